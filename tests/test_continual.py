"""Continual training end to end on the synthetic MVTec-layout set: run folder, zero forgetting,
bad input. Small model and few epochs: these check behaviour, not accuracy."""

from __future__ import annotations

import csv
import json
import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest

from moleflow.cli import main
from moleflow.config import load_config
from moleflow.train.bundle import RunBundle
from moleflow.train.continual import open_session, train_tasks
from moleflow.train.evaluate import score_class

SMALL = {"train.epochs": 2, "data.image_size": 64, "model.coupling_blocks": 2,
         "model.lora_rank": 8, "eval.overlays_per_class": 2}
CLI_SMALL = ["--quiet"] + [a for k, v in SMALL.items() for a in ("--set", f"{k}={v}")]


def _digests(run: Path) -> dict[str, str]:
    files = [run / "base.safetensors", *sorted((run / "experts").iterdir()),
             *sorted((run / "router").iterdir()), *sorted((run / "scoring").iterdir())]
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def _alpha_scores(run: Path, synthetic_root: Path) -> tuple[np.ndarray, np.ndarray]:
    """Scores of class alpha by its own expert (task 0), from the stored run."""
    from moleflow.data import load_class
    session = open_session(run, load_config(None, SMALL), progress=False, create=False)
    data = load_class(synthetic_root, "alpha")
    feats = session.store.features(data, "test")
    images = session.store.images_of([t.path for t in data.test])  # light retries included
    return score_class(session.model, feats, np.zeros(len(feats), int), session.cfg.eval, 64,
                       session.norms, images, session.store.extract)


@pytest.fixture(scope="module")
def two_step_run(synthetic_root, tmp_path_factory):
    """alpha trained first; beta added later by a second `train --run`."""
    run = tmp_path_factory.mktemp("run") / "line1"
    cfg = load_config(None, SMALL)
    first = train_tasks(run, synthetic_root, ["alpha"], cfg, progress=False)
    before = _digests(run)
    scores_before = _alpha_scores(run, synthetic_root)
    assert main(["train", "--run", str(run), "--data", str(synthetic_root), "--tasks", "beta",
                 *CLI_SMALL]) == 0
    return run, first, before, scores_before


def test_run_folder_holds_everything(two_step_run):
    run, *_ = two_step_run
    for name in ("run.json", "config.yaml", "base.safetensors", "training.log", "metrics.csv",
                 "final_results.csv"):
        assert (run / name).is_file(), name
    assert len(list((run / "experts").glob("*.safetensors"))) == 2
    assert len(list((run / "router").glob("*.safetensors"))) == 2
    assert len(list((run / "scoring").glob("*.safetensors"))) == 2
    assert len(list((run / "overlays" / "alpha").glob("*.png"))) == 2
    assert (run / "evaluation.png").is_file()  # ROC per class, AUROC per step
    with open(run / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["step"], r["class"]) for r in rows] == [("0", "alpha"), ("1", "alpha"), ("1", "beta")]
    with open(run / "final_results.csv") as fh:
        final = {r["class"]: r for r in csv.DictReader(fh)}
    assert set(final) == {"alpha", "beta", "mean"}
    assert float(final["alpha"]["forgetting_image_auroc"]) == 0.0  # exact zero forgetting
    for r in final.values():
        assert float(r["routing_accuracy"]) == 1.0
        assert 0.5 < float(r["image_auroc"]) <= 1.0 and 0.5 < float(r["pixel_auroc"]) <= 1.0
    assert not list(run.rglob("*.pt")) and not list(run.rglob("*.pkl")), "no pickled objects"


def test_adding_a_task_leaves_earlier_files_byte_identical(two_step_run):
    run, _, before, _ = two_step_run
    after = _digests(run)
    for name, digest in before.items():
        assert after[name] == digest, f"{name} changed when a task was added"


def test_earlier_scores_are_bit_identical_after_a_later_task(two_step_run, synthetic_root):
    run, first, _, (scores_before, maps_before) = two_step_run
    scores_after, maps_after = _alpha_scores(run, synthetic_root)
    assert np.array_equal(scores_before, scores_after)
    assert np.array_equal(maps_before, maps_after)
    assert np.array_equal(first["alpha"].scores, scores_after)


