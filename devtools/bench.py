"""``moleflow bench-daemon``: the running daemon driven by a sender process, timed end to end.

Serves the engine set with Mosquitto and ``moleflow serve`` as a child process, as systemd
would (``moleflow.devtools.harness``); a sender process pushes real frames over ZeroMQ (raw BGR at the
engine's input size, each stamped with its send time) at full rate or a set rate, while this
process listens on MQTT. Latency is frame sent -> result received here. The bare pipeline
(the same engine set, scoring workers and batches as the daemon's, no sockets, no MQTT) is
timed alone before each daemon window, for the overhead figure. No torch.
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

from moleflow.config import Config
from moleflow.devtools.harness import Service, served
from moleflow.errors import MoleflowError


@dataclass
class Round:
    """One bare-pipeline window and the daemon window right after it."""
    bare_fps: float
    fps: float

    @property
    def overhead(self) -> float:
        return 1.0 - self.fps / self.bare_fps if self.bare_fps else float("nan")


@dataclass
class DaemonBench:
    rounds: list[Round]
    sent: int
    results: int
    p50_ms: float
    p99_ms: float
    dropped: int
    rate: float
    window: int = 0

    @property
    def bare_fps(self) -> float:
        return float(np.median([r.bare_fps for r in self.rounds]))

    @property
    def fps(self) -> float:
        return float(np.median([r.fps for r in self.rounds]))

    @property
    def overhead(self) -> float:
        """Median of the rounds' overheads: each compares the daemon with the bare pipeline
        measured just before it, so slow and fast spells of the machine do not mix."""
        return float(np.median([r.overhead for r in self.rounds]))

    def lines(self) -> str:
        mode = (f"full rate ({self.window} frames in flight)" if self.rate <= 0
                else f"{self.rate:.0f} frames/s offered")
        full = self.rate <= 0  # at a set rate throughput is the rate itself
        rows = [f"round {i + 1}: bare pipeline {r.bare_fps:.1f} frames/s, daemon {r.fps:.1f} "
                f"frames/s" + (f" (overhead {100 * r.overhead:.1f} %)" if full else "")
                for i, r in enumerate(self.rounds)]
        text = (f"bare pipeline (batch scoring, no sockets): {self.bare_fps:.1f} frames/s "
                f"(median of {len(self.rounds)} rounds)\n"
                f"daemon, {mode}: sent {self.sent}, results {self.results}, dropped "
                f"{self.dropped} | {self.fps:.1f} frames/s | latency sent->MQTT result p50 "
                f"{self.p50_ms:.1f} ms, p99 {self.p99_ms:.1f} ms")
        if full:
            text += f" | throughput overhead vs bare {100.0 * self.overhead:.1f} % (median)"
        return "\n".join(rows + [text])


def bare_fps(pipe, frames: np.ndarray, batch: int, seconds: float, workers: int = 1) -> float:
    """Frames/s of ``pipe`` (as the daemon runs it: no maps, ``workers`` threads each scoring
    its own batches) on ``frames``."""
    starts = list(range(0, len(frames) - batch + 1, batch))
    for i in starts:  # warm-up
        pipe.score(frames[i:i + batch])
    counts = [0] * workers
    t0 = time.perf_counter()

    def work(k: int) -> None:
        j = k
        while time.perf_counter() - t0 < seconds:
            i = starts[j % len(starts)]
            pipe.score(frames[i:i + batch])
            counts[k] += batch
            j += workers

    threads = [threading.Thread(target=work, args=(k,)) for k in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - t0)


def _sender(address: str, frames_path: str, seconds: float, rate: float, window: int, sent,
            received, offset: int = 0) -> None:
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
        if rate <= 0 and i - (received.value - offset) >= window:
            time.sleep(0.001)  # 1 ms against a ~200 ms window; finer polling eats a core
            continue
        bgr = frames[i % len(frames)]
        header = {"msg": json.dumps({"camera": "bench", "frame": str(i),
                                     "timestamp": time.time()}),
                  "dtype": "uint8", "shape": list(bgr.shape)}
        sock.send_multipart([json.dumps(header).encode(), bgr], copy=False)
        i += 1
        if rate > 0:
            time.sleep(max(0.0, t0 + i / rate - time.time()))
    sent.value = i
    sock.close(linger=2000)
    ctx.term()


def load_frames(engines_dir: Path, data_root: Path, per_class: int = 16) -> np.ndarray:
    """RGB test images of the engine set's products at its input size, interleaved."""
    import cv2

    from moleflow.manifest import Manifest
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
                 rate: float = 0.0, rounds: int = 3) -> DaemonBench:
    """``rounds`` times: the bare pipeline alone for a third of ``seconds``, then the daemon
    driven by a fresh sender process for ``seconds`` (this VM's speed drifts by tens of per
    cent within minutes, so each daemon window is compared with the bare one next to it)."""
    from moleflow.engines.pipeline import EngineSet, Pipeline
    from moleflow.engines.runtime import limit_library_threads, parallelism
    workers, threads = parallelism(cfg.engines.backend, cfg.engines.workers, cfg.engines.threads)
    limit_library_threads(threads)
    pipe = Pipeline(EngineSet.open(engines_dir, backend=cfg.engines.backend,  # as the daemon
                                   precision=cfg.engines.precision, threads=threads),
                    with_maps=False)
    # Full rate: enough frames in flight that a full batch waits for every worker whenever
    # its last one is done (two batches each), never more than the queue holds (no drops).
    window = min(2 * workers * cfg.ingest.max_batch, cfg.ingest.queue_size)
    latencies: list[tuple[float, float]] = []  # (received at, sent -> received seconds)
    received: list[float] = []
    ctx = mp.get_context("spawn")
    done = ctx.Value("i", 0)
    lock = threading.Lock()
    out: list[Round] = []
    sent_total = 0

    def on_result(topic: str, payload: bytes) -> None:
        now = time.time()
        r = json.loads(payload)
        with lock:
            received.append(now)
            done.value = len(received)
            if r.get("sent_at"):
                latencies.append((now, now - r["sent_at"]))

    with tempfile.TemporaryDirectory() as tmp:
        tmpdir = Path(tmp)
        frames_path = tmpdir / "frames.npy"
        np.save(frames_path, frames)
        with served(Service(engines_dir, cfg, tmpdir, "pull", "bench",
                            {"logging": {"json": False}}), [("+/result", 0)], on_result) as zport:
            warm_until = 0.0
            for _ in range(max(1, rounds)):
                bare = bare_fps(pipe, frames, cfg.ingest.max_batch, max(seconds / 3, 2.0),
                                workers)
                with lock:
                    before = len(received)
                sent = ctx.Value("i", 0)
                proc = ctx.Process(target=_sender, args=(
                    f"tcp://127.0.0.1:{zport}", str(frames_path), seconds, rate, window, sent,
                    done, before))
                start = time.time()
                warm_until = warm_until or start + 2  # the first frames load caches
                proc.start()
                proc.join(seconds + 60)
                deadline = time.time() + 10  # let the last results arrive
                while time.time() < deadline:
                    with lock:
                        if len(received) - before >= sent.value:
                            break
                    time.sleep(0.05)
                sent_total += int(sent.value)
                with lock:  # results inside the sending window, after a 1 s ramp
                    n = sum(1 for t in received[before:] if start + 1 <= t <= start + seconds)
                out.append(Round(bare, n / max(seconds - 1, 1e-9)))
            with lock:
                lat = np.asarray([v for t, v in latencies if t >= warm_until]) * 1000
                n_results = len(received)
    return DaemonBench(out, sent_total, n_results,
                       float(np.percentile(lat, 50)) if len(lat) else float("nan"),
                       float(np.percentile(lat, 99)) if len(lat) else float("nan"),
                       sent_total - n_results, rate, window)
