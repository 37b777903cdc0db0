#!/usr/bin/env python3
"""The flag's threshold from windows of the calibration frames' maps as well as the frames
(docs/results.md, "Two calibration frames per fold"): more samples of the frame score from few
ID frames. For each row, each fold's calibration frames (recorded in its checkpoint) are scored
again, their frame score is also taken on 3x3 half-size and 4x4 third-size windows of the map,
and the false alarms and detections of the fold's saved test frames are counted at each
threshold: the stored one's rule (the 1 - frame_fpr quantile of the frames), the same quantile
over frames and windows, and the highest of them.

usage: scripts/flag_windows.py DATA BENCH_OUT CKPT_ROOT ROW:VARIANT:FAMILY ...
       (bench --train --folds K ... --out BENCH_OUT --checkpoints CKPT_ROOT; ROW is the row's index
       in --variants, e.g. 1:feature_edit:feature_diffusion)
"""
import sys
from pathlib import Path

import numpy as np

from ros_anomaly_diffusion.config import variant_settings
from ros_anomaly_diffusion.core import checkpoint as ckpt
from ros_anomaly_diffusion.core.analysis import frame_score
from ros_anomaly_diffusion.core.data import open_dataset
from ros_anomaly_diffusion.core.detector import Detector


def window_scores(score: np.ndarray, frac: float, n: int) -> list[float]:
    """frame_score of n x n windows of frac the map's height and width, evenly spread."""
    h, w = score.shape
    wh, ww = int(h * frac), int(w * frac)
    return [frame_score(score[y:y + wh, x:x + ww])
            for y in np.linspace(0, h - wh, n).astype(int) for x in np.linspace(0, w - ww, n).astype(int)]


def main(data: str, out: Path, root: Path, specs: list[str]) -> None:
    frames = {f.name: f for f in open_dataset(data)}
    for spec in specs:
        row, variant, family = spec.split(":")
        counts: dict[str, list[tuple[int, int, int, int]]] = {}
        for fold in sorted(root.glob("fold*")):
            directory = fold / family
            calibration = ckpt.load_config(directory)["calibration"][variant]
            q = 1 - calibration["frame_fpr"]
            det = Detector(directory, variant_settings(variant, checkpoint=str(directory), device="cpu"))
            full, half, third = [], [], []
            for name in calibration["frames"]:
                score = det.process(frames[name].rgb()).score
                full.append(frame_score(score))
                half += window_scores(score, 1 / 2, 3)
                third += window_scores(score, 1 / 3, 4)
            thresholds = {"frames": np.quantile(full, q), "frames + half windows": np.quantile(full + half, q),
                          "frames + third windows": np.quantile(full + third, q), "highest": max(full + half)}
            with np.load(next((out / fold.name).glob(f"{int(row):02d}_*.npz"))) as z:
                test, ood = z["frame_scores"], np.array([frames[n].is_ood() for n in z["names"]])
            for rule, t in thresholds.items():
                counts.setdefault(rule, []).append(
                    (int((test[~ood] > t).sum()), int((~ood).sum()), int((test[ood] > t).sum()), int(ood.sum())))
        for rule, per_fold in counts.items():
            fa, n_id, det_, n_ood = np.sum(per_fold, axis=0)
            print(f"{variant}, {rule}: false alarms {fa} of {n_id}, detections {det_} of {n_ood}")


if __name__ == "__main__":
    if len(sys.argv) < 5:
        sys.exit(__doc__)
    main(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4:])
