"""core.metrics on small cases worked out by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from ros_anomaly_diffusion.core import metrics
from ros_anomaly_diffusion.core.data import IGNORE, OOD
from ros_anomaly_diffusion.engine.evaluation import label_metrics, write_metrics
from ros_anomaly_diffusion.core.metrics import calibrate_threshold, f_star, frame_metrics, pixel_metrics, smiyc_metrics


# ---- pixel level ----

def test_pixel_metrics_hand_computed():
    # Evaluated pixels: ID scores 0.1, 0.4; OOD scores 0.35, 0.8. The two IGNORE pixels
    # (one with the top score) must not count.
    # Ranking 0.8(+) 0.4(-) 0.35(+) 0.1(-): AP = 0.5 * 1 + 0.5 * 2/3 = 5/6.
    # AUROC: of the 4 (OOD, ID) pairs only (0.35, 0.4) is misordered -> 3/4.
    # TPR reaches 0.95 only at threshold 0.35, where ID 0.4 is above -> FPR 1/2.
    scores = [np.array([[0.1, 0.4], [0.99, 0.0]]), np.array([[0.35, 0.8]])]
    labels = [np.array([[0, 0], [IGNORE, IGNORE]], np.uint8), np.array([[1, 1]], np.uint8)]
    m = pixel_metrics(scores, labels)
    assert m["pixel_ap"] == pytest.approx(5 / 6)
    assert m["pixel_auroc"] == pytest.approx(0.75)
    assert m["fpr95"] == pytest.approx(0.5)
    assert m["n_pixels"] == 4 and m["n_ood_pixels"] == 2


def test_fpr95_picks_highest_threshold_reaching_95_tpr():
    # 20 OOD pixels scored 0.5, 1.5, ..., 19.5 and 10 ID pixels scored 0, 1, ..., 9.
    # 19/20 = 95% TPR first at threshold 1.5; ID scores above it: 2..9 -> 8/10.
    ood = np.arange(20) + 0.5
    idd = np.arange(10, dtype=float)
    labels = np.r_[np.ones(20), np.zeros(10)].astype(np.uint8)
    m = pixel_metrics([np.r_[ood, idd]], [labels])
    assert m["fpr95"] == pytest.approx(0.8)
    # 20 (OOD, ID) pairs tied at scores 20, 19, ..., 1: the ROC points (k/20, k/20) are
    # collinear. TPR 0.95 is reached at k = 19 -> FPR 0.95 (a ROC with the collinear
    # points dropped would jump straight to FPR 1).
    tied = np.repeat(np.arange(20, 0, -1, dtype=float), 2)
    m = pixel_metrics([tied], [np.tile([1, 0], 20).astype(np.uint8)])
    assert m["fpr95"] == pytest.approx(0.95)


def test_pixel_metrics_agree_with_sklearn_on_ties():
    # pixel_metrics derives AP and AUROC from one ROC sweep; they must equal sklearn's own.
    rng = np.random.default_rng(2)
    labels = (rng.random((40, 50)) < 0.1).astype(np.uint8)
    scores = np.round(labels * 0.2 + rng.random(labels.shape), 1)  # 11 levels: many ties
    y = labels.ravel() == 1
    m = pixel_metrics([scores], [labels])
    assert m["pixel_ap"] == pytest.approx(average_precision_score(y, scores.ravel()), abs=1e-12)
    assert m["pixel_auroc"] == pytest.approx(roc_auc_score(y, scores.ravel()), abs=1e-12)


def test_pixel_metrics_perfect_and_inverted():
    rng = np.random.default_rng(0)
    labels = (rng.random((32, 32)) < 0.2).astype(np.uint8)
    perfect = labels + 0.01 * rng.random((32, 32))
    m = pixel_metrics([perfect], [labels])
    assert (m["pixel_ap"], m["pixel_auroc"], m["fpr95"]) == (1.0, 1.0, 0.0)
    m = pixel_metrics([-perfect], [labels])
    assert m["pixel_auroc"] == 0.0 and m["fpr95"] == 1.0
    assert m["pixel_ap"] < 0.3  # about the OOD prevalence (0.2), far from 1


def test_pixel_metrics_degenerate_is_nan():
    s = np.array([[0.2, 0.9]])
    for labels in ([[0, 0]], [[1, 1]], [[IGNORE, IGNORE]], [[0, IGNORE]]):
        m = pixel_metrics([s], [np.array(labels, np.uint8)])
        assert all(math.isnan(m[k]) for k in ("pixel_ap", "pixel_auroc", "fpr95")), labels
    assert math.isnan(pixel_metrics([], [])["pixel_auroc"])


def test_pixel_metrics_shape_mismatch():
    with pytest.raises(ValueError, match="shape"):
        pixel_metrics([np.zeros((2, 2))], [np.zeros((2, 3), np.uint8)])
    with pytest.raises(ValueError, match="1 score maps but 2"):
        pixel_metrics([np.zeros((2, 2))], [np.zeros((2, 2), np.uint8)] * 2)


def test_pixel_metrics_subsampling(monkeypatch: pytest.MonkeyPatch):
    rng = np.random.default_rng(1)
    labels = [(rng.random((100, 100)) < 0.3).astype(np.uint8) for _ in range(2)]
    scores = [y * 0.5 + rng.random(y.shape) for y in labels]
    full = pixel_metrics(scores, labels)
    monkeypatch.setattr(metrics, "MAX_PIXELS", 2000)
    sub = pixel_metrics(scores, labels)
    assert 1500 < sub["n_pixels"] < 2500 and full["n_pixels"] == 20000
    assert sub == pixel_metrics(scores, labels)  # deterministic
    assert abs(sub["pixel_auroc"] - full["pixel_auroc"]) < 0.05


# ---- object level: f* and SMIYC ----

def two_objects() -> np.ndarray:
    label = np.zeros((10, 20), np.uint8)
    label[1:5, 1:5] = 1  # GT A: 16 px
    label[1:5, 12:16] = 1  # GT B: 16 px
    return label


def test_f_star_two_objects_by_hand():
    # P1 = A plus one ID column (20 px): precision 16/20 = 0.8, sIoU(A) = 16/20 = 0.8.
    # P2 = top half of B (8 px): precision 1, sIoU(B) = 8/16 = 0.5.
    # P3 = 2x2 on ID ground: precision 0 -> a false positive at every tau.
    # tau in 0.25..0.50 (6 levels): TP 2, FN 0, FP 1 -> F1 = 4/5;
    # tau in 0.55..0.75 (5 levels): TP 1, FN 1, FP 1 -> F1 = 2/4. Mean = (6*0.8 + 5*0.5)/11.
    score = np.zeros((10, 20))
    score[1:5, 1:6] = 0.9
    score[1:3, 12:16] = 0.9
    score[7:9, 7:9] = 0.9
    expected = (6 * 0.8 + 5 * 0.5) / 11
    assert f_star([score], [two_objects()], thresholds=[0.5], min_gt_area=1, min_pred_area=1) == pytest.approx(expected)
    # Default thresholds: all below 0.9 give the same components, 0.95 gives none.
    assert f_star([score], [two_objects()], min_gt_area=1, min_pred_area=1) == pytest.approx(expected)
    # With min_pred_area=5 the 4-px false positive is dropped: F1 = 1 for tau <= 0.5, 2/3 above.
    assert f_star([score], [two_objects()], thresholds=[0.5], min_gt_area=1, min_pred_area=5) == pytest.approx(
        (6 + 5 * 2 / 3) / 11)


def test_f_star_siou_excludes_other_instances():
    # GT C = cols 1-3, GT D = cols 5-7 (rows 1-3, 9 px each), ID gap in col 4.
    # One prediction over cols 1-7 (21 px). sIoU(C) = 9 / |(C u P) \ D| = 9 / 12 = 0.75
    # (a plain IoU would be 9/21); precision 18/21. Every tau <= 0.75 -> F1 = 1.
    label = np.zeros((6, 10), np.uint8)
    label[1:4, 1:4] = 1
    label[1:4, 5:8] = 1
    score = np.zeros((6, 10))
    score[1:4, 1:8] = 1.0
    assert f_star([score], [label], thresholds=[0.5], min_gt_area=1, min_pred_area=1) == pytest.approx(1.0)


def test_f_star_ignores_predictions_on_ignore_pixels():
    label = two_objects()
    score = (label == 1).astype(float)
    score[7:9, 7:9] = 1.0  # a 4-px blob
    assert f_star([score], [label], thresholds=[0.5], min_gt_area=1, min_pred_area=1) < 1.0  # on ID ground: FP
    label[7:9, 7:9] = IGNORE
    assert f_star([score], [label], thresholds=[0.5], min_gt_area=1, min_pred_area=1) == pytest.approx(1.0)


def test_f_star_perfect_inverted_degenerate():
    label = two_objects()
    perfect = (label == 1).astype(float)
    assert f_star([perfect, np.zeros((10, 20))], [label, np.zeros((10, 20), np.uint8)],
                  min_gt_area=1, min_pred_area=1) == 1.0
    # Inverted: one big component on ID ground (precision 0) and no GT pixel predicted.
    assert f_star([1.0 - perfect], [label], min_gt_area=1, min_pred_area=1) == 0.0
    # Scores outside [0, 1] are clipped, so 7 behaves like 1.
    assert f_star([7 * perfect], [label], min_gt_area=1, min_pred_area=1) == 1.0
    assert math.isnan(f_star([perfect], [np.zeros((10, 20), np.uint8)]))
    # GT instances under min_gt_area are void: nothing left to find.
    assert math.isnan(f_star([perfect], [label], min_gt_area=17))


def test_small_gt_objects_are_void():
    # SMIYC voids GT components under min_gt_area (here 5 px): their pixels leave the evaluation.
    # GT: A (16 px, kept), S at rows 7-8 cols 12-13 and S2 at rows 7-8 cols 2-3 (4 px each, void).
    # Predicted: A exactly; P2 = rows 7-8 cols 12-15 (8 px: S plus 4 ID px); S2 exactly.
    # P2's non-void pixels are its 4 ID ones: PPV 0, a false positive at every tau (counting S as
    # hits would give 0.5, a FP only for tau > 0.5). S2's component is all void: not evaluated.
    # TP 1, FN 0, FP 1 -> F1 = 2/3 at every tau.
    label = np.zeros((10, 20), np.uint8)
    label[1:5, 1:5] = 1
    label[7:9, 12:14] = 1
    label[7:9, 2:4] = 1
    score = np.zeros((10, 20))
    score[1:5, 1:5] = score[7:9, 12:16] = score[7:9, 2:4] = 0.9
    assert f_star([score], [label], thresholds=[0.5], min_gt_area=5, min_pred_area=1) == pytest.approx(2 / 3)
    # At the best pixel-F1 threshold (0.9: flag >= 0.9 has TP 24, FP 4) the same components.
    m = smiyc_metrics([score], [label], min_gt_area=5, min_pred_area=1)
    assert m["pixel_f1_threshold"] == 0.9
    assert (m["f1_smiyc"], m["siou_mean"], m["ppv_mean"]) == pytest.approx((2 / 3, 1.0, 0.5))


def test_gt_and_prediction_minimum_sizes_are_separate():
    # GT: A (16 px) and B = rows 1-2 cols 12-14 (6 px). Predicted (8-connected components):
    # A exactly (16 px); PB = rows 1-2 cols 12-15 (8 px: B plus 2 ID px); an ID blob of 6 px.
    label = np.zeros((10, 20), np.uint8)
    label[1:5, 1:5] = 1
    label[1:3, 12:15] = 1
    score = np.zeros((10, 20))
    score[1:5, 1:5] = score[1:3, 12:16] = score[7:9, 7:10] = 0.9

    def fs(min_gt_area, min_pred_area):
        return f_star([score], [label], thresholds=[0.5], min_gt_area=min_gt_area, min_pred_area=min_pred_area)

    # B kept (6 >= 5) but PB (8 < 10) and the blob dropped: B missed. TP 1, FN 1, FP 0 -> 2/3.
    assert fs(5, 10) == pytest.approx(2 / 3)
    # B void (6 < 10); PB (8 >= 5) kept: its non-void part is 2 ID px, PPV 0; the blob too.
    # TP 1, FN 0, FP 2 -> 1/2.
    assert fs(10, 5) == pytest.approx(1 / 2)
    # A component's size counts its pixels on void GT (SMIYC filters sizes before voiding):
    # PB is 8 px >= 7, kept and a FP; the blob (6 px) is dropped. TP 1, FP 1 -> 2/3.
    assert fs(10, 7) == pytest.approx(2 / 3)


def test_smiyc_metrics_at_best_pixel_f1_threshold():
    # two_objects (A, B: 16 px each, 32 OOD px). Scores: background 0.1; A 0.9; the ID column
    # next to A (rows 1-4, col 5) 0.6; B's top half 0.8, bottom half 0.3; an ID 2x2 blob 0.85.
    # Pixel F1 = 2TP / (2TP + FP + FN), flagging score >= 0.9: 32/48; >= 0.85: 32/52;
    # >= 0.8: 48/60; >= 0.6: 48/64; >= 0.3: 64/72 = 8/9 (best); >= 0.1: 64/232.
    # pixel_f1_threshold is the score of that curve point, flagging score >= it: 0.3.
    label = two_objects()
    score = np.full((10, 20), 0.1)
    score[1:5, 1:5] = 0.9
    score[1:5, 5] = 0.6
    score[1:3, 12:16] = 0.8
    score[3:5, 12:16] = 0.3
    score[7:9, 7:9] = 0.85
    m = smiyc_metrics([score], [label], min_gt_area=1, min_pred_area=1)
    assert m["pixel_f1"] == pytest.approx(8 / 9)
    assert m["pixel_f1_threshold"] == 0.3
    # At score >= 0.3: P1 = A + column (20 px): sIoU(A) = PPV(P1) = 16/20; P2 = B: sIoU 1, PPV 1;
    # the blob: PPV 0. TP 2, FN 0, FP 1 at every tau -> F1 = 4/5.
    assert (m["f1_smiyc"], m["siou_mean"], m["ppv_mean"]) == pytest.approx((0.8, 0.9, 0.6))
    # With min_pred_area=5 the 4-px blob is discarded: F1 = 1, PPV mean (0.8 + 1) / 2.
    m = smiyc_metrics([score], [label], min_gt_area=1, min_pred_area=5)
    assert (m["f1_smiyc"], m["siou_mean"], m["ppv_mean"]) == pytest.approx((1.0, 0.9, 0.9))
    assert all(math.isnan(v) for v in smiyc_metrics([score], [np.zeros((10, 20), np.uint8)]).values())


# ---- SMIYC threshold: any real-valued scores, as the benchmark's pooled PR curve ----

def two_blobs() -> tuple[np.ndarray, np.ndarray]:
    """Scores s in [0, 1] and labels. GT A (rows 5-14, cols 3-12) scored 0.6, GT B (rows
    5-14, cols 25-34) 0.25: 100 px each. ID pixels: a 75-px halo (rows 19-23, cols 3-17)
    at 0.4, a 120-px band (rows 26-29, cols 5-34) at 0.15, the rest 0.05.
    Pixel F1 = 2TP / (2TP + FP + FN), flagging score >= 0.6: 200/300; >= 0.4: 200/375;
    >= 0.25: 400/475 (best, 275 px flagged); >= 0.15: 400/595 (395 px); >= 0.05: 400/1400.
    """
    label = np.zeros((30, 40), np.uint8)
    label[5:15, 3:13] = label[5:15, 25:35] = OOD
    s = np.full((30, 40), 0.05)
    s[5:15, 3:13] = 0.6
    s[5:15, 25:35] = 0.25
    s[19:24, 3:18] = 0.4
    s[26:30, 5:35] = 0.15
    return s, label


def sklearn_best_f1_threshold(scores: list[np.ndarray], labels: list[np.ndarray]) -> tuple[float, float]:
    """The best F1 and its threshold on sklearn's PR curve of the pooled non-IGNORE pixels."""
    keep = [np.asarray(y) != IGNORE for y in labels]
    s = np.concatenate([np.asarray(x)[k] for x, k in zip(scores, keep)])
    y = np.concatenate([np.asarray(x)[k] == OOD for x, k in zip(labels, keep)])
    precision, recall, thr = precision_recall_curve(y, s)
    with np.errstate(invalid="ignore"):
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))[:-1]
    assert np.count_nonzero(f1 == f1.max()) == 1  # no tie to break
    return float(f1.max()), float(thr[np.argmax(f1)])


