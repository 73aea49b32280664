"""Package boundaries: edge imports without torch; the edge extra does not pull torch."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCK_TORCH = (
    "import sys\n"
    "class Block:\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name.split('.')[0] in ('torch', 'timm', 'FrEIA', 'train'):\n"
    "            raise ImportError(f'{name} must not be imported on the edge side')\n"
    "sys.meta_path.insert(0, Block())\n"
)


def test_edge_imports_and_validates_config_without_torch():
    code = BLOCK_TORCH + (
        "import edge, edge.config, edge.cli, edge.errors\n"
        "from edge.cli import main\n"
        "raise SystemExit(main(['config', '--config', 'config.yaml']))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
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
    assert names["moleflow"] == "edge.cli:main"
