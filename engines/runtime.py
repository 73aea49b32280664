"""Runtime back ends behind one small interface: a ``Graph`` maps one input array to named outputs.

``onnxruntime`` is the embedded default (CPU, or its CUDA / TensorRT execution providers when
installed); ``tensorrt`` runs plans built by ``moleflow build`` (imported lazily: only that back
end needs tensorrt and pycuda). No torch.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Protocol
from collections.abc import Callable

import numpy as np

from moleflow.manifest import EngineSetError

log = logging.getLogger("moleflow.runtime")


class Graph(Protocol):
    """One loaded engine: ``graph(x)`` returns its outputs by name (float32 numpy arrays)."""
    input_name: str
    output_names: list[str]

    def __call__(self, x: np.ndarray) -> dict[str, np.ndarray]: ...


class OrtGraph:
    """An ONNX graph in an ONNX Runtime session."""

    def __init__(self, path: Path, threads: int = 0, providers: list[str] | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise EngineSetError("the onnxruntime back end needs the package 'onnxruntime' "
                                 "(pip install '.[edge]')") from exc
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3  # constant-folding notes on FP16 graphs are not problems
        # An engine set is several sessions (backbone + experts). With a pool per session the
        # idle pools' spinning threads steal the cores from the working one (39 ms per frame on
        # 2 cores, 17 ms without spinning); one shared pool gives 14 ms.
        _shared_thread_pool(ort, threads)
        opts.use_per_session_threads = False
        available = ort.get_available_providers()
        chosen = [p for p in (providers or default_providers(available)) if p in available]
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=chosen)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise EngineSetError(f"onnxruntime cannot load {path}: {exc}") from exc
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.providers = self.session.get_providers()

    def __call__(self, x: np.ndarray) -> dict[str, np.ndarray]:
        outs = self.session.run(self.output_names, {self.input_name: x})
        return dict(zip(self.output_names, outs))


_POOL_THREADS: int | None = None


def _shared_thread_pool(ort, threads: int) -> None:
    """Create ONNX Runtime's process-wide thread pool once (it cannot be resized later)."""
    global _POOL_THREADS
    wanted = threads or cpu_cores()
    if _POOL_THREADS is None:
        ort.set_global_thread_pool_sizes(wanted, 1)
        _POOL_THREADS = wanted
    elif wanted != _POOL_THREADS:
        log.warning("onnxruntime's thread pool already has %d threads; %d requested",
                    _POOL_THREADS, wanted)


def cpu_cores() -> int:
    """CPU cores this process may run on (respects affinity, e.g. systemd's CPUAffinity)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def parallelism(backend: str, workers: int = 0, threads: int = 0) -> tuple[int, int]:
    """Scoring workers and runtime threads per run: by default one single-threaded worker per
    core for onnxruntime (on 2 cores: 87-95 frames/s against 57-87 for one worker running
    2-thread graphs, whose threads wait for each other whenever another process takes a
    core), one worker for tensorrt (one CUDA context and its buffers)."""
    cores = cpu_cores()
    if backend == "tensorrt":
        return 1, threads or 1
    workers = workers or cores
    return workers, threads or max(1, cores // workers)


def limit_library_threads(threads: int) -> None:
    """Keep OpenCV's and the BLAS's own thread pools to ``threads`` in this process.

    The daemon runs one scoring worker per core; libraries that start their own pool per
    call (numpy's OpenBLAS for the anomaly maps, OpenCV for decoding and regions) would make
    the workers' threads wait for each other's spinning helpers: measured, a daemon at 57-62
    frames/s instead of 79-88. ``anomaly_maps`` also limits BLAS around its own products, but
    that limit is restored when a call ends; with several workers one call's exit would hand
    the pool back while another worker's product runs, so the process keeps the limit too."""
    limit = max(1, threads)
    try:
        import cv2
        cv2.setNumThreads(limit)
    except ImportError:  # pragma: no cover - OpenCV is a core dependency
        pass
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        log.warning("threadpoolctl is not installed: numpy's BLAS keeps its own thread pool")
        return
    threadpool_limits(limits=limit, user_api="blas")


def default_providers(available: list[str]) -> list[str]:
    """CUDA when this onnxruntime build has it, always with the CPU as the fallback."""
    return [p for p in ("CUDAExecutionProvider",) if p in available] + ["CPUExecutionProvider"]


def _tensorrt_graph(path: Path, threads: int = 0, providers: list[str] | None = None) -> Graph:
    from moleflow.engines.tensorrt_backend import TrtGraph  # lazy: needs tensorrt and pycuda
    return TrtGraph(path)


BACKENDS: dict[str, Callable[..., Graph]] = {
    "onnxruntime": OrtGraph,
    "tensorrt": _tensorrt_graph,
}
"""Runtime back ends by name; each loads one engine file into a ``Graph``."""

FILE_KEYS = {("onnxruntime", "fp32"): "onnx", ("onnxruntime", "fp16"): "onnx_fp16",
             ("tensorrt", "fp16"): "plan_fp16", ("tensorrt", "fp32"): "plan_fp32"}
"""Which manifest file of an expert each back end and precision runs."""


def file_key(backend: str, precision: str) -> str:
    if backend not in BACKENDS:
        raise EngineSetError(f"unknown runtime back end {backend!r} (known: {', '.join(BACKENDS)})")
    key = FILE_KEYS.get((backend, precision))
    if key is None:
        raise EngineSetError(f"back end {backend!r} has no precision {precision!r}")
    return key
