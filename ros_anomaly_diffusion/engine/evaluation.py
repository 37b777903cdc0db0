"""Evaluation on labelled frames: metrics.json, per-frame overlays and a picture sheet."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..core.data import OOD, Frame, is_ood_label
from ..core.detector import Detector, FrameResult
from ..core.metrics import f_star, frame_metrics, pixel_metrics, smiyc_metrics
from ..core.visualize import overlay, panel, save_rgb, save_sheet


def label_metrics(scores: list[np.ndarray], frame_scores: list[float], labels: list[np.ndarray],
                  frame_threshold: float | None = None) -> dict:
    """Every metric of the notes for score maps and frame scores against their labels (0 ID,
    1 OOD, 255 ignore); with frame_threshold also the frame flags' rates. Also what the demo
    reports for results that arrived over ROS."""
    return {
        **pixel_metrics(scores, labels),
        "f_star": f_star(scores, labels),
        **smiyc_metrics(scores, labels),
        **frame_metrics(frame_scores, [is_ood_label(y) for y in labels], frame_threshold),
    }


def summarize(results: list[FrameResult], labels: list[np.ndarray], det: Detector) -> dict:
    """`label_metrics` of detector outputs, with the detector's latency, NFE and thresholds."""
    latency = [r.timings_ms["total"] for r in results]
    return {
        **label_metrics([r.score for r in results], [r.frame_score for r in results], labels,
                        det.frame_threshold),
        "latency_ms": float(np.median(latency)),
        "nfe": det.nfe,
        "mask_threshold": det.mask_threshold,
        "frame_threshold": det.frame_threshold,
        "frames": len(results),
    }


def evaluate(det: Detector, frames: list[Frame], out_dir: str | Path | None = None,
             progress: bool = True, sheet_rows: int = 8) -> dict:
    """Run `det` on labelled frames; with out_dir, also write metrics.json, overlays/ and sheet.png."""
    out = Path(out_dir) if out_dir else None
    unlabelled = [f.name for f in frames if f.label_path is None]
    if unlabelled:
        raise ValueError(f"evaluation needs labelled frames; unlabelled: {unlabelled[:3]}")
    if not frames:
        raise ValueError("no frames to evaluate")
    results, labels, rows = [], [], []
    for f in tqdm(frames, desc="evaluating", disable=not progress):
        rgb, label = f.rgb(), f.label()
        r = det.process(rgb)
        results.append(r)
        labels.append(label)
        if out is not None:
            save_rgb(overlay(rgb, r.score, r.mask, det.settings.post.overlay_alpha), out / "overlays" / f"{f.name}.png")
            if len(rows) < sheet_rows:
                flag = "OOD" if r.is_ood else "ID"
                rows.append(panel(rgb, r.score, r.mask, r.edited, label,
                                  f"{f.name}  frame score {r.frame_score:.3f} -> {flag}"))
    metrics = summarize(results, labels, det)
    metrics["variant"] = det.variant.name
    metrics["per_frame"] = {f.name: {"frame_score": r.frame_score, "flag": r.is_ood,
                                     "ood_pixels": int(np.count_nonzero(y == OOD))}
                            for f, r, y in zip(frames, results, labels)}
    if out is not None:
        save_sheet(rows, out / "sheet.png")
        write_metrics(out / "metrics.json", metrics)
    return metrics


def write_metrics(path: Path, metrics: dict) -> None:
    """metrics.json; JSON has no NaN, so undefined metrics are written as null."""
    path.write_text(json.dumps(_finite(metrics), indent=2))


def _finite(d):
    if isinstance(d, dict):
        return {k: _finite(v) for k, v in d.items()}
    return None if isinstance(d, float) and not math.isfinite(d) else d
