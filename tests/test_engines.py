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
                         "anomaly_map": "likelihood"}
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


@pytest.mark.parametrize("mean,std", [((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
                                      ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
def test_preprocess_is_the_normalisation_formula(mean, std):
    from moleflow.scoring import preprocess
    images = np.random.default_rng(0).integers(0, 256, (3, 40, 56, 3), dtype=np.uint8)
    expected = ((images.astype(np.float64) / 255.0 - np.asarray(mean)) / np.asarray(std))
    got = preprocess(images, mean, std)
    assert got.dtype == np.float32 and got.shape == (3, 3, 40, 56)
    np.testing.assert_allclose(got, expected.transpose(0, 3, 1, 2), atol=2e-6)
    assert preprocess(images[:0], mean, std).shape == (0, 3, 40, 56)
    with pytest.raises(ValueError, match="uint8"):
        preprocess(images.astype(np.float32), mean, std)


@pytest.mark.parametrize("mean,std", [((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
                                      ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
def test_standardised_input_cancels_gain_exposure_and_contrast(mean, std):
    from moleflow.scoring import LIGHT_MEAN, LIGHT_STD, preprocess

    def grey(blob):  # the standardised frame in units of the grey range (B, pixels)
        x = blob * np.asarray(std)[None, :, None, None] + np.asarray(mean)[None, :, None, None]
        return x.reshape(len(x), -1).astype(np.float64)

    rng = np.random.default_rng(1)
    images = rng.integers(40, 200, (2, 48, 48, 3), dtype=np.uint8)
    images[1, :24] //= 3  # a darker half: frames with their own structure
    base = preprocess(images, mean, std, standardise=True)
    np.testing.assert_allclose(grey(base).mean(axis=1), LIGHT_MEAN, atol=1e-5)
    np.testing.assert_allclose(grey(base).std(axis=1), LIGHT_STD, rtol=1e-5)
    if mean == (0.5, 0.5, 0.5):  # the default backbone's: zero mean, std LIGHT_STD / 0.5
        np.testing.assert_allclose(base.reshape(2, -1).mean(axis=1), 0.0, atol=1e-5)
        np.testing.assert_allclose(base.reshape(2, -1).std(axis=1), LIGHT_STD / 0.5, rtol=1e-5)
    for gain, offset in ((1.1, 0.0), (0.9, 12.0), (1.0, -10.0)):  # all inside 0..255
        changed = np.rint(images * gain + offset).astype(np.uint8)  # no clipping at these
        same = preprocess(changed, mean, std, standardise=True)
        # what remains is the camera's rounding to whole grey levels
        assert np.abs(same - base).max() < 0.02, (gain, offset)
        unstandardised = preprocess(changed, mean, std) - preprocess(images, mean, std)
        assert np.abs(unstandardised).max() > 0.05  # the change the standardisation removes
    blank = preprocess(np.full((1, 8, 8, 3), 77, np.uint8), mean, std, standardise=True)
    # a blank frame becomes blank mid grey (float rounding aside)
    assert np.abs(grey(blank) - LIGHT_MEAN).max() < 1e-5
    noisy = np.full((1, 8, 8, 3), 77, np.uint8)
    noisy[0, 0, 0, 0] = 78  # one grey level of noise is not amplified to full contrast
    assert np.abs(grey(preprocess(noisy, mean, std, standardise=True)) - LIGHT_MEAN).max() < 0.25


@pytest.mark.parametrize("h,w,size,sigma", [(32, 32, 256, 4.0), (28, 20, 224, 2.5),
                                            (16, 16, 64, 0.0)])
def test_anomaly_maps_equal_opencv_resize_and_blur(h, w, size, sigma):
    from moleflow.scoring import anomaly_maps, reference_maps
    grids = (np.random.default_rng(1).normal(size=(3, h, w)) * 30 + 100).astype(np.float32)
    got, ref = anomaly_maps(grids, size, sigma), reference_maps(grids, size, sigma)
    assert got.shape == ref.shape == (3, size, size) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-3)
    grids[1, 3, 5] += 500.0  # a hot patch stays where it is
    peak = np.unravel_index(np.argmax(anomaly_maps(grids, size, sigma)[1]), (size, size))
    assert abs(peak[0] - (3 + 0.5) * size / h) <= size / h and \
        abs(peak[1] - (5 + 0.5) * size / w) <= size / w


def test_position_norm_standardises_per_position_with_a_floored_std():
    from moleflow.scoring import PositionNorm, image_scores
    # position (0, 0) varies a lot over the normal grids, (0, 1) a little, (1, *) not at all
    train = np.array([[[0.0, 10.0], [5.0, 5.0]], [[20.0, 12.0], [5.0, 5.0]],
                      [[40.0, 14.0], [5.0, 5.0]]], dtype=np.float32)
    norm = PositionNorm.fit(train)
    std = np.sqrt(np.array([800.0, 8.0]) / 3)  # population std of (0, 20, 40) and (10, 12, 14)
    np.testing.assert_allclose(norm.mean, [[20.0, 12.0], [5.0, 5.0]])
    floor = 0.1 * np.median([std[0], std[1], 0.0, 0.0])  # constant positions: floored
    np.testing.assert_allclose(norm.std, [[std[0], std[1]], [floor, floor]], rtol=1e-6)
    test = np.array([[[50.0, 12.0], [5.0, 5.0]],    # high raw NLL where normals vary anyway
                     [[20.0, 17.0], [5.0, 5.0]]],   # a smaller NLL where they never do
                    dtype=np.float32)
    z = norm.apply(test)
    np.testing.assert_allclose(z[0, 0], [30.0 / std[0], 0.0], rtol=1e-6)
    np.testing.assert_allclose(image_scores(test, 1, norm), [30.0 / std[0], 5.0 / std[1]],
                               rtol=1e-6)
    assert list(np.argsort(image_scores(test, 1))) == [1, 0]       # raw NLL: image 0 worse
    assert list(np.argsort(image_scores(test, 1, norm))) == [0, 1]  # standardised: image 1
    back = PositionNorm.from_arrays(norm.to_arrays())
    assert np.array_equal(back.mean, norm.mean) and np.array_equal(back.std, norm.std)
    with pytest.raises(ValueError, match="do not match"):
        norm.apply(np.zeros((1, 3, 3), np.float32))
    with pytest.raises(ValueError, match="at least 2 finite"):
        PositionNorm.fit(train[:1])
    with pytest.raises(ValueError, match="positive-std"):
        PositionNorm.from_arrays({"mean": norm.mean, "std": np.zeros((2, 2))}, "x.npz")


def test_likelihood_map_values_are_one_minus_the_per_dimension_likelihood():
    from moleflow.scoring import map_values
    nll = np.array([[[-10.0, 0.0], [100.0, 1e6]]], dtype=np.float32)
    lik = map_values(nll, "likelihood", 100)
    np.testing.assert_allclose(lik[0], [[1 - np.exp(0.1), 0.0], [1 - np.exp(-1.0), 1.0]],
                               rtol=1e-6)
    assert lik.dtype == np.float32
    assert np.all(np.diff(map_values(np.sort(nll.ravel())[None, None], "likelihood", 100)) >= 0)
    assert np.isfinite(map_values(np.full((1, 1, 1), -1e9, np.float32), "likelihood", 100)).all()
    assert np.array_equal(map_values(nll, "nll", 100), nll)
    with pytest.raises(ValueError, match="'likelihood' or 'nll'"):
        map_values(nll, "probability", 100)


def test_parallelism_one_single_threaded_worker_per_core(monkeypatch):
    from moleflow.engines import runtime
    monkeypatch.setattr(runtime, "cpu_cores", lambda: 4)
    assert runtime.parallelism("onnxruntime") == (4, 1)
    assert runtime.parallelism("onnxruntime", workers=1) == (1, 4)
    assert runtime.parallelism("onnxruntime", workers=2, threads=3) == (2, 3)
    assert runtime.parallelism("tensorrt", workers=4) == (1, 1)  # one CUDA context


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