def test_smiyc_threshold_follows_the_pooled_pr_curve_for_3s_minus_1():
    # The case: scores 3 s - 1 must flag the very pixels s flags, at the threshold
    # sklearn's PR curve gives the best F1 point (-0.25, 275 px), not the next lower score
    # (-0.55, which with >= would flag the 120-px band too: 395 px).
    s, label = two_blobs()
    m = smiyc_metrics([s], [label])
    m3 = smiyc_metrics([3 * s - 1], [label])
    assert m["pixel_f1_threshold"] == 0.25
    assert m3["pixel_f1_threshold"] == pytest.approx(-0.25)
    for scores, mm in (([s], m), ([3 * s - 1], m3)):
        assert (mm["pixel_f1"], mm["pixel_f1_threshold"]) == pytest.approx(sklearn_best_f1_threshold(scores, [label]))
    flagged = s >= m["pixel_f1_threshold"]
    assert np.count_nonzero(flagged) == 275
    assert np.array_equal(3 * s - 1 >= m3["pixel_f1_threshold"], flagged)
    assert m["pixel_f1"] == m3["pixel_f1"] == pytest.approx(400 / 475)
    # Components at the threshold: A and B exactly (sIoU 1, PPV 1) and the halo (PPV 0):
    # TP 2, FN 0, FP 1 at every tau -> F1 = 4/5.
    assert (m3["f1_smiyc"], m3["siou_mean"], m3["ppv_mean"]) == pytest.approx((0.8, 1.0, 2 / 3))
    assert {k: m3[k] for k in m3 if k != "pixel_f1_threshold"} == {k: m[k] for k in m if k != "pixel_f1_threshold"}


