"""Routed evaluation of every learned class: scores, anomaly maps, metrics, overlays."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np
import torch

from moleflow.config import EvalConfig
from moleflow.scoring import (PositionNorm, anomaly_maps, keep_lower, light_reference,
                              light_retries, map_values, routed_image_scores)
from moleflow.data import ClassData
from moleflow.train.features import FeatureStore, pooled
from moleflow.train.flow import MoLEFlow
from moleflow.measures import ClassMetrics, compute_class_metrics
from moleflow.overlay import render_overlay
from moleflow.train.router import PrototypeRouter
from moleflow.train.trainer import patch_scores


@dataclass
class ClassResult:
    name: str
    task: int
    metrics: ClassMetrics
    scores: np.ndarray          # image scores (N,)
    labels: np.ndarray          # 0 good, 1 defective (N,)
    routed: np.ndarray          # chosen task per image (N,)
    maps: np.ndarray            # (N, S, S)
    data: ClassData             # the test set these results are of


def fit_norm(model: MoLEFlow, feats: torch.Tensor, task: int, batch_size: int,
             images: np.ndarray | None = None) -> PositionNorm:
    """Position statistics of ``task``'s expert over its training images' features (views
    included), with the light reference of the training ``images`` as they are (none without
    them)."""
    norm = PositionNorm.fit(patch_scores(model, feats, task, batch_size).numpy())
    return norm if images is None else replace(norm, light=light_reference(images))


def score_class(model: MoLEFlow, feats: torch.Tensor, experts: np.ndarray, cfg: EvalConfig,
                size: int, norms: dict[int, PositionNorm] | None = None,
                images: np.ndarray | None = None,
                extract: Callable[[np.ndarray], torch.Tensor] | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """Image scores and maps, each image scored by the expert in ``experts``.

    Every expert that is needed scores the whole class in the same fixed batches, so a score
    does not depend on how the other images of the class were routed (zero forgetting is then
    bit-exact, not approximately so). With ``cfg.image_score`` 'standardised' each image score
    uses its expert's position statistics from ``norms``. Given the ``images`` and the
    backbone (``extract``), frames whose light is off their expert's are scored again relit
    (``cfg.light_retry``; ``moleflow.scoring.light_retries``), each alone, so that again no
    score depends on the other images.
    """
    grids = np.empty((len(feats),) + tuple(feats.shape[2:]), dtype=np.float32)
    for task in np.unique(experts):
        nll = patch_scores(model, feats, int(task), cfg.batch_size).numpy()
        sel = experts == task
        grids[sel] = nll[sel]
    if cfg.image_score == "standardised":
        missing = sorted(set(np.unique(experts).tolist()) - set(norms or {}))
        if missing:
            raise ValueError(f"no position statistics for task(s) {missing}: needed by "
                             "eval.image_score 'standardised'")
    used = norms if cfg.image_score == "standardised" else None
    if images is not None and extract is not None:
        picked, frames, _ = light_retries(images, experts, used, cfg.light_retry)
        if picked:
            again = np.concatenate([patch_scores(model, extract(f[None]), int(experts[i]), 1)
                                    .numpy() for i, f in zip(picked, frames)])
            keep_lower(grids, picked, again, experts, used, cfg.top_k)
    scores = routed_image_scores(grids, experts, used, cfg.top_k)
    maps = anomaly_maps(map_values(grids, cfg.anomaly_map, feats.shape[1]), size,
                        cfg.smoothing_sigma)
    return scores, maps


def route_tasks(model: MoLEFlow, router: PrototypeRouter | None, feats: torch.Tensor,
                task: int) -> np.ndarray:
    """The task index that scores each image: the router's choice, or ``task`` for all when
    ``router`` is None (the oracle of the wo_router ablation)."""
    if router is None:
        return np.full(len(feats), task)
    routed, _ = router.route(pooled(feats))
    return np.asarray([model.tasks[i] for i in routed])


def evaluate_class(model: MoLEFlow, router: PrototypeRouter | None, store: FeatureStore,
                   data: ClassData, task: int, cfg: EvalConfig,
                   norms: dict[int, PositionNorm] | None = None) -> ClassResult:
    """Route every test image (or use the true task when ``router`` is None) and score it."""
    feats = store.features(data, "test")
    routed = route_tasks(model, router, feats, task)
    images = store.images_of([t.path for t in data.test]) if cfg.light_retry > 0 else None
    scores, maps = score_class(model, feats, routed, cfg, store.image_size, norms, images,
                               store.extract)
    labels = np.asarray([t.label for t in data.test])
    masks = store.masks(data)
    metrics = compute_class_metrics(labels, scores, masks, maps, routed == task,
                                    max_fpr=cfg.aupro_max_fpr)
    return ClassResult(data.name, task, metrics, scores, labels, routed, maps, data)


def write_overlays(result: ClassResult, store: FeatureStore, folder: Path,
                   count: int) -> list[Path]:
    """Overlays (moleflow.overlay) of the highest-scoring defective and good images of a class,
    with the ground-truth outline. The contour marks the map threshold a calibration would
    choose here: the 95th percentile of the good test images' map maxima (no calibration
    exists yet at training time, so the banner shows the score without a decision)."""
    if count <= 0:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    order = np.argsort(-result.scores)
    bad = [i for i in order if result.labels[i] == 1][: max(1, count - 1)]
    good = [i for i in order if result.labels[i] == 0][: count - len(bad)]
    good_max = result.maps[result.labels == 0].reshape(int((result.labels == 0).sum()), -1)
    map_threshold = float(np.quantile(good_max.max(axis=1), 0.95) if len(good_max)
                          else np.percentile(result.maps, 99))
    chosen = bad + good
    masks = store.masks(result.data)
    images = store.images_of([result.data.test[i].path for i in chosen])
    written = []
    for image, i in zip(images, chosen):
        item = result.data.test[i]
        img = render_overlay(cv2.cvtColor(image, cv2.COLOR_RGB2BGR), result.maps[i],
                             map_threshold=map_threshold, score=float(result.scores[i]),
                             threshold=None, regions=[], label=str(item.defect),
                             ground_truth=masks[i] if masks[i].any() else None)
        path = folder / f"{item.defect}_{item.path.stem}.png"
        cv2.imwrite(str(path), img)
        written.append(path)
    return written
