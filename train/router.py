"""Prototype router: per task, mean and shrinkage covariance of image-level features.

A frame goes to the task with the smallest Mahalanobis distance. Each task also keeps the
distances of its own training images, so a later stage can say "no expert fits". numpy only:
the edge daemon runs the same arithmetic without torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from moleflow.scoring import mahalanobis

QUANTILES = (0.5, 0.9, 0.95, 0.99, 1.0)


def ledoit_wolf(x: np.ndarray) -> tuple[np.ndarray, float]:
    """Ledoit–Wolf shrinkage covariance of rows ``x`` (n, d) and the shrinkage used."""
    n, d = x.shape
    xc = x - x.mean(axis=0)
    emp = xc.T @ xc / n
    mu = np.trace(emp) / d
    delta = ((emp - mu * np.eye(d)) ** 2).sum() / d
    x2 = xc**2
    beta = min(((x2.T @ x2).sum() / n - (emp**2).sum()) / (d * n), delta)
    shrink = 0.0 if delta == 0 else beta / delta
    return (1 - shrink) * emp + shrink * mu * np.eye(d), float(shrink)


@dataclass
class TaskPrototype:
    """One task's routing statistics."""
    name: str
    mean: np.ndarray
    precision: np.ndarray
    train_distances: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def distance(self, x: np.ndarray) -> np.ndarray:
        return mahalanobis(x, self.mean, self.precision)

    def quantiles(self) -> np.ndarray:
        return np.quantile(self.train_distances, QUANTILES)


def fit_prototype(name: str, feats: np.ndarray, *, shrinkage: str = "ledoit_wolf",
                  fixed_shrinkage: float = 0.1, ridge: float = 1e-5) -> TaskPrototype:
    """Fit a task's prototype on its training images' pooled features (n, d)."""
    x = np.asarray(feats, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"router: task {name!r} needs at least 2 feature rows, got {x.shape}")
    if shrinkage == "ledoit_wolf":
        cov, _ = ledoit_wolf(x)
    else:
        emp = np.cov(x, rowvar=False, bias=True)
        mu = np.trace(emp) / emp.shape[0]
        cov = (1 - fixed_shrinkage) * emp + fixed_shrinkage * mu * np.eye(emp.shape[0])
    cov = cov + ridge * np.eye(cov.shape[0])
    proto = TaskPrototype(name, x.mean(axis=0), np.linalg.inv(cov))
    proto.train_distances = proto.distance(x)
    return proto


class PrototypeRouter:
    """Routes image-level features to the nearest task prototype (Mahalanobis)."""

    def __init__(self, prototypes: list[TaskPrototype] | None = None) -> None:
        self.prototypes: list[TaskPrototype] = list(prototypes or [])

    def add(self, proto: TaskPrototype) -> None:
        self.prototypes.append(proto)

    def distances(self, feats: np.ndarray) -> np.ndarray:
        """(n, tasks) distances of each row to each task."""
        x = np.asarray(feats, dtype=np.float64)
        return np.stack([p.distance(x) for p in self.prototypes], axis=1)

    def route(self, feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Chosen task index and its distance for every row."""
        d = self.distances(feats)
        idx = d.argmin(axis=1)
        return idx, d[np.arange(len(idx)), idx]

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Flat arrays (router.npz): means, precisions, training-distance quantiles."""
        return {
            "names": np.array([p.name for p in self.prototypes]),
            "means": np.stack([p.mean for p in self.prototypes]),
            "precisions": np.stack([p.precision for p in self.prototypes]),
            "quantile_levels": np.asarray(QUANTILES),
            "distance_quantiles": np.stack([p.quantiles() for p in self.prototypes]),
        }

