"""Benchmark: every listed variant on the same frames, one table.

A row is a variant name with optional setting overrides, `ddim:steps=10` or
`ddim:quantization=int8`. Each row runs in a fresh subprocess so its peak memory (process
RSS high-water mark on CPU, CUDA peak allocation on GPU) is its own. On a CPU most of that
RSS is the libraries (~1 GB, the same for every row), so `infer_mem_mb` adds the part the
variant owns: the peak above the RSS the process had, libraries and frames loaded, just
before the detector was built (the kernel's high-water mark is reset there). On a GPU
both columns are the CUDA peak. Rows that quantize read a checkpoint written by
`quantize_checkpoint`, so model_mb is the real file size.

Cross-validated (`bench_folds`, `bench --train --folds K`): the frames are split into K
folds (`assign_folds`: whole scenes per fold, OOD frames spread); for each fold every
family is trained and calibrated on the other folds' frames only (CKPT_ROOT/fold<i>) and
every row runs on the fold's frames, saving its score maps; the metrics are then pooled
over all folds' frames, exactly as one run over all of them would compute them.
"""
from __future__ import annotations

import csv
import json
import math
import os
import platform
import random
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..core.procmem import reset_peak_rss, status_mb

COLUMNS = ("variant", "model", "pixel_ap", "pixel_auroc", "fpr95", "f_star", "f1_smiyc", "frame_auroc", "latency_ms",
           "peak_mem_mb", "infer_mem_mb", "model_mb", "nfe")
# --folds: the metrics pooled over every fold's frames, the OOD flag's rates on ID and OOD frames
# (each fold's frames flagged at that fold's calibrated threshold), pixel AP per fold (mean, std with ddof=1),
# the number of folds the row was scored on (a fold without frames of the --frames kind is
# skipped) and the mean seconds per fold that `train` (fit + calibration) of the row's family took.
FOLD_COLUMNS = COLUMNS + ("false_alarm_rate", "detection_rate", "ap_fold_mean", "ap_fold_std", "folds", "train_s")


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


def recorded_rows(root: Path) -> list[str]:
    """The rows of `bench --checkpoints CKPT_ROOT` without --variants: one per family checkpoint
    in CKPT_ROOT (CKPT_ROOT/<family>), the variant it was trained for, in registry order."""
    from ..core import checkpoint as ckpt
    from ..core.variants import FAMILY_DEFAULT_VARIANT, checkpoint_variant

    rows = [checkpoint_variant(ckpt.load_config(root / family)) for family in FAMILY_DEFAULT_VARIANT
            if (root / family / ckpt.CONFIG).is_file()]
    if not rows:
        raise ValueError(f"no checkpoint in {root} (CKPT_ROOT/<family>: "
                         f"{', '.join(FAMILY_DEFAULT_VARIANT)}): name the rows with --variants")
    return rows


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
    checkpoint = checkpoint_for(Path(ckpt_root), name, dict(overrides))
    overrides.pop("quantization", None), overrides.pop("quantize_layers", None)
    chosen = select(open_dataset(data), frames)
    if names is not None:
        wanted = set(names)
        chosen = [f for f in chosen if f.name in wanted]
    chosen = chosen[: max_frames or None]
    if not chosen:
        raise ValueError(f"no frames to run {spec!r} on in {data} (frames={frames})")
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


def train_all(train_data: str, ckpt_root: Path, rows: list[str], steps: int, device: str,
              frames: str = "id", image_size: tuple[int, int] | None = None, preset: str = "small",
              seed: int = 0, names: Sequence[str] | None = None) -> dict[str, float]:
    """Train each family that a row needs once on train_data (frames: id = ID frames only; with
    `names`, only those frames); returns the seconds each family's `train` (fit and
    calibration) took."""
    from ..core.variants import get_variant
    from .training import TrainOptions, train

    seconds: dict[str, float] = {}
    for spec in rows:
        name, _ = parse_row(spec)
        family = get_variant(name).family
        if family in seconds:
            continue
        print(f"training {family} (for {name}) in {Path(ckpt_root) / family} ...", flush=True)
        t0 = time.perf_counter()
        train(train_data, Path(ckpt_root) / family,
              TrainOptions(variant=name, steps=steps, device=device, frames=frames, image_size=image_size,
                           preset=preset, seed=seed), names=names)
        seconds[family] = time.perf_counter() - t0
    return seconds


