"""Engine sets: fused export, determinism, manifest hashes, FP16 graphs, torch-free loading.

A small run on the synthetic set checks the mechanics; parity and FP16 accuracy on real
images are in test_engines_real.py.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from moleflow.cli import main
from moleflow.config import load_config
from moleflow.engines.export import export_engine_set
from moleflow.engines.fp16 import convert_to_fp16, fp32_nodes, reference_evaluator
from moleflow.engines.fuse import FusedExpert
from moleflow.manifest import EngineSetError, Manifest, sha256_of
from moleflow.engines.pipeline import EngineSet, Pipeline
from moleflow.engines.runtime import OrtGraph
from moleflow.train.bundle import RunBundle
from moleflow.train.continual import train_tasks
from moleflow.data import load_class, load_images
from moleflow.train.flow import MoLEFlow

from tests.conftest import run_without

SMALL = {"train.epochs": 2, "data.image_size": 64, "model.coupling_blocks": 2,
         "model.lora_rank": 8, "eval.overlays_per_class": 0, "train.val_fraction": 0.34,
         "backbone.standardise_light": True}  # the engines' tests cover the standardised path


def _digests(folder: Path) -> dict[str, str]:
    """Every expert's and the backbone's files (router.npz grows with each expert)."""
    files = [*folder.rglob("*.onnx"), *(folder / "experts").glob("*.npz")]
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(files)}


@pytest.fixture(scope="module")
def engine_run(synthetic_root, tmp_path_factory):
    """Run with alpha, exported; then beta added and exported again into the same folder."""
    base = tmp_path_factory.mktemp("engines")
    run, out = base / "run", base / "engines"
    cfg = load_config(None, SMALL)
    train_tasks(run, synthetic_root, ["alpha"], cfg, progress=False)
    export_engine_set(run, out)
    first = _digests(out)
    train_tasks(run, synthetic_root, ["beta"], cfg, progress=False)
    assert main(["export", "--run", str(run), "--out", str(out)]) == 0
    return run, out, first


def test_manifest_describes_every_file_with_its_hash(engine_run):
    run, out, _ = engine_run
    m = Manifest.load(out)
    assert [e.name for e in m.experts] == ["alpha", "beta"]
    assert [e.task for e in m.experts] == [0, 1]
    assert m.input["size"] == 64 and m.input["mean"] == [0.5, 0.5, 0.5]
    assert m.input["standardise"] is True  # as the run's features were extracted
    assert m.features["dim"] == 152 and m.features["grid"] == [8, 8]
    refs = [*m.backbone["files"].values(), m.router,
            *(ref for e in m.experts for ref in e.files.values()),
            *(e.position_norm for e in m.experts)]
    assert len(refs) == 2 + 1 + 4 + 2
    assert m.scoring == {"top_k": 3, "smoothing_sigma": 4.0, "image_score": "standardised",
                         "anomaly_map": "likelihood", "light_retry": 2.0}
    for ref in refs:
        assert sha256_of(out / ref.path) == ref.sha256
    assert all(len(e.calibration_images) == 8 for e in m.experts)
    assert {"torch", "onnx", "onnxruntime", "opset"} <= set(m.software)


def test_adding_an_expert_leaves_earlier_files_byte_identical(engine_run):
    _, out, first = engine_run
    now = _digests(out)
    assert set(first) < set(now)  # beta's two graphs and statistics are new
    assert "experts/task_000_alpha.norm.npz" in first
    for name, digest in first.items():
        assert now[name] == digest, f"{name} changed after adding an expert"


def test_expert_graph_is_a_plain_flow_with_lora_fused(engine_run):
    run, out, _ = engine_run
    m = Manifest.load(out)
    graph = onnx.load(out / m.expert("beta").files["onnx"].path)
    names = [t.name for t in graph.graph.initializer]
    assert not [n for n in names if "lora" in n or "task_bias" in n]
    gemms = [n for n in graph.graph.node if n.op_type in ("Gemm", "MatMul")]
    assert len(gemms) == 2 * 4 + 2 * 6  # 4 linears per coupling subnet, 6 per DIA block
    assert [i.name for i in graph.graph.input] == ["features"]
    assert [o.name for o in graph.graph.output] == ["patch_nll"]
    batch = graph.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param, "batch dimension is dynamic"


def test_fused_weights_are_w_plus_scaled_ba(engine_run):
    run, *_ = engine_run
    bundle = RunBundle.open(run)
    model = bundle.load_model()
    scale = bundle.config.model.lora_alpha / bundle.config.model.lora_rank  # alpha / rank
    assert bundle.config.model.lora_rank == 8 and scale != 1.0  # the scale is really applied
    lin = model.blocks[0].subnet.s1
    with torch.no_grad():
        lin.lora_B["1"].normal_()  # a non-trivial adapter
        fused = FusedExpert(model, 1).blocks[0].w
        expect = lin.base.weight + scale * lin.lora_B["1"] @ lin.lora_A["1"]
    torch.testing.assert_close(fused["s1_w"], expect, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fused["s1_b"][:, 0], lin.base.bias + lin.task_bias["1"],
                               rtol=0, atol=0)
    assert lin.scale == scale
    assert lin.scale_of(0) == bundle.config.model.lora_alpha_first / 8  # task 0: its own alpha


def test_onnx_experts_match_pytorch(engine_run):
    run, out, _ = engine_run
    bundle = RunBundle.open(run)
    model = bundle.load_model()
    engines = EngineSet.open(out)
    for record in bundle.tasks:
        feats = torch.randn(5, bundle.dim, *bundle.grid) * 2
        ref, _ = model.patch_nll(feats, record.index)
        with torch.no_grad():
            fused = FusedExpert(model, record.index)(feats)
        onnx_out = engines.experts[record.name](feats.numpy())["patch_nll"]
        scale = ref.abs().clamp_min(1.0)
        assert float(((fused - ref).abs() / scale).max()) <= 1e-5
        assert float((np.abs(onnx_out - ref.numpy()) / scale.numpy()).max()) <= 1e-4


def test_pipeline_routes_and_scores_like_the_run(engine_run, synthetic_root):
    run, out, _ = engine_run
    pipe = Pipeline(EngineSet.open(out))
    for name in ("alpha", "beta"):
        data = load_class(synthetic_root, name)
        frames = pipe.score(load_images([t.path for t in data.test], 64))
        assert [f.expert for f in frames] == [name] * len(frames)
        assert all(f.map.shape == (64, 64) and np.isfinite(f.raw_score) for f in frames)
        assert all(f.score is None for f in frames)  # not calibrated yet


def test_pipeline_image_scores_are_the_runs_standardised_scores(engine_run, synthetic_root):
    """The engine set scores an image as the run does: top-k of its expert's patch NLLs
    standardised by that expert's position statistics (not the raw NLLs); maps too."""
    from moleflow.scoring import image_scores
    from moleflow.train.continual import open_session
    from moleflow.train.evaluate import score_class
    run, out, _ = engine_run
    pipe = Pipeline(EngineSet.open(out), with_maps=True)
    session = open_session(run, load_config(None, SMALL), progress=False, create=False)
    assert sorted(session.norms) == [0, 1]
    for name, task in (("alpha", 0), ("beta", 1)):
        data = load_class(synthetic_root, name)
        frames = pipe.score(load_images([t.path for t in data.test], 64))
        feats = session.store.features(data, "test")
        ref, ref_maps = score_class(session.model, feats, np.full(len(feats), task),
                                    session.cfg.eval, 64, session.norms)
        got = np.array([f.raw_score for f in frames])
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(np.stack([f.map for f in frames]), ref_maps, atol=1e-5)
        nll = np.stack([f.patch_nll for f in frames])
        raw = image_scores(nll, 3)
        assert not np.allclose(got, raw, rtol=1e-2), "scores are standardised, not raw NLL"
        np.testing.assert_allclose(got, image_scores(nll, 3, pipe.engines.norms[name]),
                                   rtol=1e-6)


