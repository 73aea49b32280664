"""Overlays a person can read: the part, its anomaly heat map, the decision and its scale.

``render_overlay`` draws one frame (numpy + OpenCV, no torch) for the edge daemon's alarm
evidence and for the training run's overlays::

    +--------------------------------------+
    | ANOMALOUS  <label>                   |  banner: decision, score / threshold
    | score 0.93 / threshold 0.50          |
    +------------------------------+-------+
    |  the frame; JET heat blended |  top  |  colour bar with its scale; the map
    |  (alpha <= 0.45) only where  |  thr -|  threshold marked on it
    |  the map nears its threshold;|       |
    |  threshold contour (white),  |       |
    |  region boxes (yellow),      |       |
    |  ground truth (green)        |   0   |
    +------------------------------+-------+

The frame keeps its own pixels wherever the map stays at the part's normal level (below the
midpoint of its median and the threshold), so the part stays visible; the map may have any
size (it is resized to the frame).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

ALPHA = 0.45                      # heat-map opacity where the map reaches its threshold
CONTOUR = (255, 255, 255)         # threshold contour (BGR)
BOX = (0, 230, 255)               # region boxes
TRUTH = (0, 200, 0)               # ground-truth outline
ALARM, NORMAL = (60, 60, 255), (120, 220, 120)
FONT = cv2.FONT_HERSHEY_SIMPLEX


@dataclass(frozen=True)
class Layout:
    """Where the frame sits in the overlay: ``banner`` rows above it, ``bar`` columns right."""
    banner: int
    bar: int
    unit: float

    @classmethod
    def of(cls, height: int, width: int) -> Layout:
        unit = max(1.0, min(height, width) / 256.0)
        return cls(banner=int(round(36 * unit)), bar=int(round(52 * unit)), unit=unit)


def render_overlay(frame_bgr: np.ndarray, anomaly_map: np.ndarray, *, map_threshold: float,
                   score: float | None, threshold: float | None, regions: list[dict] = (),
                   ground_truth: np.ndarray | None = None, top: float | None = None,
                   bottom: float | None = None, label: str = "") -> np.ndarray:
    """The overlay image (BGR uint8, ``Layout.of(h, w)`` larger than the frame).

    ``anomaly_map``: any (h', w') map, resized to the frame. Its colour scale runs from
    ``bottom`` (default: the map's median, the part's normal level, when that is below the
    threshold) to ``top`` (default: as far above the threshold as ``bottom`` is below, or the
    map's peak if higher); colour shows from halfway between ``bottom`` and the threshold.
    ``regions``: the alarm's boxes (``box`` as fractions of the frame, or ``x, y, w, h`` in
    map pixels). ``ground_truth``: a defect mask of any size (non-zero = defective), outlined
    in green. ``score``/``threshold`` fill the banner; a None threshold
    shows the score alone (no decision)."""
    frame = _bgr(frame_bgr)
    h, w = frame.shape[:2]
    amap = np.asarray(anomaly_map, dtype=np.float32)
    if amap.ndim != 2 or amap.size == 0:
        raise ValueError(f"anomaly_map must be a 2-D array, got shape {amap.shape}")
    amap_full = cv2.resize(amap, (w, h), interpolation=cv2.INTER_LINEAR)
    thr = float(map_threshold)
    finite = amap_full[np.isfinite(amap_full)]
    bottom = _bottom(bottom, thr, finite)
    amap_full = np.nan_to_num(amap_full, nan=bottom, posinf=np.finfo(np.float32).max,
                              neginf=bottom)
    top = _top(top, thr, bottom, amap_full)
    layout = Layout.of(h, w)
    out = np.zeros((h + layout.banner, w + layout.bar, 3), np.uint8)
    out[:] = (32, 32, 32)
    view = out[layout.banner:, :w]
    view[:] = _blend(frame, amap_full, thr, bottom, top)
    line = max(1, int(round(layout.unit)))
    contours, _ = cv2.findContours((amap_full >= thr).astype(np.uint8), cv2.RETR_EXTERNAL,
                                   cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(view, contours, -1, CONTOUR, line, cv2.LINE_AA)
    if ground_truth is not None:
        gt = cv2.resize((np.asarray(ground_truth) > 0).astype(np.uint8), (w, h),
                        interpolation=cv2.INTER_NEAREST)
        outline, _ = cv2.findContours(gt, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(view, outline, -1, TRUTH, line, cv2.LINE_AA)
    for r in regions or ():
        x0, y0, x1, y1 = _box(r, amap.shape, w, h)
        cv2.rectangle(view, (x0, y0), (x1, y1), BOX, line)
    _colour_bar(out[layout.banner:, w:], layout, thr, bottom, top)
    _banner(out[:layout.banner], layout, score, threshold, label)
    return out


def _bgr(frame: np.ndarray) -> np.ndarray:
    f = np.asarray(frame)
    if f.ndim == 2:
        f = cv2.cvtColor(f, cv2.COLOR_GRAY2BGR)
    if f.ndim != 3 or f.shape[2] != 3 or f.shape[0] < 8 or f.shape[1] < 8:
        raise ValueError(f"frame must be an (H, W, 3) image of at least 8x8, got {f.shape}")
    if f.dtype != np.uint8:
        f = np.clip(f, 0, 255).astype(np.uint8)
    return f


def _bottom(bottom: float | None, thr: float, values: np.ndarray) -> float:
    if bottom is not None:
        return float(bottom)
    if values.size == 0:
        return thr - 1.0
    median, low = float(np.median(values)), float(values.min())
    if median < thr:
        return median
    return low if low < thr else thr - max(abs(thr), 1.0)


def _top(top: float | None, thr: float, bottom: float, amap: np.ndarray) -> float:
    if top is None:  # the threshold mid-scale, or the map's peak when that is higher
        top = max(bottom + 2.0 * (thr - bottom), float(amap.max()))
    return float(top) if top > bottom else bottom + 1.0


def _blend(frame: np.ndarray, amap: np.ndarray, thr: float, bottom: float,
           top: float) -> np.ndarray:
    """JET colours over the frame, opacity rising from 0 at half the threshold to ALPHA at it."""
    level = np.clip((amap - bottom) / (top - bottom), 0.0, 1.0)
    heat = cv2.applyColorMap((level * 255).astype(np.uint8), cv2.COLORMAP_JET)
    start = bottom + 0.5 * (thr - bottom)
    span = max(thr - start, 1e-12)
    alpha = (ALPHA * np.clip((amap - start) / span, 0.0, 1.0))[..., None]
    mixed = frame.astype(np.float32) * (1.0 - alpha) + heat.astype(np.float32) * alpha
    return np.clip(mixed + 0.5, 0, 255).astype(np.uint8)


def _box(region: dict, map_shape: tuple[int, int], w: int, h: int) -> tuple[int, int, int, int]:
    if "box" in region:
        fx0, fy0, fx1, fy1 = (float(v) for v in region["box"])
    else:
        mh, mw = map_shape
        fx0, fy0 = region["x"] / mw, region["y"] / mh
        fx1, fy1 = (region["x"] + region["w"]) / mw, (region["y"] + region["h"]) / mh
    x0, y0 = int(round(fx0 * w)), int(round(fy0 * h))
    x1, y1 = int(round(fx1 * w)) - 1, int(round(fy1 * h)) - 1
    return (min(max(x0, 0), w - 1), min(max(y0, 0), h - 1),
            min(max(x1, x0), w - 1), min(max(y1, y0), h - 1))


def _fmt(v: float) -> str:
    return f"{v:.3f}" if abs(v) < 10 else f"{v:.4g}" if abs(v) < 1000 else f"{v:.0f}"


def _colour_bar(panel: np.ndarray, layout: Layout, thr: float, bottom: float,
                top: float) -> None:
    """A vertical JET bar (top value at the top) with the top, threshold and bottom values."""
    h = panel.shape[0]
    u = layout.unit
    pad, bar_w = int(6 * u), int(10 * u)
    y0, y1 = pad, h - pad
    if y1 - y0 < 8:
        return
    ramp = np.linspace(255, 0, y1 - y0).astype(np.uint8)[:, None]
    colours = cv2.applyColorMap(np.repeat(ramp, bar_w, axis=1), cv2.COLORMAP_JET)
    x0 = int(4 * u)
    panel[y0:y1, x0:x0 + bar_w] = colours
    scale, thick = 0.33 * u, 1
    text_x = x0 + bar_w + int(3 * u)

    def y_of(v: float) -> int:
        return int(round(y1 - 1 - (v - bottom) / (top - bottom) * (y1 - y0 - 1)))

    marks = [(top, y0 + int(8 * u)), (bottom, y1)]
    if bottom < thr < top:
        yt = y_of(thr)
        cv2.line(panel, (x0 - int(2 * u), yt), (x0 + bar_w + int(2 * u), yt), CONTOUR, 1)
        marks.append((thr, yt + int(4 * u)))
    for value, y in marks:
        _text(panel, _fmt(value), (text_x, y), scale, (230, 230, 230), thick, panel.shape[1])


def _banner(panel: np.ndarray, layout: Layout, score: float | None,
            threshold: float | None, label: str) -> None:
    u, width = layout.unit, panel.shape[1]
    if threshold is None or score is None:
        state, colour = "", (230, 230, 230)
    elif score > threshold:
        state, colour = "ANOMALOUS", ALARM
    else:
        state, colour = "normal", NORMAL
    first = "  ".join(t for t in (state, label) if t) or "anomaly map"
    s = "n/a" if score is None else _fmt(float(score))
    second = f"score {s}" + ("" if threshold is None else f" / threshold {_fmt(threshold)}")
    scale = 0.45 * u
    _text(panel, first, (int(4 * u), int(15 * u)), scale, colour, max(1, int(u)), width)
    _text(panel, second, (int(4 * u), int(31 * u)), scale, (240, 240, 240), 1, width)


def _text(img: np.ndarray, text: str, origin: tuple[int, int], scale: float,
          colour: tuple[int, int, int], thickness: int, width: int) -> None:
    """Text shrunk until it fits between ``origin`` and the right edge."""
    room = max(width - origin[0] - 2, 10)
    tw = cv2.getTextSize(text, FONT, scale, thickness)[0][0]
    if tw > room:
        scale *= room / tw
    cv2.putText(img, text, origin, FONT, scale, colour, thickness, cv2.LINE_AA)
