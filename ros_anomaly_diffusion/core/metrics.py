"""Evaluation metrics (method notes sec. 4): pixel AP / AUROC / FPR95, object level (f*, SMIYC), frame level.

Conventions shared with the rest of the package: labels are uint8 maps with 0 = ID,
1 = OOD and IGNORE (255) = not evaluated (see core.data); higher score = more anomalous;
a pixel / frame is flagged when its score is strictly greater than the threshold, which
is what `calibrate_threshold` is designed for. The one exception is `smiyc_metrics`'
pixel_f1_threshold, a point of the pixel PR curve: the lowest score flagged there (>=).
Scores may be any finite real numbers; no range is assumed except by `f_star`.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import cv2
import numpy as np
from sklearn.metrics import auc, roc_auc_score, roc_curve

from .data import IGNORE, OOD

MAX_PIXELS = 20_000_000
NAN = float("nan")


def _check_pairs(scores: Sequence[np.ndarray], labels: Sequence[np.ndarray]) -> None:
    if len(scores) != len(labels):
        raise ValueError(f"got {len(scores)} score maps but {len(labels)} label maps")
    for i, (s, y) in enumerate(zip(scores, labels)):
        if np.shape(s) != np.shape(y):
            raise ValueError(f"pair {i}: score map shape {np.shape(s)} != label shape {np.shape(y)}")


def _score_map(s: np.ndarray) -> np.ndarray:
    """A score map as floats of its own precision, at least float32: rounding float64
    scores to float32 would tie distinct scores, and which ones depends on their offset
    and scale (1e7 + s ties everything in [1e7, 1e7 + 1)), or overflow them to inf."""
    s = np.asarray(s)
    return s.astype(np.result_type(s.dtype, np.float32), copy=False)


def _pooled_pixels(scores: Sequence[np.ndarray], labels: Sequence[np.ndarray], seed: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Scores (`_score_map`: float32, or float64 if any map is) and OOD flags of every
    non-IGNORE pixel, a seeded uniform random subset of about MAX_PIXELS of them above
    that, to bound memory and time. ValueError if an evaluated pixel's score is NaN or
    infinite (any finite real number is a valid score)."""
    total = sum(int(np.count_nonzero(np.asarray(y) != IGNORE)) for y in labels)
    keep_frac = min(1.0, MAX_PIXELS / max(total, 1))
    rng = np.random.default_rng(seed)
    s_parts, y_parts = [], []
    for i, (s, y) in enumerate(zip(scores, labels)):
        y = np.asarray(y).ravel()
        keep = y != IGNORE
        s = _score_map(s).ravel()
        if not np.isfinite(s[keep]).all():
            raise ValueError(f"score map {i} has NaN or infinite scores on evaluated (non-IGNORE) pixels; "
                             "scores must be finite real numbers")
        if keep_frac < 1.0:  # subsample per map so the full pool is never materialised
            keep &= rng.random(y.size, dtype=np.float32) < keep_frac
        s_parts.append(s[keep])
        y_parts.append(y[keep] == OOD)
    s_all = np.concatenate(s_parts) if s_parts else np.zeros(0, np.float32)
    y_all = np.concatenate(y_parts) if y_parts else np.zeros(0, bool)
    return s_all, y_all


def pixel_metrics(scores: Sequence[np.ndarray], labels: Sequence[np.ndarray], seed: int = 0) -> dict[str, float]:
    """Pixel-level metrics pooled over every pixel whose label is not IGNORE.

    Returns pixel_ap (average precision = AUC-PR, OOD positive), pixel_auroc, fpr95 and the
    counts n_pixels / n_ood_pixels. The three ranking metrics are NaN when the evaluated
    pixels lack either class (nothing to rank). Above MAX_PIXELS evaluated pixels a
    seeded uniform random subset of about MAX_PIXELS is used (`_pooled_pixels`).
    """
    _check_pairs(scores, labels)
    s_all, y_all = _pooled_pixels(scores, labels, seed)
    n_ood = int(y_all.sum())
    out: dict[str, float] = {"n_pixels": y_all.size, "n_ood_pixels": n_ood}
    if n_ood == 0 or n_ood == y_all.size:
        return out | {"pixel_ap": NAN, "pixel_auroc": NAN, "fpr95": NAN}
    # One ROC sweep serves all three metrics: on millions of pixels the sort dominates and
    # separate sklearn calls would do it three times. drop_intermediate=False keeps every
    # threshold, so AP is exact and the FPR95 point is not lost among collinear points.
    fpr, tpr, _ = roc_curve(y_all, s_all, drop_intermediate=False)
    tps, fps = tpr[1:] * n_ood, fpr[1:] * (y_all.size - n_ood)
    return out | {
        # As average_precision_score: sum over thresholds of recall gain x precision.
        "pixel_ap": float(np.sum(np.diff(tpr) * tps / (tps + fps))),
        "pixel_auroc": float(auc(fpr, tpr)),
        # FPR at the first threshold (high -> low) reaching 95% TPR: the lowest FPR for it.
        "fpr95": float(fpr[np.argmax(tpr >= 0.95)]),
    }