def test_eval_reproduces_the_final_step(two_step_run, synthetic_root):
    run, *_ = two_step_run
    with open(run / "metrics.csv") as fh:
        last = {r["class"]: r for r in csv.DictReader(fh) if r["step"] == "1"}
    assert main(["eval", "--run", str(run), "--data", str(synthetic_root), *CLI_SMALL]) == 0
    with open(run / "final_results.csv") as fh:
        final = {r["class"]: r for r in csv.DictReader(fh)}
    for name in ("alpha", "beta"):
        assert final[name]["image_auroc"] == last[name]["image_auroc"]


def test_eval_computes_the_statistics_an_older_run_lacks(two_step_run, synthetic_root,
                                                          tmp_path):
    """A run from before position statistics existed gets them from `eval`, from the images
    each expert trained on: byte-identical to the ones training writes."""
    run, *_ = two_step_run
    old = tmp_path / "old"
    shutil.copytree(run, old)
    shutil.rmtree(old / "scoring")
    with pytest.raises(ValueError, match=r"no position statistics for task\(s\) \[0\]"):
        _alpha_scores(old, synthetic_root)
    assert main(["eval", "--run", str(old), "--data", str(synthetic_root), *CLI_SMALL]) == 0
    for path in sorted((run / "scoring").iterdir()):
        assert (old / "scoring" / path.name).read_bytes() == path.read_bytes()
    with open(run / "final_results.csv") as fh, open(old / "final_results.csv") as fo:
        assert fh.read() == fo.read()


def test_a_damaged_statistics_file_is_named(two_step_run, synthetic_root, tmp_path, capsys):
    from safetensors.numpy import save_file
    run, *_ = two_step_run
    bad = tmp_path / "bad"
    shutil.copytree(run, bad)
    target = sorted((bad / "scoring").iterdir())[0]
    save_file({"mean": np.zeros((8, 8), np.float32), "std": np.zeros((8, 8), np.float32)},
              str(target))
    assert main(["eval", "--run", str(bad), "--data", str(synthetic_root), *CLI_SMALL]) == 2
    err = capsys.readouterr().err
    assert f"run file {target} is damaged" in err and "positive-std" in err


def test_image_score_and_map_rules_are_switches(two_step_run, synthetic_root):
    """eval.image_score=nll ranks images by raw patch NLL, eval.anomaly_map=nll smooths the
    NLL itself; the defaults standardise the image score and map the per-dimension
    likelihood. Each switch changes its own output only."""
    from moleflow.scoring import anomaly_maps, image_scores, map_values
    from moleflow.data import load_class
    from moleflow.train.trainer import patch_scores
    run, *_ = two_step_run
    default = open_session(run, load_config(None, SMALL), progress=False, create=False)
    feats = default.store.features(load_class(synthetic_root, "alpha"), "test")
    std_scores, lik_maps = score_class(default.model, feats, np.zeros(len(feats), int),
                                       default.cfg.eval, 64, default.norms)  # no light retry
    session = open_session(run, load_config(None, {**SMALL, "eval.image_score": "nll",
                                                   "eval.anomaly_map": "nll"}),
                           progress=False, create=False)
    feats = session.store.features(load_class(synthetic_root, "alpha"), "test")
    scores, maps = score_class(session.model, feats, np.zeros(len(feats), int),
                               session.cfg.eval, 64, session.norms)
    nll = patch_scores(session.model, feats, 0).numpy()
    assert np.array_equal(scores, image_scores(nll, 3))
    assert np.array_equal(maps, anomaly_maps(nll, 64, 4.0))
    assert not np.allclose(scores, std_scores)
    assert np.array_equal(std_scores, image_scores(nll, 3, session.norms[0]))
    assert np.array_equal(lik_maps, anomaly_maps(map_values(nll, "likelihood", 152), 64, 4.0))


