"""Tests for moleflow.measures against hand-computed cases and reference implementations."""

from __future__ import annotations

from bisect import bisect

import numpy as np
import pytest

from moleflow.measures import (
    ClassMetrics,
    aupro,
    auroc,
    average_precision,
    compute_class_metrics,
    forgetting,
    mean_metrics,
)

# --------------------------------------------------------------------------- AUROC


def test_auroc_hand_case() -> None:
    # pos scores {0.35, 0.8}, neg {0.1, 0.4}; pairs (pos > neg):
    # 0.35>0.1 yes, 0.35>0.4 no, 0.8>0.1 yes, 0.8>0.4 yes -> 3/4.
    assert auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)


def test_auroc_ties_count_half() -> None:
    # All scores equal: every pos/neg pair is a tie worth 0.5 -> 0.5.
    assert auroc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == pytest.approx(0.5)
    # pos {0.5, 0.5}, neg {0.2, 0.5}: pairs 1 + 0.5 + 1 + 0.5 = 3 of 4 -> 0.75.
    assert auroc([0, 1, 1, 0], [0.2, 0.5, 0.5, 0.5]) == pytest.approx(0.75)
    # pos {0.9, 0.6, 0.3}, neg {0.6, 0.3}: 0.9 beats both (2), 0.6: 1 + 0.5,
    # 0.3: 0 + 0.5 -> 4 of 6 = 2/3.
    assert auroc([1, 1, 0, 0, 1], [0.9, 0.6, 0.6, 0.3, 0.3]) == pytest.approx(2 / 3)