def write_table(rows: list[dict], out: Path, columns: Sequence[str] = COLUMNS, notes: str = "") -> None:
    out.mkdir(parents=True, exist_ok=True)
    _write_csv(rows, out / "results.csv", columns)
    fmt = lambda v: "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else (  # noqa: E731
        f"{v:.3f}" if isinstance(v, float) else str(v))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    (out / "results.md").write_text("\n".join(lines) + "\n" + (f"\n{notes.rstrip()}\n" if notes else ""))
    _plot(rows, out / "ap_vs_latency.png")


def _write_csv(rows: list[dict], path: Path, columns: Sequence[str]) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


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


def _row_process(data: str, ckpt_root: str, spec: str, frames: str, device: str, max_frames: int,
                 timeout_s: float, names_file: Path | None = None, scores_out: Path | None = None) -> dict:
    """run_row in a fresh subprocess; its result."""
    cmd = [sys.executable, "-m", "ros_anomaly_diffusion.engine.bench", data, ckpt_root, spec, frames, device,
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


def bench(data: str, ckpt_root: str, rows: list[str], out: str, frames: str = "all", device: str = "cpu",
          max_frames: int = 0, timeout_s: float = 3600) -> list[dict]:
    results = []
    for spec in rows:
        print(f"benchmarking {spec} ...", flush=True)
        results.append(_row_process(data, ckpt_root, spec, frames, device, max_frames, timeout_s))
        write_table(results, Path(out))  # after every row: a long run that is stopped keeps its rows
    return results


# --------------------------------------------------------------------------- cross-validation


def assign_folds(frames: Sequence, k: int, seed: int = 0) -> list[list[str]]:
    """Split labelled frames into k folds of frame names (each sorted), seeded and deterministic.

    Frames of one scene (`splits.scene_of`: the name before the last '_') go to the same fold,
    so near-duplicate frames of a scene never straddle training and test. Only when there are
    fewer scenes than folds are scenes cut, the largest first, into two runs of consecutive
    frames (each with an OOD frame where it has two or more, then as even as possible).
    Whole scenes are then dealt greedily: scenes with OOD frames first (most OOD frames,
    then most frames first; equal ones in a seeded random order), each to the fold with the
    fewest OOD frames so far (then the fewest frames); scenes without OOD frames to the fold
    with the fewest frames. Every fold gets at least one scene and, when there are at least
    k OOD frames in k or more scenes, at least one OOD frame (is_ood: >= 100 OOD pixels).
    """
    from ..core.splits import scene_of

    frames = sorted(frames, key=lambda f: f.name)
    if k < 2:
        raise ValueError(f"need at least 2 folds, got {k}")
    if len(frames) < k:
        raise ValueError(f"{len(frames)} frames cannot make {k} folds")
    unlabelled = [f.name for f in frames if f.label_path is None]
    if unlabelled:
        raise ValueError(f"cross-validation needs labelled frames; unlabelled: {unlabelled[:3]}")
    ood = {f.name: bool(f.is_ood()) for f in frames}
    scenes: dict[str, list[str]] = {}
    for f in frames:
        scenes.setdefault(scene_of(f), []).append(f.name)
    units = list(scenes.values())
    while len(units) < k:
        units.sort(key=len, reverse=True)  # stable: of equally long scenes the first by name
        units = _cut(units[0], ood) + units[1:]
    def n_ood(unit: list[str]) -> int:
        return sum(ood[n] for n in unit)

    random.Random(seed).shuffle(units)
    units.sort(key=lambda u: (-n_ood(u), -len(u)))  # stable: the seeded order among equal scenes
    folds: list[list[str]] = [[] for _ in range(k)]
    fold_ood = [0] * k
    for u in units:
        if n_ood(u):
            i = min(range(k), key=lambda j: (fold_ood[j], len(folds[j])))
        else:
            i = min(range(k), key=lambda j: (len(folds[j]), fold_ood[j]))
        folds[i] += u
        fold_ood[i] += n_ood(u)
    return [sorted(f) for f in folds]


def _cut(names: list[str], ood: dict[str, bool]) -> list[list[str]]:
    """Two runs of consecutive frames: each with an OOD frame if there are two, then even."""
    total = sum(ood[n] for n in names)

    def cost(c: int) -> tuple:
        left = sum(ood[n] for n in names[:c])
        return (total >= 2 and not 0 < left < total, abs(2 * c - len(names)), abs(2 * left - total))

    c = min(range(1, len(names)), key=cost)
    return [names[:c], names[c:]]


def fold_info(frames: Sequence, folds: list[list[str]], seed: int) -> dict:
    """The fold assignment as recorded in folds.json and results.md."""
    from ..core.splits import scene_of

    by_name = {f.name: f for f in frames}
    return {"k": len(folds), "seed": seed, "folds": [
        {"frames": names, "ood_frames": [n for n in names if by_name[n].is_ood()],
         "scenes": sorted({scene_of(by_name[n]) for n in names})} for names in folds]}


def _claim_fold_root(fold_root: Path, test: list[str], train: list[str]) -> None:
    """Record which frames a fold's checkpoints may be trained on; refuse a folder whose
    checkpoints were trained on another split (resuming those would train on test frames)."""
    record = {"test_frames": test, "train_frames": train}
    path = fold_root / "frames.json"
    if path.is_file():
        if json.loads(path.read_text()) != record:
            raise ValueError(f"{fold_root} holds checkpoints of another fold assignment (see {path}); "
                             "use a new --checkpoints folder or delete it")
    elif fold_root.exists() and any(fold_root.iterdir()):
        raise ValueError(f"{fold_root} is not empty and has no frames.json: not a fold of this run; "
                         "use a new --checkpoints folder")
    fold_root.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1))


