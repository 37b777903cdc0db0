"""The package's parameter files: config/<variant>.yaml, read as Settings.

They are ROS 2 parameter files (the launch files pass them to the node), so reading
them means knowing the `/**: ros__parameters:` layout and, in a colcon install, the
ament index: both stay out of the core's model code (what the Detector runs takes
Settings). Its readers: the CLI, the ROS tools, and the orchestration above the core
(engine/training.py calibrates, engine/bench.py evaluates, each with the variant's file).
"""
from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from .core.settings import NAMES, VARIANT_NAMES, Settings

PACKAGE = "ros_anomaly_diffusion"


def config_dir() -> Path:
    """The folder holding config/<variant>.yaml: installed share/ (pip or colcon) or the source tree."""
    candidates = [Path(sys.prefix) / "share" / PACKAGE / "config", Path(__file__).resolve().parents[1] / "config"]
    try:  # optional: only a colcon install has an ament index
        from ament_index_python.packages import get_package_share_directory

        candidates.insert(0, Path(get_package_share_directory(PACKAGE)) / "config")
    except (ImportError, LookupError, ValueError, OSError):
        pass  # no ament index: not a colcon install
    for c in candidates:
        if c.is_dir():
            return c
    raise FileNotFoundError(f"no config folder for {PACKAGE}; looked in {[str(c) for c in candidates]}")


def variant_params_file(variant: str) -> Path:
    """config/<variant>.yaml, the variant's parameter file (launch files, CLI, tools); a
    FileNotFoundError naming the registered variants when there is none."""
    path = config_dir() / f"{variant}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no parameter file for variant {variant!r}; variants: "
                                f"{', '.join(VARIANT_NAMES)}")
    return path


def checkpoint_variant(checkpoint: str | Path = "") -> str:
    """The variant the checkpoint (empty: the shipped model) was trained for, from its config.json
    (core.variants.checkpoint_variant); CheckpointError when it cannot be read."""
    from .core import checkpoint as ckpt
    from .core.variants import checkpoint_variant as recorded

    return recorded(ckpt.load_config(ckpt.resolve(str(checkpoint))))


def variant_settings(variant: str, **overrides: Any) -> Settings:
    """Settings of config/<variant>.yaml (the launch file's parameter file), then overrides. An
    empty variant is the one the checkpoint (overrides' `checkpoint`, empty: the shipped model)
    was trained for."""
    variant = variant or checkpoint_variant(overrides.get("checkpoint") or "")
    doc = yaml.safe_load(variant_params_file(variant).read_text()) or {}
    params = doc.get("/**", {}).get("ros__parameters", {})
    values = {k: v for k, v in params.items() if k in NAMES}
    values.update({k: v for k, v in overrides.items() if v is not None})
    values["variant"] = variant
    return Settings.from_dict(values)


def parse_assignments(items: Iterable[str], where: str) -> dict[str, Any]:
    """['steps=10', 'quantization=int8'] -> {'steps': 10, 'quantization': 'int8'}: each value
    read as YAML, as a parameter file would hold it (`--set`, a bench row's overrides)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{where}: expected key=value, got {item!r}")
        out[key] = yaml.safe_load(value)
    return out
