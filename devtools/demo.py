"""The line in a box: broker, daemon, a camera replaying test images, a SCADA-side listener.

Used by ``moleflow demo`` after it has trained, exported and calibrated: starts an MQTT broker
(Mosquitto when installed, else the embedded one), ``moleflow serve`` as a child process, a
camera that sends every test image over ZeroMQ the way imagezmq's default sender does (REQ;
by default ``send_jpg``: a JSON header and the frame as JPEG at quality 90, as cameras and
imagezmq senders on a line send them; ``raw``: ``send_image``'s header and raw BGR), and
listens to the results and alarms. Ends with a summary: frames,
alarms, precision / recall of the alarms against the ground-truth labels, frames/s, latency;
alarm frames are written with their regions drawn. No torch.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from moleflow.conditions import ConditionError, parse_condition
from moleflow.config import Config
from moleflow.devtools.drive import jpeg, jpeg_message, raw_message
from moleflow.devtools.harness import Service, served
from moleflow.engines.runtime import parallelism
from moleflow.errors import MoleflowError


@dataclass
class DemoSummary:
    frames: int
    results: int
    alarms: int
    unknown: int
    true_alarms: int
    defective: int
    seconds: float
    latencies_ms: list[float]
    codec: str = "raw"
    # per class: [good frames, good frames alarmed, defective frames, defective alarmed,
    # frames flagged unknown]
    per_class: dict[str, list[int]] = field(default_factory=dict)

    def text(self) -> str:
        precision = self.true_alarms / self.alarms if self.alarms else float("nan")
        recall = self.true_alarms / self.defective if self.defective else float("nan")
        lat = np.asarray(self.latencies_ms) if self.latencies_ms else np.asarray([np.nan])
        good = sum(c[0] for c in self.per_class.values())
        false_alarms = sum(c[1] for c in self.per_class.values())
        lines = [f"  {name:<14} false alarms {c[1]}/{c[0]}  defects flagged {c[3]}/{c[2]}  "
                 f"unknown {c[4]}/{c[0] + c[2]}" for name, c in self.per_class.items()]
        if good:
            lines.append(f"  pooled false alarms on good frames {false_alarms}/{good} = "
                         f"{false_alarms / good:.1%}")
        return (f"demo: {self.frames} frames sent ({self.codec}), {self.results} results, "
                f"{self.alarms} alarms ({self.unknown} unknown) | alarm precision "
                f"{precision:.3f}, recall {recall:.3f} against the labels ({self.defective} "
                f"defective frames) | {self.results / self.seconds:.1f} frames/s over the "
                f"replay | latency sent->result p50 {np.percentile(lat, 50):.1f} ms, p99 "
                f"{np.percentile(lat, 99):.1f} ms" + "".join("\n" + x for x in lines))


def labelled_test_images(data_root: Path, classes: list[str]) -> list[tuple[Path, str, int]]:
    """(path, class, label) of every test image of ``classes``, classes interleaved."""
    groups = []
    for name in classes:
        items = []
        for folder in sorted(p for p in (data_root / name / "test").iterdir() if p.is_dir()):
            for path in sorted(folder.iterdir()):
                if path.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp"):
                    items.append((path, name, 0 if folder.name == "good" else 1))
        groups.append(items)
    out = []
    for i in range(max(len(g) for g in groups)):
        out += [g[i] for g in groups if i < len(g)]
    return out


def camera_message(bgr: np.ndarray, msg: str, codec: str = "jpeg:90") -> list[bytes]:
    """One frame as an imagezmq sender puts it on the wire: ``send_jpg`` (``jpeg:Q``: a JSON
    ``{"msg": ...}`` header, then the JPEG) or ``send_image`` (``raw``: the header also
    carries dtype and shape, then the BGR buffer)."""
    try:
        cond = parse_condition(codec)
    except ConditionError:
        cond = None
    if cond is None or cond.kind not in ("lossless", "jpeg"):
        raise MoleflowError(f"camera codec {codec!r} is not 'raw' or 'jpeg:Q' (Q 1..100)")
    if cond.kind == "lossless":
        return raw_message(bgr, msg)
    return jpeg_message(jpeg(bgr, int(cond.value)), msg)


def replay(engines: Path, data_root: Path, classes: list[str], cfg: Config, out: Path,
           rate: float = 0.0, codec: str = "jpeg:90") -> DemoSummary:
    """Serve ``engines`` and replay the classes' test images through it (see module doc).

    The camera keeps at most one batch per scoring worker waiting for its result (and at
    most ``rate`` frames/s when given), so every frame is scored and the summary covers the
    whole test set."""
    import zmq
    results: dict[str, dict] = {}
    alarms: dict[str, dict] = {}
    lock = threading.Lock()

    def on_message(topic: str, payload: bytes) -> None:
        message = json.loads(payload)
        message["_received"] = time.time()
        with lock:
            (alarms if topic.endswith("/alarm") else results)[message["frame"]] = message

    frames = labelled_test_images(data_root, classes)
    with served(Service(engines, cfg, out, "rep", "demo", {"mqtt": {"map_interval": 0.0}},
                        embedded_ok=True), [("+/result", 0), ("+/alarm", 1)],
                on_message) as zport:
        ctx = zmq.Context()
        camera = ctx.socket(zmq.REQ)
        camera.setsockopt(zmq.RCVTIMEO, 30000)
        camera.connect(f"tcp://127.0.0.1:{zport}")
        try:
            start = time.time()
            # frames in flight: a batch for each worker, and the daemon never has to drop one
            workers, _ = parallelism(cfg.engines.backend, cfg.engines.workers,
                                     cfg.engines.threads)
            window = min(workers * cfg.ingest.max_batch, cfg.ingest.queue_size)
            for i, (path, _name, _label) in enumerate(frames):
                deadline = time.time() + 60
                while time.time() < deadline:
                    with lock:
                        if i - len(results) < window:
                            break
                    time.sleep(0.002)
                bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
                msg = json.dumps({"camera": "demo-cam", "frame": str(i),
                                  "timestamp": time.time()})
                camera.send_multipart(camera_message(bgr, msg, codec))
                if camera.recv() != b"OK":
                    raise MoleflowError("the daemon did not answer OK")
                if rate > 0:
                    time.sleep(max(0.0, start + (i + 1) / rate - time.time()))
            deadline = time.time() + 60
            while time.time() < deadline:
                with lock:
                    if len(results) >= len(frames):
                        break
                time.sleep(0.05)
        finally:
            camera.close(0)
            ctx.term()
    seconds = max(r["_received"] for r in results.values()) - start if results else 1.0
    _draw_alarms(frames, alarms, out / "alarms")
    labels = {str(i): label for i, (_, _, label) in enumerate(frames)}
    summary = DemoSummary(
        frames=len(frames), results=len(results), alarms=len(alarms),
        unknown=sum(bool(r.get("unknown")) for r in results.values()),
        true_alarms=sum(labels[f] for f in alarms), defective=sum(labels.values()),
        seconds=seconds, latencies_ms=[1000 * (r["_received"] - r["sent_at"])
                                       for r in results.values() if r.get("sent_at")],
        codec=codec, per_class=_per_class(frames, results, alarms))
    (out / "summary.json").write_text(json.dumps(summary.__dict__, indent=1))
    return summary


def _per_class(frames, results: dict[str, dict], alarms: dict[str, dict]
               ) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for i, (_, name, label) in enumerate(frames):
        c = out.setdefault(name, [0, 0, 0, 0, 0])
        key = str(i)
        c[2 * label] += 1
        c[2 * label + 1] += key in alarms
        c[4] += bool(results.get(key, {}).get("unknown"))
    return out


def _draw_alarms(frames, alarms: dict[str, dict], folder: Path, limit: int = 24) -> None:
    """Alarm frames with their anomalous regions drawn (the first ``limit``)."""
    folder.mkdir(parents=True, exist_ok=True)
    for key in sorted(alarms, key=int)[:limit]:
        path, name, label = frames[int(key)]
        img = cv2.imread(str(path), cv2.IMREAD_COLOR)
        h, w = img.shape[:2]
        for r in alarms[key].get("regions", []):
            x0, y0, x1, y1 = r["box"]
            cv2.rectangle(img, (int(x0 * w), int(y0 * h)), (int(x1 * w), int(y1 * h)),
                          (0, 0, 255), 2)
        a = alarms[key]
        text = f"{name} {path.parent.name} score {a['score']:.2f}"
        cv2.putText(img, text, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1)
        cv2.imwrite(str(folder / f"{int(key):04d}_{name}_{path.parent.name}_{path.stem}.png"), img)
