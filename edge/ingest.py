"""ZeroMQ camera sockets: SUB (PUB senders), PULL (PUSH senders), REP (imagezmq's REQ senders).

One thread polls every socket (100 ms timeout, so it notices a stop) and hands each message,
undecoded, to a callback. A REP socket answers ``OK`` on receipt (also for a bad frame, which
is reported when it is decoded), so an imagezmq sender never hangs.

Nothing a sender does may end this thread: each message is handled inside its own ``try``
(an error is reported and the loop goes on), and the thread stamps a heartbeat on every pass
so the daemon's watchdog and ``/healthz`` notice if it ever stops anyway. Resources are bounded
per message and per connection:

* a message is read part by part and only the first ``ingest.max_message_bytes`` are kept;
  parts past a message's third or past the size limit are read and dropped (ZeroMQ's
  ``MAXMSGSIZE`` cuts off any single part over twice the limit before it takes memory);
* the sockets authenticate every connection through a ZAP handler polled on this thread: it
  refuses connections beyond ``ingest.max_connections`` and, with CURVE on
  (``ingest.curve_secret_key``), every client key not in ``ingest.curve_clients``;
* half-open connections are dropped after a 5 s handshake window, dead peers by TCP keepalive.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable

from moleflow.config import ConfigError, IngestConfig
from moleflow.edge.frames import MAX_HEADER_BYTES, parse_msg

log = logging.getLogger("moleflow.ingest")
PATTERNS = {"rep": ("REP", True), "pull": ("PULL", True), "sub": ("SUB", False)}
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
MAX_PARTS = 3  # an imagezmq message has 2; a third is kept only to name the problem


@dataclass(frozen=True)
class Endpoint:
    pattern: str       # rep | pull | sub
    address: str       # tcp://host:port, ipc://...
    bind: bool


def parse_endpoint(text: str) -> Endpoint:
    """``rep+tcp://127.0.0.1:5555`` -> Endpoint; a wrong one names ingest.endpoints."""
    pattern, sep, address = text.partition("+")
    if not sep or pattern not in PATTERNS or "://" not in address:
        raise ConfigError(f"ingest.endpoints: {text!r} must be pattern+address with pattern one "
                          f"of {', '.join(PATTERNS)} (e.g. rep+tcp://127.0.0.1:5555)")
    return Endpoint(pattern, address, PATTERNS[pattern][1])


@dataclass
class Message:
    """A received camera message, not decoded yet (decoding waits until it is scored, so a
    frame dropped under overload costs no decoding). ``problem`` names what made ingest cut
    the message short (too many parts, too large); such a message is reported, not scored."""
    parts: list[bytes]
    source: str
    received_at: float
    camera: str
    problem: str | None = None


def camera_of(parts: list[bytes]) -> str:
    """The camera named in a message's header, cheaply and without failing ('?' if unclear)."""
    try:
        if len(parts) == 2 and len(parts[0]) <= MAX_HEADER_BYTES:
            header = json.loads(parts[0])
            if isinstance(header, dict):
                return parse_msg(header.get("msg", ""))[0]
    except Exception:  # noqa: BLE001 - hostile headers raise anything; '?' is the answer
        pass
    return "?"


def load_curve_keys(cfg: IngestConfig) -> tuple[tuple[bytes, bytes] | None, set[bytes]]:
    """(server public, secret) and the allowed client public keys, or (None, set()) without
    CURVE. Key files are ZeroMQ certificates (``moleflow keys`` or ``zmq.auth``)."""
    if not cfg.curve_secret_key:
        return None, set()
    import zmq.auth
    try:
        public, secret = zmq.auth.load_certificate(cfg.curve_secret_key)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"ingest.curve_secret_key: cannot read {cfg.curve_secret_key} "
                          f"({exc})") from exc
    if secret is None:
        raise ConfigError(f"ingest.curve_secret_key: {cfg.curve_secret_key} holds no secret "
                          "key (give the .key_secret file)")
    folder = Path(cfg.curve_clients or "")
    if not cfg.curve_clients or not folder.is_dir():
        raise ConfigError(f"ingest.curve_clients: {cfg.curve_clients!r} must be a folder of "
                          "client public key files (*.key) when CURVE is on")
    allowed = set()
    for path in sorted(folder.glob("*.key")):
        try:
            allowed.add(zmq.auth.load_certificate(path)[0])
        except (OSError, ValueError) as exc:
            raise ConfigError(f"ingest.curve_clients: {path} is not a key file ({exc})") from exc
    if not allowed:
        raise ConfigError(f"ingest.curve_clients: no client keys (*.key) in {folder}")
    return (public, secret), allowed


