"""The robustness benchmark (run and engine set), calibration on the line's codec, and the
"unknown product" decision, on the synthetic set (mechanics, not accuracy)."""

from __future__ import annotations

import csv
import json
import logging

import numpy as np
import pytest

from moleflow.calibration.calibrate import calibrate_engine_set
from moleflow.calibration.robustness import engine_robustness, leave_one_out
from moleflow.cli import main
from moleflow.config import load_config
from moleflow.conditions import parse_condition
from moleflow.engines.export import export_engine_set
from moleflow.train.continual import train_tasks
from moleflow.train.robustness import run_robustness

SMALL = {"train.epochs": 2, "data.image_size": 64, "model.coupling_blocks": 2,
         "model.lora_rank": 8, "eval.overlays_per_class": 0, "train.val_fraction": 0.34,
         "train.augment_views": 2}
CONDS = [parse_condition(c) for c in ("lossless", "jpeg:85", "shift:2")]


@pytest.fixture(scope="module")
def calibrated(synthetic_root, tmp_path_factory):
    """alpha then beta, exported, calibrated on JPEG q90 held-out images (the default)."""
    base = tmp_path_factory.mktemp("robust")
    run, out = base / "run", base / "engines"
    cfg = load_config(None, SMALL)
    train_tasks(run, synthetic_root, ["alpha", "beta"], cfg, progress=False)
    export_engine_set(run, out)
    calibrate_engine_set(out, synthetic_root, cfg.calibration)
    return run, out, cfg


def test_run_benchmark_lossless_row_is_evals_result(calibrated, synthetic_root):
    run, _, cfg = calibrated
    rows = run_robustness(run, synthetic_root, CONDS, cfg, progress=False)
    assert [(r.name, r.condition) for r in rows] == [
        (n, c.name) for n in ("alpha", "beta") for c in CONDS]
    with open(run / "final_results.csv") as fh:
        final = {r["class"]: r for r in csv.DictReader(fh)}
    for r in rows:
        assert 0.0 <= r.image_auroc <= 1.0 and 0.0 <= r.pixel_auroc <= 1.0
        if r.condition == "lossless":
            assert r.image_auroc == pytest.approx(float(final[r.name]["image_auroc"]), abs=1e-6)
            assert r.pixel_auroc == pytest.approx(float(final[r.name]["pixel_auroc"]), abs=1e-6)
            assert r.routing == 1.0


def test_engine_benchmark_reports_decisions_and_the_cli_prints_the_table(
        calibrated, synthetic_root, capsys):
    _, out, _ = calibrated
    rows = engine_robustness(out, synthetic_root, CONDS, progress=False)
    assert len(rows) == 6 and all(r.calibrated for r in rows)
    for r in rows:
        assert r.good > 0 and r.defective > 0
        assert 0 <= r.false_alarms <= r.good and 0 <= r.flagged <= r.defective
        assert 0 <= r.unknown <= r.good + r.defective
    assert main(["robustness", "--engines", str(out), "--data", str(synthetic_root),
                 "--conditions", "lossless", "jpeg:75", "--quiet", "--leave-one-out"]) == 0
    table = capsys.readouterr().out
    assert "without the beta expert, jpeg:75: " in table
    assert "| alpha | jpeg:75 |" in table and "false alarms" in table
    assert "largest image-AUROC drop from lossless" in table
    assert main(["robustness", "--engines", str(out), "--data", str(synthetic_root),
                 "--conditions", "jpeg:500"]) == 2
    assert "jpeg must be in 1..100" in capsys.readouterr().err


