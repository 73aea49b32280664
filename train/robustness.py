"""``moleflow robustness --run``: a run's experts scored under named camera conditions.

Every learned class's test images pass through each condition (``moleflow.conditions``), are
routed and scored by the PyTorch model exactly as ``moleflow eval`` scores them, and the
image and pixel AUROC and the routing accuracy are reported per class and condition. Ground
truth moves with the image under shift and rotation. ``lossless`` uses the cached test
features, so its row equals ``eval``'s.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from moleflow.config import Config
from moleflow.conditions import Condition, apply_to_masks
from moleflow.robustness import RobustnessRow
from moleflow.train.continual import _class_data, ensure_norms, open_session
from moleflow.train.evaluate import route_tasks, score_class
from moleflow.measures import compute_class_metrics

log = logging.getLogger("moleflow.robustness")


def run_robustness(run_dir: Path, data_root: Path | None, conditions: list[Condition],
                   config: Config, progress: bool = True) -> list[RobustnessRow]:
    """One row per (class, condition) for the run's experts, routed as on the line."""
    session = open_session(run_dir, config, progress, create=False)
    ensure_norms(session, data_root)
    store, model, cfg = session.store, session.model, session.cfg
    use_router = cfg.resolved_model().use_router
    rows = []
    for record in session.bundle.tasks:
        data = _class_data(session, record.name, data_root)
        images = store.images_of([t.path for t in data.test])
        labels = np.asarray([t.label for t in data.test])
        masks = store.masks(data)
        for cond in conditions:
            seen = images if cond.kind == "lossless" else cond.apply(images, seed=record.index)
            feats = store.features(data, "test") if cond.kind == "lossless" \
                else store.extract(seen)
            routed = route_tasks(model, session.router if use_router else None, feats,
                                 record.index)
            scores, maps = score_class(model, feats, routed, cfg.eval, store.image_size,
                                       session.norms, seen, store.extract)
            m = compute_class_metrics(labels, scores, apply_to_masks(cond, masks), maps,
                                      routed == record.index, max_fpr=cfg.eval.aupro_max_fpr)
            row = RobustnessRow(record.name, cond.name, m.image_auroc, m.pixel_auroc,
                                m.routing_accuracy, labels=labels, scores=scores)
            log.info("%s", row.line())
            rows.append(row)
    return rows
