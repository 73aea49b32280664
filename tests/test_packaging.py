"""Packaging: the edge side runs without torch, the extras say what they add, one version."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

import moleflow
from moleflow.cli import main, missing_extra
from tests.conftest import run_without

ROOT = Path(__file__).resolve().parents[1]
EDGE_FORBIDDEN = ("torch", "timm", "FrEIA", "onnx", "moleflow.train")


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_edge_imports_and_validates_config_without_torch():
    out = run_without(EDGE_FORBIDDEN,
                      "import moleflow.config, moleflow.cli, moleflow.errors\n"
                      "import moleflow.edge.daemon, moleflow.edge.ingest, moleflow.edge.publisher\n"
                      "import moleflow.edge.frames, moleflow.edge.spool, moleflow.edge.metrics\n"
                      "import moleflow.edge.logs, moleflow.thresholds, moleflow.engines.pipeline\n"
                      "from moleflow.cli import main\n"
                      "raise SystemExit(main(['config', '--config', 'config.yaml']))\n")
    assert out.returncode == 0, out.stderr
    assert "lora_rank: 64" in out.stdout


def test_training_on_an_edge_only_install_names_the_extra():
    out = run_without(("torch",), "from moleflow.cli import main\n"
                                  "raise SystemExit(main(['export', '--run', 'r', '--out', 'e']))\n")
    assert out.returncode == 2
    assert "needs the 'train' extra" in out.stderr and "torch" in out.stderr
    assert "Traceback" not in out.stderr
    exc = ModuleNotFoundError("No module named 'zmq'", name="zmq")
    assert "'edge' extra" in missing_extra(exc)
    assert missing_extra(ModuleNotFoundError("x", name="not_ours")) is None


def test_extras_add_to_the_base_without_repeating_it():
    project = _pyproject()["project"]
    base = {re.split(r"[<>=\[ ;]", r)[0].lower() for r in project["dependencies"]}
    for extra, reqs in project["optional-dependencies"].items():
        names = {re.split(r"[<>=\[ ;]", r)[0].lower() for r in reqs}
        assert not names & base, f"extra {extra} repeats base dependencies {names & base}"
    edge = {re.split(r"[<>=\[ ;]", r)[0].lower() for r in project["optional-dependencies"]["edge"]}
    assert not {n for n in edge if n.startswith(("torch", "timm", "freia", "onnx>", "onnx="))}
    assert "onnxruntime" in edge


def test_the_torch_pair_is_a_constraint_not_a_pin():
    project = _pyproject()["project"]
    train = project["optional-dependencies"]["train"]
    assert "torch" in train and "torchvision" in train  # unpinned in the package
    constraints = (ROOT / "constraints.txt").read_text()
    assert re.search(r"^torch==\d", constraints, re.M)
    assert re.search(r"^torchvision==\d", constraints, re.M)
    assert "-c constraints.txt" in (ROOT / "Makefile").read_text()


def test_one_version():
    assert _pyproject()["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "moleflow.__version__"}
    try:
        assert metadata.version("moleflow-edge") == moleflow.__version__
    except metadata.PackageNotFoundError:
        pytest.skip("moleflow-edge is not installed (pip install -e '.[train,dev]')")
    from moleflow.edge.daemon import VERSION
    assert VERSION == moleflow.__version__


def test_version_flag(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"moleflow {moleflow.__version__}"


def test_subcommands_take_only_their_flags(capsys):
    """Training shortcuts belong to the commands that train: ``serve --epochs 3`` is an error."""
    for argv in (["serve", "--epochs", "3"], ["calibrate", "--engines", "e", "--preset", "full"],
                 ["config", "--seed", "1"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        assert "unrecognized arguments" in capsys.readouterr().err


def test_pytest_markers_are_strict():
    ini = _pyproject()["tool"]["pytest"]["ini_options"]
    assert "--strict-markers" in ini["addopts"]
    names = {m.split(":")[0] for m in ini["markers"]}
    assert {"real_data", "mosquitto", "gpu", "slow", "browser"} <= names


def test_console_script_is_declared():
    try:
        eps = metadata.entry_points(group="console_scripts")
    except Exception:  # pragma: no cover
        pytest.skip("no entry point metadata")
    names = {ep.name: ep.value for ep in eps}
    if "moleflow" not in names:
        pytest.skip("moleflow-edge is not installed (pip install -e '.[train,dev]')")
    assert names["moleflow"] == "moleflow.cli:main"


def test_demo_replaces_only_a_run_folder_it_made(tmp_path):
    from moleflow.cli.dev import DEMO_MARK, fresh_run_folder
    from moleflow.errors import MoleflowError
    mine = tmp_path / "someone-elses"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(MoleflowError, match="was not made by 'moleflow demo'.*--force"):
        fresh_run_folder(mine)
    assert (mine / "notes.txt").read_text() == "keep me"
    demo = tmp_path / "demo"
    fresh_run_folder(demo)
    (demo / "old-result.csv").write_text("x")
    fresh_run_folder(demo)  # an earlier demo's folder is replaced
    assert sorted(p.name for p in demo.iterdir()) == [DEMO_MARK]
    fresh_run_folder(mine, force=True)
    assert not (mine / "notes.txt").exists()
    (tmp_path / "file").write_text("")
    with pytest.raises(MoleflowError, match="is a file"):
        fresh_run_folder(tmp_path / "file", force=True)


def test_demo_checks_the_data_before_touching_the_run_folder(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "keep.txt").write_text("x")
    assert main(["demo", "--run", str(run), "--data", str(tmp_path / "absent"), "--force"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert (run / "keep.txt").exists()


def test_ruff_is_clean():
    """The lint rules in pyproject.toml hold over the whole tree (ruff comes with '.[dev]')."""
    import subprocess
    import sys
    ruff = pytest.importorskip("ruff", reason="ruff is a dev dependency ('.[dev]')")
    assert ruff
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", str(ROOT)],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