def _components(mask: np.ndarray, min_area: int) -> tuple[np.ndarray, int]:
    """8-connected components with the ones under min_area removed, relabelled 1..n."""
    n, lab, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = np.zeros(n, np.int32)
    big = np.flatnonzero(stats[1:, cv2.CC_STAT_AREA] >= min_area) + 1
    keep[big] = np.arange(1, len(big) + 1)
    return keep[lab], len(big)


# Component-level evaluation of the SegmentMeIfYouCan benchmark (SMIYC, Chan et al. 2021),
# following github.com/SegmentMeIfYouCan/road-anomaly-benchmark:
# road_anomaly_benchmark/metrics/instance_segmentation.py (default_instancer: components,
# size limits, void; segment_metrics: sIoU, PPV, TP/FN/FP; MetricSegment: configs, the
# tau-averaged F1 of `aggregate`, the pixel-F1 threshold of `get_thresh_p_from_curve`) and
# pixel_classification_curves.py (curves_from_cmats: best_f1_threshold).
TAUS = np.linspace(0.25, 0.75, 11)
# The benchmark's Obstacle Track sizes (its Anomaly Track uses 100 / 500 on 2048x1024
# frames, too coarse for our 688x550 and 176x216 ones): GT components under MIN_GT_AREA
# pixels are void, predicted components under MIN_PRED_AREA pixels are discarded.
MIN_GT_AREA = 10
MIN_PRED_AREA = 50


class _Truth(NamedTuple):
    valid: np.ndarray  # label != IGNORE: where predicted components are formed
    roi: np.ndarray  # valid minus the void small GT components: where pixels are counted
    gt_roi: np.ndarray  # kept GT instance (1..n_gt, 0 = ID) of each roi pixel
    n_gt: int


def _truth(label: np.ndarray, min_gt_area: int) -> _Truth:
    label = np.asarray(label)
    valid, ood = label != IGNORE, label == OOD
    gt, n_gt = _components(ood, min_gt_area)
    roi = valid & ~(ood & (gt == 0))
    return _Truth(valid, roi, gt[roi], n_gt)


def _segment_scores(t: _Truth, pred: np.ndarray, min_pred_area: int) -> tuple[np.ndarray, np.ndarray]:
    """sIoU of each kept GT instance and PPV of each predicted component in one frame.

    As default_instancer, predicted components are formed and size-filtered on the
    prediction minus IGNORE pixels *before* small GT objects are voided; only roi pixels
    count afterwards, so a component lying wholly on void is not evaluated at all.
    """
    pred_lab, n_pred = _components(pred & t.valid, min_pred_area)
    # inter[g, p]: roi pixels of GT instance g (0: ID ground) in component p (0: unpredicted).
    inter = np.bincount(t.gt_roi * (n_pred + 1) + pred_lab[t.roi],
                        minlength=(t.n_gt + 1) * (n_pred + 1)).reshape(t.n_gt + 1, n_pred + 1)
    gt_area = inter[1:].sum(1)
    inter = inter[:, 1:]
    area = inter.sum(0)
    seen = area > 0
    ppv = inter[1:, seen].sum(0) / area[seen]
    # (K u P) \ A = K plus the ID pixels of P, the components touching K: their pixels
    # on other GT instances A do not count against K.
    union = gt_area + (inter[1:] > 0) @ inter[0]
    return inter[1:].sum(1) / union, ppv


