"""The benchmark's report: metrics pooled over folds, results.csv / results.md, the AP-vs-latency
plot (rows that coincide, a variant and its quantized copies, share one label) and the notes
that say what was run where."""
from __future__ import annotations

import csv
import math
import os
import platform
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .bench_rows import COLUMNS, parse_row

# --folds: the metrics pooled over every fold's frames, the OOD flag's rates on ID and OOD frames
# (each fold's frames flagged at that fold's calibrated threshold), pixel AP per fold (mean, std with ddof=1),
# the number of folds the row was scored on (a fold without frames of the --frames kind is
# skipped) and the mean seconds per fold that `train` (fit + calibration) of the row's family took.
FOLD_COLUMNS = COLUMNS + ("false_alarm_rate", "detection_rate", "ap_fold_mean", "ap_fold_std", "folds", "train_s")


def write_table(rows: list[dict], out: Path, columns: Sequence[str] = COLUMNS, notes: str = "") -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "results.csv", columns)
    fmt = lambda v: "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else (  # noqa: E731
        f"{v:.3f}" if isinstance(v, float) else str(v))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    (out / "results.md").write_text("\n".join(lines) + "\n" + (f"\n{notes.rstrip()}\n" if notes else ""))
    plot(rows, out / "ap_vs_latency.png")


def write_csv(rows: list[dict], path: Path, columns: Sequence[str]) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def plot_groups(rows: list[dict]) -> list[tuple[str, list[dict]]]:
    """(label, rows) per point group of the plot: a row and the rows that differ from it only in
    `quantization`/`quantize_layers` (its fp16 and int8 copies, which land on top of it) share
    one label, "feature_edit (+fp16, int8)"."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        name, overrides = parse_row(r["variant"])
        rest = tuple(sorted((k, str(v)) for k, v in overrides.items() if k not in ("quantization", "quantize_layers")))
        groups.setdefault((name, rest), []).append(r)
    out = []
    for members in groups.values():
        base = next((m for m in members if "quantization" not in parse_row(m["variant"])[1]), members[0])
        copies = [parse_row(m["variant"])[1].get("quantization", "fp32") for m in members if m is not base]
        out.append((base["variant"] + (f" (+{', '.join(copies)})" if copies else ""), members))
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, members in plot_groups([r for r in rows if r.get("pixel_ap") is not None
                                       and not np.isnan(r["pixel_ap"])]):
        points = ax.scatter([m["latency_ms"] for m in members], [m["pixel_ap"] for m in members])
        ax.annotate(label, (members[0]["latency_ms"], members[0]["pixel_ap"]), fontsize=7,
                    color=points.get_facecolor()[0])
    ax.set_xscale("log")
    ax.set_xlabel("median latency per frame (ms, log)")
    ax.set_ylabel("pixel AP")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
    from ..core.data import is_ood_label, open_dataset
    from ..core.metrics import frame_metrics
    from .evaluation import label_metrics

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


def fold_notes(info: dict, data: str, frames: str, max_frames: int, device: str) -> str:
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
