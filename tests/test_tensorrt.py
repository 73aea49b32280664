"""TensorRT back end. Building and running plans needs an NVIDIA GPU with TensorRT >= 10 and
pycuda; without them those tests skip and say why. Everything TensorRT consumes (the FP16 ONNX
graphs with FP32 reductions) is checked on the CPU in test_engines*.py."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from moleflow.manifest import EngineSetError
from moleflow.engines.pipeline import EngineSet

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None
HAVE_PYCUDA = importlib.util.find_spec("pycuda") is not None


def _gpu_or_skip() -> None:
    if not (HAVE_TRT and HAVE_PYCUDA):
        pytest.skip("TensorRT and pycuda are not installed (pip install '.[trt]' on a machine "
                    "with an NVIDIA GPU); the ONNX graphs they consume are tested on the CPU")
    import pycuda.driver as cuda
    cuda.init()
    if cuda.Device.count() == 0:
        pytest.skip("no CUDA GPU visible to pycuda")


@pytest.mark.skipif(HAVE_TRT, reason="TensorRT is installed here; this checks the error without it")
def test_tensorrt_back_end_without_tensorrt_names_the_install(tmp_path):
    from moleflow.engines.tensorrt_backend import build_engine_set
    with pytest.raises(EngineSetError, match=r"pip install '.\[trt\]'"):
        build_engine_set(tmp_path)


@pytest.mark.gpu
def test_tensorrt_plans_match_onnx_runtime(synthetic_root, tmp_path):
    _gpu_or_skip()
    from moleflow.config import load_config
    from moleflow.engines.export import export_engine_set
    from moleflow.engines.tensorrt_backend import build_engine_set
    from moleflow.train.continual import train_tasks
    cfg = load_config(None, {"train.epochs": 2, "data.image_size": 64,
                             "model.coupling_blocks": 2, "model.lora_rank": 8,
                             "eval.overlays_per_class": 0})
    train_tasks(tmp_path / "run", synthetic_root, ["alpha", "beta"], cfg, progress=False)
    out = tmp_path / "engines"
    export_engine_set(tmp_path / "run", out)
    manifest = build_engine_set(out, "fp16", max_batch=4)
    assert manifest.tensorrt["precision"] == "fp16" and manifest.tensorrt["gpu"]
    assert (out / "timing.cache").is_file()
    trt_set = EngineSet.open(out, backend="tensorrt", precision="fp16")
    ort_set = EngineSet.open(out, backend="onnxruntime", precision="fp32")
    image = np.random.default_rng(0).normal(size=(6, 3, 64, 64)).astype(np.float32)  # > max
    feats = ort_set.backbone(image)["features"]
    np.testing.assert_allclose(trt_set.backbone(image)["features"], feats, rtol=2e-2, atol=2e-2)
    for name in trt_set.experts:
        out_trt = trt_set.experts[name](feats)["patch_nll"]
        assert out_trt.shape == (6, 8, 8) and np.isfinite(out_trt).all()
        np.testing.assert_allclose(out_trt, ort_set.experts[name](feats)["patch_nll"],
                                   rtol=2e-2, atol=1.0)