@pytest.mark.parametrize("a, b", [
    (0.01, -1.0),  # entirely negative, in [-1, -0.99]
    (1.0, -1e7),  # entirely negative, far below -1: float32 would tie every score
    (1000.0, 500.0),  # far above 1
    (1.0, 1e7),  # far above 1: float32 would tie every score
    (1e40, 0.0),  # beyond float32's range
])
def test_smiyc_threshold_at_both_ends_of_the_range(a, b):
    s, label = two_blobs()
    m = smiyc_metrics([s], [label])
    t = a * s + b
    mt = smiyc_metrics([t], [label])
    assert mt["pixel_f1_threshold"] == pytest.approx(a * 0.25 + b, rel=1e-12)
    assert (mt["pixel_f1"], mt["pixel_f1_threshold"]) == pytest.approx(sklearn_best_f1_threshold([t], [label]))
    assert np.array_equal(t >= mt["pixel_f1_threshold"], s >= m["pixel_f1_threshold"])
    assert {k: mt[k] for k in mt if k != "pixel_f1_threshold"} == {k: m[k] for k in m if k != "pixel_f1_threshold"}


def test_smiyc_threshold_ties_go_to_the_highest():
    # OOD 0.9, ID 0.8, ID 0.7, OOD 0.6, ID 0.1. Pixel F1 flagging >= 0.9: 2/3; >= 0.8: 2/4;
    # >= 0.7: 2/5; >= 0.6: 4/6 = 2/3 again; >= 0.1: 4/7. As the benchmark's high-to-low
    # sweep, the first best (0.9); sklearn's argmax over its low-to-high curve takes 0.6.
    m = smiyc_metrics([np.array([[0.9, 0.8, 0.7, 0.6, 0.1]])], [np.array([[1, 0, 0, 1, 0]], np.uint8)],
                      min_gt_area=1, min_pred_area=1)
    assert (m["pixel_f1"], m["pixel_f1_threshold"]) == (pytest.approx(2 / 3), 0.9)

