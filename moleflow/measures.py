"""Evaluation metrics (numpy + cv2 only): AUROC, AP, MVTec AUPRO, forgetting.

Every sweep is one O(n log n) sort, so pixel metrics over ~10M pixels take seconds.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import cv2
import numpy as np
from numpy.typing import ArrayLike

__all__ = ["ClassMetrics", "aupro", "auroc", "average_precision", "compute_class_metrics",
           "forgetting", "mean_metrics"]


def _binary(labels: ArrayLike, name: str = "labels") -> np.ndarray:
    """Flatten ``labels`` to a bool array, requiring values in {0, 1}."""
    y = np.asarray(labels)
    if y.dtype != np.bool_:
        if not ((y == 0) | (y == 1)).all():
            raise ValueError(f"{name} must be binary (0/1 or bool)")
        y = y != 0
    return y.ravel()


def _scores(scores: ArrayLike, name: str = "scores") -> np.ndarray:
    """Flatten ``scores`` to a float array, rejecting NaN."""
    s = np.asarray(scores)
    if not np.issubdtype(s.dtype, np.floating):
        s = s.astype(np.float64)
    s = s.ravel()
    if np.isnan(s).any():
        raise ValueError(f"{name} contain NaN")
    return s


def _prepare(labels: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    y, s = _binary(labels), _scores(scores)
    if y.size != s.size:
        raise ValueError(f"labels and scores differ in length ({y.size} != {s.size})")
    return y, s


def _descending_sweep(s: np.ndarray, *weights: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Sweep scores descending: index of the last element of each tie group (in
    descending order) and each weight's cumulative sum at those group ends."""
    if s.size == 0:
        raise ValueError("empty input")
    order = np.argsort(s)[::-1]
    s = s[order]
    ends = np.append(np.flatnonzero(s[1:] != s[:-1]), s.size - 1)
    return ends, [np.cumsum(w[order])[ends] for w in weights]


def _auroc_from_sweep(ends: np.ndarray, cum_pos: np.ndarray, n: int) -> float:
    """Rank-sum (Mann-Whitney U) AUROC with average ranks for ties."""
    n_pos = int(cum_pos[-1])
    n_neg = n - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUROC needs both classes; labels contain only one class")
    pos_g = np.diff(cum_pos, prepend=0)
    starts = np.concatenate(([0], ends[:-1] + 1))
    # Descending position k has ascending 1-based rank n - k; a tie group
    # [start, end] shares the average rank n - (start + end) / 2. Work with
    # twice the ranks so everything stays an exact integer.
    rank_sum2 = int(np.dot(pos_g, 2 * n - starts - ends))
    u2 = rank_sum2 - n_pos * (n_pos + 1)
    return u2 / (2.0 * n_pos * n_neg)


def _ap_from_sweep(ends: np.ndarray, cum_pos: np.ndarray) -> float:
    """Step-wise AP: sum over thresholds of (R_n - R_{n-1}) * P_n."""
    n_pos = int(cum_pos[-1])
    if n_pos == 0:
        raise ValueError("average precision needs at least one positive label")
    precision = cum_pos / (ends + 1.0)
    recall = cum_pos / n_pos
    return float(np.dot(np.diff(recall, prepend=0.0), precision))


def auroc(labels: ArrayLike, scores: ArrayLike) -> float:
    """ROC AUC via the Mann-Whitney rank-sum formula (average ranks for ties).

    Raises ValueError if lengths differ or only one class is present.
    """
    y, s = _prepare(labels, scores)
    ends, (cum_pos,) = _descending_sweep(s, y)
    return _auroc_from_sweep(ends, cum_pos, s.size)


def average_precision(labels: ArrayLike, scores: ArrayLike) -> float:
    """Average precision, identical to sklearn's ``average_precision_score``.

    Raises ValueError if lengths differ or there is no positive label.
    """
    y, s = _prepare(labels, scores)
    ends, (cum_pos,) = _descending_sweep(s, y)
    return _ap_from_sweep(ends, cum_pos)


