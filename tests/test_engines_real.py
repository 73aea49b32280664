"""The exported engine set on real MVTec images (skipped where ../shared/data is absent):
parity with PyTorch, FP16 accuracy, and calibration on held-out normals."""

from __future__ import annotations

import pytest

import json

from moleflow.calibration.calibrate import calibrate_engine_set
from moleflow.config import CalibrationConfig
from moleflow.engines.pipeline import EngineSet, Pipeline
from moleflow.engines.verify import verify_engine_set
from moleflow.data import load_class, load_images

pytestmark = [pytest.mark.real_data, pytest.mark.slow]


def test_exported_pipeline_matches_pytorch_and_fp16_is_safe(real_engine_set):
    run, data, out = real_engine_set
    checks = verify_engine_set(run, out, data)
    assert [c.name for c in checks] == ["bottle", "transistor"]
    for c in checks:
        assert c.expert_max_rel <= 1e-4, c.line()
        assert c.e2e_max_rel <= 1e-4, c.line()
        assert abs(c.onnx_image_auroc - c.torch_image_auroc) <= 0.001, c.line()
        assert abs(c.onnx_pixel_auroc - c.torch_pixel_auroc) <= 0.001, c.line()
        assert c.onnx_routing == 1.0, c.line()
        assert c.fp16_finite, c.line()
        # FP16's numerics: top-k NLL scores within 1 % of FP32's (FP16 resolves 0.1 % of an
        # NLL), and the image AUROC of the set's scores (standardised: a difference of NLLs
        # over a few nats, where the same NLL error weighs more) within 0.005 of FP32's unless
        # pairs that close alone move it: on these 32 images one swapped pair is 0.0042
        # (`moleflow verify` on whole test sets: docs/results.md).
        assert c.fp16_nll_score_max_rel <= 1e-2, c.line()
        assert abs(c.fp16_image_auroc - c.onnx_image_auroc) <= max(0.005, c.fp16_tied_pairs), \
            c.line()
        assert abs(c.fp16_pixel_auroc - c.onnx_pixel_auroc) <= 0.005, c.line()


def test_calibration_thresholds_hold_on_unseen_normals(real_engine_set):
    run, data, out = real_engine_set
    reports = calibrate_engine_set(out, data, CalibrationConfig(), force=True)
    assert {r.name for r in reports} == {"bottle", "transistor"}
    for r in reports:
        assert r.calibration.n_images == 13 and r.refitted
        assert r.test_good == 12 and r.test_defective > 0, r.line()
        # decisions are informative: defects are flagged more often than normal images
        assert r.detected / r.test_defective > r.false_alarms / r.test_good, r.line()
    # This small model (53 images, 10 epochs) is calibrated from 13 images per class, so only
    # a loose bound holds here; the full-size false-alarm figures are in docs/results.md (moleflow
    # calibrate on the whole classes), and the estimator's rate is tested in test_calibration.
    false_alarms = sum(r.false_alarms for r in reports)
    assert false_alarms <= 3, "\n".join(r.line() for r in reports)
    assert json.loads((out / "calibration.json").read_text())["format"] == 1
    # a second run keeps the still-valid calibration instead of refitting it
    again = calibrate_engine_set(out, data, CalibrationConfig())
    assert not any(r.refitted for r in again)
    pipe = Pipeline(EngineSet.open(out))
    good = [t.path for t in load_class(data, "bottle").test if t.label == 0]
    frames = pipe.score(load_images(good[:4], 256))
    for f in frames:
        cal = pipe.engines.calibration[f.expert]
        assert 0.0 <= f.score <= 1.0
        assert f.anomalous == (f.raw_score > cal.threshold) == (f.score > 0.5)
        assert not f.unknown  # its own product is not "unknown"


def test_unknown_is_a_product_without_expert_not_a_defect(real_engine_set):
    """Leave-one-out on real images: a class whose expert is left out of the set is flagged
    unknown (>= 95 % of its frames), while the known classes' frames, good and defective, are
    not (<= 1 %); both as lossless frames and as JPEG q90 frames from a camera."""
    from moleflow.calibration.robustness import engine_robustness, leave_one_out
    from moleflow.conditions import parse_condition
    _, data, out = real_engine_set
    conds = [parse_condition("lossless"), parse_condition("jpeg:90")]
    for left, cond, unknown, frames in leave_one_out(out, data, conds):
        assert unknown >= 0.95 * frames, (left, cond, unknown, frames)
    rows = engine_robustness(out, data, conds, progress=False)
    known = sum(r.unknown for r in rows)
    frames = sum(r.good + r.defective for r in rows)
    assert known <= 0.01 * frames, "\n".join(r.line() for r in rows)
    assert all(r.routing == 1.0 for r in rows)


def test_light_retry_brings_normal_frames_back_under_a_contrast_change(real_engine_set):
    """Real normal frames whose contrast a camera turned up (+15 %, beyond what the product's
    own frames show) are scored again relit to the product's light: their scores come back
    towards those of the frames as they were, and the retry never raises a score."""
    import numpy as np
    from moleflow.conditions import parse_condition
    _, data, out = real_engine_set
    engines = EngineSet.open(out)
    retry, once = Pipeline(engines, with_maps=False), Pipeline(engines, with_maps=False)
    once.light_retry = 0.0
    for name in ("bottle", "transistor"):
        images = load_images([t.path for t in load_class(data, name).test if t.label == 0], 256)
        changed = parse_condition("contrast:+15").apply(images)
        hints = [name] * len(images)
        as_sent = np.array([f.raw_score for f in retry.score(images, hints)])
        plain = np.array([f.raw_score for f in once.score(changed, hints)])
        retried = retry.score(changed, hints)
        got = np.array([f.raw_score for f in retried])
        assert all("light_retry" in f.timings for f in retried), name
        assert np.all(got <= plain + 1e-6), name
        assert np.abs(got - as_sent).mean() < np.abs(plain - as_sent).mean(), \
            (name, as_sent, plain, got)
