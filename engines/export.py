"""Run folder -> engine set: backbone and fused experts as ONNX (FP32 and FP16), router arrays,
manifest. The only part of ``engines/`` that needs torch.

    manifest.json
    backbone.onnx, backbone.fp16.onnx        image (B, 3, S, S) -> features, pooled
    experts/task_000_<name>.onnx (+ .fp16.onnx)   features (B, D, H, W) -> patch_nll (B, H, W)
    experts/task_000_<name>.norm.npz         patch-NLL mean and std per grid position
    router.npz                               means, precisions, distance quantiles per task
    calibration.json                         written by `moleflow calibrate`

Export is deterministic: exporting again after a task was added rewrites the earlier experts'
files with identical bytes (a test proves it).
"""

from __future__ import annotations

import contextlib
import io
import logging
import platform
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from moleflow import __version__
from moleflow.config import Config
from moleflow.engines.fp16 import convert_to_fp16
from moleflow.engines.fuse import FusedExpert
from moleflow.manifest import MANIFEST, ExpertEntry, FileRef, Manifest
from moleflow.train.backbone import FeatureExtractor
from moleflow.train.bundle import RunBundle, RunError

log = logging.getLogger("moleflow.export")
OPSET = 18
MAX_BATCH = 64


class BackboneGraph(nn.Module):
    """The frozen backbone with its feature aggregation and the router's pooled feature."""

    def __init__(self, extractor: FeatureExtractor) -> None:
        super().__init__()
        self.extractor = extractor

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.extractor(image)
        return features, features.mean(dim=(2, 3))


def onnx_bytes(module: nn.Module, example: torch.Tensor, input_name: str,
               output_names: list[str]) -> bytes:
    """Export ``module`` (eval mode) with a dynamic batch dimension; returns the model bytes."""
    import onnx
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    for name in ("onnx_ir", "onnxscript", "torch.onnx", "torch.export"):
        logging.getLogger(name).setLevel(logging.WARNING)  # per-pass chatter, not problems
    with warnings.catch_warnings(), torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module.eval(), (example,), dynamo=True, opset_version=OPSET,
                                    input_names=[input_name], output_names=output_names,
                                    dynamic_shapes={input_name: {0: batch}}, verbose=False)
    model = program.model_proto
    model.producer_name, model.producer_version = "moleflow-edge", "1"
    del model.metadata_props[:]
    for node in model.graph.node:  # exporter provenance (stack traces, paths): not reproducible
        del node.metadata_props[:]
    for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        del vi.metadata_props[:]
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _write_if_changed(path: Path, data: bytes) -> None:
    """Write ``data`` unless the file already holds exactly these bytes (keeps mtimes stable)."""
    if path.is_file() and path.read_bytes() == data:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def _pair(out: Path, stem: str, data: bytes) -> dict[str, FileRef]:
    """Write the FP32 graph and its FP16 twin; return their file references."""
    import onnx
    fp32, fp16 = out / f"{stem}.onnx", out / f"{stem}.fp16.onnx"
    _write_if_changed(fp32, data)
    _write_if_changed(fp16, convert_to_fp16(onnx.load_from_string(data)).SerializeToString())
    return {"onnx": FileRef.of(out, fp32), "onnx_fp16": FileRef.of(out, fp16)}


def export_engine_set(run_dir: Path, out: Path, config: Config | None = None) -> Manifest:
    """Export every expert of the run (and the backbone and router) to the engine set ``out``."""
    bundle = RunBundle.open(run_dir)
    if not bundle.tasks:
        raise RunError(f"run {run_dir} has no trained task to export")
    cfg = bundle.config
    evalcfg = (config or cfg).eval
    torch.set_num_threads(cfg.train.threads or torch.get_num_threads())
    out.mkdir(parents=True, exist_ok=True)
    extractor = FeatureExtractor(cfg.backbone)
    size = cfg.data.image_size
    if extractor.identity(size) != bundle.backbone_identity:
        raise RunError(f"run {run_dir} was trained with backbone {bundle.backbone_identity}, "
                       f"but this installation builds {extractor.identity(size)}")
    log.info("exporting backbone %s at %d px", cfg.backbone.name, size)
    image = torch.zeros(2, 3, size, size)
    backbone_files = _pair(out, "backbone", onnx_bytes(BackboneGraph(extractor), image, "image",
                                                       ["features", "pooled"]))
    model = bundle.load_model(seed=cfg.train.seed)
    norms = bundle.load_norms()
    if evalcfg.image_score == "standardised" and len(norms) < len(bundle.tasks):
        lacking = [t.name for t in bundle.tasks if t.index not in norms]
        raise RunError(f"run {run_dir} has no position statistics for {', '.join(lacking)} "
                       f"(trained before they existed): run 'moleflow eval --run {run_dir} "
                       "--data DIR' once to compute them, or export with eval.image_score=nll")
    feats = torch.zeros(2, bundle.dim, *bundle.grid)
    experts = []
    for record in bundle.tasks:
        log.info("exporting expert %d/%d (%s) with LoRA fused", len(experts) + 1,
                 len(bundle.tasks), record.name)
        data = onnx_bytes(FusedExpert(model, record.index), feats, "features", ["patch_nll"])
        files = _pair(out, f"experts/{record.stem}", data)
        norm_ref = None
        if record.index in norms:
            path = out / "experts" / f"{record.stem}.norm.npz"
            _write_if_changed(path, npz_bytes(norms[record.index].to_arrays()))
            norm_ref = FileRef.of(out, path)
        experts.append(ExpertEntry(record.name, record.index, files,
                                   list(getattr(record, "val_images", []) or []), norm_ref))
    router_ref = _write_router(bundle, out)
    calib = out / "calibration.json"
    import onnx
    import onnxruntime
    manifest = Manifest(
        backbone={"name": cfg.backbone.name, "identity": bundle.backbone_identity,
                  "files": backbone_files},
        input={"size": size, "layout": "NCHW", "colour": "RGB", "dtype": "float32",
               "mean": list(extractor.spec.mean), "std": list(extractor.spec.std),
               "standardise": bool(cfg.backbone.standardise_light),
               "name": "image", "max_batch": MAX_BATCH},
        features={"dim": bundle.dim, "grid": list(bundle.grid), "name": "features",
                  "pooled": "pooled", "output": "patch_nll"},
        scoring={"top_k": evalcfg.top_k, "smoothing_sigma": evalcfg.smoothing_sigma,
                 "image_score": evalcfg.image_score, "anomaly_map": evalcfg.anomaly_map,
                 "light_retry": evalcfg.light_retry},
        experts=experts, router=router_ref,
        calibration=FileRef.of(out, calib) if calib.is_file() else None,
        software={"moleflow": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
                  "onnxruntime": onnxruntime.__version__, "opset": str(OPSET),
                  "python": platform.python_version()},
    )
    manifest.save(out)
    log.info("engine set %s: %d experts, %s", out, len(experts), out / MANIFEST)
    return manifest


def _write_router(bundle: RunBundle, out: Path) -> FileRef:
    """router.npz (means, precisions, names, training-distance quantiles), byte-stable."""
    _write_if_changed(out / "router.npz", npz_bytes(bundle.load_router().to_arrays()))
    return FileRef.of(out, out / "router.npz")


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An .npz archive with fixed timestamps (np.savez stamps the current time)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, value in arrays.items():
            arr = io.BytesIO()
            np.lib.format.write_array(arr, np.asarray(value), allow_pickle=False)
            zf.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)),
                        arr.getvalue())
    return buf.getvalue()
