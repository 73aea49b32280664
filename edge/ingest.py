"""ZeroMQ camera sockets: SUB (PUB senders), PULL (PUSH senders), REP (imagezmq's REQ senders).

One thread polls every socket (100 ms timeout, so it notices a stop) and hands each message,
undecoded, to a callback. A REP socket answers ``OK`` on receipt (also for a bad frame, which
is reported when it is decoded), so an imagezmq sender never hangs. Messages over the size limit
are rejected and reported; past twice the limit ZeroMQ's ``MAXMSGSIZE`` drops the connection
before the message takes memory.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

from edge.config import ConfigError, IngestConfig
from edge.frames import parse_msg

log = logging.getLogger("moleflow.ingest")
PATTERNS = {"rep": ("REP", True), "pull": ("PULL", True), "sub": ("SUB", False)}


@dataclass(frozen=True)
class Endpoint:
    pattern: str       # rep | pull | sub
    address: str       # tcp://host:port, ipc://...
    bind: bool


def parse_endpoint(text: str) -> Endpoint:
    """``rep+tcp://0.0.0.0:5555`` -> Endpoint; a wrong one names ingest.endpoints."""
    pattern, sep, address = text.partition("+")
    if not sep or pattern not in PATTERNS or "://" not in address:
        raise ConfigError(f"ingest.endpoints: {text!r} must be pattern+address with pattern one "
                          f"of {', '.join(PATTERNS)} (e.g. rep+tcp://0.0.0.0:5555)")
    return Endpoint(pattern, address, PATTERNS[pattern][1])


@dataclass
class Message:
    """A received camera message, not decoded yet (decoding waits until it is scored, so a
    frame dropped under overload costs no decoding)."""
    parts: list[bytes]
    source: str
    received_at: float
    camera: str


def camera_of(parts: list[bytes]) -> str:
    """The camera named in a message's header, cheaply and without failing ('?' if unclear)."""
    try:
        if len(parts) == 2 and len(parts[0]) < 65536:
            return parse_msg(json.loads(parts[0]).get("msg", ""))[0]
    except (ValueError, AttributeError, TypeError):
        pass
    return "?"


class Ingest:
    """Receives camera messages from all configured sockets on one thread."""

    def __init__(self, cfg: IngestConfig, on_message: Callable[[Message], None],
                 on_error: Callable[[str, str], None]) -> None:
        import zmq
        self.zmq = zmq
        self.cfg, self.on_message, self.on_error = cfg, on_message, on_error
        self.endpoints = [parse_endpoint(e) for e in cfg.endpoints]
        self.context = zmq.Context()
        self.sockets = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        zmq = self.zmq
        for ep in self.endpoints:
            sock = self.context.socket(getattr(zmq, PATTERNS[ep.pattern][0]))
            # messages up to twice the limit are read and rejected with a reported reason;
            # anything larger is cut off by ZeroMQ itself before it takes memory
            sock.setsockopt(zmq.MAXMSGSIZE, 2 * self.cfg.max_message_bytes + (1 << 20))
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RCVHWM, max(4, self.cfg.queue_size))
            if ep.pattern == "sub":
                sock.setsockopt(zmq.SUBSCRIBE, b"")
            try:
                sock.bind(ep.address) if ep.bind else sock.connect(ep.address)
            except zmq.ZMQError as exc:
                raise ConfigError(f"ingest.endpoints: cannot {'bind' if ep.bind else 'connect'} "
                                  f"{ep.address} ({exc})") from exc
            self.sockets.append((ep, sock))
            log.info("listening for frames: %s %s", ep.pattern, ep.address)
        self._thread = threading.Thread(target=self._run, name="ingest", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        for _, sock in self.sockets:
            sock.close(0)
        self.context.term()

    def _run(self) -> None:
        zmq = self.zmq
        poller = zmq.Poller()
        for _, sock in self.sockets:
            poller.register(sock, zmq.POLLIN)
        kinds = {sock: ep for ep, sock in self.sockets}
        while not self._stop.is_set():
            try:
                ready = dict(poller.poll(100))
            except zmq.ZMQError:
                break
            for sock in ready:
                ep = kinds[sock]
                try:
                    parts = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    continue
                except zmq.ZMQError as exc:
                    self.on_error("receive", f"{ep.address}: {exc}")
                    continue
                if ep.pattern == "rep":
                    sock.send(b"OK")
                self.on_message(Message(parts, f"{ep.pattern} {ep.address}", time.time(),
                                        camera_of(parts)))
