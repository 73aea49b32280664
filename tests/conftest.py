"""Shared pytest fixtures: a synthetic MVTec-layout data set, the real shared data, and one
small continual run on the real images that several test modules examine."""

from __future__ import annotations

from pathlib import Path

import pytest

from moleflow.train.synthetic import make_synthetic_mvtec

ROOT = Path(__file__).resolve().parents[1]

def run_without(modules: tuple[str, ...], code: str, timeout: int = 120):
    """Run ``code`` in a fresh Python in which importing any of ``modules`` (a top-level name
    such as ``torch``, or a dotted package such as ``moleflow.train``, with its submodules)
    fails."""
    import subprocess
    import sys
    blocker = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if any(name == m or name.startswith(m + '.') for m in {tuple(modules)!r}):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r} (blocked: not needed '\n"
        "                                      'here)', name=name)\n"
        "sys.meta_path.insert(0, Block())\n")
    return subprocess.run([sys.executable, "-c", blocker + code], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


#: Real MVTec images (256x256) beside the project in the dev workspace; absent in a user's clone.
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mvtec256"


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small deterministic data set (classes alpha, beta, gamma), built once per session."""
    return make_synthetic_mvtec(tmp_path_factory.mktemp("synthetic_mvtec"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path of the real MVTec data; skips the test when it is not present."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data/mvtec256 not found beside the project (a user's clone has no "
                    "shared data); this test needs the real MVTec images")
    return SHARED_DATA


def subset_class(src: Path, dst: Path, name: str, n_train: int, n_good: int,
                 n_per_defect: int) -> None:
    """Symlink a deterministic subset of one class in MVTec layout."""
    cls, out = src / name, dst / name
    for img in sorted((cls / "train" / "good").glob("*.png"))[:n_train]:
        (out / "train" / "good").mkdir(parents=True, exist_ok=True)
        (out / "train" / "good" / img.name).symlink_to(img)
    for defect in sorted(p for p in (cls / "test").iterdir() if p.is_dir()):
        n = n_good if defect.name == "good" else n_per_defect
        for img in sorted(defect.glob("*.png"))[:n]:
            (out / "test" / defect.name).mkdir(parents=True, exist_ok=True)
            (out / "test" / defect.name / img.name).symlink_to(img)
            if defect.name != "good":
                mask = cls / "ground_truth" / defect.name / f"{img.stem}_mask.png"
                (out / "ground_truth" / defect.name).mkdir(parents=True, exist_ok=True)
                (out / "ground_truth" / defect.name / mask.name).symlink_to(mask)


REAL_TRAIN = 66  # train/good images per class; 20 % are held out for calibration


@pytest.fixture(scope="session")
def real_run(shared_data: Path, tmp_path_factory: pytest.TempPathFactory):
    """bottle then transistor on a subset of the real images, 10 epochs: (run, data, results)."""
    from moleflow.config import load_config
    from moleflow.train.continual import train_tasks
    root = tmp_path_factory.mktemp("real")
    data = root / "data"
    subset_class(shared_data, data, "bottle", REAL_TRAIN, 12, 6)
    subset_class(shared_data, data, "transistor", REAL_TRAIN, 12, 5)
    cfg = load_config(None, {"train.epochs": 10, "eval.overlays_per_class": 1,
                             "train.val_fraction": 0.2})
    results = train_tasks(root / "run", data, ["bottle", "transistor"], cfg, progress=False)
    return root / "run", data, results


@pytest.fixture(scope="session")
def real_engine_set(real_run, tmp_path_factory):
    """The real run exported and calibrated: (run, data, engine-set folder)."""
    from moleflow.calibration.calibrate import calibrate_engine_set
    from moleflow.config import CalibrationConfig
    from moleflow.engines.export import export_engine_set
    run, data, _ = real_run
    out = tmp_path_factory.mktemp("real_engines") / "line1"
    export_engine_set(run, out)
    calibrate_engine_set(out, data, CalibrationConfig())
    return run, data, out


DAEMON_SMALL = {"train.epochs": 2, "data.image_size": 64, "model.coupling_blocks": 2,
                "model.lora_rank": 8, "eval.overlays_per_class": 0, "train.val_fraction": 0.34}


#: A small engine set (synthetic alpha and beta, calibrated) for the daemon's tests.
@pytest.fixture(scope="module")
def engine_set(synthetic_root, tmp_path_factory):
    from moleflow.calibration.calibrate import calibrate_engine_set
    from moleflow.config import CalibrationConfig, load_config
    from moleflow.engines.export import export_engine_set
    from moleflow.train.continual import train_tasks
    base = tmp_path_factory.mktemp("daemon")
    train_tasks(base / "run", synthetic_root, ["alpha", "beta"], load_config(None, DAEMON_SMALL),
                progress=False)
    export_engine_set(base / "run", base / "engines")
    calibrate_engine_set(base / "engines", synthetic_root, CalibrationConfig())
    return base / "engines"


@pytest.fixture()
def broker(tmp_path):
    """A real Mosquitto on a free port (skips where it is not installed)."""
    from tests.daemon_helpers import Broker
    b = Broker(tmp_path / "mosquitto").start()
    yield b
    b.stop()
