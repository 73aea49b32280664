"""Driving a served daemon from outside, for ``moleflow fuzz`` and ``moleflow soak``.

What both tools need beside ``moleflow.devtools.harness.served``: frames to send (the engine set's
products' test images when a data folder is given, else generated ones, so the tools work on
any engine set), imagezmq messages of them, the daemon's resources as /proc shows them (what
an operator's ``top`` and ``ls /proc/PID/fd`` see), an MQTT collector that holds every
payload to strict JSON (Python's ``json.loads`` takes NaN, a SCADA parser does not), and the
daemon's Prometheus counters. No torch.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

#: Events that annotate a frame that was still scored, or the engine set: not a rejection.
INFO_EVENTS = frozenset({"bad_hint", "engines_reloaded", "reload_failed"})
#: Events of a generic fault handler: whatever raised them lost the frames of its batch.
FAULT_EVENTS = frozenset({"worker_error", "engine_error"})


def synthetic_frames(count: int, size: int, seed: int = 0) -> list[np.ndarray]:
    """BGR frames of stripes, a disc and sensor noise in a few hues: what a line camera sends,
    for engine sets whose images are not at hand (the daemon scores them all the same)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    out = []
    for i in range(count):
        hue = np.array([60 + 50 * (i % 3), 90 + 40 * (i % 2), 160], np.float32)
        stripes = 0.5 + 0.5 * np.sin(2 * np.pi * (4 + i % 5) * (xx * np.cos(i) + yy * np.sin(i)))
        disc = ((xx - 0.5) ** 2 + (yy - 0.5) ** 2 < 0.09).astype(np.float32)
        img = hue * (0.6 + 0.4 * stripes - 0.2 * disc)[..., None]
        img += rng.normal(0, 3, img.shape)
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return out


def load_frames(engines: Path, data: Path | None, count: int = 32, seed: int = 0
                ) -> list[np.ndarray]:
    """BGR frames at the engine set's input size: its products' test images under ``data``
    (as ``moleflow bench-daemon`` takes them), else generated ones."""
    from moleflow.manifest import Manifest
    size = int(Manifest.load(engines).input["size"])
    if data is not None:
        from moleflow.devtools.bench import load_frames as test_images
        rgb = test_images(engines, data, per_class=max(1, count // 2))
        return [np.ascontiguousarray(f[..., ::-1]) for f in rgb]
    return synthetic_frames(count, size, seed)


def jpeg(bgr: np.ndarray, quality: int = 90) -> bytes:
    """The frame as imagezmq's ``send_jpg`` senders encode it (OpenCV, quality 90)."""
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
    return buf.tobytes()


def msg_text(camera: str, frame: str, timestamp: float | None = None) -> str:
    """imagezmq's ``msg`` as our cameras write it: a JSON object in the text."""
    return json.dumps({"camera": camera, "frame": frame,
                       "timestamp": time.time() if timestamp is None else timestamp})


def jpeg_message(buf: bytes, msg: str) -> list[bytes]:
    """``send_jpg``'s two parts: ``{"msg": ...}`` and the JPEG."""
    return [json.dumps({"msg": msg}).encode(), buf]


def raw_message(bgr: np.ndarray, msg: str) -> list[bytes]:
    """``send_image``'s two parts: the header with dtype and shape, and the BGR buffer."""
    header = {"msg": msg, "dtype": str(bgr.dtype), "shape": list(bgr.shape)}
    return [json.dumps(header).encode(), bgr.tobytes()]


@dataclass(frozen=True)
class ProcStats:
    """A process's resources from /proc: resident and peak memory, open fds, threads."""
    rss_mib: float
    peak_mib: float
    fds: int
    threads: int


def proc_stats(pid: int) -> ProcStats | None:
    """``pid``'s resources now, or None when it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    fields = dict(re.findall(r"^(\w+):\s+(\d+)", status, re.M))
    return ProcStats(int(fields.get("VmRSS", 0)) / 1024, int(fields.get("VmHWM", 0)) / 1024,
                     fds, int(fields.get("Threads", 0)))


def last_exception(log_path: Path, since: int = 0) -> str | None:
    """The last ``SomeError: why`` line the daemon's log holds after byte ``since``: what a
    dead thread or process said (tracebacks of threads go to stderr, the log)."""
    try:
        with open(log_path, "rb") as f:
            f.seek(since)
            text = f.read().decode(errors="replace")
    except OSError:
        return None
    found = re.findall(r"^(\w+(?:Error|Exception|Exit)(?::.*)?)$", text, re.M)
    return found[-1][:160] if found else None


def _strict_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


class Collector:
    """Every result, alarm and event the daemon published on MQTT, counted, with every payload
    that is not strict JSON. Called on the listener's thread; never raises (an exception
    there would end paho's loop and every later message would be missed)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.results: Counter[str] = Counter()   # frame id -> results carrying it
        self.n_results = 0
        self.n_alarms = 0
        self.events: list[dict] = []
        self.invalid: list[tuple[str, str]] = []  # (topic, start of the payload)

    def __call__(self, topic: str, payload: bytes) -> None:
        try:
            message = self._parse(topic, payload)
            with self.lock:
                if topic.endswith("/result"):
                    self.n_results += 1
                    self.results[str(message.get("frame", "?"))] += 1
                elif topic.endswith("/alarm"):
                    self.n_alarms += 1
                elif topic.endswith("/events"):
                    self.events.append(message)
        except Exception as exc:  # noqa: BLE001 (see the class doc)
            with self.lock:
                self.invalid.append((topic, f"unreadable: {exc!r}"))

    def _parse(self, topic: str, payload: bytes) -> dict:
        try:
            out = json.loads(payload, parse_constant=_strict_constant)
        except ValueError:
            text = payload[:4096].decode(errors="replace")
            bad = re.search(r'"\w+": *-?(?:NaN|Infinity)', text)
            with self.lock:
                self.invalid.append((topic, bad.group(0) if bad else text[:200]))
            try:
                out = json.loads(payload)  # still counted, attributed by its frame id
            except ValueError:
                out = {}
        return out if isinstance(out, dict) else {"value": out}

    def counts(self) -> tuple[int, int, int]:
        """(results, rejection events, fault events) so far."""
        with self.lock:
            kinds = [e.get("event") for e in self.events]
        return (self.n_results, sum(k not in INFO_EVENTS and k not in FAULT_EVENTS
                                    for k in kinds), sum(k in FAULT_EVENTS for k in kinds))


def scrape_metrics(port: int) -> dict[str, float] | None:
    """The daemon's Prometheus counters and gauges as ``name{labels}`` -> value (None when
    the endpoint does not answer)."""
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
    except OSError:
        return None
    out = {}
    for line in text.decode(errors="replace").splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            try:
                out[key.removeprefix("moleflow_")] = float(value)
            except ValueError:
                continue
    return out


def metric_total(metrics: dict[str, float], name: str, **labels: str) -> float:
    """Sum of ``name``'s series whose labels include ``labels`` (a counter's ``name_total``)."""
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(v for k, v in metrics.items()
               if any(k == n or k.startswith(n + "{") for n in (name, name + "_total"))
               and all(w in k for w in want))