def _pooled_segment_scores(truths: list[_Truth], preds: Sequence[np.ndarray], min_pred_area: int
                           ) -> tuple[np.ndarray, np.ndarray]:
    per_frame = [_segment_scores(t, p, min_pred_area) for t, p in zip(truths, preds)]
    return np.concatenate([s for s, _ in per_frame]), np.concatenate([p for _, p in per_frame])


def _f1_per_tau(siou: np.ndarray, ppv: np.ndarray, taus: np.ndarray) -> np.ndarray:
    tp = (siou[None, :] >= taus[:, None]).sum(1)
    fp = (ppv[None, :] < taus[:, None]).sum(1)
    return 2 * tp / (2 * tp + (siou.size - tp) + fp)


def f_star(
    scores: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    thresholds: Sequence[float] | np.ndarray | None = None,
    taus: Sequence[float] | np.ndarray = TAUS,
    min_gt_area: int = MIN_GT_AREA,
    min_pred_area: int = MIN_PRED_AREA,
) -> float:
    """Object-level f*: best over thresholds of the SMIYC component F1 averaged over taus.

    Scores are assumed to be normalised anomaly maps in [0, 1] already (ours are); they are
    clipped to [0, 1] rather than min-max rescaled per frame, which would invent anomalies
    in normal frames. thresholds default to 0.05, 0.10, ..., 0.95; prediction = score > t.
    At each threshold the components are scored as the benchmark does (see
    `smiyc_metrics`, same taus and size limits); picking the threshold that suits the
    component F1 best makes f* an optimistic figure, the benchmark's own is `f1_smiyc`.
    NaN when no frame has a GT instance of >= min_gt_area pixels.
    """
    _check_pairs(scores, labels)
    thresholds = np.arange(1, 20) * 0.05 if thresholds is None else np.asarray(thresholds, float)
    taus = np.asarray(taus, float)
    truths = [_truth(y, min_gt_area) for y in labels]
    if sum(t.n_gt for t in truths) == 0:
        return NAN
    clipped = [np.clip(np.asarray(s, np.float32), 0.0, 1.0) for s in scores]
    best = 0.0
    for thr in thresholds:
        siou, ppv = _pooled_segment_scores(truths, [s > thr for s in clipped], min_pred_area)
        best = max(best, float(np.mean(_f1_per_tau(siou, ppv, taus))))
    return best


