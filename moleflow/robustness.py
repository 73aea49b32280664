"""Robustness rows and their table (shared by the run and the engine-set benchmarks)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


@dataclass
class RobustnessRow:
    """One class under one condition."""
    name: str
    condition: str
    image_auroc: float
    pixel_auroc: float
    routing: float                      # share of frames routed to the class's own expert
    good: int = 0                       # engine set only: normal test frames ...
    false_alarms: int = 0               # ... raised as alarms at the calibrated threshold
    defective: int = 0                  # defective test frames ...
    flagged: int = 0                    # ... raised as alarms
    unknown: int = 0                    # frames flagged "unknown product"
    calibrated: bool = False
    labels: np.ndarray | None = field(default=None, repr=False, compare=False)  # 1 defective
    scores: np.ndarray | None = field(default=None, repr=False, compare=False)  # image scores

    def line(self) -> str:
        text = (f"{self.name:<14} {self.condition:<16} image AUROC {self.image_auroc:.4f}  "
                f"pixel AUROC {self.pixel_auroc:.4f}  routing {self.routing:.3f}")
        if self.calibrated:
            text += (f"  false alarms {self.false_alarms}/{self.good}  defects flagged "
                     f"{self.flagged}/{self.defective}  unknown {self.unknown}/"
                     f"{self.good + self.defective}")
        return text


def paired_delta_interval(labels: np.ndarray, base: np.ndarray, other: np.ndarray,
                          level: float = 0.95, resamples: int = 2000,
                          seed: int = 0) -> tuple[float, float]:
    """Bootstrap interval of AUROC(``other``) - AUROC(``base``): the same images scored two
    ways (lossless and under a condition), resampled together, normal and defective images
    each with replacement (stratified). A class with 23 normal images moves its AUROC by
    several hundredths when one normal image passes a few defects, so a drop is only a drop
    where its interval says so."""
    y = np.asarray(labels).astype(bool)
    base, other = np.asarray(base, np.float64), np.asarray(other, np.float64)
    if y.all() or not y.any() or len(base) != len(y) or len(other) != len(y):
        return math.nan, math.nan

    def wins(s: np.ndarray) -> np.ndarray:  # (defective, normal): 1 if ranked above, 0.5 tied
        d = s[y][:, None] - s[~y][None, :]
        return (d > 0) + 0.5 * (d == 0)

    diff = wins(other) - wins(base)
    rng = np.random.default_rng(seed)
    n_pos, n_neg = diff.shape
    w_pos = rng.multinomial(n_pos, np.full(n_pos, 1.0 / n_pos), size=resamples)
    w_neg = rng.multinomial(n_neg, np.full(n_neg, 1.0 / n_neg), size=resamples)
    deltas = np.einsum("bi,ij,bj->b", w_pos, diff, w_neg) / (n_pos * n_neg)
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.percentile(deltas, [tail, 100.0 - tail])
    return float(low), float(high)


def format_table(rows: list[RobustnessRow]) -> str:
    """Markdown table: a row per class and condition, with each class's change from lossless
    and, where the rows carry their image scores, its 95 % paired bootstrap interval."""
    calibrated = any(r.calibrated for r in rows)
    head = "| class | condition | image AUROC | Δ lossless | 95 % interval | pixel AUROC | routing |"
    rule = "|---|---|---|---|---|---|---|"
    if calibrated:
        head += " false alarms | defects flagged | unknown |"
        rule += "---|---|---|"
    base = {r.name: r for r in rows if r.condition == "lossless"}
    spans = {id(r): _span(base.get(r.name), r) for r in rows}  # one bootstrap per row
    lines = [head, rule]
    for r in rows:
        ref = base.get(r.name)
        delta = r.image_auroc - ref.image_auroc if ref else math.nan
        line = (f"| {r.name} | {r.condition} | {r.image_auroc:.4f} | {delta:+.4f} | "
                f"{spans[id(r)]} | {r.pixel_auroc:.4f} | {r.routing:.3f} |")
        if calibrated:
            line += (f" {r.false_alarms}/{r.good} | {r.flagged}/{r.defective} | "
                     f"{r.unknown}/{r.good + r.defective} |")
        lines.append(line)
    if base:
        drops = []
        for name, ref in base.items():  # the lowest AUROC; lossless itself on a tie
            worst = min((r for r in rows if r.name == name),
                        key=lambda r: (r.image_auroc, r is not ref))
            text = f"{name} {worst.image_auroc - ref.image_auroc:+.4f}"
            if worst is not ref:
                span = spans[id(worst)]
                text += f" ({worst.condition}" + (f", 95 % interval {span})" if span else ")")
            drops.append(text)
        lines.append("")
        lines.append("largest image-AUROC drop from lossless: " + ", ".join(drops))
    return "\n".join(lines)


def _span(ref: RobustnessRow | None, row: RobustnessRow) -> str:
    """The row's 95 % interval of its change from ``ref`` as text ('' without one)."""
    if ref is None or row is ref or ref.scores is None or row.scores is None \
            or row.labels is None:
        return ""
    low, high = paired_delta_interval(row.labels, ref.scores, row.scores)
    return "" if math.isnan(low) else f"{low:+.3f} .. {high:+.3f}"