def test_auroc_perfect_inverted_and_bool_input() -> None:
    labels = np.array([False, False, True, True])
    assert auroc(labels, [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert auroc(labels, [0.4, 0.3, 0.2, 0.1]) == 0.0
    # 2-D inputs are flattened; integer scores are accepted.
    assert auroc(labels.reshape(2, 2), np.array([[1, 2], [3, 4]])) == 1.0


def test_auroc_errors() -> None:
    with pytest.raises(ValueError, match="one class"):
        auroc([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="one class"):
        auroc([0, 0], [0.1, 0.2])
    with pytest.raises(ValueError, match="length"):
        auroc([0, 1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="binary"):
        auroc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        auroc([0, 1], [0.1, np.nan])


# ---------------------------------------------------------------- average precision


def test_ap_hand_case() -> None:
    # Descending: 0.8(+) P=1 R=1/2; 0.4(-) P=1/2 R=1/2; 0.35(+) P=2/3 R=1; 0.1(-).
    # AP = 1/2 * 1 + 1/2 * 2/3 = 5/6.
    assert average_precision([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(5 / 6)


def test_ap_ties_grouped() -> None:
    # Thresholds 0.9: tp=1 fp=0 (P=1, R=1/3); 0.6: tp=2 fp=1 (P=2/3, R=2/3);
    # 0.3: tp=3 fp=2 (P=3/5, R=1). AP = (1 + 2/3 + 3/5) / 3 = 34/45.
    ap = average_precision([1, 1, 0, 0, 1], [0.9, 0.6, 0.6, 0.3, 0.3])
    assert ap == pytest.approx(34 / 45)
    # One tie group holding everything: P = 2/4, R jumps 0 -> 1 -> AP = 0.5.
    assert average_precision([1, 0, 1, 0], [0.5] * 4) == pytest.approx(0.5)


def test_ap_edge_cases() -> None:
    assert average_precision([1, 1], [0.1, 0.2]) == 1.0  # all positive: P = 1 everywhere
    with pytest.raises(ValueError, match="positive"):
        average_precision([0, 0], [0.1, 0.2])
    with pytest.raises(ValueError, match="length"):
        average_precision([0, 1], [0.1])


def test_random_against_sklearn() -> None:
    skm = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for trial in range(20):
        n = int(rng.integers(2, 3000))
        labels = rng.random(n) < rng.uniform(0.05, 0.6)
        labels[:2] = [False, True]
        scores = rng.normal(size=n) + labels * rng.uniform(0, 2)
        if trial % 2:  # heavy ties
            scores = np.round(scores, 1).astype(np.float32)
        assert auroc(labels, scores) == pytest.approx(skm.roc_auc_score(labels, scores), abs=1e-12)
        assert average_precision(labels, scores) == pytest.approx(
            skm.average_precision_score(labels, scores), abs=1e-12
        )


# ---------------------------------------------------------------------------- AUPRO


def _hand_example() -> tuple[np.ndarray, np.ndarray]:
    """2 images 4x4. Image A: region r1 = {(0,0),(1,1)} (diagonal, one region under
    8-connectivity, area 2) and r2 = {(3,3)} (area 1). Image B: r3 = 3x3 block (area 9).
    3 regions, 12 anomalous and 20 normal pixels."""
    masks = np.zeros((2, 4, 4), dtype=np.uint8)
    masks[0, 0, 0] = masks[0, 1, 1] = masks[0, 3, 3] = 1
    masks[1, :3, :3] = 1
    maps = np.full((2, 4, 4), 0.1)
    maps[0, 3, 3] = 0.9  # r2
    maps[0, 0, 3] = maps[0, 1, 3] = 0.8  # 2 normal pixels
    maps[0, 0, 0] = maps[0, 1, 1] = 0.7  # r1 ...
    maps[0, 2, 0] = maps[0, 3, 0] = 0.7  # ... tied with 2 normal pixels
    maps[1, :3, :3] = 0.6  # r3
    # The remaining 16 normal pixels score 0.1.
    return masks, maps


# Sweep of the hand example (PRO step for region r is 1/(area_r * 3)):
#   0.9: r2 -> PRO 1/3            FPR 0
#   0.8: 2 normal                 FPR 2/20 = 0.1
#   0.7: r1 (+1/3) and 2 normal   PRO 2/3, FPR 0.2 (one point: ties grouped)
#   0.6: r3 -> PRO 1              FPR 0.2
#   0.1: 16 normal                FPR 1
# Curve: (0,0) (0,1/3) (0.1,1/3) (0.2,2/3) (0.2,1) (1,1).


def test_aupro_hand_example() -> None:
    masks, maps = _hand_example()
    # Up to 0.3: 0.1*1/3 + 0.1*(1/3+2/3)/2 + 0.1*1 (interpolated PRO at 0.3 is 1)
    # = 1/30 + 1/20 + 1/10 = 11/60; normalised by 0.3 -> 11/18.
    assert aupro(masks, maps, max_fpr=0.3) == pytest.approx(11 / 18)
    # Up to 1.0 (an existing FPR, no interpolation): 1/30 + 1/20 + 0.8 * 1 = 53/60.
    assert aupro(masks, maps, max_fpr=1.0) == pytest.approx(53 / 60)
    # Up to 0.15: 1/30 + trapezoid (0.1,1/3)->(0.15,1/2) = 0.05*(5/6)/2 = 1/48;
    # (1/30 + 1/48) / 0.15 = (13/240) / 0.15 = 13/36.
    assert aupro(masks, maps, max_fpr=0.15) == pytest.approx(13 / 36)


def test_aupro_uses_8_connectivity() -> None:
    masks, maps = _hand_example()
    # Under 4-connectivity r1 would split into two regions (4 regions in all),
    # giving PRO 1/4 at FPR 0 and hence a different value than 11/18.
    val = aupro(masks, maps, max_fpr=0.3)
    assert val == pytest.approx(11 / 18)
    assert val != pytest.approx((0.1 * 0.25 + 0.1 * (0.25 + 0.75) / 2 + 0.1) / 0.3)


def test_aupro_perfect_and_constant() -> None:
    masks, _ = _hand_example()
    # Perfect: all regions fully covered at FPR 0 -> PRO 1 on [0, max_fpr].
    assert aupro(masks, masks.astype(float) + 0.5) == pytest.approx(1.0)
    # Constant: one tie group -> curve (0,0)-(1,1), area max_fpr^2 / 2 -> max_fpr / 2.
    assert aupro(masks, np.full(masks.shape, 0.3)) == pytest.approx(0.15)
    assert aupro(masks, np.zeros(masks.shape), max_fpr=0.5) == pytest.approx(0.25)


def test_aupro_normal_only_image_adds_fpr_only() -> None:
    masks, maps = _hand_example()
    # A third, fully normal image scoring below everything only appends FPR mass:
    # 20 -> 36 normal pixels. Curve: (0,1/3) (2/36,1/3) (4/36,2/3) (4/36,1) (1,1).
    masks3 = np.concatenate([masks, np.zeros((1, 4, 4), np.uint8)])
    maps3 = np.concatenate([maps, np.zeros((1, 4, 4))])
    expected = ((2 / 36) * (1 / 3) + (2 / 36) * 0.5 + (0.3 - 4 / 36) * 1) / 0.3
    assert aupro(masks3, maps3) == pytest.approx(expected)


def test_aupro_errors() -> None:
    masks, maps = _hand_example()
    with pytest.raises(ValueError, match="shape"):
        aupro(masks, maps[:, :3])
    with pytest.raises(ValueError, match="region"):
        aupro(np.zeros_like(masks), maps)
    with pytest.raises(ValueError, match="normal"):
        aupro(np.ones_like(masks), maps)
    with pytest.raises(ValueError, match="max_fpr"):
        aupro(masks, maps, max_fpr=0.0)


def _reference_aupro(masks: np.ndarray, maps: np.ndarray, max_fpr: float) -> float:
    """Transcription of MVTec AD's compute_pro + generic_util.trapezoid."""
    from scipy.ndimage import label

    fp_changes = np.zeros(masks.shape, dtype=np.uint32)
    pro_changes = np.zeros(masks.shape, dtype=np.float64)
    num_ok = num_regions = 0
    for i, gt in enumerate(masks):
        labeled, n_comp = label(gt, np.ones((3, 3), dtype=int))
        num_regions += n_comp
        ok = labeled == 0
        num_ok += ok.sum()
        fp_changes[i, ok] = 1
        for k in range(n_comp):
            region = labeled == k + 1
            pro_changes[i, region] = 1.0 / region.sum()
    scores = maps.ravel()
    idx = np.argsort(scores)[::-1]
    scores_sorted = scores[idx]
    fprs = np.cumsum(fp_changes.ravel()[idx]).astype(np.float64) / num_ok
    pros = np.cumsum(pro_changes.ravel()[idx]) / num_regions
    keep = np.append(np.diff(scores_sorted) != 0, True)
    x = np.concatenate(([0.0], np.clip(fprs[keep], 0, 1)))
    y = np.concatenate(([0.0], np.clip(pros[keep], 0, 1)))
    correction = 0.0
    if max_fpr not in x:
        ins = bisect(x, max_fpr)
        y_i = y[ins - 1] + (y[ins] - y[ins - 1]) * (max_fpr - x[ins - 1]) / (x[ins] - x[ins - 1])
        correction = 0.5 * (y_i + y[ins - 1]) * (max_fpr - x[ins - 1])
    m = x <= max_fpr
    x, y = x[m], y[m]
    return (np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])) + correction) / max_fpr


def test_aupro_random_against_reference() -> None:
    pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(1)
    for trial in range(8):
        masks = rng.random((3, 16, 16)) < 0.15  # many small, irregular regions
        masks[0, 0, 0], masks[0, 0, 1] = True, False
        maps = rng.random(masks.shape) + 0.5 * masks
        if trial % 2:
            maps = np.round(maps, 1)  # heavy ties
        max_fpr = float(rng.choice([0.05, 0.3, 1.0]))
        assert aupro(masks, maps, max_fpr) == pytest.approx(
            _reference_aupro(masks, maps, max_fpr), abs=1e-9
        )


# ------------------------------------------------------------------------ forgetting


def test_forgetting_hand_matrix() -> None:
    nan = np.nan
    mat = [
        [0.90, nan, nan, 0.5],
        [0.80, 0.70, nan, 0.6],
        [0.85, 0.75, 0.60, nan],
    ]
    # col0: max(0.90, 0.80) - 0.85 = 0.05; col1: 0.70 - 0.75 = -0.05 (improved,
    # not clipped); col2: a single value -> NaN; col3: final value missing -> NaN.
    out = forgetting(mat)
    np.testing.assert_allclose(out[:2], [0.05, -0.05])
    assert np.isnan(out[2]) and np.isnan(out[3])
    assert np.isnan(forgetting([[0.9, 0.8]])).all()  # one step: nothing to forget
    with pytest.raises(ValueError):
        forgetting([0.1, 0.2])


# ------------------------------------------------------------------ class metrics


def test_compute_class_metrics_and_mean() -> None:
    masks, maps = _hand_example()
    image_labels = [1, 1]
    image_scores = [0.9, 0.6]
    # Image AUROC needs both classes: add a normal image scoring 0.0 everywhere.
    masks3 = np.concatenate([masks, np.zeros((1, 4, 4), np.uint8)])
    maps3 = np.concatenate([maps, np.zeros((1, 4, 4))])
    cm = compute_class_metrics(
        image_labels + [0], image_scores + [0.7], masks3, maps3, np.array([True, False, True])
    )
    assert cm.image_auroc == pytest.approx(0.5)  # 0.9 > 0.7 (1), 0.6 < 0.7 (0) -> 1/2
    assert cm.routing_accuracy == pytest.approx(2 / 3)
    assert cm.pixel_auroc == pytest.approx(auroc(masks3, maps3))
    assert cm.pixel_ap == pytest.approx(average_precision(masks3, maps3))
    assert cm.aupro == pytest.approx(aupro(masks3, maps3))
    names = {"image_auroc", "pixel_auroc", "pixel_ap", "aupro", "routing_accuracy"}
    assert set(cm.as_dict()) == names
    with pytest.raises(ValueError):
        compute_class_metrics([1, 0], [0.1, 0.2], masks3, maps3, [True, True, True])

    a = ClassMetrics(0.9, 0.8, 0.5, 0.7, 1.0)
    b = ClassMetrics(0.7, 0.6, 0.3, 0.5, 0.5)
    mean = mean_metrics({"a": a, "b": b})
    expected = {"image_auroc": 0.8, "pixel_auroc": 0.7, "pixel_ap": 0.4, "aupro": 0.6}
    assert mean.as_dict() == pytest.approx(expected | {"routing_accuracy": 0.75})
    with pytest.raises(AttributeError):  # frozen
        a.aupro = 0.0  # type: ignore[misc]
    with pytest.raises(ValueError):
        mean_metrics({})


def test_empty_input_rejected() -> None:
    with pytest.raises(ValueError, match="empty"):
        auroc([], [])
    with pytest.raises(ValueError, match="empty"):
        aupro(np.zeros((0, 4, 4)), np.zeros((0, 4, 4)))


def test_tied_pairs_counts_the_pairs_a_bounded_error_can_swap():
    from moleflow.engines.verify import tied_pairs
    labels = np.array([0, 0, 1, 1])
    scores = np.array([1.0, 5.0, 5.3, 9.0])
    assert tied_pairs(labels, scores, 0.1) == 0.0        # 5.0 / 5.3 are 0.3 apart
    assert tied_pairs(labels, scores, 0.15) == 0.25      # 2·0.15 reaches them: 1 of 4 pairs
    assert tied_pairs(labels, scores, 2.0) == 0.5        # and 5.0 / 9.0, 1.0 / 5.3 stay apart
    assert tied_pairs(np.zeros(3), scores[:3], 10.0) == 0.0


def test_log_throttle_logs_first_then_counts_what_it_left_out(monkeypatch):
    import moleflow.edge.logs as logs
    clock = [100.0]
    monkeypatch.setattr(logs.time, "monotonic", lambda: clock[0])
    throttle = logs.Throttle(10.0)
    assert throttle.due("decode") == 0                       # first: logged
    assert throttle.due("decode") is None                    # within 10 s: left out
    assert throttle.due("decode") is None
    assert throttle.due("refused") == 0                      # another kind has its own clock
    assert throttle.due("decode", force=True) == 2           # a changed fault logs at once
    clock[0] += 10.0
    assert throttle.due("decode") == 0                       # 10 s later: logged again
