"""``moleflow bench-daemon``: the running daemon driven by a sender process, timed end to end.

Serves the engine set with Mosquitto and ``moleflow serve`` as a child process, as systemd
would (``edge.harness``); a sender process pushes real frames over ZeroMQ (raw BGR at the
engine's input size, each stamped with its send time) at full rate or a set rate, while this
process listens on MQTT. Latency is frame sent -> result received here. The bare pipeline (the same engine
set, batches of ``ingest.max_batch``, no sockets, no MQTT) is timed first, alone, for the
overhead figure. No torch.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge.config import Config
from edge.errors import MoleflowError
from edge.harness import served


@dataclass
class DaemonBench:
    bare_fps: float
    sent: int
    results: int
    fps: float
    p50_ms: float
    p99_ms: float
    dropped: int
    rate: float
    window: int = 0

    def lines(self) -> str:
        mode = (f"full rate ({self.window} frames in flight)" if self.rate <= 0
                else f"{self.rate:.0f} frames/s offered")
        text = (f"bare pipeline (batch scoring, no sockets): {self.bare_fps:.1f} frames/s\n"
                f"daemon, {mode}: sent {self.sent}, results {self.results}, dropped "
                f"{self.dropped} | {self.fps:.1f} frames/s | latency sent->MQTT result p50 "
                f"{self.p50_ms:.1f} ms, p99 {self.p99_ms:.1f} ms")
        if self.rate <= 0 and self.bare_fps:  # at a set rate throughput is the rate itself
            text += f" | throughput overhead vs bare {100.0 * (1 - self.fps / self.bare_fps):.1f} %"
        return text


def bare_fps(engines_dir: Path, frames: np.ndarray, batch: int, seconds: float) -> float:
    from engines.pipeline import EngineSet, Pipeline
    pipe = Pipeline(EngineSet.open(engines_dir), with_maps=False)  # as the daemon runs it
    for i in range(0, len(frames) - batch + 1, batch):  # warm-up
        pipe.score(frames[i:i + batch])
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for i in range(0, len(frames) - batch + 1, batch):
            pipe.score(frames[i:i + batch])
            n += batch
    return n / (time.perf_counter() - t0)


def _sender(address: str, frames_path: str, seconds: float, rate: float, window: int, sent,
            received) -> None:
    """Child process: PUSH frames (RGB -> BGR raw) stamped with their send time.

    At full rate (``rate`` 0) it keeps ``window`` frames in flight (sent, no result yet): as
    fast as the daemon can score, without flooding the socket with frames it would drop."""
    import zmq
    frames = np.load(frames_path)[..., ::-1].copy()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.SNDHWM, 4)
    sock.connect(address)
    t0, i = time.time(), 0
    while time.time() - t0 < seconds:
        if rate <= 0 and i - received.value >= window:
            time.sleep(0.0002)
            continue
        bgr = frames[i % len(frames)]
        header = {"msg": json.dumps({"camera": "bench", "frame": str(i),
                                     "timestamp": time.time()}),
                  "dtype": "uint8", "shape": list(bgr.shape)}
        sock.send_multipart([json.dumps(header).encode(), bgr.tobytes()])
        i += 1
        if rate > 0:
            time.sleep(max(0.0, t0 + i / rate - time.time()))
    sent.value = i
    sock.close(linger=2000)
    ctx.term()


def load_frames(engines_dir: Path, data_root: Path, per_class: int = 16) -> np.ndarray:
    """RGB test images of the engine set's products at its input size, interleaved."""
    import cv2
    from engines.manifest import Manifest
    manifest = Manifest.load(engines_dir)
    size = int(manifest.input["size"])
    groups = []
    for e in manifest.experts:
        paths = sorted(Path(data_root, e.name, "test").glob("*/*.png"))
        step = max(1, len(paths) // per_class)
        imgs = [cv2.resize(cv2.imread(str(p), cv2.IMREAD_COLOR), (size, size),
                           interpolation=cv2.INTER_AREA)[..., ::-1] for p in paths[::step]]
        if imgs:
            groups.append(imgs[:per_class])
    if not groups:
        raise MoleflowError(f"no test images of the engine set's products under {data_root}")
    return np.ascontiguousarray(np.stack([img for g in zip(*groups) for img in g]))


def bench_daemon(engines_dir: Path, frames: np.ndarray, cfg: Config, seconds: float = 20.0,
                 rate: float = 0.0) -> DaemonBench:
    bare = bare_fps(engines_dir, frames, cfg.ingest.max_batch, min(seconds, 10.0))
    window = cfg.ingest.max_batch + 2
    latencies: list[float] = []
    received: list[float] = []
    ctx = mp.get_context("spawn")
    done, sent = ctx.Value("i", 0), ctx.Value("i", 0)
    lock = threading.Lock()

    def on_result(topic: str, payload: bytes) -> None:
        now = time.time()
        r = json.loads(payload)
        with lock:
            received.append(now)
            done.value = len(received)
            if r.get("sent_at"):
                latencies.append(now - r["sent_at"])

    with tempfile.TemporaryDirectory() as tmp:
        tmpdir = Path(tmp)
        with served(engines_dir, cfg, tmpdir, "pull", "bench", [("+/result", 0)], on_result,
                    settings={"logging": {"json": False}}) as zport:
            frames_path = tmpdir / "frames.npy"
            np.save(frames_path, frames)
            proc = ctx.Process(target=_sender, args=(
                f"tcp://127.0.0.1:{zport}", str(frames_path), seconds, rate, window, sent,
                done))
            start = time.time()
            proc.start()
            proc.join(seconds + 60)
            time.sleep(2.0)  # let the last results arrive
            with lock:
                in_window = [t for t in received if start + 2 <= t <= start + seconds]
                lat = np.asarray(latencies[len(latencies) // 10:]) * 1000  # skip warm-up
                n_results = len(received)
    fps = len(in_window) / max(seconds - 2, 1e-9)
    return DaemonBench(bare, int(sent.value), n_results, fps,
                       float(np.percentile(lat, 50)) if len(lat) else float("nan"),
                       float(np.percentile(lat, 99)) if len(lat) else float("nan"),
                       int(sent.value) - n_results, rate, window)
