"""``moleflow verify``: the exported engine set against the PyTorch run it came from.

Per class of the run, on its test images (normal and defective):
  * expert parity: the fused ONNX expert vs the PyTorch model with LoRA, on the same features;
  * end-to-end parity: ONNX backbone + router + expert vs the PyTorch pipeline (image and pixel
    AUROC, routing);
  * FP16: the FP16 graphs (what TensorRT builds from): the backbone in ONNX Runtime, the experts
    in onnx's reference evaluator, which keeps every tensor in FP16 as declared (ONNX Runtime on
    a CPU silently computes FP16 ops in FP32 and would hide an overflow): no inf/nan, image
    scores next to FP32's, and AUROC next to FP32. The graphs' numerics show in the top-k
    patch-NLL scores (FP16 resolves 0.1 % of an NLL); a standardised image score is a
    difference of NLLs over a few nats of spread, so the same NLL error is a larger share of it
    (both are reported). An image AUROC can only move where a normal
    and a defective image score within FP16's own error of each other; the share of such
    near-tied pairs is reported with it (on a few dozen images one swapped pair moves the AUROC
    by more than 0.004).
Relative errors are ``|onnx - torch| / max(|torch|, 1)`` per patch NLL (nats; the floor keeps
patches with an NLL near zero from dividing by ~0).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx

from moleflow.engines.fp16 import reference_evaluator
from moleflow.scoring import image_scores
from moleflow.manifest import verified
from moleflow.engines.pipeline import EngineSet, Pipeline, scoring_rule
from moleflow.train.bundle import RunBundle
from moleflow.train.continual import ensure_norms, open_session
from moleflow.data import load_class
from moleflow.train.evaluate import evaluate_class
from moleflow.measures import auroc
from moleflow.train.trainer import patch_scores

log = logging.getLogger("moleflow.verify")


@dataclass
class ClassCheck:
    name: str
    images: int
    expert_max_rel: float        # fused ONNX expert vs PyTorch, same features
    e2e_max_rel: float           # whole ONNX pipeline vs PyTorch, patch NLL
    torch_image_auroc: float
    torch_pixel_auroc: float
    onnx_image_auroc: float
    onnx_pixel_auroc: float
    onnx_routing: float
    fp16_image_auroc: float
    fp16_pixel_auroc: float
    fp16_finite: bool
    fp16_max_abs: float          # largest patch NLL seen in FP16 (overflow would be inf)
    fp16_nll_score_max_rel: float  # FP16 top-k patch-NLL scores vs FP32, largest rel. error
    fp16_score_max_rel: float    # FP16 image scores (the set's rule) vs FP32, largest rel. error
    fp16_tied_pairs: float       # share of (normal, defective) pairs closer than FP16's error

    def line(self) -> str:
        return (f"{self.name:<12} n={self.images:<4} expert rel {self.expert_max_rel:.2e}  "
                f"e2e rel {self.e2e_max_rel:.2e} | image AUROC torch {self.torch_image_auroc:.4f} "
                f"onnx {self.onnx_image_auroc:.4f} fp16 {self.fp16_image_auroc:.4f} | pixel "
                f"torch {self.torch_pixel_auroc:.4f} onnx {self.onnx_pixel_auroc:.4f} fp16 "
                f"{self.fp16_pixel_auroc:.4f} | routing {self.onnx_routing:.3f} | fp16 finite "
                f"{self.fp16_finite} (max NLL {self.fp16_max_abs:.0f}), NLL scores rel "
                f"{self.fp16_nll_score_max_rel:.1e}, image scores rel "
                f"{self.fp16_score_max_rel:.1e}, pairs within it {self.fp16_tied_pairs:.4f}")


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1.0)))


def verify_engine_set(run_dir: Path, engines_dir: Path, data_root: Path | None,
                      threads: int = 0) -> list[ClassCheck]:
    bundle = RunBundle.open(run_dir)
    session = open_session(run_dir, bundle.config, progress=False, create=False)
    fp32 = Pipeline(EngineSet.open(engines_dir, threads=threads), with_maps=True)
    fp16 = Pipeline(EngineSet.open(engines_dir, precision="fp16", threads=threads),
                    with_maps=True)
    # parity of the graphs: every frame scored once on both sides (the light retry runs the
    # same graphs again on relit frames, so it adds nothing to check)
    fp32.light_retry = fp16.light_retry = 0.0
    experts16 = {e.name: reference_evaluator(onnx.load(verified(engines_dir, e.files["onnx_fp16"])))
                 for e in fp16.engines.manifest.experts}
    scoring = fp32.engines.manifest.scoring  # the torch side scores images the same way
    evalcfg = replace(session.cfg.eval, top_k=int(scoring["top_k"]),
                      smoothing_sigma=float(scoring["smoothing_sigma"]),
                      image_score=scoring_rule(fp32.engines.manifest, "image_score"),
                      anomaly_map=scoring_rule(fp32.engines.manifest, "anomaly_map"),
                      light_retry=0.0)
    ensure_norms(session, data_root)
    checks = []
    for record in bundle.tasks:
        root = data_root if data_root and (data_root / record.name).is_dir() else \
            Path(record.data_root)
        data = load_class(root, record.name)
        ref = evaluate_class(session.model, session.router, session.store, data, record.index,
                             evalcfg, session.norms)
        feats = session.store.features(data, "test")
        torch_nll = patch_scores(session.model, feats, record.index,
                                 session.cfg.eval.batch_size).numpy()
        onnx_nll = np.concatenate([fp32.expert_nll(record.name, feats[i:i + 16].numpy())
                                   for i in range(0, len(feats), 16)])
        images = session.store.images_of([t.path for t in data.test])
        masks = session.store.masks(data)
        labels = np.asarray([t.label for t in data.test])
        e2e, routed = _pipeline_nll(fp32, images)
        half, routed16 = _pipeline_nll(fp16, images, experts16)
        same = routed == record.name
        full, half_scores = fp32.image_scores(e2e, routed), fp16.image_scores(half, routed16)
        checks.append(ClassCheck(
            name=record.name, images=len(images), expert_max_rel=_rel(onnx_nll, torch_nll),
            e2e_max_rel=_rel(e2e[same], torch_nll[same]) if same.any() else float("nan"),
            torch_image_auroc=ref.metrics.image_auroc, torch_pixel_auroc=ref.metrics.pixel_auroc,
            onnx_image_auroc=auroc(labels, full),
            onnx_pixel_auroc=_pixel_auroc(masks, fp32.anomaly_maps(e2e)),
            onnx_routing=float(same.mean()),
            fp16_image_auroc=auroc(labels, half_scores),
            fp16_pixel_auroc=_pixel_auroc(masks, fp16.anomaly_maps(half)),
            fp16_finite=bool(np.isfinite(half).all()), fp16_max_abs=float(np.abs(half).max()),
            fp16_nll_score_max_rel=_rel(image_scores(half, fp16.top_k),
                                        image_scores(e2e, fp32.top_k)),
            fp16_score_max_rel=_rel(half_scores, full),
            fp16_tied_pairs=tied_pairs(labels, full, float(np.abs(half_scores - full).max()))))
        log.info("%s", checks[-1].line())
    return checks


def _pipeline_nll(pipe: Pipeline, images: np.ndarray, experts16: dict | None = None,
                  batch: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Routed patch-NLL grids and the chosen expert of every image, through the engine set;
    with ``experts16`` the experts run in the FP16 reference evaluator instead."""
    grids, routed = [], []
    for i in range(0, len(images), batch):
        chunk = images[i:i + batch]
        if experts16 is None:
            frames = pipe.score(chunk)
            grids += [f.patch_nll for f in frames]
            routed += [f.expert for f in frames]
            continue
        feats, pooled = pipe.features(chunk)
        names = np.asarray(pipe.route(pooled)[0])
        out = np.zeros((len(chunk),) + feats.shape[2:], dtype=np.float32)
        for name in set(names):
            out[names == name] = experts16[name].run(None, {"features": feats[names == name]})[0]
        grids += list(out)
        routed += list(names)
    return np.stack(grids), np.asarray(routed)


def tied_pairs(labels: np.ndarray, scores: np.ndarray, error: float) -> float:
    """Share of (normal, defective) pairs whose scores are at most ``2·error`` apart: the only
    pairs a perturbation of every score by at most ``error`` can reorder."""
    labels = np.asarray(labels).astype(bool)
    good, bad = scores[~labels], scores[labels]
    if not len(good) or not len(bad):
        return 0.0
    return float((np.abs(good[:, None] - bad[None, :]) <= 2 * error).mean())


def _pixel_auroc(masks: np.ndarray, maps: np.ndarray) -> float:
    return auroc(masks.reshape(-1), maps.reshape(-1))
