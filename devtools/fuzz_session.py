"""The fuzz session's parts: the camera senders, one served daemon with its collector, and a
probe of one message kind (what ``moleflow fuzz`` isolates and mixes; see ``fuzz``)."""

from __future__ import annotations

import contextlib
import re
import time
from dataclasses import dataclass
from pathlib import Path

from moleflow.config import Config
from moleflow.devtools.drive import (
    FAULT_EVENTS,
    INFO_EVENTS,
    Collector,
    last_exception,
    metric_total,
    proc_stats,
    scrape_metrics,
)
from moleflow.devtools.fuzz_cases import (
    EITHER,
    Forge,
    Kind,
    make,
)
from moleflow.devtools.harness import Service, free_port, served
from moleflow.errors import MoleflowError

DEVICE = "fuzz"
CAMERAS = ["camA", "camB"]
TOPICS = [("+/result", 0), ("+/alarm", 1), ("events", 1)]
#: ``errors`` counter kinds that are not a refused message (annotations, faults, the broker)
NOT_REJECTIONS = frozenset({"bad_hint", "worker", "engine", "publish", "reload"})
WINDOW = 64   # messages in flight (sent, no outcome yet) in the mixed phase


class Sender:
    """One socket per camera: PUSH to a ``pull`` endpoint, or REQ to a ``rep`` one (which
    waits for the daemon's OK; after a timeout the socket is replaced, since a REQ socket that
    got no answer cannot send again)."""

    def __init__(self, pattern: str, port: int, cameras: list[str], timeout: float) -> None:
        import zmq
        self.zmq, self.pattern, self.address = zmq, pattern, f"tcp://127.0.0.1:{port}"
        self.timeout_ms = int(timeout * 1000)
        self.ctx = zmq.Context()
        self.sockets = {cam: self._socket() for cam in cameras}

    def _socket(self):
        zmq = self.zmq
        sock = self.ctx.socket(zmq.REQ if self.pattern == "rep" else zmq.PUSH)
        sock.setsockopt(zmq.SNDTIMEO, self.timeout_ms)
        sock.setsockopt(zmq.RCVTIMEO, self.timeout_ms)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.address)
        return sock

    def send(self, camera: str, parts: list[bytes]) -> tuple[bool, bool]:
        """(whether the message left, whether the daemon took it: for rep, its OK came)."""
        sock = self.sockets[camera]
        try:
            sock.send_multipart(parts, copy=False)
        except self.zmq.Again:  # PUSH: the daemon's queue and ours are full
            return False, False
        if self.pattern != "rep":
            return True, True
        try:
            sock.recv()
            return True, True
        except self.zmq.Again:
            sock.close(0)
            self.sockets[camera] = self._socket()
            return True, False

    def close(self) -> None:
        for sock in self.sockets.values():
            sock.close(0)
        self.ctx.term()


class Session:
    """One served daemon with its MQTT collector, metrics port and camera sockets;
    ``patience``: how long a missing answer or outcome is waited for."""

    def __init__(self, engines: Path, cfg: Config, folder: Path, pattern: str,
                 patience: float) -> None:
        self.collector, self.patience = Collector(), patience
        self.metrics_port = free_port()
        self.stack = contextlib.ExitStack()
        settings = {"ingest": {"queue_size": max(cfg.ingest.queue_size, 4 * WINDOW)},
                    "mqtt": {"map_interval": 0.0}, "metrics": {"port": self.metrics_port},
                    "logging": {"json": False}}
        self.served = self.stack.enter_context(served(
            Service(engines, cfg, folder, pattern, DEVICE, settings), TOPICS, self.collector))
        self.sender = Sender(pattern, self.served, CAMERAS, patience)
        self.stack.callback(self.sender.close)
        self.log = folder / "daemon.log"

    @property
    def pid(self) -> int:
        return self.served.daemon.pid

    def exit_code(self) -> int | None:
        return self.served.daemon.poll()

    def log_size(self) -> int:
        return self.log.stat().st_size if self.log.exists() else 0

    def reports(self) -> tuple[int, int, str]:
        """(refused messages, faults, source): the daemon's ``errors`` counter when /metrics
        answers (exact whatever the events' QoS), else the ``events`` received on MQTT."""
        metrics = scrape_metrics(self.metrics_port)
        if metrics is not None:
            errors = metric_total(metrics, "errors")
            faults = metric_total(metrics, "errors", kind="worker") + \
                metric_total(metrics, "errors", kind="engine")
            other = sum(metric_total(metrics, "errors", kind=k) for k in NOT_REJECTIONS)
            return int(errors - other), int(faults), "errors counter"
        _, rejected, faults = self.collector.counts()
        return rejected, faults, "events"

    def close(self) -> str | None:
        """Stop everything; what went wrong stopping the daemon, if anything."""
        try:
            self.stack.close()
        except MoleflowError as exc:
            return str(exc)[:300]
        return None


