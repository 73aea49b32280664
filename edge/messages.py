"""What the daemon publishes about a scored frame, built apart from the sending.

``result_payload``: the result JSON (also the base of the alarm's). ``alarm_regions``: the
alarm's boxes. ``MapThrottle``: one anomaly map per camera and ``mqtt.map_interval``.
``map_png``: the map as an 8-bit PNG that carries its frame id in PNG ``tEXt`` chunks
(``frame``, ``camera``, ``scored_at``, ``top``, ``map_threshold``), so a bare-PNG consumer of
``<camera>/map`` keeps working and one that wants the frame reads it with ``png_text``.
``alarm_evidence``: the frame and its overlay saved as JPEG for an alarm (moleflow.edge.evidence).
"""

from __future__ import annotations

import struct
import threading
import zlib
from typing import TYPE_CHECKING

import cv2
import numpy as np

from moleflow.edge.evidence import EvidenceStore
from moleflow.edge.frames import Frame
from moleflow.overlay import render_overlay

if TYPE_CHECKING:  # the engines' types only: no runtime import needed here
    from moleflow.engines.pipeline import FrameScore
    from moleflow.thresholds import ExpertCalibration

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def result_payload(device: str, frame: Frame, s: FrameScore, started: float,
                   done: float) -> dict:
    """The ``<camera>/result`` JSON of one scored frame (docs/mqtt-payloads.schema.json)."""
    decision = "uncalibrated" if s.anomalous is None else (
        "anomalous" if s.anomalous else "normal")
    latency = {k: round(v * 1000, 3) for k, v in s.timings.items()}
    latency["queue"] = round((started - frame.received_at) * 1000, 3)
    latency["total"] = round((done - frame.received_at) * 1000, 3)
    return {"device": device, "camera": frame.camera,
            "frame": frame.frame_id, "sent_at": frame.sent_at,
            "received_at": frame.received_at, "scored_at": done, "expert": s.expert,
            "routing_distance": round(s.distance, 4), "unknown": s.unknown,
            "score_raw": round(s.raw_score, 4),
            "score": None if s.score is None else round(s.score, 6), "decision": decision,
            "light_offset": None if s.light_offset is None else round(s.light_offset, 2),
            "relit": s.relit, "latency_ms": latency}


def regions(anomaly_map: np.ndarray, threshold: float, max_regions: int = 16) -> list[dict]:
    """Bounding boxes of the map's connected areas above ``threshold`` (pixels and 0..1)."""
    mask = (anomaly_map > threshold).astype(np.uint8)
    n, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    size = anomaly_map.shape[0]
    boxes = []
    for i in range(1, n):
        x, y, w, h, area = (int(v) for v in stats[i])
        peak = float(anomaly_map[y:y + h, x:x + w].max())
        boxes.append({"x": x, "y": y, "w": w, "h": h, "area": area, "peak": round(peak, 3),
                      "box": [round(x / size, 4), round(y / size, 4),
                              round((x + w) / size, 4), round((y + h) / size, 4)]})
    return sorted(boxes, key=lambda b: -b["peak"])[:max_regions]


def alarm_regions(amap: np.ndarray, map_threshold: float) -> list[dict]:
    """The regions over the map threshold; when the image score passed but no pixel did, the
    hottest area (above the midpoint of the map's median and peak), flagged as such."""
    boxes = regions(amap, map_threshold)
    if boxes:
        return boxes
    peak_level = 0.5 * (float(amap.max()) + float(np.median(amap)))
    return [dict(b, below_map_threshold=True) for b in regions(amap, peak_level)]


class MapThrottle:
    """One map per ``interval`` seconds and camera, whichever worker asks first."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()

    def due(self, camera: str, now: float) -> bool:
        if self.interval <= 0:
            return False
        with self._lock:
            if now - self._last.get(camera, 0.0) < self.interval:
                return False
            self._last[camera] = now
            return True


def map_png(amap: np.ndarray, cal: ExpertCalibration | None, frame: Frame,
            scored_at: float) -> bytes | None:
    """The map as an 8-bit PNG (128 = the map threshold when calibrated) with its frame id and
    scale in ``tEXt`` chunks; None if OpenCV cannot encode it."""
    top = 2.0 * cal.map_threshold if cal else float(amap.max()) or 1.0
    img = np.clip(amap / top * 255.0, 0, 255).astype(np.uint8)
    ok, png = cv2.imencode(".png", img)
    if not ok:
        return None
    text = {"frame": frame.frame_id, "camera": frame.camera, "scored_at": f"{scored_at:.3f}",
            "top": f"{top:.6g}"}
    if cal:
        text["map_threshold"] = f"{cal.map_threshold:.6g}"
    return png_with_text(png.tobytes(), text)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def png_with_text(png: bytes, text: dict[str, str]) -> bytes:
    """``png`` with a ``tEXt`` chunk per key inserted after IHDR (Latin-1, keys 1-79 chars;
    other characters become '?')."""
    if not png.startswith(PNG_SIGNATURE):
        raise ValueError("not a PNG")
    ihdr_end = 8 + 8 + struct.unpack(">I", png[8:12])[0] + 4
    chunks = b"".join(_chunk(b"tEXt", k[:79].encode("latin-1", "replace") + b"\0"
                             + str(v).encode("latin-1", "replace")) for k, v in text.items())
    return png[:ihdr_end] + chunks + png[ihdr_end:]


def png_text(png: bytes) -> dict[str, str]:
    """The ``tEXt`` chunks of a PNG as a dict (what ``map_png`` wrote: frame, camera, ...)."""
    if not png.startswith(PNG_SIGNATURE):
        raise ValueError("not a PNG")
    out, pos = {}, 8
    while pos + 8 <= len(png):
        length = struct.unpack(">I", png[pos:pos + 4])[0]
        kind, data = png[pos + 4:pos + 8], png[pos + 8:pos + 8 + length]
        if kind == b"tEXt" and b"\0" in data:
            key, _, value = data.partition(b"\0")
            out[key.decode("latin-1")] = value.decode("latin-1")
        if kind == b"IEND":
            break
        pos += 12 + length
    return out


def alarm_evidence(store: EvidenceStore, frame: Frame, amap: np.ndarray,
                   cal: ExpertCalibration, alarm: dict, snapshot: bool
                   ) -> tuple[dict | None, bytes | None]:
    """Render the alarm's overlay and save it with the frame: (the payload's ``evidence``
    or None when the store is off, the overlay JPEG when ``snapshot``). Raises (EvidenceError,
    or whatever rendering raised) for the caller to report; the alarm goes out regardless."""
    if not (store.enabled or snapshot):
        return None, None
    bgr = cv2.cvtColor(frame.image, cv2.COLOR_RGB2BGR)
    overlay = render_overlay(bgr, amap, map_threshold=cal.map_threshold, score=alarm["score"],
                             threshold=0.5, regions=alarm["regions"],
                             label=f"{frame.camera} #{frame.frame_id}"[:40])
    jpeg = store.encode(overlay)
    if not store.enabled:
        return None, jpeg
    names = store.save(frame.camera, frame.frame_id, {"frame": bgr, "overlay": jpeg},
                       when=alarm["scored_at"])
    return ({"frame": names["frame"], "overlay": names["overlay"],
             "url": f"/evidence/{names['overlay']}"}, jpeg if snapshot else None)