class Ingest:
    """Receives camera messages from all configured sockets on one thread."""

    def __init__(self, cfg: IngestConfig, on_message: Callable[[Message], None],
                 on_error: Callable[[str, str], None]) -> None:
        import zmq
        self.zmq = zmq
        self.cfg, self.on_message, self.on_error = cfg, on_message, on_error
        self.endpoints = [parse_endpoint(e) for e in cfg.endpoints]
        self.server_keys, self.client_keys = load_curve_keys(cfg)
        self.context = zmq.Context()
        self.sockets = []
        self.connections = 0          # accepted and not yet closed, over all sockets
        self.refused = 0              # connections the ZAP handler turned away
        self._refusal_reported = -1e9
        self.heartbeat = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._zap = None
        self._monitors: list = []

    def start(self) -> None:
        zmq = self.zmq
        self._zap = self.context.socket(zmq.REP)   # must exist before any handshake
        self._zap.linger = 0
        self._zap.bind(ZAP_ENDPOINT)
        for ep in self.endpoints:
            sock = self._socket(ep)
            try:
                sock.bind(ep.address) if ep.bind else sock.connect(ep.address)
            except zmq.ZMQError as exc:
                sock.close(0)
                self.stop()
                raise ConfigError(f"ingest.endpoints: cannot {'bind' if ep.bind else 'connect'} "
                                  f"{ep.address} ({exc})") from exc
            self.sockets.append((ep, sock))
            log.info("listening for frames: %s %s%s", ep.pattern, ep.address,
                     " (CURVE)" if self.server_keys else "")
        self._thread = threading.Thread(target=self._run, name="ingest", daemon=True)
        self._thread.start()

    def _socket(self, ep: Endpoint):
        zmq = self.zmq
        sock = self.context.socket(getattr(zmq, PATTERNS[ep.pattern][0]))
        # a part up to twice the limit is read and reported; a larger one is cut off by
        # ZeroMQ itself (the peer disconnected) before it takes memory
        sock.setsockopt(zmq.MAXMSGSIZE, 2 * self.cfg.max_message_bytes + (1 << 20))
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, max(4, self.cfg.queue_size))
        sock.setsockopt(zmq.HANDSHAKE_IVL, 5000)
        sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
        sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, 60)
        sock.setsockopt(zmq.ZAP_DOMAIN, b"moleflow")  # every handshake asks the ZAP handler
        if self.server_keys:
            sock.curve_publickey, sock.curve_secretkey = self.server_keys
            sock.curve_server = True
        if ep.pattern == "sub":
            sock.setsockopt(zmq.SUBSCRIBE, b"")
        if ep.bind:
            self._monitors.append(
                sock.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED))
        return sock

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        for ep, sock in self.sockets:
            if ep.bind:
                try:
                    sock.disable_monitor()
                except self.zmq.ZMQError:
                    pass
            sock.close(0)
        for monitor in self._monitors:
            monitor.close(0)
        if self._zap is not None:
            self._zap.close(0)
        self.context.term()

    def _run(self) -> None:
        zmq = self.zmq
        poller = zmq.Poller()
        kinds = {}
        for ep, sock in self.sockets:
            poller.register(sock, zmq.POLLIN)
            kinds[sock] = ep
        poller.register(self._zap, zmq.POLLIN)
        for monitor in self._monitors:
            poller.register(monitor, zmq.POLLIN)
        while not self._stop.is_set():
            self.heartbeat = time.monotonic()
            try:
                ready = dict(poller.poll(100))
            except zmq.ZMQError as exc:
                if self._stop.is_set():
                    break
                self._report("ingest_error", f"poll: {exc}")
                time.sleep(0.1)
                continue
            for sock in ready:
                try:
                    if sock is self._zap:
                        self._authenticate()
                    elif sock in kinds:
                        self._receive(kinds[sock], sock)
                    else:
                        self._count_connection(sock)
                except Exception as exc:  # noqa: BLE001 - one message never ends ingest
                    self._report("ingest_error", f"{type(exc).__name__}: {exc}")

    def _report(self, kind: str, detail: str) -> None:
        try:
            self.on_error(kind, detail)
        except Exception:  # noqa: BLE001 - reporting must not end the thread either
            log.exception("ingest: reporting %s failed", kind)

    def _receive(self, ep: Endpoint, sock) -> None:
        """Read one message part by part, keeping at most ``max_message_bytes`` and three
        parts; the REP socket answers before anything can go wrong with the content."""
        zmq = self.zmq
        try:
            first = sock.recv(zmq.NOBLOCK)
        except zmq.Again:
            return
        except zmq.ZMQError as exc:
            self._report("receive", f"{ep.address}: {exc}")
            return
        parts, total, count = [first], len(first), 1
        try:
            while sock.getsockopt(zmq.RCVMORE):  # the rest of a multipart message is here
                part = sock.recv()
                count, total = count + 1, total + len(part)
                if count <= MAX_PARTS and total <= self.cfg.max_message_bytes:
                    parts.append(part)
        finally:  # a REP socket that does not answer can never receive again
            if ep.pattern == "rep":
                sock.send(b"OK")
        problem = None
        if count > MAX_PARTS:
            problem = f"expected 2 message parts (JSON header, buffer), got {count}"
        elif total > self.cfg.max_message_bytes:
            problem = (f"message of {total} bytes exceeds ingest.max_message_bytes "
                       f"({self.cfg.max_message_bytes})")
        if problem:
            parts = []  # what was kept of it is not needed any more
        self.on_message(Message(parts, f"{ep.pattern} {ep.address}", time.time(),
                                camera_of(parts) if not problem else "?", problem))

    def _authenticate(self) -> None:
        """Answer one ZAP request (RFC 27): refuse past ``max_connections`` and, with CURVE,
        unknown client keys."""
        from zmq.utils import z85  # the allowed keys are read Z85-encoded, as in the files
        request = self._zap.recv_multipart()
        version, request_id = request[0], request[1]
        address, mechanism = request[3].decode(errors="replace"), request[5]
        credentials = request[6] if len(request) > 6 else b""
        status, reason = b"200", b"OK"
        if self.connections > self.cfg.max_connections:
            status, reason = b"400", b"too many connections"
        elif self.server_keys and (mechanism != b"CURVE" or len(credentials) != 32
                                   or z85.encode(credentials) not in self.client_keys):
            status, reason = b"400", b"client key not allowed"
        if status != b"200":
            self.refused += 1
            now = time.monotonic()
            if now - self._refusal_reported >= 10.0:  # a refused peer retries every 100 ms
                self._refusal_reported = now
                self._report("connection_refused", f"{address}: {reason.decode()} "
                             f"({self.connections} open, ingest.max_connections "
                             f"{self.cfg.max_connections}; {self.refused} refused so far, "
                             "reported at most every 10 s)")
        self._zap.send_multipart([version, request_id, status, reason, b"", b""])

    def _count_connection(self, monitor) -> None:
        from zmq.utils.monitor import recv_monitor_message
        event = recv_monitor_message(monitor, self.zmq.NOBLOCK)["event"]
        if event == self.zmq.EVENT_ACCEPTED:
            self.connections += 1
        elif event == self.zmq.EVENT_DISCONNECTED:
            self.connections = max(0, self.connections - 1)
