"""One benchmark row: a variant with setting overrides, run on frames in a fresh process.

A row is a variant name with optional overrides, `ddim:steps=10` or
`ddim:quantization=int8`. Each row runs in a fresh subprocess (`row_process`) so its peak
memory (process RSS high-water mark on CPU, CUDA peak allocation on GPU) is its own. On a
CPU most of that RSS is the libraries (~1 GB, the same for every row), so `infer_mem_mb`
adds the part the variant owns: the peak above the RSS the process had, libraries and
frames loaded, just before the detector was built (the kernel's high-water mark is reset
there). On a GPU both columns are the CUDA peak. Rows that quantize read a checkpoint
written by `quantize_checkpoint`, so model_mb is the real file size.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..config import parse_assignments
from ..core.procmem import reset_peak_rss, status_mb

COLUMNS = ("variant", "model", "pixel_ap", "pixel_auroc", "fpr95", "f_star", "f1_smiyc", "frame_auroc", "latency_ms",
           "peak_mem_mb", "infer_mem_mb", "model_mb", "nfe")


def parse_row(spec: str) -> tuple[str, dict]:
    """'ddim:steps=10,quantization=int8' -> ('ddim', {'steps': 10, 'quantization': 'int8'})."""
    name, _, rest = spec.partition(":")
    return name, parse_assignments(filter(None, rest.split(",")), f"benchmark row {spec!r}")


def checkpoint_for(root: Path, variant: str, overrides: dict) -> tuple[Path, dict]:
    """(checkpoint, settings overrides): CKPT_ROOT/<family> (or the family's old name, for a root
    trained before a rename), or its quantized copy (written once) for a row with
    `quantization` (and `quantize_layers`), which are checkpoint choices, not settings."""
    from ..core.variants import FAMILY_ALIASES, get_variant

    settings = {k: v for k, v in overrides.items() if k not in ("quantization", "quantize_layers")}
    family = get_variant(variant).family
    base = root / family
    if not base.exists():
        base = next((root / old for old, new in FAMILY_ALIASES.items() if new == family and (root / old).exists()),
                    base)
    precision = overrides.get("quantization", "none")
    if precision == "none":
        return base, settings
    layers = overrides.get("quantize_layers", "selected")
    out = root / f"{base.name}-{precision}-{layers}"
    if not (out / "config.json").is_file():
        from .quantize import quantize_checkpoint

        quantize_checkpoint(base, out, precision, layers)
    return out, settings


def peak_memory_mb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return status_mb("VmHWM")  # peak resident set size of this process


def preload_libraries() -> None:
    """Import what building a detector imports, so their RSS counts as baseline."""
    import cv2  # noqa: F401
    import skimage.segmentation  # noqa: F401
    from diffusers import AutoencoderDC, Transformer2DModel, UNet2DModel  # noqa: F401


def run_row(data: str, ckpt_root: str, spec: str, frames: str, device: str, max_frames: int,
            names: Sequence[str] | None = None, scores_out: str | None = None) -> dict:
    """One row, in this process (called in a fresh subprocess by `bench`). With `names`, only
    those frames (of the `frames` kind) are run; with `scores_out`, the score maps (float32, at
    the labels' resolution, as the metrics see them), frame scores and latencies are saved
    there as an .npz (arrays only, no pickle) for metrics pooled over several runs."""
    from ..config import variant_settings
    from ..core.data import open_dataset
    from ..core.detector import Detector
    from ..core.splits import select
    from .evaluation import summarize

    name, overrides = parse_row(spec)
    checkpoint, overrides = checkpoint_for(Path(ckpt_root), name, overrides)
    chosen = select(open_dataset(data), frames)
    if names is not None:
        wanted = set(names)
        chosen = [f for f in chosen if f.name in wanted]
    chosen = chosen[: max_frames or None]
    if not chosen:
        raise ValueError(f"no frames to run {spec!r} on in {data} (frames={frames})")
    frames_in = [(f.rgb(), f.label()) for f in chosen]
    preload_libraries()
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
    if scores_out:
        Path(scores_out).parent.mkdir(parents=True, exist_ok=True)
        np.savez(scores_out, names=np.array([f.name for f in chosen]),
                 frame_scores=np.array([r.frame_score for r in results], np.float64),
                 frame_threshold=np.float64(det.frame_threshold),
                 latency_ms=np.array([r.timings_ms["total"] for r in results], np.float64),
                 **{f"score_{i}": np.asarray(r.score, np.float32) for i, r in enumerate(results)})
    files = [checkpoint / n for n in det.config["files"]]
    peak = peak_memory_mb(det.device)
    m.update(variant=spec, peak_mem_mb=peak, infer_mem_mb=peak if det.device.type == "cuda" else peak - baseline_mb,
             model_mb=sum(p.stat().st_size for p in files) / 2**20)
    m["model"] = model_description(det.config)
    return {k: m[k] for k in COLUMNS}


def model_description(config: dict) -> str:
    """What a row ran, for the table: family, input size, the denoiser (kind, and the receptive
    field of a bounded one) and the latent family's autoencoder."""
    desc = f"{config.get('family')} {'x'.join(map(str, config.get('image_size', [])))}"
    from ..core.networks.denoisers import receptive_field

    net = config.get("denoiser")
    if net is not None:
        desc += f" {net['kind']}"
        if net["kind"] == "local":
            desc += f"(R={receptive_field(net['config'])})"
    ae = config.get("autoencoder")
    if ae is not None:
        desc += f" ae={ae.get('kind', 'dcae')}"
        if ae.get("kind", "dcae") == "dcae":
            desc += f"({'trained' if ae.get('source') in ('trained', 'untrained') else 'pretrained'})"
    return desc


def row_process(data: str, ckpt_root: str, spec: str, frames: str, device: str, max_frames: int,
                 timeout_s: float, names_file: Path | None = None, scores_out: Path | None = None) -> dict:
    """run_row in a fresh subprocess; its result."""
    cmd = [sys.executable, "-m", "ros_anomaly_diffusion.engine.bench_rows", data, ckpt_root, spec, frames, device,
           str(max_frames)]
    if names_file is not None:
        cmd += [str(names_file), str(scores_out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark row {spec!r} failed:\n{proc.stderr[-2000:]}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    print("  " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
          flush=True)
    return row


if __name__ == "__main__":  # one row in a fresh process: prints its JSON on the last line
    d, root, spec, fr, dev, mx = sys.argv[1:7]
    names_arg, scores_arg = (sys.argv[7:9] + [None, None])[:2]
    wanted = json.loads(Path(names_arg).read_text()) if names_arg else None
    print(json.dumps(run_row(d, root, spec, fr, dev, int(mx), wanted, scores_arg)))
