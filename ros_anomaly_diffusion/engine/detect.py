"""Offline detection on unlabelled frames (a user's own images, a bag, a video): what the node
would publish, written to disk.

OUT/overlays/<name>.png   the frame with the anomalies coloured and outlined
OUT/masks/<name>.png      mono8, 255 = anomalous pixel
OUT/scores/<name>.png     16-bit grey, the score map in [0, 1] times 65535 (lossless enough to
                          threshold again; read back with cv2.IMREAD_UNCHANGED / 65535)
OUT/frames.csv            name, frame_score, ood (the per-frame decision), ood_filtered (the
                          temporal filter the node applies, flag_* settings, over the frames in
                          order), anomalous_fraction, latency_ms
"""
from __future__ import annotations

import csv
from collections.abc import Iterable
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from ..core.detector import Detector
from ..core.temporal import FlagFilter
from ..core.visualize import overlay, save_rgb

COLUMNS = ("name", "frame_score", "ood", "ood_filtered", "anomalous_fraction", "latency_ms")


def write_score_png(score: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.round(np.clip(score, 0.0, 1.0) * 65535).astype(np.uint16))


def detect(det: Detector, frames: Iterable[tuple[str, np.ndarray]], out_dir: str | Path, total: int | None = None,
           progress: bool = True) -> dict:
    """Run `det` on (name, uint8 RGB) frames in order, write the outputs above; returns a summary
    (frames, flagged per-frame and filtered, median latency). A frame the detector refuses (too
    small) is skipped and counted, never ends the run."""
    out = Path(out_dir)
    for sub in ("overlays", "masks", "scores"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    flags = FlagFilter(det.settings.temporal.flag_filter())
    rows, skipped = [], []
    with open(out / "frames.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for name, rgb in tqdm(frames, total=total, desc="detecting", unit="frame", disable=not progress):
            try:
                r = det.process(rgb)
            except ValueError as err:
                skipped.append(f"{name}: {err}")
                continue
            filtered = flags.update(r.frame_score, det.frame_threshold)
            save_rgb(overlay(rgb, r.score, r.mask, det.settings.post.overlay_alpha), out / "overlays" / f"{name}.png")
            cv2.imwrite(str(out / "masks" / f"{name}.png"), r.mask.astype(np.uint8) * 255)
            write_score_png(r.score, out / "scores" / f"{name}.png")
            row = {"name": name, "frame_score": f"{r.frame_score:.6f}", "ood": int(r.is_ood),
                   "ood_filtered": int(filtered), "anomalous_fraction": f"{float(r.mask.mean()):.6f}",
                   "latency_ms": f"{r.timings_ms['total']:.1f}"}
            writer.writerow(row)
            rows.append(row)
    latency = [float(r["latency_ms"]) for r in rows]
    return {"frames": len(rows), "skipped": skipped, "ood_frames": sum(r["ood"] for r in rows),
            "ood_filtered_frames": sum(r["ood_filtered"] for r in rows),
            "latency_ms": float(np.median(latency)) if latency else None, "out": str(out)}
