"""Prototype router: shrinkage covariance, Mahalanobis routing, stored distance statistics."""

from __future__ import annotations

import numpy as np
import pytest

from moleflow.train.router import PrototypeRouter, fit_prototype, ledoit_wolf


def test_ledoit_wolf_matches_sklearn():
    sk = pytest.importorskip("sklearn.covariance")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 50)) @ rng.normal(size=(50, 50))  # fewer rows than dimensions
    cov, shrink = ledoit_wolf(x)
    ref = sk.LedoitWolf().fit(x)
    assert shrink == pytest.approx(ref.shrinkage_, rel=1e-9)
    assert np.allclose(cov, ref.covariance_, rtol=1e-9, atol=1e-9)


def test_mahalanobis_distance_by_hand():
    proto = fit_prototype("a", np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0]]),
                          shrinkage="fixed", fixed_shrinkage=0.0, ridge=0.0)
    # mean (1, 1), covariance diag(1, 1): distance of (3, 1) is 2
    assert np.allclose(proto.mean, [1, 1])
    assert proto.distance(np.array([[3.0, 1.0]]))[0] == pytest.approx(2.0)
    assert np.allclose(proto.train_distances, np.sqrt(2))


def test_routes_to_the_nearest_task_even_with_few_images():
    rng = np.random.default_rng(1)
    dim = 64
    centres = [rng.normal(size=dim) * 3 for _ in range(3)]
    router = PrototypeRouter()
    for i, c in enumerate(centres):
        router.add(fit_prototype(f"t{i}", c + rng.normal(size=(20, dim))))
    test = np.concatenate([c + rng.normal(size=(10, dim)) for c in centres])
    idx, dist = router.route(test)
    assert (idx == np.repeat([0, 1, 2], 10)).all()
    assert (dist > 0).all()
    arrays = router.to_arrays()
    assert arrays["means"].shape == (3, dim) and arrays["precisions"].shape == (3, dim, dim)
    assert (np.diff(arrays["distance_quantiles"], axis=1) >= 0).all()


def test_too_few_rows_is_an_error():
    with pytest.raises(ValueError, match="at least 2"):
        fit_prototype("x", np.ones((1, 4)))
