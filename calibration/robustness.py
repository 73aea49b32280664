"""``moleflow robustness --engines``: an engine set scored as the line would see each class.

Every expert's class test images pass through each condition (``moleflow.conditions``) and the
torch-free pipeline scores them routed, exactly as the daemon does: image and pixel AUROC,
routing accuracy, and at the calibrated thresholds the false alarms on normal frames, the
defects flagged and the frames called "unknown product". ``leave_one_out`` measures the other
side of "unknown": each class's frames against the set without its expert.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from moleflow.calibration.calibrate import score_frames
from moleflow.conditions import Condition, apply_to_masks
from moleflow.manifest import Manifest
from moleflow.engines.pipeline import EngineSet, FrameScore, Pipeline
from moleflow.robustness import RobustnessRow
from moleflow.data import class_masks, load_class, load_images
from moleflow.measures import auroc

log = logging.getLogger("moleflow.robustness")


def engine_robustness(root: Path, data_root: Path, conditions: list[Condition],
                      threads: int = 0, progress: bool = True) -> list[RobustnessRow]:
    """One row per (expert's class, condition), scored by the engine set routed."""
    pipe = Pipeline(EngineSet.open(root, threads=threads), with_maps=True)
    size = pipe.engines.size
    rows = []
    for index, name in enumerate(pipe.engines.expert_names()):
        data = load_class(Path(data_root), name)
        images = load_images([t.path for t in data.test], size)
        labels = np.asarray([t.label for t in data.test])
        masks = class_masks(data, size)
        for cond in conditions:
            frames = score_frames(pipe, cond.apply(images, seed=index))
            rows.append(_row(name, cond, frames, labels, apply_to_masks(cond, masks),
                             name in pipe.engines.calibration))
            if progress:
                log.info("%s", rows[-1].line())
    return rows


def _row(name: str, cond: Condition, frames: list[FrameScore], labels: np.ndarray,
         masks: np.ndarray, calibrated: bool) -> RobustnessRow:
    scores = np.asarray([f.raw_score for f in frames])
    maps = np.stack([f.map for f in frames])
    defective = labels == 1
    pixel = auroc(masks.ravel(), maps.ravel()) if masks.any() else float("nan")
    flagged = np.asarray([bool(f.anomalous) for f in frames])
    unknown = np.asarray([f.unknown for f in frames])
    return RobustnessRow(
        name, cond.name, auroc(labels, scores) if 0 < defective.sum() < len(labels)
        else float("nan"), pixel, float(np.mean([f.expert == name for f in frames])),
        good=int((~defective).sum()), false_alarms=int((flagged & ~defective).sum()),
        defective=int(defective.sum()), flagged=int((flagged & defective).sum()),
        unknown=int(unknown.sum()), calibrated=calibrated, labels=labels, scores=scores)


def leave_one_out(root: Path, data_root: Path, conditions: list[Condition],
                  threads: int = 0) -> list[tuple[str, str, int, int]]:
    """(left-out class, condition, frames flagged unknown, frames) for every expert's class,
    scored by the engine set without that expert (its other experts and calibrations)."""
    names = [e.name for e in Manifest.load(Path(root)).experts]
    out = []
    for index, left in enumerate(names):
        others = [n for n in names if n != left]
        if not others:
            continue
        pipe = Pipeline(EngineSet.open(root, threads=threads, experts=others), with_maps=False)
        data = load_class(Path(data_root), left)
        images = load_images([t.path for t in data.test], pipe.engines.size)
        for cond in conditions:
            frames = score_frames(pipe, cond.apply(images, seed=index))
            out.append((left, cond.name, sum(f.unknown for f in frames), len(frames)))
            log.info("without %s, %s: %d/%d of its frames unknown", left, cond.name,
                     out[-1][2], out[-1][3])
    return out
