"""Checkpoints: a folder with config.json plus one .safetensors file per network.

Nothing here unpickles: tensors come only from safetensors, configs only from JSON,
so a checkpoint from an untrusted source cannot run code. Every failure names the
file and what is wrong with it.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

FORMAT = "ros_anomaly_diffusion/1"
CONFIG = "config.json"
PICKLE_SUFFIXES = {".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle"}
# The model shipped with the package (its MODEL_CARD.md says how it was made): what an empty
# `checkpoint` setting means.
DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "models" / "default"


def resolve(checkpoint: str | Path | None) -> Path:
    """The checkpoint folder a setting names; empty or None: the shipped default model."""
    return DEFAULT_MODEL if checkpoint is None or str(checkpoint) == "" else Path(checkpoint)


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated, pickled or does not match its config."""


def save(directory: str | Path, config: dict, tensors: dict[str, dict[str, torch.Tensor]]) -> Path:
    """Write config.json and `<name>.safetensors` for each entry of `tensors`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, state in tensors.items():
        state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
        save_file(state, str(directory / f"{name}.safetensors"))
    _write_config(directory, {**config, "format": FORMAT, "files": sorted(f"{n}.safetensors" for n in tensors)})
    return directory


def update_config(directory: str | Path, **changes) -> dict:
    """Replace top-level entries of config.json (calibration, say), tensors untouched."""
    config = {**load_config(directory), **changes}
    _write_config(Path(directory), config)
    return config


def _write_config(directory: Path, config: dict) -> None:
    tmp = directory / (CONFIG + ".tmp")
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True))
    tmp.replace(directory / CONFIG)  # atomic: a crash never leaves half a config


def _pickles_in(directory: Path) -> list[Path]:
    try:
        return sorted(p for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())
    except OSError:
        return []


def load_config(directory: str | Path) -> dict:
    directory = Path(directory)
    if directory.suffix in PICKLE_SUFFIXES or directory.is_file():
        raise CheckpointError(f"{directory}: checkpoints are folders with config.json and .safetensors "
                              "files; pickle files (.pt/.pth/.ckpt/.bin) are refused because loading "
                              "them can execute code")
    path = directory / CONFIG
    if not path.is_file():
        pickles = _pickles_in(directory) if directory.is_dir() else []
        if pickles:
            raise CheckpointError(f"{pickles[0]}: a pickle file, refused because loading it can execute code "
                                  f"({path} is missing; checkpoints are config.json plus .safetensors files)")
        raise CheckpointError(f"{path}: missing (is {directory} a checkpoint folder?)")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format is {config.get('format') if isinstance(config, dict) else None!r}, "
                              f"expected {FORMAT!r}")
    return config


def load_tensors(directory: str | Path, name: str) -> dict[str, torch.Tensor]:
    path = Path(directory) / f"{name}.safetensors"
    if not path.is_file():
        pickles = [p for p in _pickles_in(Path(directory)) if p.stem == name]
        if pickles:
            raise CheckpointError(f"{path}: missing; {pickles[0]} is a pickle file, refused because loading "
                                  "it can execute code (convert it to safetensors)")
        raise CheckpointError(f"{path}: missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable or truncated safetensors file ({err})") from err


def load_into(module: nn.Module, directory: str | Path, name: str) -> nn.Module:
    """Load `<name>.safetensors` into `module`, insisting on an exact match."""
    state = load_tensors(directory, name)
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        detail = "; ".join(f"{what}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                           for what, keys in (("missing", missing), ("unexpected", unexpected),
                                              ("wrong shape", wrong)) if keys)
        raise CheckpointError(f"{Path(directory) / (name + '.safetensors')}: does not match the network "
                              f"described in {CONFIG} ({detail})")
    module.load_state_dict(state)
    return module