def test_smiyc_metrics_refuse_non_finite_scores():
    s, label = two_blobs()
    for bad in (np.nan, np.inf, -np.inf):
        t = s.copy()
        t[0, 0] = bad
        with pytest.raises(ValueError, match="score map 1 has NaN or infinite"):
            smiyc_metrics([s, t], [label, label])
    label = label.copy()
    label[0, 0] = IGNORE  # not evaluated: its score does not matter
    assert smiyc_metrics([t], [label])["pixel_f1_threshold"] == 0.25


# Scores k / 2^30 and transforms a * s + b with a = m * 2^j, b = n / 2^10: all exact in
# float64, so a > 0 keeps distinct scores distinct and in order. Scores bunch around a
# base (as a detector's do) with a spread from 2^-30 (closer than float32 resolves) up.
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    base=st.integers(0, 2**30),
    spread=st.sampled_from([1, 2**8, 2**16, 2**21]),
    steps=st.lists(st.integers(0, 255), min_size=2 * 64, max_size=2 * 64),
    classes=st.lists(st.sampled_from([0, 0, 0, 1, 1, IGNORE]), min_size=2 * 64, max_size=2 * 64),
    m=st.integers(1, 15),
    j=st.integers(-8, 8),
    n=st.integers(-2**20, 2**20),
)
def test_smiyc_metrics_invariant_under_positive_affine_scores(base, spread, steps, classes, m, j, n):
    a, b = m * 2.0**j, n / 2**10
    s = ((base + spread * np.array(steps)) / 2**30).reshape(2, 8, 8)
    labels = list(np.array(classes, np.uint8).reshape(2, 8, 8))
    ms = smiyc_metrics(list(s), labels, min_gt_area=1, min_pred_area=1)
    mt = smiyc_metrics(list(a * s + b), labels, min_gt_area=1, min_pred_area=1)
    keys = ("pixel_f1", "f1_smiyc", "siou_mean", "ppv_mean")
    assert np.array_equal([ms[k] for k in keys], [mt[k] for k in keys], equal_nan=True)
    if math.isnan(ms["pixel_f1_threshold"]):
        assert math.isnan(mt["pixel_f1_threshold"])
        return
    assert mt["pixel_f1_threshold"] == a * ms["pixel_f1_threshold"] + b
    assert np.array_equal(a * s + b >= mt["pixel_f1_threshold"], s >= ms["pixel_f1_threshold"])


