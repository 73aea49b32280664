"""Image-side arithmetic shared by training and the edge: numpy and OpenCV only, no torch.

Preprocessing before the backbone, and the step from a patch-NLL grid to an image score and
an anomaly map. Training, export parity checks and the daemon all call these, so a frame is
scored the same way everywhere.
"""

from __future__ import annotations

import cv2
import numpy as np


def preprocess(images: np.ndarray, mean: tuple, std: tuple) -> np.ndarray:
    """uint8 RGB (B, H, W, 3) -> float32 normalised (B, 3, H, W)."""
    x = images.astype(np.float32) / 255.0
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def image_scores(patch_nll: np.ndarray, top_k: int) -> np.ndarray:
    """Image score: mean of the top-k patch scores on the feature grid (N,)."""
    flat = patch_nll.reshape(len(patch_nll), -1)
    k = min(top_k, flat.shape[1])
    return np.sort(flat, axis=1)[:, -k:].mean(axis=1)


def anomaly_maps(patch_nll: np.ndarray, size: int, sigma: float) -> np.ndarray:
    """Patch NLL grids (N, h, w) -> bilinearly upsampled, Gaussian-smoothed maps (N, size, size)."""
    out = np.empty((len(patch_nll), size, size), dtype=np.float32)
    for i, grid in enumerate(patch_nll.astype(np.float32)):
        up = cv2.resize(grid, (size, size), interpolation=cv2.INTER_LINEAR)
        out[i] = cv2.GaussianBlur(up, (0, 0), sigma) if sigma > 0 else up
    return out


def mahalanobis(x: np.ndarray, mean: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """Mahalanobis distance of each row of ``x`` (n, d) to one prototype, float64."""
    diff = np.asarray(x, dtype=np.float64) - mean
    return np.sqrt(np.maximum(np.einsum("nd,de,ne->n", diff, precision, diff), 0.0))
