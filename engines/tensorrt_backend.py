"""TensorRT back end: build serialized plans from the engine set's ONNX graphs, and run them.

Builds are strongly typed: the precision is the ONNX graph's own (``*.fp16.onnx`` carries FP16
weights with FP32 Casts around the reductions; see ``engines/fp16.py``), so no FP16 builder
flag or per-layer precision call is used. That is TensorRT 10's recommended route and the only
one TensorRT 11 keeps, and what the plan computes is what ONNX Runtime verified on the CPU.
One optimisation profile covers batch 1..max; one timing cache is shared by all graphs of the
set. A plan runs only on the TensorRT version and GPU that built it: the manifest records
both, and loading checks them.

tensorrt and pycuda are imported inside functions; this module imports without them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from moleflow.manifest import EngineSetError, FileRef, Manifest, verified

log = logging.getLogger("moleflow.tensorrt")
INSTALL_HINT = ("the tensorrt back end needs NVIDIA TensorRT >= 10 and pycuda with a CUDA GPU "
                "(pip install '.[trt]'; on Jetson use JetPack's python3-libnvinfer in a venv "
                "made with --system-site-packages)")
TIMING_CACHE = "timing.cache"


def _import_trt():
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise EngineSetError(INSTALL_HINT) from exc
    return trt


def _import_cuda():
    try:
        import pycuda.driver as cuda
    except ImportError as exc:
        raise EngineSetError(INSTALL_HINT) from exc
    cuda.init()
    if cuda.Device.count() == 0:
        raise EngineSetError("no CUDA GPU is visible: " + INSTALL_HINT)
    return cuda


def gpu_identity(device: int = 0) -> dict[str, Any]:
    """Name and compute capability of the GPU plans are built for."""
    cuda = _import_cuda()
    dev = cuda.Device(device)
    major, minor = dev.compute_capability()
    return {"gpu": dev.name(), "compute_capability": f"{major}.{minor}"}


def build_plan(onnx_path: Path, input_shape: tuple[int, ...], max_batch: int, opt_batch: int,
               timing_cache: bytes, workspace_mb: int, level: int) -> tuple[bytes, bytes]:
    """One serialized plan from ``onnx_path`` (strongly typed); returns (plan, timing cache)."""
    trt = _import_trt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(f"{parser.get_error(i).node_name()}: {parser.get_error(i).desc()}"
                           for i in range(parser.num_errors))
        raise EngineSetError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    config.builder_optimization_level = level
    cache = config.create_timing_cache(timing_cache)
    config.set_timing_cache(cache, ignore_mismatch=False)
    profile = builder.create_optimization_profile()
    name = network.get_input(0).name
    rest = tuple(input_shape[1:])
    profile.set_shape(name, (1,) + rest, (opt_batch,) + rest, (max_batch,) + rest)
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineSetError(f"TensorRT failed to build a plan from {onnx_path} (see the log "
                             "above for the failing layer)")
    return bytes(plan), bytes(config.get_timing_cache().serialize())


def build_engine_set(root: Path, precision: str = "fp16", max_batch: int = 8, opt_batch: int = 1,
                     workspace_mb: int = 1024, level: int = 3) -> Manifest:
    """Build a plan for the backbone and every expert of the engine set at ``root``."""
    trt = _import_trt()
    root = Path(root)
    manifest = Manifest.load(root)
    src_key, plan_key = ("onnx_fp16", "plan_fp16") if precision == "fp16" else ("onnx", "plan_fp32")
    if precision not in ("fp16", "fp32"):
        raise EngineSetError(f"--precision must be fp16 or fp32, got {precision!r}")
    max_batch = min(max_batch, int(manifest.input.get("max_batch", max_batch)))
    cache_path = root / TIMING_CACHE
    cache = cache_path.read_bytes() if cache_path.is_file() else b""
    size, dim, (h, w) = manifest.input["size"], manifest.features["dim"], manifest.features["grid"]
    jobs = [("backbone", manifest.backbone["files"], (1, 3, size, size))]
    jobs += [(f"expert {e.name}", e.files, (1, dim, h, w)) for e in manifest.experts]
    for what, files, shape in jobs:
        src = verified(root, files[src_key])
        log.info("building %s plan for %s", precision, what)
        plan, cache = build_plan(src, shape, max_batch, opt_batch, cache, workspace_mb, level)
        out = src.with_name(src.name.replace(".fp16.onnx", ".onnx")).with_suffix(
            f".{precision}.plan")
        out.write_bytes(plan)
        files[plan_key] = FileRef.of(root, out)
    cache_path.write_bytes(cache)
    manifest.tensorrt = {"version": trt.__version__, "precision": precision,
                         "max_batch": max_batch, **gpu_identity()}
    manifest.save(root)
    return manifest


def check_compatible(built: dict[str, Any] | None) -> None:
    """Refuse plans built by another TensorRT version or for another GPU."""
    if not built:
        raise EngineSetError("the engine set has no TensorRT plans: run 'moleflow build' on "
                             "this device first")
    trt = _import_trt()
    here = {"version": trt.__version__, **gpu_identity()}
    for key in ("version", "gpu", "compute_capability"):
        if built.get(key) != here[key]:
            raise EngineSetError(f"the plans were built with {key} {built.get(key)!r}, this "
                                 f"device has {here[key]!r}: rebuild with 'moleflow build'")


class TrtGraph:
    """A deserialized plan with device buffers for its largest profile shape, reused per call."""

    def __init__(self, path: Path, device: int = 0) -> None:
        trt = _import_trt()
        cuda = _import_cuda()
        self.cuda = cuda
        self.context_gpu = cuda.Device(device).retain_primary_context()
        self.context_gpu.push()
        try:
            self.logger = trt.Logger(trt.Logger.WARNING)
            self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(Path(path).read_bytes())
            if self.engine is None:
                raise EngineSetError(f"TensorRT cannot deserialize {path} (built by another "
                                     "version or for another GPU?)")
            self.ctx = self.engine.create_execution_context()
            self.stream = cuda.Stream()
            names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
            inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
            if len(inputs) != 1:
                raise EngineSetError(f"{path}: expected one input tensor, found {inputs}")
            self.input_name = inputs[0]
            self.output_names = [n for n in names if n not in inputs]
            max_shape = tuple(self.engine.get_tensor_profile_shape(self.input_name, 0)[2])
            self.max_batch = max_shape[0]
            self.ctx.set_input_shape(self.input_name, max_shape)
            self.buffers: dict[str, Any] = {}
            self.host: dict[str, np.ndarray] = {}
            for name in names:
                dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(name)))
                shape = tuple(self.ctx.get_tensor_shape(name))
                self.host[name] = cuda.pagelocked_empty(int(np.prod(shape)), dtype)
                self.buffers[name] = cuda.mem_alloc(self.host[name].nbytes)
                self.ctx.set_tensor_address(name, int(self.buffers[name]))
        finally:
            self.context_gpu.pop()

    def __call__(self, x: np.ndarray) -> dict[str, np.ndarray]:
        if len(x) > self.max_batch:  # larger batches run in slices of the profile's maximum
            parts = [self(x[i:i + self.max_batch]) for i in range(0, len(x), self.max_batch)]
            return {k: np.concatenate([p[k] for p in parts]) for k in self.output_names}
        cuda = self.cuda
        self.context_gpu.push()
        try:
            host_in = self.host[self.input_name]
            flat = np.ascontiguousarray(x, dtype=host_in.dtype).ravel()
            host_in[: flat.size] = flat
            self.ctx.set_input_shape(self.input_name, tuple(x.shape))
            cuda.memcpy_htod_async(self.buffers[self.input_name], host_in, self.stream)
            if not self.ctx.execute_async_v3(self.stream.handle):
                raise EngineSetError("TensorRT execution failed (execute_async_v3 returned False)")
            shapes = {n: tuple(self.ctx.get_tensor_shape(n)) for n in self.output_names}
            for n in self.output_names:
                cuda.memcpy_dtoh_async(self.host[n], self.buffers[n], self.stream)
            self.stream.synchronize()
            return {n: self.host[n][: int(np.prod(s))].reshape(s).astype(np.float32)
                    for n, s in shapes.items()}
        finally:
            self.context_gpu.pop()
