"""The edge daemon: camera frames in, routed expert scoring, MQTT results and alarms out.

    ingest thread --frames--> bounded queue (drops the oldest when full) --> scoring workers
    each worker: batch of waiting frames -> Pipeline (backbone, router, expert, map, decision)
                 -> result / alarm / map / unknown on MQTT, metrics, each alarm's
                    frame and overlay saved as evidence (edge.outbox, messages, evidence)
    main thread: watchdog ping while every worker is alive, engine-set reloads

On a CPU the workers are one per core, each running its batch through single-threaded graphs
(``engines.workers``, ``engines.threads``): cores that do not wait for each other keep working
when the sockets, the broker or another process take one of them.
Whichever worker finishes first, batches are published in the order they left the queue, so
results and spooled alarms keep each camera's frame order.

``Daemon.run()`` blocks until ``stop()`` (SIGTERM/SIGINT): ingest stops, the frames already
queued are scored, the alarm spool is delivered (bounded wait), ``offline`` is published.
``reload()`` (SIGHUP) loads the engine set again beside the running one and swaps it in
between two batches, so a new product expert goes live while frames keep flowing. No torch.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable

import numpy as np

from moleflow import __version__
from moleflow.config import Config, ConfigError
from moleflow.edge.frames import Frame, FrameError, decode
from moleflow.edge.health import assess
from moleflow.edge.http import serve_http
from moleflow.edge.ingest import Ingest, Message
from moleflow.edge.lifecycle import load_engines, sd_notify
from moleflow.edge.logs import Throttle
from moleflow.edge.metrics import Metrics
from moleflow.edge.outbox import Outbox
from moleflow.edge.publisher import Publisher
from moleflow.edge.queueing import FairQueue
from moleflow.edge.scada import Scada
from moleflow.edge.spool import AlarmSpool
from moleflow.edge.webstate import web_source
from moleflow.engines.pipeline import Pipeline
from moleflow.engines.runtime import parallelism

log = logging.getLogger("moleflow.daemon")
VERSION = __version__


class Daemon:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.metrics = Metrics()
        self.pipeline = load_engines(cfg)
        self.spool = AlarmSpool(cfg.spool.path, cfg.spool.max_alarms)
        self.publisher = Publisher(cfg.mqtt, self.spool, self._status(), self.metrics)
        self.queue: FairQueue[Message] = FairQueue(cfg.ingest.queue_size, cfg.ingest.cameras,
                                                   cfg.ingest.max_cameras)
        self.started_at = time.monotonic()
        self._threads: list[threading.Thread] = []
        self._log_throttle = Throttle(10.0)  # ingest/decode faults: a line per kind per 10 s
        self.cond = threading.Condition()
        self.stopping = threading.Event()
        self._reload_pending = threading.Event()
        self._wake = threading.Event()  # the main loop's: a reload or a stop is asked for
        self.workers, _ = parallelism(cfg.engines.backend, cfg.engines.workers,
                                      cfg.engines.threads)
        self._heartbeat = [time.monotonic()] * self.workers  # each worker's last loop start
        self._taken = 0          # batches taken from the queue (their sequence numbers)
        self._published = 0      # batches published; later ones wait in _ready
        self._ready: dict[int, list[Callable[[], object]]] = {}
        self._order_lock = threading.Lock()
        self.ingest = Ingest(cfg.ingest, self._enqueue, self._ingest_error)
        self.scada = Scada(self)  # camera products, cmd/ topics, Sparkplug B (edge.scada)
        self.outbox = Outbox(cfg, self.metrics, self.publisher, self.scada, self._ingest_error)
        self.evidence = self.outbox.evidence            # the web page reads these two
        self.recent_alarms = self.outbox.recent_alarms
        self.metrics.collectors.append(lambda: self._gauges(self.health()))
        self._metrics_server = None

    def _status(self) -> dict:
        engines = self.pipeline.engines
        return {"version": VERSION, "device": self.cfg.mqtt.device_id,
                "experts": engines.expert_names(), "backend": engines.backend,
                "precision": engines.precision,
                "calibrated": sorted(engines.calibration)}

    # ----- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        if self.cfg.metrics.port:  # first: a port in use is a config error, before any socket
            try:  # /metrics, /healthz and the read-only page (moleflow.edge.http)
                self._metrics_server = serve_http(web_source(self), self.cfg.metrics.bind,
                                                  self.cfg.metrics.port)
            except OSError as exc:
                raise ConfigError(f"metrics.port: cannot listen on {self.cfg.metrics.bind}:"
                                  f"{self.cfg.metrics.port} ({exc}); choose another port or "
                                  "0 to switch /metrics, /healthz and the page off") from exc
        self.publisher.start()
        self.scada.start()
        self.ingest.start()
        sd_notify("READY=1\nSTATUS=scoring frames")
        log.info("daemon started: experts %s, backend %s, %d scoring workers",
                 self.pipeline.engines.expert_names(), self.pipeline.engines.backend,
                 self.workers)

    def run(self) -> None:
        """Start, score until stopped, then drain. The main thread pings the watchdog while
        every worker is alive and looping, and carries out reloads."""
        self.start()
        threads = [threading.Thread(target=self._work, args=(i,), name=f"score-{i}",
                                    daemon=True) for i in range(self.workers)]
        self._threads = threads
        for t in threads:
            t.start()
        try:
            while not self.stopping.is_set():
                if self._reload_pending.is_set():
                    self._do_reload()
                if self.health()["status"] != "unhealthy":  # every thread alive and looping
                    sd_notify("WATCHDOG=1")
                self._wake.wait(1.0)
                self._wake.clear()
        finally:
            self.shutdown(threads)

    def _work(self, index: int) -> None:
        """One scoring worker: batches until stopped, then its share of the queued frames."""
        while True:
            self._heartbeat[index] = time.monotonic()
            stopping = self.stopping.is_set()
            try:
                n = self.step(timeout=0 if stopping else 0.5)
            except Exception as exc:  # a publishing fault must not end the worker
                self.metrics.inc("errors", kind="worker")
                log.exception("scoring worker %d: unexpected error", index)
                self.publisher.send("events", {"event": "worker_error", "detail": repr(exc),
                                               "time": time.time()})
                n = 1
            if stopping and n == 0:
                return

    def _gauges(self, health: dict) -> None:
        """The health document's numbers as metrics, set as each scrape begins."""
        spool = health["spool"]
        self.metrics.set("healthy", 1.0 if health["healthy"] else 0.0)
        self.metrics.set("mqtt_connected", 1.0 if health["mqtt"]["connected"] else 0.0)
        self.metrics.set("spooled_alarms", float(spool["spooled_alarms"] or 0))
        self.metrics.set("memory_alarms", float(spool["memory_alarms"]))
        self.metrics.set("ingest_connections", float(self.ingest.connections))
        self.metrics.set("ingest_connections_refused", float(self.ingest.refused))

    def loop_age(self) -> float:
        """Seconds since the least recent worker started its current loop."""
        return time.monotonic() - min(self._heartbeat)

    def stop(self) -> None:
        self.stopping.set()
        self._wake.set()
        with self.cond:
            self.cond.notify_all()

    def shutdown(self, threads: list[threading.Thread] | None = None) -> None:
        sd_notify("STOPPING=1")
        self.ingest.stop()
        self.stop()
        for t in threads or []:  # the workers score what was already received
            t.join()
        while self.queue:
            self.step(timeout=0)
        self.scada.stop()  # Sparkplug NDEATH, the command thread
        self.publisher.stop(timeout=5.0)
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
        health = self.publisher.health()["spool"]
        if health["spooled_alarms"]:
            log.warning("%d alarms stay spooled in %s for the next start",
                        health["spooled_alarms"], self.spool.path)
        if health["memory_alarms"]:
            log.error("%d undelivered alarms were only in memory (the spool could not be "
                      "written) and are lost with this stop", health["memory_alarms"])
        self.spool.close()

    def reload(self) -> None:
        """Ask the main loop to load the engine set again (SIGHUP)."""
        self._reload_pending.set()
        self._wake.set()

    def health(self) -> dict:
        """``/healthz``: every thread, its loop, the broker and the spool (moleflow.edge.health)."""
        now = time.monotonic()
        threads = {t.name: t.is_alive() for t in self._threads}
        threads["ingest"] = self.ingest.alive()
        threads.update(self.publisher.threads_alive())
        threads.update(self.scada.threads_alive())
        ages = {"workers": self.loop_age(), "ingest": now - self.ingest.heartbeat,
                "spool-pump": now - self.publisher.heartbeat}
        with self.cond:
            queued = len(self.queue)
        doc = assess(threads, ages, self.publisher.health(), now - self.started_at,
                     self.pipeline.engines.uncalibrated, self.stopping.is_set())
        doc.update(workers=self.workers, queue=queued, mqtt_connected=doc["mqtt"]["connected"],
                   connections=self.ingest.connections,
                   experts=self.pipeline.engines.expert_names())
        return doc

    # ----- ingest side ------------------------------------------------------------------------
    def _enqueue(self, message: Message) -> None:
        """Queue a received message (the ingest thread): cameras past the configured bound
        are refused and reported; a full queue drops the flooding camera's oldest frame."""
        with self.cond:
            admitted = self.queue.admits(message.camera)
            if admitted:
                old = self.queue.put(message.camera, message)
                self.metrics.set("queue_depth", len(self.queue))
                self.cond.notify()
        if not admitted:
            bound = (f"ingest.cameras {list(self.cfg.ingest.cameras)}" if self.cfg.ingest.cameras
                     else f"ingest.max_cameras ({self.cfg.ingest.max_cameras}) reached")
            self._ingest_error("camera_refused", f"{message.source}: camera "
                               f"{message.camera!r} refused ({bound})")
            return
        self.metrics.inc("frames_in", camera=message.camera)
        if old is not None:
            self.metrics.inc("frames_dropped", camera=old.camera, reason="queue_full")

    def _ingest_error(self, kind: str, detail: str) -> None:
        """Count, publish an event and log a problem; the log says each kind at most every
        10 s (with how many were not logged), the events and counters keep every one."""
        self.metrics.inc("errors", kind=kind)
        left_out = self._log_throttle.due(kind)
        if left_out is not None:
            more = f" ({left_out} more since the last line)" if left_out else ""
            log.warning("%s: %s%s", kind, detail, more)
        self.publisher.send("events", {"event": kind, "detail": detail, "time": time.time()})

    # ----- scoring side -----------------------------------------------------------------------
    def step(self, timeout: float) -> int:
        """Score one batch of waiting frames (waiting up to ``timeout`` for one); returns its size."""
        with self.cond:
            if not self.queue and timeout > 0:
                self.cond.wait(timeout)
            messages = self.queue.take(self.cfg.ingest.max_batch)
            self.metrics.set("queue_depth", len(self.queue))
            if not messages:
                return 0
            seq, self._taken = self._taken, self._taken + 1
        actions: list[Callable[[], object]] = []
        try:
            pipeline = self.pipeline  # a reload swaps it between two batches
            batch = [f for f in (self._decode(m, pipeline.engines.size) for m in messages)
                     if f is not None]
            if batch:
                self._score(pipeline, batch, actions)
        finally:
            self._deliver(seq, actions)
        return len(messages)

    def _deliver(self, seq: int, actions: list[Callable[[], object]]) -> None:
        """Publish batches in the order they left the queue, whichever worker finishes first:
        a batch done early waits in ``_ready`` and goes out with the one before it, so
        results and spooled alarms keep the cameras' frame order and no worker waits."""
        with self._order_lock:
            self._ready[seq] = actions
            while self._published in self._ready:
                for act in self._ready.pop(self._published):
                    try:
                        act()
                    except Exception:  # e.g. the spool's disk: report, keep the order going
                        self.metrics.inc("errors", kind="publish")
                        log.exception("publishing failed")
                self._published += 1

    def _decode(self, message: Message, size: int) -> Frame | None:
        """The message's frame, or None with the reason reported: a bad frame costs only
        itself, never the batch it came with."""
        cfg = self.cfg.ingest
        try:
            if message.problem:
                raise FrameError(message.problem)
            return decode(message.parts, size, cfg.max_message_bytes,
                          cfg.max_side, message.received_at, cfg.max_pixels)
        except Exception as exc:  # noqa: BLE001 - FrameError or anything a hostile buffer raises
            reason = str(exc) if isinstance(exc, FrameError) else f"{type(exc).__name__}: {exc}"
            self.metrics.inc("frame_errors", camera=message.camera)  # the page's per camera
            self._ingest_error("bad_frame", f"{message.source} (camera {message.camera}): "
                                            f"{reason}")
            return None

    def _do_reload(self) -> None:
        self._reload_pending.clear()
        before = set(self.pipeline.engines.expert_names())
        try:
            fresh = load_engines(self.cfg)
        except Exception as exc:  # noqa: BLE001 - a bad engine set never stops the daemon
            self.metrics.inc("errors", kind="reload")
            log.error("reload failed, keeping the running engine set: %s", exc)
            self.publisher.send("events", {"event": "reload_failed", "detail": str(exc),
                                           "time": time.time()})
            return
        self.pipeline = fresh
        after = set(fresh.engines.expert_names())
        self.publisher.announce(self._status())
        self.scada.reloaded(self._status())
        event = {"event": "engines_reloaded", "added": sorted(after - before),
                 "removed": sorted(before - after), "experts": sorted(after), "time": time.time()}
        self.publisher.send("events", event, qos=1)
        log.info("engine set reloaded: %s", event)

    def _score(self, pipeline: Pipeline, batch: list[Frame],
               actions: list[Callable[[], object]]) -> None:
        images = np.stack([f.image for f in batch])
        hints = [f.product if f.product in pipeline.engines.experts else None
                 for f in batch]
        for f, h in zip(batch, hints):
            if f.product and h is None:
                self._ingest_error("bad_hint", f"{f.camera}/{f.frame_id}: product {f.product!r} "
                                               "is not an expert; routed instead")
        hints = self.scada.hints(batch, hints, pipeline.engines.experts)  # camera products
        started = time.time()
        try:
            scores = pipeline.score(images, hints)
        except Exception as exc:  # an engine fault must not end the daemon
            self.metrics.inc("errors", kind="engine")
            for f in batch:
                self.metrics.inc("frame_errors", camera=f.camera)
            log.exception("scoring failed for %d frames", len(batch))
            self.publisher.send("events", {"event": "engine_error", "detail": repr(exc),
                                           "frames": [f.frame_id for f in batch],
                                           "time": time.time()})
            return
        done = time.time()
        for frame, score in zip(batch, scores):
            try:
                self.outbox.frame(pipeline, frame, score, started, done, actions)
            except Exception as exc:  # noqa: BLE001 - one frame's fault costs only that frame
                self.metrics.inc("errors", kind="publish")
                log.exception("preparing the messages of %s/%s failed", frame.camera,
                              frame.frame_id)
                actions.append(functools.partial(
                    self.publisher.send, "events",
                    {"event": "publish_error", "detail": repr(exc), "camera": frame.camera,
                     "frames": [frame.frame_id], "time": time.time()}))
