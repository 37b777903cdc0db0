#!/usr/bin/env python3
"""The DDPM baseline's guidance forms on labelled frames (docs/results.md, "The DDPM baseline's
guidance forms"): pooled pixel AP, pixel AUROC and frame AUROC of the ddpm variant for each
ROW of settings, e.g. `ddpm_guidance_reference=noised,ddpm_guidance_scale=3000`.

Every row's map is the raw feature distance halved (1 - cosine lies in [0, 2]): one linear map
for all rows, so no row's calibration, nor the [0, 1] clamp of an uncalibrated checkpoint,
takes part in the comparison. Frames go through the network six at a time.

usage: scripts/ddpm_reference.py CHECKPOINT DATA ROW [ROW ...]
"""
import sys
import time

from sklearn.metrics import roc_auc_score

from ros_anomaly_diffusion.config import variant_settings
from ros_anomaly_diffusion.core.data import is_ood_label, open_dataset
from ros_anomaly_diffusion.core.detector import Detector
from ros_anomaly_diffusion.core.metrics import pixel_metrics
from ros_anomaly_diffusion.engine.bench_rows import parse_row


def main(checkpoint: str, data: str, rows: list[str]) -> None:
    frames = list(open_dataset(data))
    rgbs, labels = [f.rgb() for f in frames], [f.label() for f in frames]
    y = [is_ood_label(label) for label in labels]
    for row in rows:
        settings = variant_settings("ddpm", checkpoint=checkpoint, **parse_row(f"ddpm:{row}")[1])
        det = Detector(checkpoint, settings)
        det.scorer.scaled = lambda raw: raw / 2  # the same linear map for every row
        start, results = time.perf_counter(), []
        for i in range(0, len(rgbs), 6):
            results += det.process_batch(rgbs[i:i + 6])
        m = pixel_metrics([r.score for r in results], labels)
        print(f"{row}: pixel AP {m['pixel_ap']:.3f}, pixel AUROC {m['pixel_auroc']:.3f}, frame AUROC "
              f"{roc_auc_score(y, [r.frame_score for r in results]):.2f} ({time.perf_counter() - start:.0f} s)",
              flush=True)


if __name__ == "__main__":
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
