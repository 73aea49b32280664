"""The messages ``moleflow fuzz`` sends: valid frames, crafted hostile kinds, mutations.

Every kind says what a correct daemon does with it. ``hostile``: it cannot be scored and must
be reported (an ``events`` message, the ``errors`` counter) and never published as a result.
``either``: the outcome is a policy choice (a NaN timestamp may be refused or dropped to null, a
bit-flipped JPEG may still decode, a 70 KB header may be refused or read): one report or one
result whose payload is strict JSON, never both and never neither. So the fuzz report can
count exactly without guessing how a mutation turns out. No torch.
"""

from __future__ import annotations

import json
import re
import random
from dataclasses import dataclass
from collections.abc import Callable

import numpy as np

from moleflow.devtools.drive import jpeg, jpeg_message, msg_text, raw_message

HOSTILE, EITHER, VALID = "hostile", "either", "valid"


class Forge:
    """Seeded source of message material: the frames (BGR) and their JPEGs, random bytes."""

    def __init__(self, frames: list[np.ndarray], seed: int) -> None:
        self.rng = random.Random(seed)
        self.np = np.random.default_rng(seed)
        self.frames = frames
        self.jpegs = [jpeg(f) for f in frames]

    def jpeg(self) -> bytes:
        return self.rng.choice(self.jpegs)

    def frame(self) -> np.ndarray:
        return self.rng.choice(self.frames)

    def bytes(self, n: int) -> bytes:
        return self.np.integers(0, 256, n, dtype=np.uint8).tobytes()

    def valid(self, camera: str, frame_id: str, raw: bool | None = None) -> list[bytes]:
        """A valid frame as ``send_jpg`` or (``raw``) ``send_image`` sends it."""
        raw = self.rng.random() < 0.3 if raw is None else raw
        msg = msg_text(camera, frame_id)
        return raw_message(self.frame(), msg) if raw else jpeg_message(self.jpeg(), msg)


Build = Callable[[Forge, str, str], list[bytes]]


@dataclass(frozen=True)
class Kind:
    name: str
    expect: str            # hostile | either
    build: Build           # (forge, camera, frame id) -> message parts
    weight: float = 1.0    # relative frequency among the mixed phase's hostile messages


def _raw_header(camera: str, frame_id: str, **fields) -> bytes:
    return json.dumps({"msg": msg_text(camera, frame_id), **fields}).encode()


def _ts_in_header(literal: bytes | Callable[[Forge], bytes]) -> Build:
    """``{"msg": {..., "timestamp": <literal>}}`` written as text: json.dumps cannot write
    NaN as the hostile sender does, nor is 10**400 a float."""
    def build(f: Forge, camera: str, frame_id: str) -> list[bytes]:
        value = literal(f) if callable(literal) else literal
        header = b'{"msg": {"camera": "%s", "frame": "%s", "timestamp": %s}}' % (
            camera.encode(), frame_id.encode(), value)
        return [header, f.jpeg()]
    return build


def _ts_in_text(values: tuple[str, ...]) -> Build:
    """imagezmq's ``camera|frame|timestamp`` text: the header is strict JSON, the timestamp
    text (``nan``, ``1e400``) is not a finite number."""
    def build(f: Forge, camera: str, frame_id: str) -> list[bytes]:
        return jpeg_message(f.jpeg(), f"{camera}|{frame_id}|{f.rng.choice(values)}")
    return build


def _sof_at(buf: bytes) -> int:
    """Offset of the JPEG's start-of-frame marker (its height and width follow at +5)."""
    i = 2
    while i + 9 < len(buf):
        marker = buf[i + 1]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return i
        i += 2 + int.from_bytes(buf[i + 2:i + 4], "big")
    raise ValueError("no start-of-frame marker")


