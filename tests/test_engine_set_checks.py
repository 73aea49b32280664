"""A hostile engine set: tampered files, hand-edited manifests and calibrations are refused by
``EngineSet.open`` and ``serve --validate-config`` with one line naming the file or field; an
expert left without a calibration is a warning (it will raise no alarm).

Runs on a small engine set trained on the synthetic classes; each test tampers with its own
copy.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from moleflow.cli import main
from moleflow.engines.export import npz_bytes
from moleflow.manifest import EngineSetError, Manifest, sha256_of
from moleflow.engines.pipeline import EngineSet, validate_engine_set

# engine_set: the small calibrated set of tests/conftest.py (synthetic alpha and beta)


@pytest.fixture()
def copy(engine_set, tmp_path) -> Path:
    out = tmp_path / "engines"
    shutil.copytree(engine_set, out)
    return out


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def edit_manifest(root: Path, edit) -> None:
    """Apply ``edit`` (changes the parsed manifest in place) to the manifest file."""
    raw = json.loads((root / "manifest.json").read_text())
    edit(raw)
    (root / "manifest.json").write_text(json.dumps(raw))


def walk(node, visit) -> None:
    """``visit`` every JSON object inside ``node``."""
    if isinstance(node, dict):
        visit(node)
        node = list(node.values())
    for value in node if isinstance(node, list) else []:
        walk(value, visit)


def rehash(root: Path, rel: str) -> None:
    """Record ``rel``'s present sha256 and size in the manifest, as a hostile edit that also
    rewrites the manifest would: only the content checks can catch it then."""
    path = root / rel

    def fix(node: dict) -> None:
        if node.get("path") == rel:
            node.update(sha256=sha256_of(path), bytes=path.stat().st_size)
    edit_manifest(root, lambda m: walk(m, fix))


def validate(root: Path, tmp_path: Path, capsys, *extra: str) -> tuple[int, str]:
    cfg = tmp_path / "edge.yaml"
    cfg.write_text(f"engines:\n  path: {root}\n" + "".join(extra))
    capsys.readouterr()
    rc = main(["serve", "--config", str(cfg), "--validate-config"])
    return rc, capsys.readouterr().err


def refused(root: Path, tmp_path: Path, capsys, pattern: str) -> str:
    """Both validate-config (exit 2, one line naming the problem) and EngineSet.open refuse."""
    rc, err = validate(root, tmp_path, capsys)
    assert rc == 2 and pattern in err and "Traceback" not in err, err
    with pytest.raises(EngineSetError, match=re.escape(pattern)):
        EngineSet.open(root)
    return err


def test_export_and_calibration_record_size_and_sha256_of_every_file(engine_set, tmp_path,
                                                                     capsys):
    manifest = Manifest.load(engine_set)
    refs = manifest.file_refs()
    paths = {r.path for r in refs}
    assert {"router.npz", "calibration.json", "backbone.onnx", "backbone.fp16.onnx"} <= paths
    assert {e.position_norm.path for e in manifest.experts} <= paths
    for ref in refs:
        path = engine_set / ref.path
        assert ref.bytes == path.stat().st_size and ref.sha256 == sha256_of(path), ref.path
    rc, err = validate(engine_set, tmp_path, capsys)
    assert rc == 0 and "WARNING" not in err, err


@pytest.mark.parametrize("target", ["router.npz", "calibration.json", "norm"])
def test_a_flipped_byte_in_any_file_is_refused_naming_it(copy, tmp_path, capsys, target):
    if target == "norm":
        target = Manifest.load(copy).expert("beta").position_norm.path
    flip_byte(copy / target)
    err = refused(copy, tmp_path, capsys, "does not match manifest.json")
    assert target in err


def test_a_truncated_file_is_refused_by_its_size(copy, tmp_path, capsys):
    path = copy / "backbone.fp16.onnx"
    path.write_bytes(path.read_bytes()[:-10])
    rc, err = validate(copy, tmp_path, capsys)
    assert rc == 2 and "backbone.fp16.onnx" in err and "bytes, recorded" in err


def test_older_manifest_without_sizes_still_loads_and_verifies(copy, tmp_path, capsys):
    edit_manifest(copy, lambda m: walk(m, lambda node: node.pop("bytes", None)))
    assert all(r.bytes is None for r in Manifest.load(copy).file_refs())
    assert validate(copy, tmp_path, capsys)[0] == 0
    flip_byte(copy / "router.npz")
    assert "router.npz does not match" in validate(copy, tmp_path, capsys)[1]


def test_manifest_that_is_a_list_is_refused(copy, tmp_path, capsys):
    raw = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps([raw]))
    err = refused(copy, tmp_path, capsys, "must be a JSON object, got a JSON list")
    assert "manifest.json" in err


@pytest.mark.parametrize("edit, field", [
    (lambda m: m["input"].pop("mean"), "field input.mean is missing"),
    (lambda m: m["input"].update(std=[0.5, 0, 0.5]), "field input.std must be a list of 3 "
                                                      "positive numbers"),
    (lambda m: m["input"].update(standardise=1), "field input.standardise must be true or "
                                                  "false"),
    (lambda m: m["features"].update(grid="8x8"), "field features.grid must be a list"),
    (lambda m: m["scoring"].update(top_k=True), "field scoring.top_k must be an integer"),
    (lambda m: m["scoring"].update(light_retry=-1), "field scoring.light_retry must be at least 0"),
    (lambda m: m.pop("router"), "field router must be an object"),
    (lambda m: m["experts"][1].pop("files"), "field experts[1].files is missing"),
    (lambda m: m["experts"][0]["files"]["onnx"].update(sha256=1), "experts[0].files.onnx.sha256"),
    (lambda m: m["router"].update(path="../../etc/passwd"), "field router.path '../../etc/passwd'"
                                                            " is not a path inside"),
    (lambda m: m["experts"].append(m["experts"][0]), "distinct names"),
    (lambda m: m.update(experts={}), "field experts must be a list"),
])
def test_malformed_manifest_is_refused_naming_the_field(copy, tmp_path, capsys, edit, field):
    edit_manifest(copy, edit)
    err = refused(copy, tmp_path, capsys, field)
    assert "manifest.json" in err


def test_router_contents_are_checked_even_when_the_manifest_was_rewritten(copy, tmp_path,
                                                                          capsys):
    with np.load(copy / "router.npz") as z:
        arrays = dict(z)
    (copy / "router.npz").write_bytes(npz_bytes({k: v for k, v in arrays.items()
                                                 if k != "precisions"}))
    rehash(copy, "router.npz")
    assert "router.npz" in refused(copy, tmp_path, capsys, "lacks the array(s) precisions")
    arrays["means"][0, 0] = np.nan
    (copy / "router.npz").write_bytes(npz_bytes(arrays))
    rehash(copy, "router.npz")
    refused(copy, tmp_path, capsys, "array 'means' holds non-finite values")
    (copy / "router.npz").write_bytes(b"PK\x03\x04 not an archive")
    rehash(copy, "router.npz")
    refused(copy, tmp_path, capsys, "not a readable .npz archive")


def test_statistics_and_calibration_contents_are_checked(engine_set, copy, tmp_path, capsys):
    rel = Manifest.load(copy).expert("alpha").position_norm.path
    with np.load(copy / rel) as z:
        arrays = dict(z)
    arrays["std"][0, 0] = np.inf
    (copy / rel).write_bytes(npz_bytes(arrays))
    rehash(copy, rel)
    assert rel in refused(copy, tmp_path, capsys, "array 'std' holds non-finite values")
    arrays["std"][0, 0] = 1.0
    arrays["light"] = np.array([0.5, 0.0, 0.2, 0.01], np.float32)  # a spread of 0
    (copy / rel).write_bytes(npz_bytes(arrays))
    rehash(copy, rel)
    assert rel in refused(copy, tmp_path, capsys, "light reference must be 4 finite numbers")
    shutil.copy2(engine_set / rel, copy / rel)
    rehash(copy, rel)
    table = json.loads((copy / "calibration.json").read_text())
    table["experts"]["beta"]["threshold"] = "high"
    (copy / "calibration.json").write_text(json.dumps(table))
    rehash(copy, "calibration.json")
    refused(copy, tmp_path, capsys, "expert 'beta': threshold must be finite numbers")
    (copy / "calibration.json").write_text("[]")
    rehash(copy, "calibration.json")
    refused(copy, tmp_path, capsys, "malformed calibration file")


def test_uncalibrated_experts_are_named_and_warned_about(copy, tmp_path, capsys, caplog):
    assert EngineSet.open(copy).uncalibrated == []
    table = json.loads((copy / "calibration.json").read_text())
    del table["experts"]["beta"]
    (copy / "calibration.json").write_text(json.dumps(table))
    rehash(copy, "calibration.json")
    with caplog.at_level(logging.WARNING, logger="moleflow.engines"):
        assert EngineSet.open(copy).uncalibrated == ["beta"]
    assert "beta" in caplog.text and "no alarm will be raised" in caplog.text
    edit_manifest(copy, lambda m: m.update(calibration=None))
    assert EngineSet.open(copy).uncalibrated == ["alpha", "beta"]
    rc, err = validate(copy, tmp_path, capsys)
    assert rc == 0 and "WARNING" in err and "alpha, beta" in err and "no alarm" in err, err
    assert EngineSet.open(copy, with_calibration=False).calibration == {}


def test_tensorrt_back_end_needs_plans_and_tensorrt(copy, tmp_path, capsys):
    trt = "  backend: tensorrt\n  precision: fp16\n"
    rc, err = validate(copy, tmp_path, capsys, trt)
    assert rc == 2 and "no plan_fp16 plan for expert 'alpha', expert 'beta', backbone" in err
    assert "moleflow build" in err

    def fake_plans(m):
        for files in [m["backbone"]["files"]] + [e["files"] for e in m["experts"]]:
            files["plan_fp16"] = files["onnx_fp16"]
        m["tensorrt"] = {"version": "10.0", "gpu": "none", "compute_capability": "0.0"}
    edit_manifest(copy, fake_plans)
    if importlib.util.find_spec("tensorrt") is None:
        rc, err = validate(copy, tmp_path, capsys, trt)
        assert rc == 2 and "needs NVIDIA TensorRT" in err, err
    with pytest.raises(EngineSetError):
        validate_engine_set(copy, "tensorrt", "fp16")


def test_older_manifest_without_the_light_setting_scores_as_before(engine_set, copy):
    """Engine sets from before ``input.standardise`` were trained on unstandardised frames:
    without the field they score exactly as the set that records ``false``."""
    from moleflow.engines.pipeline import Pipeline
    assert Manifest.load(engine_set).input["standardise"] is False
    edit_manifest(copy, lambda m: m["input"].pop("standardise"))
    frames = np.random.default_rng(3).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    before, now = (Pipeline(EngineSet.open(root, with_calibration=False)).score(frames)
                   for root in (copy, engine_set))
    assert [f.raw_score for f in before] == [f.raw_score for f in now]


def test_older_manifest_without_the_light_retry_scores_each_frame_once(engine_set, copy):
    """Engine sets from before ``scoring.light_retry`` score every frame once, as they did;
    the current set retries frames whose light is off their expert's and never scores them
    higher for it."""
    from moleflow.engines.pipeline import Pipeline
    assert Manifest.load(engine_set).scoring["light_retry"] == 2.0
    edit_manifest(copy, lambda m: m["scoring"].pop("light_retry"))
    frames = np.random.default_rng(3).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    old = Pipeline(EngineSet.open(copy, with_calibration=False))
    now = Pipeline(EngineSet.open(engine_set, with_calibration=False))
    assert old.light_retry == 0.0 and now.light_retry == 2.0
    before, after = old.score(frames), now.score(frames)
    assert all("light_retry" not in f.timings for f in before)
    assert all("light_retry" in f.timings for f in after)  # noise: far from any product's light
    assert all(a.raw_score <= b.raw_score for a, b in zip(after, before))
    now.light_retry = 0.0
    assert [f.raw_score for f in now.score(frames)] == [f.raw_score for f in before]


def test_validate_config_checks_camera_products_against_the_set(engine_set, tmp_path, capsys):
    rc, err = validate(engine_set, tmp_path, capsys, "ingest:\n  products: [cam0=alpha]\n")
    assert rc == 0, err
    rc, err = validate(engine_set, tmp_path, capsys, "ingest:\n  products: [cam0=gamma]\n")
    assert rc == 2 and "ingest.products" in err and "gamma" in err, err