def _region_weights(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """Per-pixel 1/area of its 8-connected region (0 on normal pixels) and #regions."""
    weights = np.zeros(masks.shape, dtype=np.float64)
    n_regions = 0
    for i, m in enumerate(masks):
        n_labels, lab = cv2.connectedComponents(m.astype(np.uint8), connectivity=8)
        if n_labels <= 1:
            continue
        inv_area = np.zeros(n_labels)
        inv_area[1:] = 1.0 / np.bincount(lab.ravel(), minlength=n_labels)[1:]
        weights[i] = inv_area[lab]
        n_regions += n_labels - 1
    return weights, n_regions


def _as_stack(
    masks: ArrayLike, maps: ArrayLike, max_fpr: float
) -> tuple[np.ndarray, np.ndarray]:
    """Validate (N, H, W) or (H, W) masks/maps and max_fpr; masks become bool (N, H, W)."""
    if not 0.0 < max_fpr <= 1.0:
        raise ValueError(f"max_fpr must be in (0, 1], got {max_fpr}")
    m, a = np.asarray(masks), np.asarray(maps)
    if m.shape != a.shape:
        raise ValueError(f"masks and maps differ in shape ({m.shape} != {a.shape})")
    if m.ndim == 2:
        m, a = m[None], a[None]
    if m.ndim != 3:
        raise ValueError(f"masks/maps must be (N, H, W) or (H, W), got {m.shape}")
    return _binary(m, "masks").reshape(m.shape), a


def _trapezoid(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """MVTec ``generic_util.trapezoid``: area up to x_max, interpolating y(x_max)."""
    correction = 0.0
    if not np.any(x == x_max):
        ins = int(np.searchsorted(x, x_max, side="right"))
        slope = (y[ins] - y[ins - 1]) / (x[ins] - x[ins - 1])
        y_interp = y[ins - 1] + slope * (x_max - x[ins - 1])
        correction = 0.5 * (y_interp + y[ins - 1]) * (x_max - x[ins - 1])
    keep = x <= x_max
    x, y = x[keep], y[keep]
    return float(np.sum(0.5 * (y[1:] + y[:-1]) * np.diff(x)) + correction)


def _aupro_from_sweep(
    ends: np.ndarray, cum_pos: np.ndarray, cum_pro: np.ndarray, n_regions: int, max_fpr: float
) -> float:
    n_normal = int(ends[-1] + 1 - cum_pos[-1])
    if n_regions == 0:
        raise ValueError("AUPRO needs at least one anomalous region")
    if n_normal == 0:
        raise ValueError("AUPRO needs at least one normal pixel")
    fpr = np.clip((ends + 1 - cum_pos) / n_normal, 0.0, 1.0)
    pro = np.clip(cum_pro / n_regions, 0.0, 1.0)
    fpr, pro = np.concatenate(([0.0], fpr)), np.concatenate(([0.0], pro))
    return _trapezoid(fpr, pro, max_fpr) / max_fpr


def aupro(masks: ArrayLike, maps: ArrayLike, max_fpr: float = 0.3) -> float:
    """Normalised area under the PRO-vs-FPR curve for FPR in [0, max_fpr].

    Follows MVTec AD's ``compute_pro`` exactly: regions are 8-connected
    components of each mask; pixels are swept by descending score (ties
    grouped); each normal pixel adds 1/num_normal to FPR, each pixel of region
    r adds 1/(area_r * num_regions) to PRO; the curve starts at (0, 0) and is
    integrated with the trapezoid rule, interpolating PRO at max_fpr. A
    perfect detector scores 1.0; a constant map scores max_fpr / 2.

    Raises ValueError on shape mismatch, no anomalous region or no normal pixel.
    """
    m, a = _as_stack(masks, maps, max_fpr)
    weights, n_regions = _region_weights(m)
    s = _scores(a, "maps")
    ends, (cum_pos, cum_pro) = _descending_sweep(s, m.ravel(), weights.ravel())
    return _aupro_from_sweep(ends, cum_pos, cum_pro, n_regions, max_fpr)


def forgetting(matrix: ArrayLike) -> np.ndarray:
    """Per-class forgetting from a (T, C) metric matrix (higher = better).

    Row t holds the metric after training step t, column c the class (NaN where
    not yet learned). Result[c] = max over rows 0..T-2 - value in row T-1. It is
    clipped at nothing: negative values mean the class improved. NaN if the
    column has fewer than two non-NaN values or its final value is NaN.
    """
    mat = np.asarray(matrix, dtype=np.float64)
    if mat.ndim != 2:
        raise ValueError(f"matrix must be 2-D (T, C), got shape {mat.shape}")
    out = np.full(mat.shape[1], np.nan)
    if mat.shape[0] < 2:
        return out
    prev = mat[:-1]
    best = np.where(np.isnan(prev), -np.inf, prev).max(axis=0)
    valid = (np.sum(~np.isnan(mat), axis=0) >= 2) & ~np.isnan(mat[-1])
    out[valid] = best[valid] - mat[-1, valid]
    return out


@dataclass(frozen=True)
class ClassMetrics:
    """Evaluation results for one class (or their mean)."""

    image_auroc: float
    pixel_auroc: float
    pixel_ap: float
    aupro: float
    routing_accuracy: float

    def as_dict(self) -> dict[str, float]:
        """Field name -> value."""
        return {k: float(v) for k, v in asdict(self).items()}


def compute_class_metrics(
    image_labels: ArrayLike,
    image_scores: ArrayLike,
    masks: ArrayLike,
    maps: ArrayLike,
    routed_correct: ArrayLike,
    max_fpr: float = 0.3,
) -> ClassMetrics:
    """All metrics for one class; pixel metrics pool every pixel of every image.

    masks/maps are (N, H, W); routed_correct is a bool array (N,). The three
    pixel metrics share a single sort of the anomaly maps. Raises ValueError
    (via the metrics) when a class lacks normal or anomalous images/pixels.
    """
    m, a = _as_stack(masks, maps, max_fpr)
    routed = np.asarray(routed_correct, dtype=bool).ravel()
    if not np.asarray(image_labels).size == routed.size == m.shape[0]:
        raise ValueError("image_labels, routed_correct and masks must agree on N")
    weights, n_regions = _region_weights(m)
    s = _scores(a, "maps")
    ends, (cum_pos, cum_pro) = _descending_sweep(s, m.ravel(), weights.ravel())
    return ClassMetrics(
        image_auroc=auroc(image_labels, image_scores),
        pixel_auroc=_auroc_from_sweep(ends, cum_pos, s.size),
        pixel_ap=_ap_from_sweep(ends, cum_pos),
        aupro=_aupro_from_sweep(ends, cum_pos, cum_pro, n_regions, max_fpr),
        routing_accuracy=float(routed.mean()),
    )


def mean_metrics(per_class: dict[str, ClassMetrics]) -> ClassMetrics:
    """Field-wise arithmetic mean over classes (NaN propagates)."""
    if not per_class:
        raise ValueError("per_class is empty")
    names = [f.name for f in fields(ClassMetrics)]
    means = np.mean([[getattr(v, k) for k in names] for v in per_class.values()], axis=0)
    return ClassMetrics(**{k: float(x) for k, x in zip(names, means)})