def _jpeg_dims(height: int, width: int) -> Build:
    """A real JPEG whose frame header claims ``height`` x ``width`` (its data is 64x64):
    decoded as claimed, 8000x8000 takes 192 MB for a message of a few KB."""
    def build(f: Forge, camera: str, frame_id: str) -> list[bytes]:
        buf = bytearray(f.jpeg())
        at = _sof_at(buf)
        buf[at + 5:at + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
        return jpeg_message(bytes(buf), msg_text(camera, frame_id))
    return build


def _with_raw(shape_of: Callable[[Forge, int], object], buffer_of: Callable[[Forge, int], bytes]
              ) -> Build:
    """A uint8 ``send_image`` message with the shape and buffer made from the frame's side."""
    def build(f: Forge, camera: str, frame_id: str) -> list[bytes]:
        side = f.frame().shape[0]
        return [_raw_header(camera, frame_id, dtype="uint8", shape=shape_of(f, side)),
                buffer_of(f, side)]
    return build


def _pick(*options) -> Callable[[Forge, int], object]:
    return lambda f, side: f.rng.choice(options)


def _wrong_size(f: Forge, side: int) -> bytes:
    n = side * side * 3
    return f.bytes(f.rng.choice([0, 1, n - 1, n + 1, n // 2, 2 * n]))


def _wrong_dtype(f: Forge, camera: str, frame_id: str) -> list[bytes]:
    """The buffer fits the shape in the dtype named: only the dtype is wrong."""
    dtype, itemsize = f.rng.choice([("float64", 8), ("float32", 4), ("uint16", 2), ("int32", 4)])
    side = f.frame().shape[0]
    return [_raw_header(camera, frame_id, dtype=dtype, shape=[side, side, 3]),
            bytes(side * side * 3 * itemsize)]


def _header_not_object(f: Forge, camera: str, frame_id: str) -> list[bytes]:
    text = f.rng.choice([b"[1, 2]", b"42", b'"%s|%s"' % (camera.encode(), frame_id.encode()),
                         b"null", b"true", b"3.5e2", b"[]"])
    return [text, f.jpeg()]


def _msg_wrong_type(f: Forge, camera: str, frame_id: str) -> list[bytes]:
    msg = f.rng.choice([5, 1.5, [camera, frame_id], None, True, {"camera": 7, "frame": [frame_id],
                        "timestamp": {"t": 1}}, {"camera": {"name": camera}, "frame": None}])
    return [json.dumps({"msg": msg}).encode(), f.jpeg()]


def _empty_parts(f: Forge, camera: str, frame_id: str) -> list[bytes]:
    return f.rng.choice([[b"", b""], [_raw_header(camera, frame_id), b""], [b"", f.jpeg()]])


def _random_bytes(f: Forge, camera: str, frame_id: str) -> list[bytes]:
    # 0xFE opens no UTF-8 sequence: the header can never be JSON by chance
    return [b"\xfe" + f.bytes(f.rng.randrange(0, 4096)), f.bytes(f.rng.randrange(0, 65536))]


def _random_body(f: Forge, camera: str, frame_id: str) -> list[bytes]:
    # no SOI marker and no shape: neither a JPEG nor a raw array
    return jpeg_message(b"\x00" + f.bytes(f.rng.randrange(0, 65536)), msg_text(camera, frame_id))


def _truncated_jpeg(f: Forge, camera: str, frame_id: str) -> list[bytes]:
    buf = f.jpeg()
    return jpeg_message(buf[:f.rng.randrange(2, len(buf) - 2)], msg_text(camera, frame_id))


def _extra_parts(f: Forge, camera: str, frame_id: str) -> list[bytes]:
    extra = [f.bytes(f.rng.randrange(0, 64)) for _ in range(f.rng.randrange(1, 6))]
    return jpeg_message(f.jpeg(), msg_text(camera, frame_id)) + extra


def _header_over_64k(f: Forge, camera: str, frame_id: str) -> list[bytes]:
    return [_raw_header(camera, frame_id, pad="x" * f.rng.randrange(66_000, 200_000)), f.jpeg()]


CRAFTED = [
    Kind("deep_brackets_5000", HOSTILE, lambda f, c, i: [b"[" * 5000, b"x"]),
    Kind("deep_nesting_100000", HOSTILE,
         lambda f, c, i: [b"[" * 100_000 + b"]" * 100_000, f.jpeg()], 0.3),
    Kind("deep_nesting_in_msg", EITHER,
         lambda f, c, i: [b'{"msg": ' + b"[" * 3000 + b"]" * 3000 + b"}", f.jpeg()]),
    Kind("nan_timestamp", EITHER, _ts_in_header(b"NaN")),
    Kind("infinity_timestamp", EITHER,
         _ts_in_header(lambda f: f.rng.choice([b"Infinity", b"-Infinity"]))),
    Kind("huge_int_timestamp", EITHER, _ts_in_header(b"1" + b"0" * 400)),
    Kind("nan_timestamp_text", EITHER, _ts_in_text(("nan", "NaN", "-nan"))),
    Kind("infinite_timestamp_text", EITHER, _ts_in_text(("inf", "1e400", "-Infinity"))),
    Kind("header_over_64k", EITHER, _header_over_64k, 0.3),
    Kind("random_bytes", HOSTILE, _random_bytes),
    Kind("random_buffer", HOSTILE, _random_body),
    Kind("truncated_jpeg", HOSTILE, _truncated_jpeg),
    Kind("wrong_dtype", HOSTILE, _wrong_dtype),
    Kind("wrong_buffer_size", HOSTILE, _with_raw(lambda f, s: [s, s, 3], _wrong_size)),
    Kind("one_part", HOSTILE, lambda f, c, i: [_raw_header(c, i)]),
    Kind("extra_parts", HOSTILE, _extra_parts),
    Kind("twelve_1mb_parts", HOSTILE, lambda f, c, i: [f.bytes(1 << 20) for _ in range(12)], 0.1),
    Kind("empty_parts", HOSTILE, _empty_parts),
    Kind("header_not_object", HOSTILE, _header_not_object),
    Kind("header_without_msg", HOSTILE,
         lambda f, c, i: [json.dumps({"camera": c, "frame": i}).encode(), f.jpeg()]),
    Kind("msg_wrong_type", EITHER, _msg_wrong_type),
    Kind("huge_shape", HOSTILE, _with_raw(
        _pick([10 ** 12, 10 ** 12, 3], [2 ** 63, 2, 3], [10 ** 30, 1], [64, 64, 10 ** 9]),
        lambda f, s: bytes(s * s * 3))),
    Kind("negative_shape", HOSTILE, _with_raw(
        lambda f, s: f.rng.choice([[-s, s, 3], [s, -s, 3], [0, s, 3], [s, s, -3]]),
        lambda f, s: bytes(s * s * 3))),
    Kind("shape_wrong_type", HOSTILE, _with_raw(
        lambda f, s: f.rng.choice([f"{s}x{s}", [float(s), s, 3], {"h": s}, [s, s, 4], [],
                                   [s, s, 3, 1], None, [[s], s, 3]]),
        lambda f, s: bytes(s * s * 3))),
    Kind("jpeg_bogus_dims", HOSTILE, _jpeg_dims(65500, 65500)),
    Kind("jpeg_zero_dims", HOSTILE, _jpeg_dims(0, 64)),
    Kind("jpeg_inflated_dims", EITHER, _jpeg_dims(8000, 8000), 0.2),
    Kind("jpeg_markers_only", HOSTILE,
         lambda f, c, i: jpeg_message(b"\xff\xd8\xff\xd9", msg_text(c, i))),
]


def _flip(buf: bytes, f: Forge, start: int = 0) -> bytes:
    out = bytearray(buf)
    for _ in range(f.rng.randrange(1, 9)):
        at = f.rng.randrange(start, len(out))
        out[at] ^= 1 << f.rng.randrange(8)
    return bytes(out)


def _flip_header(header: bytes, f: Forge) -> bytes:
    """Bit flips anywhere in a header but its frame id (``h`` + 6 digits): a flipped digit
    would give the message another case's id, and its result would be blamed on that case."""
    found = re.search(rb"h\d{6}", header)
    if found is None:
        return _flip(header, f)
    head, ident, tail = header[:found.start()], found.group(), header[found.end():]
    flipped = _flip(head + tail, f)
    return flipped[:len(head)] + ident + flipped[len(head):]


def _mutation(change: Callable[[Forge, list[bytes]], list[bytes]], raw: bool = False) -> Build:
    """A valid frame (a fresh id of its own) changed by ``change``."""
    def build(f: Forge, camera: str, frame_id: str) -> list[bytes]:
        return change(f, f.valid(camera, frame_id, raw=raw))
    return build


MUTATIONS = [
    Kind("mutation:jpeg_bitflips", EITHER, _mutation(lambda f, p: [p[0], _flip(p[1], f, 2)])),
    Kind("mutation:jpeg_truncated", EITHER,
         _mutation(lambda f, p: [p[0], p[1][:f.rng.randrange(0, len(p[1]))]])),
    Kind("mutation:raw_bitflips", EITHER, _mutation(lambda f, p: [p[0], _flip(p[1], f)], raw=True)),
    Kind("mutation:header_bitflips", EITHER, _mutation(lambda f, p: [_flip_header(p[0], f), p[1]])),
    Kind("mutation:header_truncated", HOSTILE,
         _mutation(lambda f, p: [p[0][:f.rng.randrange(0, len(p[0]))], p[1]])),
    Kind("mutation:parts_swapped", HOSTILE, _mutation(lambda f, p: [p[1], p[0]])),
    Kind("mutation:part_dropped", HOSTILE, _mutation(lambda f, p: [f.rng.choice(p)])),
    Kind("mutation:part_repeated", HOSTILE, _mutation(lambda f, p: p + [f.rng.choice(p)])),
]
KINDS = CRAFTED + MUTATIONS


@dataclass
class Case:
    """One message of the plan."""
    kind: str                  # a Kind's name, or "valid"
    expect: str                # valid | hostile | either
    camera: str
    frame_id: str
    parts: list[bytes]


def plan(forge: Forge, hostile: int, valid: int, cameras: list[str]) -> list[Case]:
    """``hostile`` messages (every kind at least once when there is room, then by weight) and
    ``valid`` frames, shuffled; frame ids are unique (``v…`` valid, ``h…`` the rest)."""
    kinds = list(KINDS[:hostile]) + forge.rng.choices(
        KINDS, weights=[k.weight for k in KINDS], k=max(0, hostile - len(KINDS)))
    cases = [make(forge, k, forge.rng.choice(cameras), f"h{i:06d}") for i, k in enumerate(kinds)]
    cases += [Case(VALID, VALID, cam, fid, forge.valid(cam, fid))
              for cam, fid in ((cameras[i % len(cameras)], f"v{i:06d}") for i in range(valid))]
    forge.rng.shuffle(cases)
    return cases


def make(forge: Forge, kind: Kind, camera: str, frame_id: str) -> Case:
    return Case(kind.name, kind.expect, camera, frame_id, kind.build(forge, camera, frame_id))
