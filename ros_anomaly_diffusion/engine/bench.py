"""Benchmark: every listed variant on the same frames, one table.

A row is a variant name with optional setting overrides, `ddim:steps=10` or
`ddim:quantization=int8`. Each row runs in a fresh subprocess so its peak memory (process
RSS high-water mark on CPU, CUDA peak allocation on GPU) is its own. On a CPU most of that
RSS is the libraries (~1 GB, the same for every row), so `infer_mem_mb` adds the part the
variant owns: the peak above the RSS the process had, libraries and frames loaded, just
before the detector was built (the kernel's high-water mark is reset there). On a GPU
both columns are the CUDA peak. Rows that quantize read a checkpoint written by
`quantize_checkpoint`, so model_mb is the real file size.
"""
from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from ..core.procmem import reset_peak_rss, status_mb

COLUMNS = ("variant", "pixel_ap", "pixel_auroc", "fpr95", "f_star", "f1_smiyc", "frame_auroc", "latency_ms",
           "peak_mem_mb", "infer_mem_mb", "model_mb", "nfe")


def parse_row(spec: str) -> tuple[str, dict]:
    """'ddim:steps=10,quantization=int8' -> ('ddim', {'steps': 10, 'quantization': 'int8'})."""
    import yaml

    name, _, rest = spec.partition(":")
    overrides = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"bad benchmark row {spec!r}: expected key=value after ':'")
        overrides[key] = yaml.safe_load(value)
    return name, overrides


def checkpoint_for(root: Path, variant: str, overrides: dict) -> Path:
    """CKPT_ROOT/<family> (or the family's old name, for a root trained before a rename), or its
    quantized copy for a quantization row (written once)."""
    from ..core.variants import FAMILY_ALIASES, get_variant

    family = get_variant(variant).family
    base = root / family
    if not base.exists():
        base = next((root / old for old, new in FAMILY_ALIASES.items() if new == family and (root / old).exists()),
                    base)
    precision = overrides.pop("quantization", "none")
    if precision == "none":
        return base
    layers = overrides.pop("quantize_layers", "selected")
    out = root / f"{base.name}-{precision}-{layers}"
    if not (out / "config.json").is_file():
        from ..core.networks.quantization import quantize_checkpoint

        quantize_checkpoint(base, out, precision, layers)
    return out


def peak_memory_mb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return status_mb("VmHWM")  # peak resident set size of this process


def _preload_libraries() -> None:
    """Import what building a detector imports, so their RSS counts as baseline."""
    import cv2  # noqa: F401
    import skimage.segmentation  # noqa: F401
    from diffusers import AutoencoderDC, Transformer2DModel, UNet2DModel  # noqa: F401


def run_row(data: str, ckpt_root: str, spec: str, frames: str, device: str, max_frames: int) -> dict:
    """One row, in this process (called in a fresh subprocess by `bench`)."""
    from ..config import variant_settings
    from ..core.data import open_dataset
    from ..core.detector import Detector
    from ..core.splits import select
    from .evaluation import summarize

    name, overrides = parse_row(spec)
    checkpoint = checkpoint_for(Path(ckpt_root), name, dict(overrides))
    overrides.pop("quantization", None), overrides.pop("quantize_layers", None)
    chosen = select(open_dataset(data), frames)[: max_frames or None]
    frames_in = [(f.rgb(), f.label()) for f in chosen]
    _preload_libraries()
    baseline_mb = reset_peak_rss()  # nan without /proc (not Linux): infer_mem_mb is n/a
    det = Detector(checkpoint, variant_settings(name, checkpoint=str(checkpoint), device=device, **overrides))
    # Warm-up: lazy initialisation, the allocator and oneDNN's kernel cache take a few calls
    # to settle (the first ones run up to 1.5x slower); at least one call, up to 5 within ~2 s.
    t_warm = time.perf_counter()
    for i in range(5):
        det.process(frames_in[i % len(frames_in)][0])
        if time.perf_counter() - t_warm > 2.0:
            break
    results, labels = [], []
    for rgb, label in frames_in:
        t0 = time.perf_counter()
        r = det.process(rgb)
        if det.device.type == "cuda":
            import torch

            torch.cuda.synchronize()
        r.timings_ms["total"] = (time.perf_counter() - t0) * 1000
        results.append(r)
        labels.append(label)
    m = summarize(results, labels, det)
    files = [checkpoint / n for n in det.config["files"]]
    peak = peak_memory_mb(det.device)
    m.update(variant=spec, peak_mem_mb=peak, infer_mem_mb=peak if det.device.type == "cuda" else peak - baseline_mb,
             model_mb=sum(p.stat().st_size for p in files) / 2**20)
    return {k: m[k] for k in COLUMNS}


def train_all(train_data: str, ckpt_root: Path, rows: list[str], steps: int, device: str,
              frames: str = "id", image_size: tuple[int, int] = (64, 80), preset: str = "small") -> None:
    """Train each family that a row needs once on train_data (frames: id = ID frames only)."""
    from ..core.variants import get_variant
    from .training import TrainOptions, train

    done = set()
    for spec in rows:
        name, _ = parse_row(spec)
        family = get_variant(name).family
        if family in done:
            continue
        done.add(family)
        print(f"training {family} (for {name}) ...", flush=True)
        train(train_data, ckpt_root / family, TrainOptions(variant=name, steps=steps, device=device, frames=frames,
                                                           image_size=image_size, preset=preset))


def write_table(rows: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with (out / "results.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    fmt = lambda v: "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else (  # noqa: E731
        f"{v:.3f}" if isinstance(v, float) else str(v))
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in COLUMNS) + " |" for r in rows]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    _plot(rows, out / "ap_vs_latency.png")


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        if r.get("pixel_ap") is not None and not np.isnan(r["pixel_ap"]):
            ax.scatter(r["latency_ms"], r["pixel_ap"])
            ax.annotate(r["variant"], (r["latency_ms"], r["pixel_ap"]), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("median latency per frame (ms, log)")
    ax.set_ylabel("pixel AP")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def bench(data: str, ckpt_root: str, rows: list[str], out: str, frames: str = "all", device: str = "cpu",
          max_frames: int = 0, timeout_s: float = 3600) -> list[dict]:
    results = []
    for spec in rows:
        print(f"benchmarking {spec} ...", flush=True)
        cmd = [sys.executable, "-m", "ros_anomaly_diffusion.engine.bench", data, ckpt_root, spec, frames, device,
               str(max_frames)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        if proc.returncode != 0:
            raise RuntimeError(f"benchmark row {spec!r} failed:\n{proc.stderr[-2000:]}")
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        print("  " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
              flush=True)
        results.append(row)
        write_table(results, Path(out))  # after every row: a long run that is stopped keeps its rows
    return results


if __name__ == "__main__":  # one row in a fresh process: prints its JSON on the last line
    d, root, spec, fr, dev, mx = sys.argv[1:7]
    print(json.dumps(run_row(d, root, spec, fr, dev, int(mx))))
