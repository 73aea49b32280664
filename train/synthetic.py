"""A tiny deterministic MVTec-layout data set for unit tests and the demo.

Each class has its own hue, stripe frequency/orientation and object radius,
so per-class mean features differ clearly; normal images vary a little
(noise, phase and small shifts). Defects are painted in the complementary
colour of the class (an elliptic ``blob`` or a line ``scratch``) after all
noise, so the written mask marks exactly the painted pixels.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

__all__ = ["DEFECTS", "class_colours", "make_synthetic_mvtec"]

#: Defect kinds, split between the bad test images (first half blob, rest scratch).
DEFECTS: tuple[str, str] = ("blob", "scratch")

_GOLDEN = 0.6180339887


def class_colours(index: int) -> tuple[np.ndarray, np.ndarray]:
    """(base RGB, defect RGB) of class ``index``: well-spread hues, defect = complement."""
    r, g, b = colorsys.hsv_to_rgb((index * _GOLDEN) % 1.0, 0.7, 0.75)
    base = np.array([r, g, b], dtype=np.float32) * 255.0
    defect = np.rint(255.0 - base).astype(np.uint8)
    return base, defect


def _normal_image(index: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """One normal RGB uint8 image of class ``index`` (stripes + darker disc + noise)."""
    base, _ = class_colours(index)
    period = size / (3.0 + 2.5 * index)  # class-specific texture frequency
    theta = index * 0.9  # class-specific stripe orientation
    dx, dy = rng.integers(-2, 3, size=2)  # small shift of the whole pattern
    phase = rng.uniform(-0.3, 0.3)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    xs, ys = xx - dx, yy - dy
    stripes = np.sin(2 * np.pi * (xs * np.cos(theta) + ys * np.sin(theta)) / period + phase)
    shade = 1.0 + 0.15 * stripes
    radius = size * (0.22 + 0.05 * (index % 3))
    c = size / 2.0
    disc = (xs - c) ** 2 + (ys - c) ** 2 <= radius**2
    shade = np.where(disc, shade * 0.8, shade)
    img = base[None, None, :] * shade[:, :, None]
    img += rng.normal(0.0, 3.0, size=img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _defect_mask(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 {0,255} mask of one blob or scratch, never empty."""
    mask = np.zeros((size, size), dtype=np.uint8)
    lo, hi = int(size * 0.25), int(size * 0.75)
    cx, cy = (int(v) for v in rng.integers(lo, hi + 1, size=2))
    if kind == "blob":
        ax = max(2, int(size * rng.uniform(0.06, 0.12)))
        ay = max(2, int(size * rng.uniform(0.04, 0.09)))
        angle = float(rng.uniform(0, 180))
        cv2.ellipse(mask, (cx, cy), (ax, ay), angle, 0, 360, 255, thickness=-1)
    else:
        length = size * rng.uniform(0.3, 0.45)
        a = rng.uniform(0, np.pi)
        hx, hy = 0.5 * length * np.cos(a), 0.5 * length * np.sin(a)
        p0 = (int(round(cx - hx)), int(round(cy - hy)))
        p1 = (int(round(cx + hx)), int(round(cy + hy)))
        cv2.line(mask, p0, p1, 255, thickness=max(1, size // 32))
    return mask


def _write(path: Path, rgb_or_grey: np.ndarray) -> None:
    img = rgb_or_grey if rgb_or_grey.ndim == 2 else cv2.cvtColor(rgb_or_grey, cv2.COLOR_RGB2BGR)
    if not cv2.imwrite(str(path), img):
        raise OSError(f"cannot write {path}")


def make_synthetic_mvtec(root: Path, classes: Sequence[str] = ("alpha", "beta", "gamma"), *,
                         n_train: int = 24, n_test_good: int = 6, n_test_bad: int = 6,
                         size: int = 64, seed: int = 0) -> Path:
    """Write a small MVTec-layout data set under ``root`` and return ``root``.

    Deterministic for a given seed: class ``i`` draws from its own generator
    seeded with ``(seed, i)``. Files are 000.png, 001.png, ...; bad test
    images are split between ``test/blob`` and ``test/scratch``.
    """
    root = Path(root)
    for index, name in enumerate(classes):
        rng = np.random.default_rng([seed, index])
        _, defect_rgb = class_colours(index)
        cls = root / name
        folders = {
            "train": cls / "train" / "good",
            "good": cls / "test" / "good",
            **{d: cls / "test" / d for d in DEFECTS},
            **{f"gt_{d}": cls / "ground_truth" / d for d in DEFECTS},
        }
        for folder in folders.values():
            folder.mkdir(parents=True, exist_ok=True)
        for i in range(n_train):
            _write(folders["train"] / f"{i:03d}.png", _normal_image(index, size, rng))
        for i in range(n_test_good):
            _write(folders["good"] / f"{i:03d}.png", _normal_image(index, size, rng))
        n_blob = (n_test_bad + 1) // 2
        counters = dict.fromkeys(DEFECTS, 0)
        for i in range(n_test_bad):
            kind = DEFECTS[0] if i < n_blob else DEFECTS[1]
            img = _normal_image(index, size, rng)
            mask = _defect_mask(kind, size, rng)
            img[mask > 0] = defect_rgb
            stem = f"{counters[kind]:03d}"
            counters[kind] += 1
            _write(folders[kind] / f"{stem}.png", img)
            _write(folders[f"gt_{kind}"] / f"{stem}_mask.png", mask)
    return root
