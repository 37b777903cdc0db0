#!/usr/bin/env python3
"""Frame-level scores beside the editing variants' own, on a cross-validated bench run's saved
maps (docs/results.md, "A frame-level prior for feature_edit"): pooled frame AUROC of

* each saved row's frame score, and of its map z-scored again (to_unit inverted): the top-0.5 %
  mean, the mean, and their sum;
* the inversion reading of each fold's feature_diffusion checkpoint, and its combinations with
  the feature_edit row's frame score (in [0, 1], or as z-scores).

usage: scripts/frame_prior.py DATA BENCH_OUT CKPT_ROOT   (bench --train --folds K ... --out BENCH_OUT
       --checkpoints CKPT_ROOT, with a feature_edit row)
"""
import json
import sys
from pathlib import Path

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score

from ros_anomaly_diffusion.config import variant_settings
from ros_anomaly_diffusion.core.analysis import frame_score
from ros_anomaly_diffusion.core.data import is_ood_label, open_dataset
from ros_anomaly_diffusion.core.detector import Detector


def z_of_unit(u: np.ndarray) -> np.ndarray:
    """feature_space.to_unit inverted: a score in [0, 1] -> its ID z-score."""
    c = 2 * np.clip(u, 1e-6, 1 - 1e-6) - 1
    return 3 + 2 * c / np.sqrt(1 - c * c)


def main(data: str, out: Path, root: Path) -> None:
    by_name = {f.name: f for f in open_dataset(data)}
    folds = sorted(out.glob("fold*/frames.json"))
    rows = sorted(p.name for p in folds[0].parent.glob("*.npz"))
    frame_scores = {}
    for row in rows:
        y, own, top, mean = [], [], [], []
        for names_file in folds:
            with np.load(names_file.parent / row) as z:
                own += z["frame_scores"].tolist()
                for i, name in enumerate(z["names"]):
                    s = z_of_unit(z[f"score_{i}"].astype(np.float64))
                    y.append(is_ood_label(by_name[str(name)].label()))
                    top.append(frame_score(s))
                    mean.append(s.mean())
        frame_scores[row] = np.array(own)
        print(f"{row}: frame score {roc_auc_score(y, own):.3f}, z-scored map: top-k mean "
              f"{roc_auc_score(y, top):.3f}, mean {roc_auc_score(y, mean):.3f}, "
              f"their sum {roc_auc_score(y, np.add(top, mean)):.3f}")
    inversion = []
    for names_file in folds:
        ckpt = root / names_file.parent.name / "feature_diffusion"
        det = Detector(ckpt, variant_settings("inversion", checkpoint=str(ckpt), segments="none"))
        inversion += [det.process(by_name[n].rgb()).frame_score for n in json.loads(names_file.read_text())]
    inv, edit = np.array(inversion), frame_scores[next(r for r in rows if r.endswith("_feature_edit.npz"))]
    for name, s in [("inversion", inv), ("feature_edit", edit), ("mean of the two", (inv + edit) / 2),
                    ("max of the two", np.maximum(inv, edit)), ("rank mean", rankdata(inv) + rankdata(edit)),
                    ("sum of the two as z-scores", z_of_unit(inv) + z_of_unit(edit))]:
        print(f"{name}: frame AUROC {roc_auc_score(y, s):.3f}")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    main(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]))
