"""Image-side arithmetic shared by training and the edge: numpy and OpenCV only, no torch.

Preprocessing before the backbone, and the step from a patch-NLL grid to an image score and
an anomaly map. Training, export parity checks and the daemon all call these, so a frame is
scored the same way everywhere.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import cv2
import numpy as np


# Light every frame is brought to when the backbone standardises it, in units of the grey range:
# mid grey, with the contrast (std) of ImageNet images.
LIGHT_MEAN = 0.5
LIGHT_STD = 0.225
# Smallest frame std standardised at full gain: a blank frame is not amplified into noise.
LIGHT_FLOOR = 0.01


def preprocess(images: np.ndarray, mean: tuple, std: tuple,
               standardise: bool = False) -> np.ndarray:
    """uint8 RGB (B, H, W, 3) -> float32 normalised (B, 3, H, W): ``(x / 255 - mean) / std``.

    ``standardise``: ``x / 255`` is first replaced by ``LIGHT_MEAN + (x / 255 - m) / s *
    LIGHT_STD``, with ``m`` and ``s`` the frame's own mean and std over all its pixels and
    channels, so that a camera's gain, exposure or contrast change (``a * x + b`` on every
    pixel) cancels before the backbone sees the frame; colours and the frame's own structure
    stay as they are. Done on the normalised blob: one scale per frame and one offset per frame
    and channel.

    OpenCV's blob packing does the scaling and the NHWC -> NCHW copy in one pass: 0.17 ms a
    256² frame against 1.4 ms for the same arithmetic as numpy expressions (the daemon's
    largest cost outside the graphs)."""
    blob = _blob(images, mean, std)
    if standardise and len(blob):
        m, s = frame_light(images)
        m = m[:, None, None, None]
        gain = LIGHT_STD / np.maximum(s, LIGHT_FLOOR)[:, None, None, None]
        centre = np.asarray(mean, np.float32)[None, :, None, None]
        scale = np.asarray(std, np.float32)[None, :, None, None]
        blob *= gain
        blob += (LIGHT_MEAN - centre + (centre - m) * gain) / scale
    return blob


def frame_light(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each frame's mean and std over all its pixels and channels, in units of the grey range,
    from OpenCV's per-channel statistics (one pass over the uint8 frame)."""
    stats = np.array([np.concatenate(cv2.meanStdDev(im)) for im in images])[..., 0] / 255.0
    ch_mean, ch_std = stats[:, :3], stats[:, 3:]
    m = ch_mean.mean(axis=1)
    s = np.sqrt(np.maximum((ch_std ** 2 + ch_mean ** 2).mean(axis=1) - m ** 2, 0.0))
    return m.astype(np.float32), s.astype(np.float32)


def _blob(images: np.ndarray, mean: tuple, std: tuple) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (B, H, W, 3), got {images.dtype} {images.shape}")
    if len(images) == 0:
        return np.zeros((0, 3) + images.shape[1:3], dtype=np.float32)
    shift = tuple(255.0 * float(m) for m in mean)
    if len(set(std)) == 1:  # one scale factor: OpenCV's fastest path
        return cv2.dnn.blobFromImages(list(images), scalefactor=1.0 / (255.0 * float(std[0])),
                                      mean=shift, swapRB=False, crop=False)
    params = cv2.dnn.Image2BlobParams(
        scalefactor=tuple(1.0 / (255.0 * float(s)) for s in std) + (0.0,), mean=shift + (0.0,))
    return cv2.dnn.blobFromImagesWithParams(list(images), params)


# Smallest spread of a product's light over its training frames (grey-range units: one grey
# level): frames of one constant light do not make every small change an outlier.
LIGHT_SPREAD_FLOOR = 1 / 255


def light_reference(images: np.ndarray) -> np.ndarray:
    """A product's light over its training frames (uint8 RGB, N >= 1), as four numbers in units
    of the grey range: the mean and the spread (std) of the frames' mean grey, then the mean and
    the spread of their contrast (std over a frame's pixels and channels)."""
    m, s = frame_light(np.asarray(images))
    return np.array([m.mean(), max(float(m.std()), LIGHT_SPREAD_FLOOR),
                     s.mean(), max(float(s.std()), LIGHT_SPREAD_FLOOR)], dtype=np.float32)


