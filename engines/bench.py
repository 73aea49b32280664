"""``moleflow bench-engines``: per-frame cost of backbone + router + expert, PyTorch eager vs the
exported engine set in ONNX Runtime, at batch 1 and 8, with one expert loaded and with all.

Both sides do the same work per frame: normalise, backbone, pooled feature, Mahalanobis distance
to every loaded prototype, one expert per frame, top-k image score and the smoothed anomaly map.
Frames are real test images of every class of the run, interleaved.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engines.imaging import anomaly_maps, image_scores, preprocess
from engines.pipeline import EngineSet, Pipeline
from train.backbone import FeatureExtractor
from train.bundle import RunBundle
from train.data import load_class, load_images


@dataclass
class BenchRow:
    runtime: str
    batch: int
    experts: int
    ms_per_frame: float
    stages: dict[str, float]

    @property
    def fps(self) -> float:
        return 1000.0 / self.ms_per_frame


class EagerPipeline:
    """The PyTorch side: training-code modules as they are (LoRA applied per call)."""

    def __init__(self, bundle: RunBundle, experts: int) -> None:
        self.cfg = bundle.config
        self.extractor = FeatureExtractor(self.cfg.backbone)
        self.model = bundle.load_model(seed=self.cfg.train.seed)
        router = bundle.load_router()
        self.protos = router.prototypes[:experts]
        self.tasks = self.model.tasks[:experts]

    @torch.no_grad()
    def score(self, images: np.ndarray) -> dict[str, float]:
        t0 = time.perf_counter()
        spec = self.extractor.spec
        feats = self.extractor(torch.from_numpy(preprocess(images, spec.mean, spec.std)))
        pooled = feats.mean(dim=(2, 3)).double().numpy()
        t1 = time.perf_counter()
        dist = np.stack([p.distance(pooled) for p in self.protos], axis=1)
        chosen = dist.argmin(axis=1)
        t2 = time.perf_counter()
        grids = np.zeros((len(images),) + tuple(feats.shape[2:]), dtype=np.float32)
        for j in np.unique(chosen):
            sel = torch.from_numpy(chosen == j)
            grids[sel.numpy()] = self.model.patch_nll(feats[sel], self.tasks[j])[0].numpy()
        t3 = time.perf_counter()
        image_scores(grids, self.cfg.eval.top_k)
        anomaly_maps(grids, images.shape[1], self.cfg.eval.smoothing_sigma)
        t4 = time.perf_counter()
        return {"backbone": t1 - t0, "router": t2 - t1, "expert": t3 - t2, "postprocess": t4 - t3}


def _ort_stages(pipe: Pipeline, images: np.ndarray) -> dict[str, float]:
    frames = pipe.score(images)
    return {k: v * len(images) for k, v in frames[0].timings.items()}


def _time(fn, frames: np.ndarray, batch: int, rounds: int) -> tuple[float, dict[str, float]]:
    """Median ms per frame over ``rounds`` passes through ``frames`` in batches of ``batch``."""
    fn(frames[:batch])  # warm-up (allocations, first-call kernels)
    per_round, stages = [], {}
    for _ in range(rounds):
        total = 0.0
        for i in range(0, len(frames) - batch + 1, batch):
            st = fn(frames[i:i + batch])
            total += sum(st.values())
            for k, v in st.items():
                stages[k] = stages.get(k, 0.0) + v
        per_round.append(total)
    n = (len(frames) // batch) * batch
    ms = 1000.0 * float(np.median(per_round)) / n
    return ms, {k: 1000.0 * v / (n * rounds) for k, v in stages.items()}


def bench_engines(run_dir: Path, engines_dir: Path, data_root: Path | None, threads: int,
                  per_class: int = 8, rounds: int = 3) -> list[BenchRow]:
    bundle = RunBundle.open(run_dir)
    torch.set_num_threads(threads or torch.get_num_threads())
    size = bundle.config.data.image_size
    per = []
    for record in bundle.tasks:
        root = data_root if data_root and (data_root / record.name).is_dir() else \
            Path(record.data_root)
        data = load_class(root, record.name)
        per.append(load_images([t.path for t in data.test][:per_class], size))
    frames = np.stack([img for group in zip(*per) for img in group])  # interleave classes
    n_all = len(bundle.tasks)
    rows = []
    for experts in sorted({1, n_all}):
        names = [t.name for t in bundle.tasks[:experts]]
        eager = EagerPipeline(bundle, experts)
        pipe = Pipeline(EngineSet.open(engines_dir, threads=threads, experts=names))
        for batch in (1, 8):
            ms, st = _time(eager.score, frames, batch, rounds)
            rows.append(BenchRow("PyTorch eager", batch, experts, ms, st))
            ms, st = _time(lambda x: _ort_stages(pipe, x), frames, batch, rounds)
            rows.append(BenchRow("ONNX Runtime", batch, experts, ms, st))
    return rows


def format_rows(rows: list[BenchRow]) -> str:
    head = (f"{'runtime':<15}{'batch':>6}{'experts':>8}{'ms/frame':>10}{'frames/s':>10}"
            f"{'backbone':>10}{'router':>8}{'expert':>8}{'post':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        s = r.stages
        lines.append(f"{r.runtime:<15}{r.batch:>6}{r.experts:>8}{r.ms_per_frame:>10.2f}"
                     f"{r.fps:>10.1f}{s['backbone']:>10.2f}{s['router']:>8.3f}"
                     f"{s['expert']:>8.2f}{s['postprocess']:>7.2f}")
    for batch in (1, 8):
        for experts in sorted({r.experts for r in rows}):
            pair = {r.runtime: r for r in rows if r.batch == batch and r.experts == experts}
            if len(pair) == 2:
                gain = pair["PyTorch eager"].ms_per_frame / pair["ONNX Runtime"].ms_per_frame
                lines.append(f"speed-up ONNX Runtime / eager, batch {batch}, {experts} "
                             f"expert(s): {gain:.2f}x")
    return "\n".join(lines)