def test_a_task_already_in_the_run_is_refused(two_step_run, synthetic_root, capsys):
    run, *_ = two_step_run
    before = _digests(run)
    assert main(["train", "--run", str(run), "--data", str(synthetic_root), "--tasks", "alpha",
                 *CLI_SMALL]) == 2
    assert "alpha, already learned in run" in capsys.readouterr().err
    assert _digests(run) == before


def test_missing_data_folder_is_named(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert main(["train", "--run", str(tmp_path / "r"), "--data", str(missing), "--tasks", "x",
                 *CLI_SMALL]) == 2
    assert str(missing) in capsys.readouterr().err


def test_unknown_class_lists_the_known_ones(synthetic_root, tmp_path, capsys):
    assert main(["train", "--run", str(tmp_path / "r"), "--data", str(synthetic_root),
                 "--tasks", "cable", *CLI_SMALL]) == 2
    err = capsys.readouterr().err
    assert "cable" in err and "alpha" in err


def test_bad_config_value_is_named(tmp_path, synthetic_root, capsys):
    assert main(["train", "--run", str(tmp_path / "r"), "--data", str(synthetic_root),
                 "--tasks", "alpha", "--set", "model.lora_rank=-1"]) == 2
    assert "model.lora_rank" in capsys.readouterr().err


def test_grey_scale_class_trains(tmp_path, synthetic_root):
    """A class of grey-scale images (as some MVTec classes are) trains and evaluates."""
    import shutil

    import cv2
    root = tmp_path / "grey"
    shutil.copytree(synthetic_root / "gamma", root / "gamma")
    for png in root.rglob("*.png"):
        if "ground_truth" not in png.parts:
            img = cv2.imread(str(png))
            cv2.imwrite(str(png), cv2.cvtColor(img, cv2.COLOR_BGR2GRAY))
    results = train_tasks(tmp_path / "run", root, ["gamma"], load_config(None, SMALL),
                          progress=False)
    assert results["gamma"].metrics.image_auroc > 0.5


def test_run_bundle_refuses_a_foreign_folder(tmp_path):
    from moleflow.train.bundle import RunError
    with pytest.raises(RunError, match="not a run folder"):
        RunBundle.open(tmp_path)


def test_demo_runs_end_to_end_on_a_data_folder(synthetic_root, tmp_path):
    run = tmp_path / "demo"
    assert main(["demo", "--data", str(synthetic_root), "--run", str(run), *CLI_SMALL,
                 "--set", "train.val_fraction=0.34"]) == 0
    with open(run / "final_results.csv") as fh:
        classes = [r["class"] for r in csv.DictReader(fh)]
    assert classes == ["alpha", "beta", "gamma", "mean"]
    calibration = json.loads((run / "engines" / "calibration.json").read_text())
    assert sorted(calibration["experts"]) == ["alpha", "beta", "gamma"]
    line = json.loads((run / "line" / "summary.json").read_text())  # served and replayed
    assert line["frames"] == line["results"] == 3 * 12 and line["defective"] == 18
    drawn = len(list((run / "line" / "alarms").glob("*.png")))
    assert line["alarms"] > 0 and drawn == min(line["alarms"], 24)
    assert line["codec"] == "jpeg:90"  # the camera sends what a line sends
    assert sorted(line["per_class"]) == ["alpha", "beta", "gamma"]
    counts = np.asarray(list(line["per_class"].values()))
    assert counts[:, 0].sum() + counts[:, 2].sum() == 36 and counts[:, 2].sum() == 18
    assert counts[:, 1].sum() + counts[:, 3].sum() == line["alarms"]
    assert counts[:, 4].sum() == line["unknown"]


def test_validation_split_is_seeded_disjoint_and_leaves_training_images():
    from moleflow.train.continual import validation_split
    fit, held = validation_split(50, 0.1, seed=3)
    assert len(held) == 5 and len(fit) == 45
    assert not set(fit) & set(held) and set(fit) | set(held) == set(range(50))
    again_fit, again_held = validation_split(50, 0.1, seed=3)
    assert (held == again_held).all() and (fit == again_fit).all()
    assert len(validation_split(50, 0.0, seed=3)[1]) == 0
    assert len(validation_split(3, 0.5, seed=0)[0]) >= 2  # never fewer than 2 to train on