def light_offsets(m: np.ndarray, s: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """How far each frame's light (``frame_light``'s mean ``m`` and contrast ``s``) lies from a
    product's ``light_reference``: the larger of the two distances, in spreads."""
    ref = np.asarray(reference, dtype=np.float64)
    return np.maximum(np.abs(m - ref[0]) / ref[1], np.abs(s - ref[2]) / ref[3])


def relit(image: np.ndarray, m: float, s: float, reference: np.ndarray) -> np.ndarray:
    """One uint8 frame with its light (mean ``m``, contrast ``s``) brought to the product's
    typical light: ``(x - m) * s_ref / s + m_ref``, clipped. A camera's gain, exposure or
    contrast change (``a * x + b`` on every pixel) is undone, clipping aside; one table lookup."""
    ref = np.asarray(reference, dtype=np.float64)
    levels = (np.arange(256) / 255.0 - m) * (ref[2] / max(float(s), LIGHT_FLOOR)) + ref[0]
    return cv2.LUT(image, np.clip(np.rint(levels * 255.0), 0, 255).astype(np.uint8))


@dataclass(frozen=True)
class PositionNorm:
    """One expert's patch-NLL statistics per grid position, over its own training images.

    The image score may rank a grid's patches by ``(nll - mean) / std`` instead of the raw NLL:
    positions whose NLL varies a lot between normal images (an imprint, the image border) then
    stop dominating the top-k of normal images. The anomaly maps do not use it. ``std`` is
    floored at ``FLOOR`` times its median over the grid, so a position that is nearly constant
    over the training images (a blank background) cannot turn noise into a large score.

    ``light`` (``light_reference`` of the expert's training frames; None in runs from before
    it existed) is what ``light_retries`` compares a frame's light with.
    """
    mean: np.ndarray            # (h, w) float32
    std: np.ndarray             # (h, w) float32, floored
    light: np.ndarray | None = None   # (4,) float32

    FLOOR = 0.1

    @classmethod
    def fit(cls, grids: np.ndarray) -> PositionNorm:
        """Statistics of patch-NLL grids (N, h, w) of normal images (N >= 2)."""
        g = np.asarray(grids, dtype=np.float64)
        if g.ndim != 3 or len(g) < 2 or not np.all(np.isfinite(g)):
            raise ValueError(f"need at least 2 finite (h, w) grids, got shape {g.shape}")
        std = g.std(axis=0)
        floor = max(cls.FLOOR * float(np.median(std)), 1e-6)
        return cls(g.mean(axis=0).astype(np.float32), np.maximum(std, floor).astype(np.float32))

    @classmethod
    def from_arrays(cls, arrays: dict, where: str = "") -> PositionNorm:
        """From ``to_arrays``' dict; ``where`` (a file) prefixes the error of a bad one."""
        prefix = f"{where}: " if where else ""
        try:
            mean = np.asarray(arrays["mean"], dtype=np.float32)
            std = np.asarray(arrays["std"], dtype=np.float32)
        except KeyError as exc:
            raise ValueError(f"{prefix}position statistics lack {exc}") from exc
        if mean.ndim != 2 or mean.shape != std.shape or not np.all(std > 0):
            raise ValueError(f"{prefix}position statistics must be two positive-std (h, w) "
                             f"grids, got mean {mean.shape}, std {std.shape}")
        light = arrays.get("light")
        if light is not None:
            light = np.asarray(light, dtype=np.float32)
            if light.shape != (4,) or not np.all(np.isfinite(light)) or not np.all(light[[1, 3]] > 0):
                raise ValueError(f"{prefix}light reference must be 4 finite numbers with "
                                 f"positive spreads, got {light.tolist()}")
        return cls(mean, std, light)

    def to_arrays(self) -> dict[str, np.ndarray]:
        out = {"mean": self.mean, "std": self.std}
        if self.light is not None:
            out["light"] = self.light
        return out

    def apply(self, patch_nll: np.ndarray) -> np.ndarray:
        """Standardised grids (N, h, w)."""
        grids = np.asarray(patch_nll, dtype=np.float32)
        if grids.shape[1:] != self.mean.shape:
            raise ValueError(f"patch grids {grids.shape[1:]} do not match the position "
                             f"statistics {self.mean.shape}")
        return (grids - self.mean) / self.std


def image_scores(patch_nll: np.ndarray, top_k: int,
                 norm: PositionNorm | None = None) -> np.ndarray:
    """Image score (N,): mean of the top-k patch scores on the feature grid; the patch scores
    are the NLLs, or with ``norm`` the NLLs standardised per position (see ``PositionNorm``)."""
    if norm is not None:
        patch_nll = norm.apply(patch_nll)
    flat = patch_nll.reshape(len(patch_nll), -1)
    k = min(top_k, flat.shape[1])
    return np.sort(flat, axis=1)[:, -k:].mean(axis=1)


def standardised(patch_nll: np.ndarray, owners, norms: dict | None) -> np.ndarray:
    """Patch grids (N, h, w), grid ``i`` standardised by the statistics ``norms[owners[i]]``
    (``norms`` None: the NLLs as they are)."""
    grids = np.asarray(patch_nll)
    if norms is None:
        return grids
    owners = np.asarray(owners)
    out = np.empty(grids.shape, dtype=np.float32)
    for owner in np.unique(owners):
        sel = owners == owner
        out[sel] = norms[owner.item()].apply(grids[sel])
    return out


def light_retries(images: np.ndarray, owners, norms: dict | None, spreads: float
                  ) -> tuple[list[int], np.ndarray, np.ndarray]:
    """The frames to score a second time in their product's typical light, those frames
    relit (``relit``), and every frame's light offset from its expert's reference in spreads
    (``light_offsets``; NaN where the expert has none). A frame is retried when its offset is
    over ``spreads``; none are when ``spreads`` is 0 or its expert has no reference (runs from
    before it existed).

    The experts trained on views whose light varied by ±10 %; a frame beyond what a product's
    own frames show (a camera's gain or contrast turned up) can still score high on normal
    parts. Both paths score the relit frame and keep the lower score (``keep_lower``): a
    clipped highlight that relighting cannot restore leaves the frame as it came, a defect
    stays a defect in either light."""
    empty = np.zeros((0,) + tuple(np.shape(images)[1:]), dtype=np.uint8)
    offsets = np.full(len(images), np.nan)
    if norms is None or len(images) == 0:
        return [], empty, offsets
    m, s = frame_light(images)
    picked, frames = [], []
    for i, owner in enumerate(owners):
        ref = getattr(norms.get(owner), "light", None)
        if ref is None:
            continue
        offsets[i] = light_offsets(m[i], s[i], ref)
        if 0 < spreads < offsets[i]:
            picked.append(i)
            frames.append(relit(images[i], float(m[i]), float(s[i]), ref))
    return picked, (np.stack(frames) if frames else empty), offsets


def keep_lower(grids: np.ndarray, picked: list[int], again: np.ndarray, owners,
               norms: dict, top_k: int) -> np.ndarray:
    """Put ``again[j]`` (the relit frame's patch grid) in place of ``grids[picked[j]]`` where its
    image score is lower; returns which were taken (bool per picked frame). The frame's score,
    map and typicality then all come from the same grid."""
    if not picked:
        return np.zeros(0, dtype=bool)
    who = [owners[i] for i in picked]
    before = routed_image_scores(grids[picked], who, norms, top_k)
    after = routed_image_scores(again, who, norms, top_k)
    taken = after < before
    for j in np.flatnonzero(taken):
        grids[picked[j]] = again[j]
    return taken


def routed_image_scores(patch_nll: np.ndarray, owners, norms: dict | None,
                        top_k: int) -> np.ndarray:
    """Image scores of grids scored by different experts: grid ``i`` standardised by the
    statistics ``norms[owners[i]]`` (``norms`` None: raw NLL scores)."""
    return image_scores(standardised(patch_nll, owners, norms), top_k)


def typicality(scores: np.ndarray) -> np.ndarray:
    """How unlike its expert's training images a frame is as a whole (N,): the median over the
    grid of its patch scores (``standardised`` grids, or raw NLLs without statistics).

    A defect is local and leaves the median where normal frames have it; a product the expert
    has never seen is unlike it nearly everywhere and moves the median far. This is what tells
    an unknown product from a defective known one (``Pipeline.score``)."""
    grids = np.asarray(scores)
    return np.median(grids.reshape(len(grids), -1), axis=1)


def map_values(patch_nll: np.ndarray, rule: str, dim: int) -> np.ndarray:
    """The patch values an anomaly map is made of, from patch NLL grids (N, h, w).

    'nll': the NLL itself. 'likelihood': ``1 - exp(-NLL / dim)``, one minus the patch's
    likelihood per feature dimension, the map anomalib builds for FastFlow and CFlow. It is
    monotone in the NLL, so a grid ranks its patches the same way; what changes is the
    smoothing: a defect's extreme NLLs saturate instead of spreading their size over the
    neighbouring normal pixels (measured on the three shared classes: pixel AUROC, AP and AUPRO
    all a little higher, e.g. bottle 0.9699 -> 0.9702, AP 0.553 -> 0.556).
    """
    grids = np.asarray(patch_nll, dtype=np.float32)
    if rule == "nll":
        return grids
    if rule != "likelihood":
        raise ValueError(f"anomaly-map rule {rule!r} is not 'likelihood' or 'nll'")
    # the exponent is clipped where float32 would overflow (an NLL below -80·dim nats)
    return (1.0 - np.exp(np.minimum(-grids / np.float32(dim), np.float32(80.0)))).astype(
        np.float32)


def anomaly_maps(patch_nll: np.ndarray, size: int, sigma: float) -> np.ndarray:
    """Patch NLL grids (N, h, w) -> bilinearly upsampled, Gaussian-smoothed maps (N, size, size).

    Both steps are separable linear operators, so a map is ``A_h @ grid @ A_w.T`` with two
    small matrices built once from OpenCV's own resize and blur (identical semantics: borders,
    kernel size; equal to float rounding). Two matrix products cost a tenth of the image-sized
    resize and blur, which the daemon pays for every alarm."""
    grids = np.asarray(patch_nll, dtype=np.float32)
    a_h = _map_operator(grids.shape[1], grids.shape[2], size, float(sigma), rows=True)
    a_w = _map_operator(grids.shape[1], grids.shape[2], size, float(sigma), rows=False)
    with _single_threaded_blas():
        return np.ascontiguousarray(a_h @ grids @ a_w.T, dtype=np.float32)


@functools.lru_cache(maxsize=1)
def _blas_controller():
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # pragma: no cover - a dependency; without it BLAS keeps its pool
        return None
    return ThreadpoolController()


def _single_threaded_blas():
    """These products are too small for a thread pool: OpenBLAS's threads would spin after
    each one and take the cores from ONNX Runtime or torch running beside it (measured: the
    ONNX backbone at 11 instead of 5.3 ms a frame), and one thread is faster here anyway."""
    controller = _blas_controller()
    if controller is None:
        return contextlib.nullcontext()
    return controller.limit(limits=1, user_api="blas")


def reference_maps(patch_nll: np.ndarray, size: int, sigma: float) -> np.ndarray:
    """The anomaly map as OpenCV computes it image by image (the definition ``anomaly_maps``
    reproduces with matrices)."""
    out = np.empty((len(patch_nll), size, size), dtype=np.float32)
    for i, grid in enumerate(np.asarray(patch_nll, dtype=np.float32)):
        up = cv2.resize(grid, (size, size), interpolation=cv2.INTER_LINEAR)
        out[i] = cv2.GaussianBlur(up, (0, 0), sigma) if sigma > 0 else up
    return out


@functools.lru_cache(maxsize=16)
def _map_operator(h: int, w: int, size: int, sigma: float, rows: bool) -> np.ndarray:
    """(size, h) matrix acting on the grid's rows (or (size, w) on its columns): column j is
    the map of a grid whose row (column) j is one and the rest zero, read along one column
    (row) -- the other axis' operator maps a constant to a constant."""
    n = h if rows else w
    basis = np.zeros((n, h, w), dtype=np.float32)
    for j in range(n):
        if rows:
            basis[j, j, :] = 1.0
        else:
            basis[j, :, j] = 1.0
    maps = reference_maps(basis, size, sigma)
    cols = maps[:, :, 0] if rows else maps[:, 0, :]
    return np.ascontiguousarray(cols.T, dtype=np.float32)


def mahalanobis(x: np.ndarray, mean: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """Mahalanobis distance of each row of ``x`` (n, d) to one prototype, float64."""
    diff = np.asarray(x, dtype=np.float64) - mean
    return np.sqrt(np.maximum(np.einsum("nd,de,ne->n", diff, precision, diff), 0.0))
