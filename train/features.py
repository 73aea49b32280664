"""Backbone features per class and split, cached on disk and keyed by everything they depend on.

The cache key hashes the backbone identity (name, weights digest, stages, local average), the
image size and the data fingerprint (paths, sizes, mtimes), so a change to any of them
invalidates the entry; stale entries of the same class and split are removed.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from moleflow.conditions import Augmentation
from moleflow.train.backbone import FeatureExtractor, extract
from moleflow.data import ClassData, class_masks, load_images

log = logging.getLogger("moleflow.features")


class FeatureStore:
    """Extracts (and caches) patch features of a class's train or test images."""

    def __init__(self, extractor: FeatureExtractor, image_size: int,
                 cache_dir: Path | None = None, progress: bool = True) -> None:
        self.extractor, self.image_size = extractor, image_size
        self.cache_dir, self.progress = cache_dir, progress

    def _key(self, data: ClassData, split: str) -> str:
        ident = f"{self.extractor.identity(self.image_size)}|{split}|{data.fingerprint()}"
        return hashlib.sha256(ident.encode()).hexdigest()[:20]

    def _paths(self, data: ClassData, split: str) -> list[Path]:
        return list(data.train) if split == "train" else [t.path for t in data.test]

    def extract(self, images: np.ndarray) -> torch.Tensor:
        """Features (N, D, H, W) of uint8 RGB images as they are (not cached)."""
        return extract(self.extractor, images)

    def images_of(self, paths: list[Path]) -> np.ndarray:
        """uint8 RGB images (N, S, S, 3) at the store's size."""
        return load_images(paths, self.image_size)

    def features(self, data: ClassData, split: str, view: int = 0,
                 augmentation: Augmentation | None = None, seed: int = 0) -> torch.Tensor:
        """(N, D, H, W) float32 features of ``split`` ('train' or 'test') of ``data``.

        ``view`` 0 is the images as they are; view ``v`` > 0 is the ``v``-th random view of
        every image under ``augmentation`` (drawn with ``seed``), cached under its own key."""
        if view and augmentation is None:
            raise ValueError("a view > 0 needs an augmentation")
        path = None
        gained = bool(view and self.extractor.cfg.standardise_light and augmentation.photometric)
        if self.cache_dir is not None:
            ident = self._key(data, split) if view == 0 else hashlib.sha256(
                f"{self._key(data, split)}|{augmentation.spec}|seed{seed}|view{view}"
                f"{'|gain' if gained else ''}".encode()).hexdigest()[:20]
            tag = split if view == 0 else f"{split}v{view}"
            path = self.cache_dir / f"{data.name}-{tag}-{ident}.npy"
            if path.is_file():
                return torch.from_numpy(np.load(path))
        images = self.images_of(self._paths(data, split))
        gains = None
        if view:
            images = augmentation.views(images, view, seed)
            if gained:
                gains = augmentation.input_gains(len(images), view, seed)
        bar = tqdm(total=len(images), desc=f"features {data.name}/{split}"
                   + (f" view {view}" if view else ""), unit="img",
                   disable=not self.progress, leave=False)
        feats = extract(self.extractor, images, progress=bar.update, gains=gains)
        bar.close()
        if path is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            for stale in self.cache_dir.glob(f"{data.name}-{tag}-*.npy"):
                stale.unlink()
            tmp = path.with_suffix(".tmp.npy")
            np.save(tmp, feats.numpy())
            tmp.replace(path)
        return feats

    def views(self, data: ClassData, count: int, augmentation: Augmentation | None,
              seed: int = 0) -> list[torch.Tensor]:
        """The training images' features as they are, then ``count`` random views of them."""
        if augmentation is None:
            count = 0
        return [self.features(data, "train", v, augmentation, seed) for v in range(count + 1)]

    def masks(self, data: ClassData) -> np.ndarray:
        """Ground-truth masks (N, S, S) bool of the test images (all-false for good ones)."""
        return class_masks(data, self.image_size)


def pooled(feats: torch.Tensor) -> np.ndarray:
    """Image-level router feature: the patch features averaged over the grid (N, D)."""
    return feats.mean(dim=(2, 3)).double().numpy()

