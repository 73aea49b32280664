"""``moleflow bench-engines``: per-frame cost of backbone + router + expert, PyTorch eager vs the
exported engine set in ONNX Runtime, at batch 1 and 8, with one expert loaded and with all.

Both sides do the same work per frame: normalise, backbone, pooled feature, Mahalanobis distance
to every loaded prototype, one expert per frame, top-k image score and the smoothed anomaly map.
Frames are real test images of every class of the run, interleaved. Each runtime is timed in
a process of its own (see engines/bench_ort.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from moleflow.engines.bench_ort import time_per_frame
from moleflow.scoring import anomaly_maps, map_values, routed_image_scores
from moleflow.train.backbone import FeatureExtractor
from moleflow.train.bundle import RunBundle
from moleflow.data import load_class, load_images


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
        norms = bundle.load_norms()
        self.norms = norms if self.cfg.eval.image_score == "standardised" else None

    @torch.no_grad()
    def score(self, images: np.ndarray) -> dict[str, float]:
        t0 = time.perf_counter()
        feats = self.extractor(torch.from_numpy(self.extractor.preprocess(images)))
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
        routed_image_scores(grids, [self.tasks[j] for j in chosen], self.norms,
                            self.cfg.eval.top_k)
        anomaly_maps(map_values(grids, self.cfg.eval.anomaly_map, feats.shape[1]),
                     images.shape[1], self.cfg.eval.smoothing_sigma)
        t4 = time.perf_counter()
        return {"backbone": t1 - t0, "router": t2 - t1, "expert": t3 - t2, "postprocess": t4 - t3}


def _ort_rows(engines_dir: Path, frames: np.ndarray, threads: int, rounds: int,
              names: list[str]) -> list[BenchRow]:
    """ONNX Runtime timings from a fresh process (see engines/bench_ort.py)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "frames.npy"
        np.save(path, frames)
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
        res = subprocess.run([sys.executable, "-m", "moleflow.engines.bench_ort", str(engines_dir),
                              str(path), str(threads), str(rounds), ",".join(names)],
                             capture_output=True, text=True, env=env, timeout=3600)
    if res.returncode != 0:
        raise RuntimeError(f"ONNX Runtime benchmark failed: {res.stderr[-2000:]}")
    return [BenchRow("ONNX Runtime", r["batch"], len(names), r["ms"], r["stages"])
            for r in json.loads(res.stdout.strip().splitlines()[-1])]


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
        eager = EagerPipeline(bundle, experts)
        for batch in (1, 8):
            ms, st = time_per_frame(eager.score, frames, batch, rounds)
            rows.append(BenchRow("PyTorch eager", batch, experts, ms, st))
    for experts in sorted({1, n_all}):
        rows += _ort_rows(engines_dir, frames, threads or 0, rounds,
                          [t.name for t in bundle.tasks[:experts]])
    return sorted(rows, key=lambda r: (r.experts, r.batch, r.runtime != "PyTorch eager"))


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