def test_light_retry_scores_frames_off_their_products_light_again(calibrated, synthetic_root):
    """Frames whose light lies beyond their expert's training frames' (contrast +30 %) are
    scored again relit, by the engine set and the run alike; the lower score counts, so no
    frame scores higher than it would without the retry."""
    from moleflow.data import load_class, load_images
    from moleflow.engines.pipeline import EngineSet, Pipeline
    from moleflow.train.continual import open_session
    from moleflow.train.evaluate import score_class
    run, out, cfg = calibrated
    engines = EngineSet.open(out)
    assert engines.manifest.scoring["light_retry"] == cfg.eval.light_retry == 2.0
    assert all(n.light is not None and n.light.shape == (4,) for n in engines.norms.values())
    data = load_class(synthetic_root, "alpha")
    frames = parse_condition("contrast:+30").apply(
        load_images([t.path for t in data.test], 64), seed=0)
    hints = ["alpha"] * len(frames)
    retried = Pipeline(engines, with_maps=False).score(frames, hints)
    assert all(f.timings.get("light_retry", 0) > 0 for f in retried)
    once = Pipeline(engines, with_maps=False)
    once.light_retry = 0.0
    a = np.array([f.raw_score for f in retried])
    b = np.array([f.raw_score for f in once.score(frames, hints)])
    assert np.all(a <= b + 1e-6) and np.any(a < b - 1e-3)
    session = open_session(run, cfg, progress=False, create=False)
    ref, _ = score_class(session.model, session.store.extract(frames), np.zeros(len(frames), int),
                         cfg.eval, 64, session.norms, frames, session.store.extract)
    np.testing.assert_allclose(a, ref, rtol=1e-4, atol=1e-4)


def test_calibration_follows_the_codec(calibrated, synthetic_root, capsys, caplog):
    _, out, _ = calibrated
    caplog.set_level(logging.INFO)
    table = json.loads((out / "calibration.json").read_text())["experts"]
    assert {e["codec"] for e in table.values()} == {"jpeg:90"}
    assert all(e["typical_limit"] is not None for e in table.values())
    # another codec refits every expert; the same one keeps them
    assert main(["calibrate", "--engines", str(out), "--data", str(synthetic_root),
                 "--set", "calibration.codec=lossless", "--quiet"]) == 0
    lossless = json.loads((out / "calibration.json").read_text())["experts"]
    assert {e["codec"] for e in lossless.values()} == {"lossless"}
    assert lossless["alpha"]["held_out_scores"] != table["alpha"]["held_out_scores"]
    printed = capsys.readouterr().out
    assert "(lossless)" in printed
    # the table once (printed), the log shows progress instead of a second copy of it
    row = next(line for line in printed.splitlines() if line.startswith("alpha"))
    assert printed.count(row) == 1 and row not in caplog.text
    assert "calibrating alpha (1/" in caplog.text and "held-out images through lossless" in caplog.text
    assert main(["calibrate", "--engines", str(out), "--data", str(synthetic_root),
                 "--set", "calibration.codec=jpeg:90", "--quiet"]) == 0
    again = json.loads((out / "calibration.json").read_text())["experts"]
    assert again == table
    assert main(["calibrate", "--engines", str(out), "--data", str(synthetic_root),
                 "--set", "calibration.codec=jpeg:0"]) == 2
    assert "calibration.codec" in capsys.readouterr().err


def test_leave_one_out_scores_each_class_without_its_expert(calibrated, synthetic_root):
    """The mechanics (the figures on real images are in test_engines_real): every class's
    test frames, under every condition, against the set without that class's expert."""
    _, out, _ = calibrated
    conds = [parse_condition("lossless"), parse_condition("jpeg:90")]
    rows = leave_one_out(out, synthetic_root, conds)
    assert [(r[0], r[1]) for r in rows] == [(n, c.name) for n in ("alpha", "beta")
                                              for c in conds]
    from moleflow.data import load_class
    for left, _, unknown, frames in rows:
        assert frames == len(load_class(synthetic_root, left).test) and 0 <= unknown <= frames


