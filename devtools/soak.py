"""``moleflow soak``: the daemon under a steady stream of JPEG frames, its resources watched.

A leak shows as a slope, not as a level. The daemon is served as systemd would
(``moleflow.devtools.harness.served``: Mosquitto, ``moleflow serve`` as a child process), cameras send JPEG
frames (OpenCV quality 90, as imagezmq's ``send_jpg``) at a steady rate, and every interval
the daemon's resident memory, open file descriptors and threads are read from /proc beside the
frames sent and the results and alarms received. The first minutes are a warm-up (the
runtime's arenas, the batch sizes and the broker session settle there); the last sample is
compared with the first one after it, and a change past the tolerance fails the run. No torch.
"""

from __future__ import annotations

import re
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable

from moleflow.config import Config
from moleflow.devtools.drive import (
    Collector,
    jpeg,
    jpeg_message,
    load_frames,
    metric_total,
    msg_text,
    proc_stats,
    scrape_metrics,
)
from moleflow.devtools.harness import Service, free_port, served
from moleflow.errors import MoleflowError

HEADER = (f"{'minute':>7} {'rss_mib':>9} {'fds':>5} {'threads':>7} {'sent':>8} {'results':>8} "
          f"{'alarms':>7}")
ROW = re.compile(r"^\s*(\d+\.\d+)\s+(\d+\.\d)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s*$")


@dataclass(frozen=True)
class Row:
    """One sample: minutes since the stream started, the daemon's resources, the counts."""
    minute: float
    rss_mib: float
    fds: int
    threads: int
    sent: int
    results: int
    alarms: int

    def line(self) -> str:
        return (f"{self.minute:>7.2f} {self.rss_mib:>9.1f} {self.fds:>5d} {self.threads:>7d} "
                f"{self.sent:>8d} {self.results:>8d} {self.alarms:>7d}")


def parse_rows(text: str) -> list[Row]:
    """The sample rows of a soak's printed output (for scripts that plot or compare runs)."""
    out = []
    for line in text.splitlines():
        m = ROW.match(line)
        if m:
            g = m.groups()
            out.append(Row(float(g[0]), float(g[1]), *(int(v) for v in g[2:])))
    return out


class Cameras(threading.Thread):
    """``cameras`` senders, each at ``fps``, interleaved on one thread, each on its own PUSH
    socket (made on this thread: ZeroMQ sockets are not thread-safe). A frame the socket cannot
    take at once (the daemon's queue and ours are full) is skipped and counted, as a camera on
    a line would drop it rather than fall behind."""

    def __init__(self, port: int, cameras: int, fps: float, jpegs: list[bytes]) -> None:
        super().__init__(name="soak-cameras", daemon=True)
        self.address, self.fps, self.jpegs = f"tcp://127.0.0.1:{port}", fps, jpegs
        self.names = [f"soak{i + 1}" for i in range(cameras)]
        self.sent = self.skipped = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        import zmq
        ctx = zmq.Context()
        socks = [ctx.socket(zmq.PUSH) for _ in self.names]
        for s in socks:
            s.setsockopt(zmq.LINGER, 0)
            s.connect(self.address)
        t0, k, n = time.time(), 0, len(self.names)
        try:
            while not self._stop_event.is_set():
                delay = t0 + k / (self.fps * n) - time.time()
                if delay > 0 and self._stop_event.wait(delay):
                    break
                parts = jpeg_message(self.jpegs[k % len(self.jpegs)],
                                     msg_text(self.names[k % n], str(k)))
                try:
                    socks[k % n].send_multipart(parts, zmq.NOBLOCK)
                    self.sent += 1
                except zmq.Again:
                    self.skipped += 1
                k += 1
        finally:
            for s in socks:
                s.close(0)
            ctx.term()

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=10)


@dataclass
class SoakReport:
    rows: list[Row]
    lines: list[str]
    ok: bool


def compare(rows: list[Row], warmup_minutes: float, tolerance: float
            ) -> tuple[list[str], bool]:
    """RSS and fds at the end against the first sample after the warm-up, in per cent."""
    after = [r for r in rows if r.minute >= warmup_minutes - 1e-9]
    if len(after) < 2:
        return [f"soak: FAIL: no two samples after the {warmup_minutes:.2f}-minute warm-up to "
                "compare (run longer or sample more often)"], False
    base, end = after[0], after[-1]
    rss = 100.0 * (end.rss_mib - base.rss_mib) / base.rss_mib
    fds = 100.0 * (end.fds - base.fds) / max(base.fds, 1)
    ok = abs(rss) <= tolerance and abs(fds) <= tolerance
    return [f"soak: after the warm-up (minute {base.minute:.2f} -> {end.minute:.2f}): RSS "
            f"{base.rss_mib:.1f} -> {end.rss_mib:.1f} MiB ({rss:+.1f} %), fds {base.fds} -> "
            f"{end.fds} ({fds:+.1f} %), threads {base.threads} -> {end.threads}; tolerance "
            f"±{tolerance:g} %: {'PASS' if ok else 'FAIL'}"], ok


