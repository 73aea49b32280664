"""Import contracts between the packages, read from the code and proven by importing.

One import root, ``moleflow``: the torch-free core (``moleflow/*.py``, ``moleflow/config``) that
every side shares; ``moleflow.train`` → core; the engines' runtime (``runtime``, ``pipeline``,
``tensorrt_backend``, ``bench_ort``) → core; the engines' export side → train; calibration →
engines runtime + core; edge → engines runtime + core; the CLI and the dev tools on top.
Nothing points back. The static test reads every import statement (lazy ones inside functions
too); the runtime tests import each side in a fresh Python in which what it must not need fails
to import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import run_without

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"moleflow.edge": "edge", "moleflow.train": "train", "moleflow.engines": "engines",
           "moleflow.calibration": "calibration", "moleflow.devtools": "devtools",
           "moleflow.cli": "moleflow/cli", "moleflow.config": "moleflow/config"}
RUNTIME = ("runtime", "pipeline", "tensorrt_backend", "bench_ort")
"""The engines' modules the daemon and calibration use; the rest (export, fuse, verify, fp16,
bench) export and check a run's model with torch."""


def modules() -> dict[str, Path]:
    """Every module of the package by its import name."""
    found = {f"moleflow.{p.stem}": p for p in (ROOT / "moleflow").glob("*.py")
             if p.stem != "__init__"}
    for package, folder in FOLDERS.items():
        for p in (ROOT / folder).glob("*.py"):
            found[package if p.stem == "__init__" else f"{package}.{p.stem}"] = p
    return found


def side(module: str) -> str:
    """core, train, engines-runtime, engines-export, calibration, edge, devtools or cli."""
    parts = module.split(".")
    if len(parts) == 1 or parts[1] not in ("edge", "train", "engines", "calibration",
                                           "devtools", "cli"):
        return "core"
    if parts[1] == "engines":
        return "engines-runtime" if len(parts) == 2 or parts[2] in RUNTIME else "engines-export"
    return parts[1]


ALLOWED = {
    "core": {"core"},
    "train": {"core", "train"},
    "engines-runtime": {"core", "engines-runtime"},
    "engines-export": {"core", "engines-runtime", "engines-export", "train"},
    "calibration": {"core", "engines-runtime", "calibration"},
    "edge": {"core", "engines-runtime", "edge"},
    "devtools": {"core", "engines-runtime", "edge", "devtools"},
    "cli": {"core", "train", "engines-runtime", "engines-export", "calibration", "edge",
            "devtools", "cli"},
}
TORCH_FREE = ("core", "engines-runtime", "calibration", "edge", "devtools")


def imported(path: Path) -> set[str]:
    """The moleflow modules (and third-party top-level names) a file imports, anywhere in it."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            known = modules()
            names |= {f"{node.module}.{a.name}" for a in node.names
                      if f"{node.module}.{a.name}" in known}
    return names


def test_every_module_is_on_one_side():
    found = modules()
    assert len(found) > 60
    assert {side(m) for m in found} == set(ALLOWED)
    assert side("moleflow.scoring") == "core" and side("moleflow.config.loading") == "core"
    assert side("moleflow.engines.pipeline") == "engines-runtime"
    assert side("moleflow.engines.export") == "engines-export"


@pytest.mark.parametrize("module", sorted(modules()))
def test_import_contract(module):
    own = side(module)
    wrong = []
    for name in imported(modules()[module]):
        if name.split(".")[0] in ("edge", "train", "engines", "calibration", "devtools"):
            wrong.append(f"{name} (the old top-level name: use moleflow.{name})")
        elif name.split(".")[0] == "moleflow" and side(name) not in ALLOWED[own]:
            wrong.append(f"{name} ({side(name)})")
        elif own in TORCH_FREE and name.split(".")[0] in ("torch", "timm", "FrEIA", "onnx"):
            wrong.append(name)
    assert not wrong, f"{module} ({own}) must not import {', '.join(sorted(wrong))}"


def _import_all(sides: tuple[str, ...]) -> str:
    names = sorted(m for m in modules() if side(m) in sides)
    return "import importlib\n" + "".join(f"importlib.import_module({m!r})\n" for m in names)


THIRD_PARTY_TRAINING = ("torch", "torchvision", "timm", "FrEIA", "onnx", "onnxscript")


def test_core_imports_alone():
    out = run_without(THIRD_PARTY_TRAINING + ("zmq", "paho", "onnxruntime", "prometheus_client",
                                              "moleflow.edge", "moleflow.train",
                                              "moleflow.engines", "moleflow.calibration",
                                              "moleflow.devtools", "moleflow.cli"),
                      _import_all(("core",)))
    assert out.returncode == 0, out.stderr


def test_edge_imports_with_the_engines_runtime_only():
    out = run_without(THIRD_PARTY_TRAINING + ("moleflow.train", "moleflow.calibration",
                                              "moleflow.devtools", "moleflow.cli",
                                              "moleflow.engines.export", "moleflow.engines.fuse",
                                              "moleflow.engines.verify"),
                      _import_all(("edge", "engines-runtime")))
    assert out.returncode == 0, out.stderr


def test_calibration_imports_without_torch_or_the_edge():
    out = run_without(THIRD_PARTY_TRAINING + ("moleflow.train", "moleflow.edge",
                                              "moleflow.devtools", "moleflow.cli"),
                      _import_all(("calibration",)))
    assert out.returncode == 0, out.stderr


def test_train_imports_without_engines_or_edge():
    out = run_without(("zmq", "paho", "moleflow.edge", "moleflow.engines", "moleflow.calibration",
                       "moleflow.devtools", "moleflow.cli"), _import_all(("train",)))
    assert out.returncode == 0, out.stderr


def test_old_top_level_names_are_gone():
    """The design card's folders install beneath ``moleflow`` only: a user's own ``train.py``
    or another distribution's ``edge`` package can no longer collide with ours."""
    out = run_without((), "import importlib.util, os, sys\n"
                          "sys.path = [p for p in sys.path if p not in ('', os.getcwd())]\n"
                          "print([n for n in ('edge', 'train', 'engines', 'calibration', "
                          "'devtools') if importlib.util.find_spec(n)])\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