def wait_until(test, seconds: float) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if test():
            return True
        time.sleep(0.01)
    return test()


# ----- isolation phase -------------------------------------------------------------------------
@dataclass
class Probe:
    kind: str
    expect: str
    outcome: str
    ok: bool


def probe(s: Session, forge: Forge, kind: Kind, index: int) -> tuple[Probe, bool]:
    """Send one ``kind`` message then a canary frame; (what happened, whether the daemon must
    be restarted)."""
    c = s.collector
    results0 = c.n_results
    events0, invalid0, log0 = len(c.events), len(c.invalid), s.log_size()
    before, counted0 = s.reports(), c.counts()
    peak0 = getattr(proc_stats(s.pid), "peak_mib", 0.0)
    case = make(forge, kind, "camA", f"h-probe-{index}")
    canary = f"c-probe-{index}"
    s.sender.send("camA", case.parts)
    s.sender.send("camA", forge.valid("camA", canary))
    got = wait_until(lambda: c.results[canary] > 0, s.patience)
    time.sleep(0.2)  # a report published after the canary's result still counts
    after = s.reports()
    if after[2] == before[2]:
        rejected, faults = after[0] - before[0], after[1] - before[1]
    else:  # /metrics went away with the daemon: count what reached MQTT
        counted = c.counts()
        rejected, faults = counted[1] - counted0[1], counted[2] - counted0[2]
    scored = c.n_results - results0 - c.results[canary]
    with c.lock:
        events = [e for e in c.events[events0:] if e.get("event") not in INFO_EVENTS]
        invalid = c.invalid[invalid0:]
    words = []
    if rejected:
        detail = next((e for e in events if e.get("event") not in FAULT_EVENTS), {})
        words.append(f"reported{'' if rejected == 1 else f' x{rejected}'} "
                     f"({detail.get('event', '?')}: {_reason(detail.get('detail'))})")
    if scored:
        words.append(f"scored{'' if scored == 1 else f' x{scored}'}")
    if invalid:
        words.append(f"payload not JSON ({invalid[0][1][:70]})")
    if faults:
        fault = next((e for e in events if e.get("event") in FAULT_EVENTS), {})
        words.append(f"fault {fault.get('event', '?')} ({str(fault.get('detail', ''))[:60]})")
    if not rejected and not scored:
        words.append("NOT REPORTED")
    peak = getattr(proc_stats(s.pid), "peak_mib", peak0) - peak0
    if peak > 50:  # a small message that makes the daemon allocate much is a risk of its own
        words.append(f"peak RSS +{peak:.0f} MiB")
    broken = False
    if not got:
        broken, why = _why_lost(s, forge, index, log0)
        words.append(why)
    one = rejected + scored == 1 and (kind.expect == EITHER or not scored)
    ok = got and one and not faults and not invalid
    return Probe(kind.name, kind.expect, "; ".join(words), ok), broken


def _reason(detail: object) -> str:
    """An event's reason without the socket and camera it names first."""
    text = str(detail or "")
    found = re.search(r"\(camera [^)]*\): (.*)", text)
    return (found.group(1) if found else text)[:80]


def _why_lost(s: Session, forge: Forge, index: int, log0: int) -> tuple[bool, str]:
    """The canary got no result: was its batch lost, did the ingest stop, or the daemon?"""
    code = s.exit_code()
    if code is not None:
        return True, f"DAEMON EXITED (code {code}; {last_exception(s.log, log0)})"
    second = f"c2-probe-{index}"
    s.sender.send("camB", forge.valid("camB", second))
    if wait_until(lambda: s.collector.results[second] > 0, s.patience):
        return False, "canary lost (the batch it was in was dropped)"
    return True, (f"INGEST STOPPED: no later frame is scored "
                  f"({last_exception(s.log, log0) or 'nothing in the log'})")