def test_training_views_are_cached_keyed_and_recorded(calibrated, synthetic_root):
    run, _, cfg = calibrated
    meta = json.loads((run / "run.json").read_text())
    assert [t["augment_views"] for t in meta["tasks"]] == [2, 2]
    assert meta["tasks"][0]["augmentation"]["jpeg_min"] == cfg.train.augment_jpeg_min
    names = sorted(p.name.split("-")[1] for p in (run / "cache").glob("alpha-*.npy"))
    assert names == ["test", "train", "trainv1", "trainv2"]
    from moleflow.train.continual import open_session
    from moleflow.data import load_class
    session = open_session(run, cfg, progress=False, create=False)
    data = load_class(synthetic_root, "alpha")
    aug = cfg.train.augmentation()
    views = session.store.views(data, 2, aug, cfg.train.seed)
    fresh = session.store.__class__(session.store.extractor, 64, None, progress=False)
    again = fresh.views(data, 2, aug, cfg.train.seed)
    for cached, computed in zip(views, again):
        np.testing.assert_array_equal(cached.numpy(), computed.numpy())
    assert not np.array_equal(views[0].numpy(), views[1].numpy())
    other = cfg.train.augmentation().__class__(shift=1.0)
    assert not np.array_equal(session.store.features(data, "train", 1, other).numpy(),
                              views[1].numpy())
    assert len(list((run / "cache").glob("alpha-trainv1-*.npy"))) == 1  # stale entry replaced


def test_views_keep_their_contrast_change_past_light_standardisation(calibrated,
                                                                    synthetic_root):
    """A backbone that standardises light cancels a view's brightness and contrast change: the
    view's contrast gain is applied to the standardised input instead, so the expert still
    trains on frames of varying contrast. Without standardisation the view is as drawn."""
    import dataclasses
    from moleflow.train.backbone import FeatureExtractor, extract
    from moleflow.data import load_class
    from moleflow.train.features import FeatureStore
    _, _, cfg = calibrated
    data, aug, seed = load_class(synthetic_root, "alpha"), cfg.train.augmentation(), 3
    for standardise in (True, False):
        extractor = FeatureExtractor(dataclasses.replace(cfg.backbone,
                                                         standardise_light=standardise))
        store = FeatureStore(extractor, 64, None, progress=False)
        images = aug.views(store.images_of(list(data.train)), 1, seed)
        gains = aug.input_gains(len(images), 1, seed)
        got = store.features(data, "train", 1, aug, seed).numpy()
        with_gains = extract(extractor, images, gains=gains).numpy()
        as_drawn = extract(extractor, images).numpy()
        np.testing.assert_allclose(got, with_gains if standardise else as_drawn, atol=1e-5)
        assert np.abs(with_gains - as_drawn).max() > 1e-3


def test_paired_delta_interval_brackets_the_change_and_shrinks_with_data():
    """The interval of a paired AUROC change: zero width for an unchanged scorer, it holds the
    observed change, and with 10x the images it is narrower."""
    from moleflow.robustness import RobustnessRow, format_table, paired_delta_interval
    from moleflow.measures import auroc
    rng = np.random.default_rng(1)

    def case(n_good, n_bad):
        labels = np.r_[np.zeros(n_good), np.ones(n_bad)].astype(int)
        base = rng.normal(size=len(labels)) + 1.5 * labels
        other = base + rng.normal(scale=0.8, size=len(labels))  # a condition adds noise
        return labels, base, other

    labels, base, other = case(23, 109)
    assert paired_delta_interval(labels, base, base) == (0.0, 0.0)
    low, high = paired_delta_interval(labels, base, other)
    delta = auroc(labels, other) - auroc(labels, base)
    assert low <= delta <= high and low < high
    big = case(230, 1090)
    low_big, high_big = paired_delta_interval(*big)
    assert high_big - low_big < (high - low) / 2
    assert np.isnan(paired_delta_interval(np.zeros(5), base[:5], other[:5])[0])
    rows = [RobustnessRow("c", "lossless", auroc(labels, base), 0.9, 1.0, labels=labels,
                          scores=base),
            RobustnessRow("c", "jpeg:85", auroc(labels, other), 0.9, 1.0, labels=labels,
                          scores=other)]
    table = format_table(rows)
    assert f"{low:+.3f} .. {high:+.3f}" in table
    assert f"(jpeg:85, 95 % interval {low:+.3f} .. {high:+.3f})" in table or delta > 0
