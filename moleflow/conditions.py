"""What a camera on a line does to a frame, as named, reproducible image conditions.

One vocabulary for three users: the robustness benchmark scores every class under each
condition, calibration passes its held-out images through ``calibration.codec`` (the line
sends JPEG), and training draws random views of its images from the same operations
(``augment``). numpy and OpenCV only, so the edge side can use it too.

Names (``name`` or ``name:value``):

=================  ============================================================================
``lossless``       the image as it is
``jpeg:Q``         encoded and decoded by OpenCV's JPEG codec at quality Q (what imagezmq's
                   ``send_jpg`` does); ``raw`` is an alias of ``lossless``
``brightness:P``   every pixel scaled by 1 + P/100 (``brightness:-10``: 10 % darker)
``contrast:P``     distances to the image's mean grey scaled by 1 + P/100
``noise:S``        Gaussian sensor noise, standard deviation S grey levels (seeded)
``blur:S``         defocus: Gaussian blur with sigma S pixels
``shift:P``        the image moved by P pixels right and down (reflected border): vibration
``rotate:D``       rotated by D degrees about its centre (reflected border)
=================  ============================================================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from moleflow.errors import MoleflowError

#: The benchmark's default conditions; the jitter strengths are the documented ones.
DEFAULT_CONDITIONS = ("lossless", "jpeg:95", "jpeg:85", "jpeg:75", "brightness:+10",
                      "brightness:-10", "contrast:+10", "contrast:-10", "noise:3", "blur:1",
                      "shift:4", "rotate:3")
_NAMES = ("lossless", "jpeg", "brightness", "contrast", "noise", "blur", "shift", "rotate")
_RANGES = {"jpeg": (1, 100), "brightness": (-90, 400), "contrast": (-90, 400), "noise": (0, 100),
           "blur": (0, 20), "shift": (-64, 64), "rotate": (-45, 45)}


class ConditionError(MoleflowError, ValueError):
    """A condition name that cannot be parsed; the message lists the valid ones."""


@dataclass(frozen=True)
class Condition:
    """One parsed condition: an operation and its strength."""
    kind: str
    value: float = 0.0

    @property
    def name(self) -> str:
        if self.kind == "lossless":
            return "lossless"
        v = self.value
        text = f"{int(v):+d}" if self.kind in ("brightness", "contrast") and v == int(v) else \
            (f"{int(v)}" if v == int(v) else f"{v:g}")
        return f"{self.kind}:{text}"

    def apply(self, images: np.ndarray, seed: int = 0) -> np.ndarray:
        """The condition applied to uint8 RGB images (N, H, W, 3) or one image (H, W, 3)."""
        one = images.ndim == 3
        batch = images[None] if one else images
        rng = np.random.default_rng(seed)
        out = np.stack([_apply(self.kind, self.value, im, rng) for im in batch]) if len(batch) \
            else batch.copy()
        return out[0] if one else out


def apply_to_masks(cond: Condition, masks: np.ndarray) -> np.ndarray:
    """Ground-truth masks (N, H, W) bool moved as ``cond`` moves the image (shift, rotate);
    other conditions leave them as they are."""
    if cond.kind not in ("shift", "rotate") or len(masks) == 0:
        return masks
    dx = dy = cond.value if cond.kind == "shift" else 0.0
    deg = cond.value if cond.kind == "rotate" else 0.0
    return np.stack([_affine(k.astype(np.uint8), dx, dy, deg, cv2.INTER_NEAREST) > 0
                     for k in masks])


def parse_condition(text: str) -> Condition:
    """``jpeg:85`` -> Condition('jpeg', 85.0); errors name the text and the valid forms."""
    raw = str(text).strip().lower()
    kind, sep, value = raw.partition(":")
    if kind == "raw":
        kind = "lossless"
    valid = "lossless, raw, jpeg:Q, brightness:P, contrast:P, noise:S, blur:S, shift:P, rotate:D"
    if kind not in _NAMES or (kind == "lossless") == bool(sep):
        raise ConditionError(f"condition {text!r} is not one of: {valid}")
    if kind == "lossless":
        return Condition("lossless")
    try:
        number = float(value)
    except ValueError:
        raise ConditionError(f"condition {text!r}: {value!r} is not a number ({valid})") from None
    lo, hi = _RANGES[kind]
    if not (math.isfinite(number) and lo <= number <= hi):
        raise ConditionError(f"condition {text!r}: {kind} must be in {lo}..{hi}")
    if kind == "jpeg" and number != int(number):
        raise ConditionError(f"condition {text!r}: JPEG quality must be an integer 1..100")
    return Condition(kind, number)


def jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    """One RGB image through OpenCV's JPEG encoder and decoder (BGR on the wire, as OpenCV
    senders encode camera frames)."""
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:  # pragma: no cover - OpenCV encodes any uint8 image
        raise ConditionError("OpenCV could not JPEG-encode the image")
    return cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def _affine(image: np.ndarray, dx: float, dy: float, degrees: float,
            interpolation: int = cv2.INTER_LINEAR) -> np.ndarray:
    """Rotated about the centre by ``degrees``, then moved by (dx, dy); reflected border."""
    h, w = image.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2 - 0.5, h / 2 - 0.5), degrees, 1.0)
    m[:, 2] += (dx, dy)
    return cv2.warpAffine(image, m, (w, h), flags=interpolation,
                          borderMode=cv2.BORDER_REFLECT_101)


def _levels(image: np.ndarray, gain: float, contrast: float) -> np.ndarray:
    f = image.astype(np.float32) * gain
    if contrast != 1.0:
        mean = f.mean()
        f = mean + (f - mean) * contrast
    return np.clip(np.rint(f), 0, 255).astype(np.uint8)


def _apply(kind: str, v: float, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if kind == "lossless":
        return image.copy()
    if kind == "jpeg":
        return jpeg(image, int(v))
    if kind == "brightness":
        return _levels(image, 1 + v / 100, 1.0)
    if kind == "contrast":
        return _levels(image, 1.0, 1 + v / 100)
    if kind == "noise":
        noisy = image.astype(np.float32) + rng.normal(0.0, v, image.shape).astype(np.float32)
        return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
    if kind == "blur":
        return cv2.GaussianBlur(image, (0, 0), v) if v > 0 else image.copy()
    if kind == "shift":
        return _affine(image, v, v, 0.0)
    if kind == "rotate":
        return _affine(image, 0.0, 0.0, v)
    raise ConditionError(f"unknown condition kind {kind!r}")  # pragma: no cover


@dataclass(frozen=True)
class Augmentation:
    """Random views of training images: small camera changes and compression, each drawn per
    image and view. Shift and blur are in pixels of a 256-pixel image and scale with the
    image's side (a 64-pixel image shifts a quarter as far). ``spec`` names it in the feature
    cache's key."""
    jpeg_min: int = 60           # JPEG quality drawn uniformly in [jpeg_min, 100] ...
    jpeg_share: float = 0.8      # ... for this share of views (the rest stay lossless)
    photometric: float = 0.1     # brightness and contrast gain in 1 ± this
    noise: float = 3.0           # sensor-noise std drawn in [0, noise] grey levels
    blur: float = 1.0            # defocus sigma drawn in [0, blur] pixels for a third of views
    shift: float = 4.0           # translation drawn in ±shift pixels (each axis)
    rotate: float = 3.0          # rotation drawn in ±rotate degrees

    @property
    def spec(self) -> str:
        return (f"aug2|jpeg{self.jpeg_min}x{self.jpeg_share}|ph{self.photometric}|n{self.noise}"
                f"|b{self.blur}|s{self.shift}|r{self.rotate}")

    def view(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One random view of a uint8 RGB image (geometry, light, optics, sensor, codec: the
        order a camera applies them)."""
        scale = image.shape[0] / 256.0
        dx, dy = rng.uniform(-self.shift, self.shift, 2) * scale
        deg = rng.uniform(-self.rotate, self.rotate)
        out = _affine(image, dx, dy, deg) if (self.shift or self.rotate) else image.copy()
        gain, contrast = rng.uniform(1 - self.photometric, 1 + self.photometric, 2)
        out = _levels(out, gain, contrast)
        if self.blur > 0 and rng.random() < 1 / 3:
            out = cv2.GaussianBlur(out, (0, 0), rng.uniform(0.3, self.blur) * scale)
        sigma = rng.uniform(0, self.noise)
        if sigma > 0:
            out = _apply("noise", sigma, out, rng)
        if rng.random() < self.jpeg_share:
            out = jpeg(out, int(rng.integers(self.jpeg_min, 101)))
        return out

    def input_gains(self, count: int, view: int, seed: int) -> np.ndarray:
        """Contrast gains (count,) in 1 ± ``photometric`` for view number ``view`` of ``count``
        images, for a backbone that standardises each frame's light (which cancels the view's
        own brightness and contrast change): applied to the standardised input, they keep the
        expert's density smooth across contrast. Image ``i``'s gain depends on seed, view and
        ``i`` only."""
        return np.asarray([np.random.default_rng([seed, view, i, 1]).uniform(
            1 - self.photometric, 1 + self.photometric) for i in range(count)], dtype=np.float32)

    def views(self, images: np.ndarray, view: int, seed: int) -> np.ndarray:
        """View number ``view`` (1, 2, ...) of every image: image ``i`` of view ``v`` is the
        same whatever else is drawn (its generator is seeded by seed, v and i)."""
        out = np.empty_like(images)
        for i, im in enumerate(images):
            out[i] = self.view(im, np.random.default_rng([seed, view, i]))
        return out
