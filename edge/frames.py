"""Camera messages in, validated RGB frames out: the imagezmq wire format.

A message is two ZeroMQ frames: a JSON header and a buffer. Raw arrays carry
``{"msg": ..., "dtype": "uint8", "shape": [H, W, 3]}`` and the BGR bytes (imagezmq's
``send_image``); JPEG carries ``{"msg": ...}`` and the JPEG bytes (``send_jpg``). ``msg`` is
``camera|frame|timestamp`` text, a JSON object with those keys (and optionally ``product``),
or any other text (then it names the camera). Every problem raises ``FrameError`` with what was
wrong; nothing here may crash the daemon.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field

import cv2
import numpy as np

from moleflow.errors import MoleflowError
from moleflow.names import MAX_NAME, NAME_CHARS


class FrameError(MoleflowError, ValueError):
    """A camera message that cannot become a frame (the reason is in the message)."""


@dataclass
class Frame:
    camera: str
    frame_id: str
    image: np.ndarray              # uint8 RGB (S, S, 3), resized to the engine input
    sent_at: float | None          # sender's timestamp (seconds since the epoch), if given
    received_at: float = field(default_factory=time.time)
    product: str | None = None     # hint that bypasses the router


MAX_HEADER_BYTES = 65536
"""An imagezmq header is a few dozen bytes; anything near this is hostile."""


def parse_header(raw: bytes) -> object:
    """The JSON header, or FrameError: deep nesting (``[[[[...``) raises RecursionError in
    Python's parser and NaN/Infinity are not JSON, so both are refused here by name."""
    try:
        return json.loads(raw, parse_constant=_no_constant)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FrameError(f"header is not JSON ({exc})") from None
    except RecursionError:
        raise FrameError("header is not JSON (nested too deeply)") from None


def _no_constant(name: str) -> object:
    raise FrameError(f"header is not JSON ({name} is not a JSON number)")


def parse_msg(msg: object) -> tuple[str, str, float | None, str | None]:
    """(camera, frame id, timestamp, product hint) from imagezmq's ``msg`` field."""
    if isinstance(msg, dict):
        data = msg
    else:
        text = str(msg)
        data = None
        if text.startswith("{"):
            try:
                data = json.loads(text)
            except (json.JSONDecodeError, RecursionError):
                data = None
        if not isinstance(data, dict):
            parts = text.split("|")
            data = {"camera": parts[0], "frame": parts[1] if len(parts) > 1 else "",
                    "timestamp": parts[2] if len(parts) > 2 else None}
    camera = str(data.get("camera") or "camera").strip()[:MAX_NAME] or "camera"
    safe = "".join(c if c.isalnum() or c in NAME_CHARS else "_" for c in camera)
    stamp = _timestamp(data.get("timestamp", data.get("ts")))
    product = data.get("product")
    return safe, str(data.get("frame", data.get("frame_id", "")))[:128], stamp, \
        (str(product) if product else None)


def _timestamp(value: object) -> float | None:
    """A finite float or None: a NaN, an infinity or an integer too big for a float (all seen
    from hostile senders) would otherwise reach the payloads as invalid JSON or raise."""
    if value in (None, "") or isinstance(value, bool):
        return None
    try:
        stamp = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return None
    return stamp if math.isfinite(stamp) else None


def decode(parts: list[bytes], size: int, max_bytes: int, max_side: int,
           received_at: float | None = None, max_pixels: int = 25_000_000) -> Frame:
    """Validate and decode one two-part imagezmq message into a ``Frame`` at ``size``²."""
    if len(parts) != 2:
        raise FrameError(f"expected 2 message parts (JSON header, buffer), got {len(parts)}")
    header_raw, buf = parts
    total = len(header_raw) + len(buf)
    if total > max_bytes:
        raise FrameError(f"message of {total} bytes exceeds ingest.max_message_bytes "
                         f"({max_bytes})")
    if len(header_raw) > MAX_HEADER_BYTES:
        raise FrameError(f"header of {len(header_raw)} bytes exceeds {MAX_HEADER_BYTES} bytes")
    header = parse_header(header_raw)
    if not isinstance(header, dict) or "msg" not in header:
        raise FrameError("header must be a JSON object with a 'msg' field")
    camera, frame_id, stamp, product = parse_msg(header["msg"])
    if "shape" in header or "dtype" in header:
        image = _raw(header, buf, max_side, max_pixels)
    else:
        image = _jpeg(buf, max_side, max_pixels)
    if image.shape[:2] != (size, size):
        image = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
    rgb = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    return Frame(camera, frame_id, rgb, stamp, received_at=received_at or time.time(),
                 product=product)


def _raw(header: dict, buf: bytes, max_side: int, max_pixels: int) -> np.ndarray:
    dtype, shape = header.get("dtype"), header.get("shape")
    if dtype != "uint8":
        raise FrameError(f"dtype must be uint8, got {dtype!r}")
    if (not isinstance(shape, list) or len(shape) not in (2, 3)
            or not all(isinstance(v, int) and v > 0 for v in shape)):
        raise FrameError(f"shape must be [H, W] or [H, W, 3], got {shape!r}")
    if len(shape) == 3 and shape[2] not in (1, 3):
        raise FrameError(f"shape must have 1 or 3 channels, got {shape!r}")
    _check_size(shape[0], shape[1], "frame", max_side, max_pixels)
    if int(np.prod(shape)) != len(buf):
        raise FrameError(f"buffer has {len(buf)} bytes, shape {shape} needs {int(np.prod(shape))}")
    image = np.frombuffer(buf, dtype=np.uint8).reshape(shape)
    if image.ndim == 2 or image.shape[2] == 1:
        image = cv2.cvtColor(image.reshape(shape[:2]), cv2.COLOR_GRAY2BGR)
    return image


def jpeg_size(buf: bytes) -> tuple[int, int] | None:
    """(height, width) from a JPEG's frame header, read before decoding anything."""
    i = 2
    while i + 9 < len(buf):
        if buf[i] != 0xFF:
            return None
        marker, length = buf[i + 1], int.from_bytes(buf[i + 2:i + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return int.from_bytes(buf[i + 5:i + 7], "big"), int.from_bytes(buf[i + 7:i + 9], "big")
        i += 2 + length
    return None


def _check_size(height: int, width: int, what: str, max_side: int, max_pixels: int) -> None:
    """Refuse a frame by its declared size, before it is decoded: a JPEG of a few kB can
    claim 8000x8000 and would take 192 MB once decoded."""
    if max(height, width) > max_side:
        raise FrameError(f"{what} {height}x{width} exceeds ingest.max_side ({max_side})")
    if height * width > max_pixels:
        raise FrameError(f"{what} {height}x{width} exceeds ingest.max_pixels ({max_pixels})")


def _jpeg(buf: bytes, max_side: int, max_pixels: int) -> np.ndarray:
    if len(buf) < 4 or buf[:2] != b"\xff\xd8":
        raise FrameError("buffer is neither a raw array (no shape/dtype in the header) nor a "
                         "JPEG (no SOI marker)")
    if not buf.rstrip(b"\x00").endswith(b"\xff\xd9"):
        raise FrameError(f"JPEG of {len(buf)} bytes has no end marker (truncated)")
    dims = jpeg_size(buf)
    if dims is None:
        raise FrameError("JPEG has no readable frame header")
    _check_size(dims[0], dims[1], "JPEG", max_side, max_pixels)
    arr = np.frombuffer(buf, dtype=np.uint8)
    image = cv2.imdecode(arr, cv2.IMREAD_COLOR)
    if image is None:
        raise FrameError(f"JPEG of {len(buf)} bytes cannot be decoded (corrupt)")
    return image
