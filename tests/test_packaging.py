"""Package boundaries: edge imports without torch; the edge extra does not pull torch."""

from __future__ import annotations

from importlib import metadata

import pytest

from tests.conftest import run_without

EDGE_FORBIDDEN = ("torch", "timm", "FrEIA", "train")


def test_edge_imports_and_validates_config_without_torch():
    out = run_without(EDGE_FORBIDDEN + ("onnx",),
                      "import edge, moleflow.config, moleflow.cli, moleflow.errors\n"
                      "import moleflow.edge.daemon, moleflow.edge.ingest, moleflow.edge.publisher, moleflow.edge.frames, moleflow.edge.spool\n"
                      "import moleflow.edge.metrics, moleflow.edge.logs, moleflow.thresholds, moleflow.engines.pipeline\n"
                      "from moleflow.cli import main\n"
                      "raise SystemExit(main(['config', '--config', 'config.yaml']))\n")
    assert out.returncode == 0, out.stderr
    assert "lora_rank: 64" in out.stdout


def test_edge_extra_does_not_pull_torch():
    try:
        requires = metadata.requires("moleflow-edge") or []
    except metadata.PackageNotFoundError:
        pytest.skip("moleflow-edge is not installed (pip install -e '.[train,dev]')")
    edge = [r.split(";")[0].strip().lower() for r in requires if 'extra == "edge"' in r]
    assert edge, "the edge extra exists"
    assert not [r for r in edge if r.startswith(("torch", "timm", "freia"))]


def test_console_script_is_declared():
    try:
        eps = metadata.entry_points(group="console_scripts")
    except Exception:  # pragma: no cover
        pytest.skip("no entry point metadata")
    names = {ep.name: ep.value for ep in eps}
    if "moleflow" not in names:
        pytest.skip("moleflow-edge is not installed (pip install -e '.[train,dev]')")
    assert names["moleflow"] == "moleflow.cli:main"
