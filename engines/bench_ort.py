"""The ONNX Runtime half of ``moleflow bench-engines``, run in its own process.

Each runtime is timed alone in a process: PyTorch's OpenMP threads and ONNX Runtime's pools
would otherwise compete for the same two cores and distort both figures. This process imports
no torch, as on the edge device.

    python -m engines.bench_ort ENGINES FRAMES.npy THREADS ROUNDS EXPERT[,EXPERT...]
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np

from engines.pipeline import EngineSet, Pipeline


def time_pipeline(pipe: Pipeline, frames: np.ndarray, batch: int, rounds: int
                  ) -> tuple[float, dict[str, float]]:
    """Median ms per frame over ``rounds`` passes, and the mean ms per frame of each stage."""
    n = (len(frames) // batch) * batch
    for i in range(0, n, batch):  # warm-up pass, as for the eager side
        pipe.score(frames[i:i + batch])
    per_round, stages = [], {}
    for _ in range(rounds):
        t0 = time.perf_counter()
        for i in range(0, n, batch):
            for k, v in pipe.score(frames[i:i + batch])[0].timings.items():
                stages[k] = stages.get(k, 0.0) + v * batch
        per_round.append(time.perf_counter() - t0)
    return (1000.0 * float(np.median(per_round)) / n,
            {k: 1000.0 * v / (n * rounds) for k, v in stages.items()})


def main(argv: list[str]) -> None:
    root, frames_path, threads, rounds, experts = argv
    frames = np.load(frames_path)
    pipe = Pipeline(EngineSet.open(root, threads=int(threads), experts=experts.split(",")))
    rows = []
    for batch in (1, 8):
        ms, stages = time_pipeline(pipe, frames, batch, int(rounds))
        rows.append({"batch": batch, "ms": ms, "stages": stages})
    print(json.dumps(rows))


if __name__ == "__main__":
    main(sys.argv[1:])
