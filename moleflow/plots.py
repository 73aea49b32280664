"""The run's evaluation as one PNG, drawn with OpenCV (no matplotlib): the image ROC curve of
every class with its AUROC in the legend, and, when the run has several task steps, the image
AUROC of each class after each step as bars (forgetting shows as a bar that shrinks)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

FONT = cv2.FONT_HERSHEY_SIMPLEX
WHITE, INK, GRID = (255, 255, 255), (30, 30, 30), (215, 215, 215)
PALETTE = [(180, 119, 31), (14, 127, 255), (44, 160, 44), (40, 39, 214), (189, 103, 148),
           (75, 86, 140), (194, 119, 227), (127, 127, 127), (34, 189, 188), (207, 190, 23)]


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates over every threshold (ties taken together)."""
    y = np.asarray(labels).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    ends = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1] if len(s) else np.array([], int)
    tp, fp = np.cumsum(y)[ends], np.cumsum(~y)[ends]
    pos, neg = max(int(y.sum()), 1), max(int((~y).sum()), 1)
    return np.r_[0.0, fp / neg], np.r_[0.0, tp / pos]


def _axes(img: np.ndarray, box: tuple[int, int, int, int], xlabel: str, ylabel: str,
          ticks: list[float]) -> None:
    x0, y0, x1, y1 = box
    for t in ticks:
        y = int(y1 - t * (y1 - y0))
        cv2.line(img, (x0, y), (x1, y), GRID, 1)
        cv2.putText(img, f"{t:.1f}", (x0 - 28, y + 4), FONT, 0.38, INK, 1, cv2.LINE_AA)
    cv2.rectangle(img, (x0, y0), (x1, y1), INK, 1)
    cv2.putText(img, xlabel, ((x0 + x1) // 2 - 40, y1 + 34), FONT, 0.45, INK, 1, cv2.LINE_AA)
    cv2.putText(img, ylabel, (6, y0 - 8), FONT, 0.42, INK, 1, cv2.LINE_AA)


def draw_roc(curves: dict[str, tuple[np.ndarray, np.ndarray, float]],
             size: int = 440) -> np.ndarray:
    """ROC curves {class: (labels, scores, auroc)} on one square plot, the legend inside."""
    img = np.full((size, size), 255, np.uint8)
    img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    x0, y0, x1, y1 = 48, 60, size - 16, size - 48
    ticks = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    _axes(img, (x0, y0, x1, y1), "false-positive rate", "true-positive rate", ticks)
    for t in ticks:
        x = int(x0 + t * (x1 - x0))
        cv2.putText(img, f"{t:.1f}", (x - 10, y1 + 16), FONT, 0.38, INK, 1, cv2.LINE_AA)
    cv2.line(img, (x0, y1), (x1, y0), GRID, 1, cv2.LINE_AA)  # chance
    cv2.putText(img, "image ROC", (x0, 22), FONT, 0.55, INK, 1, cv2.LINE_AA)
    for i, (name, (labels, scores, auc)) in enumerate(curves.items()):
        colour = PALETTE[i % len(PALETTE)]
        fpr, tpr = roc_curve(labels, scores)
        pts = np.stack([x0 + fpr * (x1 - x0), y1 - tpr * (y1 - y0)], 1).round().astype(np.int32)
        cv2.polylines(img, [pts], False, colour, 2, cv2.LINE_AA)
        ly = y1 - 12 - 18 * (len(curves) - 1 - i)
        cv2.line(img, (x0 + 120, ly - 4), (x0 + 140, ly - 4), colour, 2)
        cv2.putText(img, f"{name[:16]}  AUROC {auc:.3f}", (x0 + 146, ly), FONT, 0.4, INK, 1,
                    cv2.LINE_AA)
    return img


def draw_steps(steps: list[int], classes: list[str], matrix: np.ndarray,
               height: int = 440) -> np.ndarray:
    """Grouped bars: per step, each learned class's image AUROC (NaN: not learned yet)."""
    group = max(len(classes), 1) * 14 + 16
    legend = sum(24 + 8 * len(c[:12]) for c in classes)
    width = max(300, 70 + group * len(steps), 48 + 120 + legend + 16)
    img = cv2.cvtColor(np.full((height, width), 255, np.uint8), cv2.COLOR_GRAY2BGR)
    x0, y0, x1, y1 = 48, 60, width - 16, height - 48
    lo = 0.5  # bars start at chance
    ticks = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    _axes(img, (x0, y0, x1, y1), "after task step", "image AUROC", ticks)
    for t in ticks:  # relabel the axis: lo..1
        y = int(y1 - t * (y1 - y0))
        cv2.rectangle(img, (x0 - 30, y - 8), (x0 - 2, y + 6), WHITE, -1)
        cv2.putText(img, f"{lo + t * (1 - lo):.1f}", (x0 - 28, y + 4), FONT, 0.38, INK, 1,
                    cv2.LINE_AA)
    cv2.putText(img, "image AUROC per step", (x0, 22), FONT, 0.55, INK, 1, cv2.LINE_AA)
    span = (x1 - x0) / max(len(steps), 1)
    for s, (step, row) in enumerate(zip(steps, matrix)):
        gx = int(x0 + s * span + (span - (group - 16)) / 2)
        for c, value in enumerate(row):
            if np.isnan(value):
                continue
            frac = float(np.clip((value - lo) / (1 - lo), 0, 1))
            top = int(y1 - frac * (y1 - y0))
            cv2.rectangle(img, (gx + 14 * c, top), (gx + 14 * c + 11, y1 - 1),
                          PALETTE[c % len(PALETTE)], -1)
        cv2.putText(img, str(step), (int(x0 + (s + 0.5) * span) - 4, y1 + 16), FONT, 0.4, INK,
                    1, cv2.LINE_AA)
    lx = x0 + 120  # the legend in one line between the title and the plot
    for c, name in enumerate(classes):
        cv2.rectangle(img, (lx, 30), (lx + 10, 40), PALETTE[c % len(PALETTE)], -1)
        cv2.putText(img, name[:12], (lx + 14, 40), FONT, 0.38, INK, 1, cv2.LINE_AA)
        lx += 24 + 8 * len(name[:12])
    return img


def write_evaluation_plot(path: Path, curves: dict[str, tuple[np.ndarray, np.ndarray, float]],
                          steps: list[int] | None = None, classes: list[str] | None = None,
                          matrix: np.ndarray | None = None) -> Path:
    """The ROC plot, with the per-step bars beside it when there are several steps."""
    panels = [draw_roc(curves)]
    if steps and len(steps) > 1 and matrix is not None:
        panels.append(draw_steps(steps, classes or [], matrix))
    img = np.hstack(panels)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), img):
        raise OSError(f"cannot write {path}")
    return path