def _slug(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", spec)


def machine(device: str) -> str:
    """One line: CPU model, cores, memory, and the accelerator when the device is one."""
    cpu = platform.processor() or platform.machine()
    mem = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
        kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal"))
        mem = f", {kb / 2**20:.0f} GiB"
    except (OSError, StopIteration, ValueError):
        pass
    text = f"{cpu}, {os.cpu_count()} CPU cores{mem}, device {device}"
    if device.startswith("cuda"):
        import torch

        text += f" ({torch.cuda.get_device_name(torch.device(device))})"
    return text


def pool_folds(data: str, npz_files: list[Path]) -> dict:
    """label_metrics over every frame of the given per-fold score files (run_row's scores_out)
    against the labels of `data`: the pooled pixel, object and frame metrics, and the median
    latency over all those frames."""
    from ..core.data import open_dataset
    from .evaluation import label_metrics

    from ..core.data import is_ood_label
    from ..core.metrics import frame_metrics

    by_name = {f.name: f for f in open_dataset(data)}
    scores, frame_scores, labels, latency, flags = [], [], [], [], []
    for path in npz_files:
        with np.load(path, allow_pickle=False) as z:
            names = [str(n) for n in z["names"]]
            scores += [z[f"score_{i}"] for i in range(len(names))]
            frame_scores += z["frame_scores"].tolist()
            latency += z["latency_ms"].tolist()
            # each fold's frames flagged at that fold's calibrated threshold (files without one: no rates)
            known = "frame_threshold" in z
            flags += (z["frame_scores"] > z["frame_threshold"] if known else np.full(len(names), np.nan)).tolist()
        labels += [by_name[n].label() for n in names]
    m = label_metrics(scores, frame_scores, labels)
    m.update(latency_ms=float(np.median(latency)), frames=len(labels))
    # the flags' rates, as frame_metrics defines them, of flags given as 0/1 scores
    rates = frame_metrics(flags, [is_ood_label(y) for y in labels], 0.5) if not np.isnan(flags).any() else {}
    m.update({c: rates.get(c, math.nan) for c in ("false_alarm_rate", "detection_rate")})
    return m


def bench_folds(data: str, ckpt_root: str, rows: list[str], out: str, k: int, seed: int = 0, frames: str = "all",
                device: str = "cpu", max_frames: int = 0, train_steps: int = 3000, train_frames: str = "all",
                image_size: tuple[int, int] | None = None, preset: str = "small", timeout_s: float = 3600
                ) -> list[dict]:
    """K-fold cross-validated benchmark: for fold i, every family a row needs is trained and
    calibrated in CKPT_ROOT/fold<i> on the other folds' frames only (train_frames: all = OOD
    pixels masked out of the loss; id = OOD frames left out), then every row runs on fold i's
    frames (those of the `frames` kind, at most max_frames of them) in its own process and
    saves its score maps to OUT/fold<i>/. The table pools every fold's frames."""
    from ..core.data import open_dataset
    from ..core.splits import select
    from ..core.variants import get_variant

    out_dir, root = Path(out), Path(ckpt_root)
    dataset = open_dataset(data)
    folds = assign_folds(dataset, k, seed)
    info = fold_info(dataset, folds, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "folds.json").write_text(json.dumps(info, indent=1))
    for i, fold in enumerate(info["folds"]):
        print(f"fold {i}: {len(fold['frames'])} frames ({len(fold['ood_frames'])} OOD), "
              f"scenes {', '.join(fold['scenes'])}: {' '.join(fold['frames'])}", flush=True)
    families = {spec: get_variant(parse_row(spec)[0]).family for spec in rows}
    of_kind = {f.name for f in select(dataset, frames)}
    _preload_libraries()  # imported before the first fold's training, so its train_s does not include them
    times: dict[str, list[float]] = {}
    per_fold: list[dict] = []
    npz: list[list[Path]] = [[] for _ in rows]
    for i, test in enumerate(folds):
        train_names = sorted(n for j, fold in enumerate(folds) if j != i for n in fold)
        fold_root, fold_out = root / f"fold{i}", out_dir / f"fold{i}"
        if not of_kind.intersection(test):
            print(f"fold {i}: no frames of kind {frames!r} to test on; skipped", flush=True)
            continue
        _claim_fold_root(fold_root, test, train_names)
        print(f"fold {i}: training on {len(train_names)} frames, testing on {len(test)}", flush=True)
        for family, s in train_all(data, fold_root, rows, train_steps, device, train_frames, image_size, preset,
                                   seed, train_names).items():
            times.setdefault(family, []).append(s)
        (out_dir / "train_times.json").write_text(json.dumps(
            {"seconds": times, "what": "engine.training.train per family and fold: fit, checkpoint, calibration",
             "steps": train_steps, "machine": machine(device)}, indent=1))
        fold_out.mkdir(parents=True, exist_ok=True)
        names_file = fold_out / "frames.json"
        names_file.write_text(json.dumps(test))
        for r, spec in enumerate(rows):
            print(f"fold {i}: benchmarking {spec} ...", flush=True)
            scores = fold_out / f"{r:02d}_{_slug(spec)}.npz"
            row = _row_process(data, str(fold_root), spec, frames, device, max_frames, timeout_s, names_file, scores)
            per_fold.append(dict(row, fold=i, row=r))
            npz[r].append(scores)
        _write_csv(per_fold, out_dir / "per_fold.csv", ("fold",) + COLUMNS)
    results = []
    for r, spec in enumerate(rows):
        folds_of_row = [f for f in per_fold if f["row"] == r]
        m = pool_folds(data, npz[r])
        aps = np.array([f["pixel_ap"] for f in folds_of_row], float)
        aps = aps[np.isfinite(aps)]
        row = {c: m[c] for c in COLUMNS + ("false_alarm_rate", "detection_rate") if c in m}
        row.update(variant=spec, model=folds_of_row[0]["model"], nfe=folds_of_row[0]["nfe"],
                   peak_mem_mb=max(f["peak_mem_mb"] for f in folds_of_row),
                   infer_mem_mb=max(f["infer_mem_mb"] for f in folds_of_row),
                   model_mb=float(np.mean([f["model_mb"] for f in folds_of_row])),
                   ap_fold_mean=float(aps.mean()) if aps.size else math.nan,
                   ap_fold_std=float(aps.std(ddof=1)) if aps.size > 1 else math.nan,
                   folds=len(folds_of_row), train_s=float(np.mean(times[families[spec]])))
        results.append({c: row[c] for c in FOLD_COLUMNS})
    write_table(results, out_dir, FOLD_COLUMNS, _fold_notes(info, data, frames, max_frames, device))
    return results


def _fold_notes(info: dict, data: str, frames: str, max_frames: int, device: str) -> str:
    n = sum(len(f["frames"]) for f in info["folds"])
    lines = [(f"{info['k']}-fold cross-validation (seed {info['seed']}) over the {n} frames of {data}: each "
              f"fold's frames ({frames}{f', at most {max_frames}' if max_frames else ''}) were scored by models "
              "trained and calibrated on the other folds' frames only. Metrics pooled over every fold's test frames; "
              "ap_fold_mean / ap_fold_std: pixel AP per fold (std with ddof=1); train_s: mean seconds of training "
              "and calibration of the row's family per fold (train_times.json). Per-fold rows: per_fold.csv."),
             "", "Folds (* = OOD frame):", ""]
    for i, f in enumerate(info["folds"]):
        ood = set(f["ood_frames"])
        lines.append(f"- fold {i} ({len(f['frames'])} frames, {len(ood)} OOD): "
                     + ", ".join(n + ("*" if n in ood else "") for n in f["frames"]))
    lines += ["", f"Machine: {machine(device)}."]
    return "\n".join(lines)


if __name__ == "__main__":  # one row in a fresh process: prints its JSON on the last line
    d, root, spec, fr, dev, mx = sys.argv[1:7]
    names_arg, scores_arg = (sys.argv[7:9] + [None, None])[:2]
    wanted = json.loads(Path(names_arg).read_text()) if names_arg else None
    print(json.dumps(run_row(d, root, spec, fr, dev, int(mx), wanted, scores_arg)))
