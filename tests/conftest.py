"""Shared pytest fixtures: a synthetic MVTec-layout data set and the real shared data."""

from __future__ import annotations

from pathlib import Path

import pytest

from train.synthetic import make_synthetic_mvtec

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