def test_image_score_rule_of_the_manifest(engine_run, synthetic_root, tmp_path):
    """Engine sets from before the rules existed score and map raw NLL; a standardised set
    whose expert lacks its statistics is refused by name."""
    import json
    from moleflow.scoring import anomaly_maps, image_scores
    _, out, _ = engine_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["scoring"].pop("image_score")
    manifest["scoring"].pop("anomaly_map")
    for e in manifest["experts"]:
        e.pop("position_norm")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    pipe = Pipeline(EngineSet.open(copy), with_maps=True)
    images = load_images([t.path for t in load_class(synthetic_root, "alpha").test][:4], 64)
    frames = pipe.score(images)
    nll = np.stack([f.patch_nll for f in frames])
    np.testing.assert_allclose([f.raw_score for f in frames], image_scores(nll, 3), rtol=1e-6)
    np.testing.assert_allclose(np.stack([f.map for f in frames]), anomaly_maps(nll, 64, 4.0),
                               rtol=1e-6)
    manifest["scoring"]["image_score"] = "standardised"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineSetError, match="'alpha' .* no position statistics.*re-export"):
        EngineSet.open(copy)
    manifest["scoring"].update(image_score="nll", anomaly_map="probability")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineSetError, match="scoring.anomaly_map 'probability' is not one of"):
        Pipeline(EngineSet.open(copy))


def test_tampered_engine_file_is_refused(engine_run, tmp_path, capsys):
    _, out, _ = engine_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    m = Manifest.load(copy)
    target = copy / m.expert("alpha").files["onnx"].path
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(EngineSetError, match="does not match manifest.json"):
        EngineSet.open(copy)
    target.unlink()
    with pytest.raises(EngineSetError, match="is missing"):
        EngineSet.open(copy)
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(EngineSetError, match="not valid JSON"):
        Manifest.load(copy)
    with pytest.raises(EngineSetError, match="no manifest.json"):
        Manifest.load(tmp_path)


