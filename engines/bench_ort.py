"""The ONNX Runtime half of ``moleflow bench-engines``, run in its own process.

Each runtime is timed alone in a process: PyTorch's OpenMP threads and ONNX Runtime's pools
would otherwise compete for the same two cores and distort both figures. This process imports
no torch, as on the edge device.

    python -m moleflow.engines.bench_ort ENGINES FRAMES.npy THREADS ROUNDS EXPERT[,EXPERT...]
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable

import numpy as np

from moleflow.engines.pipeline import EngineSet, Pipeline


def time_per_frame(fn: Callable[[np.ndarray], dict[str, float]], frames: np.ndarray,
                   batch: int, rounds: int) -> tuple[float, dict[str, float]]:
    """Median ms per frame over ``rounds`` passes through ``frames`` in batches of ``batch``,
    after one warm-up pass, and the mean ms per frame of each stage ``fn`` reports (seconds
    for the whole batch)."""
    n = (len(frames) // batch) * batch
    for i in range(0, n, batch):  # warm-up pass: allocations, first-call kernels, caches
        fn(frames[i:i + batch])
    per_round, stages = [], {}
    for _ in range(rounds):
        t0 = time.perf_counter()
        for i in range(0, n, batch):
            for k, v in fn(frames[i:i + batch]).items():
                stages[k] = stages.get(k, 0.0) + v
        per_round.append(time.perf_counter() - t0)
    return (1000.0 * float(np.median(per_round)) / n,
            {k: 1000.0 * v / (n * rounds) for k, v in stages.items()})


def pipeline_stages(pipe: Pipeline, images: np.ndarray) -> dict[str, float]:
    """Seconds per stage for the whole batch (the pipeline reports them per frame)."""
    return {k: v * len(images) for k, v in pipe.score(images)[0].timings.items()}


def main(argv: list[str]) -> None:
    root, frames_path, threads, rounds, experts = argv
    frames = np.load(frames_path)
    pipe = Pipeline(EngineSet.open(root, threads=int(threads), experts=experts.split(",")))
    rows = []
    for batch in (1, 8):
        ms, stages = time_per_frame(lambda x: pipeline_stages(pipe, x), frames, batch,
                                    int(rounds))
        rows.append({"batch": batch, "ms": ms, "stages": stages})
    print(json.dumps(rows))


if __name__ == "__main__":
    main(sys.argv[1:])