def _sample(pid: int, minute: float, cams: Cameras, collector: Collector) -> Row | None:
    stats = proc_stats(pid)
    if stats is None:
        return None
    return Row(minute, stats.rss_mib, stats.fds, stats.threads, cams.sent,
               collector.n_results, collector.n_alarms)


def run_soak(engines: Path, cfg: Config, minutes: float = 30.0, fps: float = 10.0,
             cameras: int = 2, interval: float = 60.0, tolerance: float = 5.0,
             warmup_minutes: float | None = None, data: Path | None = None,
             emit: Callable[[str], None] = print) -> SoakReport:
    """Serve ``engines`` for ``minutes`` under ``cameras`` x ``fps`` JPEG frames, sampling every
    ``interval`` seconds; each line goes to ``emit`` as it is made (a 30-minute run shows its
    progress). The warm-up defaults to 3 minutes, or 30 % of a shorter run."""
    if minutes <= 0 or fps <= 0 or cameras < 1 or interval <= 0:
        raise MoleflowError("soak: --minutes, --fps, --interval must be > 0 and --cameras >= 1")
    warmup = min(3.0, 0.3 * minutes) if warmup_minutes is None else warmup_minutes
    jpegs = [jpeg(f) for f in load_frames(engines, data, count=32)]
    collector, mport = Collector(), free_port()
    lines = [f"soak: engine set {engines}, {cameras} camera(s) x {fps:g} frames/s for "
             f"{minutes:g} min (JPEG q90), a sample every {interval:g} s, warm-up "
             f"{warmup:.2f} min", HEADER]
    for line in lines:
        emit(line)
    rows: list[Row] = []
    problems: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        with served(Service(engines, cfg, Path(tmp), "pull", "soak", {"metrics": {"port": mport}}),
                    [("+/result", 0), ("+/alarm", 1), ("events", 1)], collector) as port:
            cams = Cameras(port, cameras, fps, jpegs)
            t0 = time.time()
            cams.start()
            try:
                _watch(port.daemon.pid, t0, minutes, interval, cams, collector, rows, emit,
                       problems)
            finally:
                cams.stop()
            time.sleep(min(2.0, interval))  # the last frames' results
            metrics = scrape_metrics(mport) or {}
            code = port.daemon.poll()
    if code is not None:
        problems.append(f"the daemon exited with code {code}")
    more, ok = compare(rows, warmup, tolerance)
    dropped = metric_total(metrics, "frames_dropped")
    more.insert(0, f"soak: sent {cams.sent} ({cams.skipped} skipped: socket full), results "
                   f"{collector.n_results}, alarms {collector.n_alarms}, dropped by the "
                   f"daemon's queue {dropped:.0f}, events {len(collector.events)}, payloads "
                   f"not JSON {len(collector.invalid)}")
    more += [f"soak: FAIL: {p}" for p in problems]
    for line in more:
        emit(line)
    return SoakReport(rows, lines + [r.line() for r in rows] + more, ok and not problems)


def _watch(pid: int, t0: float, minutes: float, interval: float, cams: Cameras,
           collector: Collector, rows: list[Row], emit: Callable[[str], None],
           problems: list[str]) -> None:
    """Sample at 0, every ``interval`` and at the end; stop early if the daemon is gone or
    scored nothing for a whole interval."""
    times = [k * interval for k in range(int(minutes * 60 / interval) + 1)]
    if times[-1] < minutes * 60 - 1e-6:
        times.append(minutes * 60)
    for at in times:
        time.sleep(max(0.0, t0 + at - time.time()))
        row = _sample(pid, at / 60.0, cams, collector)
        if row is None:
            problems.append(f"the daemon is gone at minute {at / 60:.2f}")
            return
        rows.append(row)
        emit(row.line())
        if len(rows) > 1 and row.results == rows[-2].results and row.sent > rows[-2].sent:
            problems.append(f"no result between minute {rows[-2].minute:.2f} and "
                            f"{row.minute:.2f} while frames were sent")
            return