def test_export_of_a_missing_run_is_a_clear_error(tmp_path, capsys):
    assert main(["export", "--run", str(tmp_path / "nope"), "--out", str(tmp_path / "e")]) == 2
    assert "is not a run folder" in capsys.readouterr().err


def test_engine_set_loads_and_scores_without_torch(engine_run, synthetic_root):
    _, out, _ = engine_run
    image = sorted((synthetic_root / "alpha" / "test" / "good").glob("*.png"))[0]
    res = run_without(
        ("torch", "timm", "FrEIA", "train", "onnx"),
        "import sys\n"
        "import cv2, numpy as np\n"
        "from moleflow.engines.pipeline import EngineSet, Pipeline\n"
        f"es = EngineSet.open({str(out)!r})\n"
        f"img = cv2.cvtColor(cv2.resize(cv2.imread({str(image)!r}), (64, 64)), cv2.COLOR_BGR2RGB)\n"
        "f = Pipeline(es).score(img[None])[0]\n"
        "assert 'torch' not in sys.modules\n"
        "print(f.expert, np.isfinite(f.raw_score), f.map.shape)\n")
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["alpha", "True", "(64,", "64)"]


def test_fp16_graph_keeps_reductions_and_layernorm_in_fp32(engine_run):
    _, out, _ = engine_run
    m = Manifest.load(out)
    g16 = onnx.load(out / m.expert("alpha").files["onnx_fp16"].path)
    inferred = onnx.shape_inference.infer_shapes(g16).graph
    types = {v.name: v.type.tensor_type.elem_type
             for v in list(inferred.value_info) + list(inferred.input) + list(inferred.output)}
    types.update({t.name: t.data_type for t in g16.graph.initializer})
    half = onnx.TensorProto.FLOAT16
    reduce_inputs = [n.input[0] for n in g16.graph.node if n.op_type == "ReduceSum"]
    assert reduce_inputs and all(types[i] == onnx.TensorProto.FLOAT for i in reduce_inputs)
    inits = {t.name for t in g16.graph.initializer}
    gemms = [n for n in g16.graph.node if n.op_type in ("MatMul", "Gemm")]
    weights = [i for n in gemms for i in n.input if i in inits]
    assert len(gemms) == 2 * 4 + 2 * 6 and len(weights) >= len(gemms)
    assert all(types[w] == half for w in weights)
    assert g16.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def test_fp16_islands_prevent_overflow_on_extreme_patches(tmp_path):
    """Without LayerNorm nothing bounds z: on far-out features 0.5·Σz² passes 65,504. The
    graph with FP32 reductions stays finite and close to FP32; naive FP16 overflows."""
    from moleflow.engines.export import onnx_bytes
    cfg = load_config(None, {"model.adapter_layernorm": False, "model.coupling_blocks": 2,
                             "model.lora_rank": 4}).resolved_model()
    torch.manual_seed(0)
    model = MoLEFlow(16, (4, 4), cfg)
    model.add_task(0, torch.randn(8, 16, 4, 4))
    feats = torch.randn(3, 16, 4, 4)
    feats[0] *= 400.0  # an extreme frame
    data = onnx_bytes(FusedExpert(model, 0), feats[:2], "features", ["patch_nll"])
    fp32 = onnx.load_from_string(data)
    paths = {}
    for name, graph in (("fp32", fp32), ("islands", convert_to_fp16(fp32)),
                        ("naive", convert_to_fp16(fp32, keep=set()))):
        paths[name] = tmp_path / f"{name}.onnx"
        onnx.save(graph, paths[name])
    out = {"fp32": OrtGraph(paths["fp32"])(feats.numpy())["patch_nll"]}
    with np.errstate(over="ignore"):
        for k in ("islands", "naive"):  # FP16 numerics need the reference (see engines/fp16.py)
            graph = onnx.load(paths[k])
            out[k] = reference_evaluator(graph).run(None, {"features": feats.numpy()})[0]
    assert out["fp32"].max() > 65504, "the test needs a patch whose NLL exceeds FP16's range"
    assert np.isfinite(out["islands"]).all()
    np.testing.assert_allclose(out["islands"], out["fp32"], rtol=2e-2, atol=1.0)
    assert not np.isfinite(out["naive"]).all()
    assert fp32_nodes(fp32.graph)


def test_concurrent_scoring_gives_the_same_scores(engine_run, synthetic_root):
    """The daemon's workers share one Pipeline: scores must not depend on who runs beside."""
    import threading
    _, out, _ = engine_run
    pipe = Pipeline(EngineSet.open(out), with_maps=False)
    data = load_class(synthetic_root, "alpha")
    images = load_images([t.path for t in data.test], pipe.engines.size)
    alone = [f.raw_score for f in pipe.score(images)]
    together: dict[int, list[float]] = {}

    def work(k: int) -> None:
        for _ in range(3):
            together[k] = [f.raw_score for f in pipe.score(images)]

    threads = [threading.Thread(target=work, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in range(3):
        np.testing.assert_allclose(together[k], alone, rtol=1e-5)
