"""Robustness rows and their table (shared by the run and the engine-set benchmarks)."""

from __future__ import annotations

import math
from dataclasses import dataclass


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

    def line(self) -> str:
        text = (f"{self.name:<14} {self.condition:<16} image AUROC {self.image_auroc:.4f}  "
                f"pixel AUROC {self.pixel_auroc:.4f}  routing {self.routing:.3f}")
        if self.calibrated:
            text += (f"  false alarms {self.false_alarms}/{self.good}  defects flagged "
                     f"{self.flagged}/{self.defective}  unknown {self.unknown}/"
                     f"{self.good + self.defective}")
        return text


def format_table(rows: list[RobustnessRow]) -> str:
    """Markdown table: a row per class and condition, with each class's change from lossless."""
    calibrated = any(r.calibrated for r in rows)
    head = "| class | condition | image AUROC | Δ lossless | pixel AUROC | routing |"
    rule = "|---|---|---|---|---|---|"
    if calibrated:
        head += " false alarms | defects flagged | unknown |"
        rule += "---|---|---|"
    base = {r.name: r for r in rows if r.condition == "lossless"}
    lines = [head, rule]
    for r in rows:
        ref = base.get(r.name)
        delta = r.image_auroc - ref.image_auroc if ref else math.nan
        line = (f"| {r.name} | {r.condition} | {r.image_auroc:.4f} | {delta:+.4f} | "
                f"{r.pixel_auroc:.4f} | {r.routing:.3f} |")
        if calibrated:
            line += (f" {r.false_alarms}/{r.good} | {r.flagged}/{r.defective} | "
                     f"{r.unknown}/{r.good + r.defective} |")
        lines.append(line)
    worst = {}
    for r in rows:
        if r.name in base:
            worst[r.name] = min(worst.get(r.name, 0.0), r.image_auroc - base[r.name].image_auroc)
    if worst:
        lines.append("")
        lines.append("largest image-AUROC drop from lossless: " + ", ".join(
            f"{k} {v:+.4f}" for k, v in worst.items()))
    return "\n".join(lines)