# ---- frame level and calibration ----

def test_frame_metrics_by_hand():
    scores = [0.1, 0.2, 0.3, 0.9, 0.8, 0.25]
    is_ood = [False, False, False, True, True, True]
    # OOD 0.9 and 0.8 beat all 3 ID frames, 0.25 beats 2 of them -> AUROC 8/9.
    # Threshold 0.25 (flag = score > 0.25): ID 0.3 flagged -> 1/3; OOD 0.9, 0.8 -> 2/3.
    m = frame_metrics(scores, is_ood, threshold=0.25)
    assert m["frame_auroc"] == pytest.approx(8 / 9)
    assert m["false_alarm_rate"] == pytest.approx(1 / 3)
    assert m["detection_rate"] == pytest.approx(2 / 3)
    assert m["n_id"] == 3 and m["n_ood"] == 3
    assert "false_alarm_rate" not in frame_metrics(scores, is_ood)


def test_frame_metrics_degenerate():
    m = frame_metrics([0.1, 0.7], [False, False], threshold=0.5)
    assert math.isnan(m["frame_auroc"]) and math.isnan(m["detection_rate"])
    assert m["false_alarm_rate"] == 0.5
    with pytest.raises(ValueError):
        frame_metrics([0.1, 0.2], [True])


def test_calibrate_threshold():
    id_scores = np.arange(100, dtype=float)
    t = calibrate_threshold(id_scores, 0.05)
    assert t == pytest.approx(94.05)
    assert np.mean(id_scores > t) == pytest.approx(0.05)
    assert calibrate_threshold(id_scores, 0.0) == 99.0  # nothing flagged
    assert calibrate_threshold(id_scores.reshape(10, 10), 0.05) == t  # any shape, e.g. pixel maps
    for bad_fpr in (-0.1, 1.5):
        with pytest.raises(ValueError):
            calibrate_threshold(id_scores, bad_fpr)
    with pytest.raises(ValueError):
        calibrate_threshold(np.array([]), 0.05)


def test_label_metrics_flag_frames_by_the_100_pixel_rule(tmp_path):
    """The evaluation summary (also the demo's) takes the OOD frames from core.data's rule."""
    labels = [np.zeros((10, 10), np.uint8) for _ in range(3)]
    labels[1].flat[:99] = OOD
    labels[2].flat[:100] = OOD
    scores = [y.astype(np.float32) for y in labels]
    m = label_metrics(scores, [0.1, 0.2, 0.9], labels, frame_threshold=0.5)
    assert (m["n_id"], m["n_ood"]) == (2, 1)
    assert m["frame_auroc"] == 1.0 and m["false_alarm_rate"] == 0.0 and m["detection_rate"] == 1.0
    assert m["pixel_ap"] == pytest.approx(1.0) and "f_star" in m and "f1_smiyc" in m
    write_metrics(tmp_path / "metrics.json", {"a": math.nan, "b": 1.5})
    assert (tmp_path / "metrics.json").read_text().split() == ["{", '"a":', "null,", '"b":', "1.5", "}"]