def smiyc_metrics(
    scores: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    taus: Sequence[float] | np.ndarray = TAUS,
    min_gt_area: int = MIN_GT_AREA,
    min_pred_area: int = MIN_PRED_AREA,
    seed: int = 0,
) -> dict[str, float]:
    """The SMIYC component-level figures at the benchmark's single threshold.

    pixel_f1_threshold: the threshold t of the best pixel F1 (pixel_f1) on the pooled PR
    curve of the non-IGNORE pixels (pooled and subsampled as in `pixel_metrics`): the score
    of that curve point, in the scores' own units, and prediction = score >= t (the
    threshold sklearn's precision_recall_curve gives that point, so pixel_f1 is the F1 of
    the very pixels flagged). Of equally good thresholds the highest, as the
    benchmark's high-to-low sweep (its curve bins the scores, ours is exact). Scores may be
    any finite reals (NaN or inf on an evaluated pixel: ValueError): only their order
    matters, so a * scores + b with a > 0 flags the same pixels, with threshold a * t + b,
    and gives the same figures, as long as it keeps distinct scores distinct (float64 maps
    are kept float64 for that). At t, per frame, GT instances are the
    8-connected components of OOD pixels; those under min_gt_area pixels are void: their
    pixels are removed from the evaluation like IGNORE ones, so predicting them is neither
    right nor wrong and does not count toward a component's area. Predicted components are
    the 8-connected components of the prediction minus IGNORE pixels, those under
    min_pred_area pixels discarded.
      sIoU(K) = |K n P| / |(K u P) \\ A|  for a GT instance K, with P the union of the
          predicted components meeting K and A the other GT instances' pixels;
      PPV(P) = |P n GT| / |P|  for a predicted component P (its non-void pixels).
    For each tau: TP = #GT with sIoU >= tau, FN = #GT - TP, FP = #components with
    PPV < tau, pooled over frames; F1(tau) = 2TP / (2TP + FN + FP).
    Returns pixel_f1, pixel_f1_threshold, f1_smiyc (mean F1 over taus), siou_mean (over GT
    instances) and ppv_mean (over predicted components). All NaN when the evaluated pixels
    lack either class; f1_smiyc and siou_mean NaN without a kept GT instance, ppv_mean
    without a predicted component.
    """
    _check_pairs(scores, labels)
    out = dict.fromkeys(("pixel_f1", "pixel_f1_threshold", "f1_smiyc", "siou_mean", "ppv_mean"), NAN)
    s_all, y_all = _pooled_pixels(scores, labels, seed)
    n_ood = int(y_all.sum())
    if n_ood == 0 or n_ood == y_all.size:
        return out
    fpr, tpr, thr = roc_curve(y_all, s_all, drop_intermediate=False)
    # Whole counts, so that equally good thresholds give bit-equal F1 and tie as they should.
    tp, fp = np.rint(tpr * n_ood), np.rint(fpr * (y_all.size - n_ood))
    f1 = 2 * tp / (tp + fp + n_ood)  # 2TP / (2TP + FP + FN)
    # First of the ties: thresholds run high to low. f1[0] (thr[0] = inf, nothing flagged)
    # is 0 and some point has TP > 0, so thr[i] is one of the scores.
    i = int(np.argmax(f1))
    t = np.float64(thr[i])  # a float64 scalar: compared with float32 maps without rounding
    truths = [_truth(y, min_gt_area) for y in labels]
    siou, ppv = _pooled_segment_scores(truths, [_score_map(s) >= t for s in scores], min_pred_area)
    return out | {
        "pixel_f1": float(f1[i]),
        "pixel_f1_threshold": float(t),
        "f1_smiyc": float(np.mean(_f1_per_tau(siou, ppv, np.asarray(taus, float)))) if siou.size else NAN,
        "siou_mean": float(siou.mean()) if siou.size else NAN,
        "ppv_mean": float(ppv.mean()) if ppv.size else NAN,
    }


def frame_metrics(
    frame_scores: Sequence[float] | np.ndarray,
    frame_is_ood: Sequence[bool] | np.ndarray,
    threshold: float | None = None,
) -> dict[str, float]:
    """Frame-level OOD flag quality: frame_auroc (NaN unless both kinds of frame occur).

    With a threshold (flag = score > threshold) also false_alarm_rate (flagged share of
    ID frames) and detection_rate (flagged share of OOD frames), NaN when there are none.
    """
    s = np.asarray(frame_scores, float).ravel()
    y = np.asarray(frame_is_ood, bool).ravel()
    if s.shape != y.shape:
        raise ValueError(f"got {s.size} frame scores but {y.size} OOD flags")
    n_ood = int(y.sum())
    out = {
        "n_id": y.size - n_ood,
        "n_ood": n_ood,
        "frame_auroc": float(roc_auc_score(y, s)) if 0 < n_ood < y.size else NAN,
    }
    if threshold is not None:
        flagged = s > threshold
        out["false_alarm_rate"] = float(flagged[~y].mean()) if n_ood < y.size else NAN
        out["detection_rate"] = float(flagged[y].mean()) if n_ood else NAN
    return out


def calibrate_threshold(id_scores: np.ndarray, target_fpr: float) -> float:
    """Threshold flagging about target_fpr of the ID calibration scores (flag = score > t).

    The (1 - target_fpr) quantile (linear interpolation) of all given ID scores, which may
    be per-pixel scores (mask threshold) or per-frame scores (frame threshold).
    """
    if not 0.0 <= target_fpr <= 1.0:
        raise ValueError(f"target_fpr must be in [0, 1], got {target_fpr}")
    s = np.asarray(id_scores, float).ravel()
    if s.size == 0 or not np.all(np.isfinite(s)):
        raise ValueError("need a non-empty array of finite ID scores to calibrate a threshold")
    return float(np.quantile(s, 1.0 - target_fpr))
