"""The daemon's Prometheus metrics (prometheus-client): one registry per daemon.

Each ``Metrics`` has its own ``CollectorRegistry`` (not the library's global one: a test can
run several daemons in one process). Every metric is declared in ``SPECS`` with its help text,
type and labels; the code counts by short name (``metrics.inc("frames_scored", camera=...)``)
and the exposition carries ``moleflow_<name>`` with Prometheus' suffixes (``_total`` for
counters; ``_bucket``, ``_sum``, ``_count`` for the latency histogram), label values escaped by
the library. The registry also holds the process (CPU, memory, descriptors) and platform
(Python version) collectors. Gauges that mirror the daemon's state, and counters kept by other
objects (refused connections), are set by the ``collectors`` callbacks as each scrape begins.
The ``*_created`` series are switched off (they would double every counter's series).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import NamedTuple

import prometheus_client
from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge,
                               GCCollector, Histogram, PlatformCollector, ProcessCollector,
                               generate_latest)
from prometheus_client.core import CounterMetricFamily

log = logging.getLogger("moleflow.metrics")
prometheus_client.disable_created_metrics()

PREFIX = "moleflow"
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


class Spec(NamedTuple):
    kind: str                           # counter | gauge | histogram | sampled (a counter set)
    help: str
    labels: tuple[str, ...] = ()
    initial: tuple[tuple[str, ...], ...] = ()  # label values shown (at 0) before any count


SPECS: dict[str, Spec] = {
    "frames_in": Spec("counter", "Messages received from an admitted camera", ("camera",)),
    "frames_scored": Spec("counter", "Frames scored by the engine set", ("camera",)),
    "frames_dropped": Spec("counter", "Frames dropped unscored (reason queue_full: scoring "
                           "fell behind)", ("camera", "reason")),
    "frames_unknown": Spec("counter", "Frames of a product the engine set has no expert for",
                           ("camera",)),
    "frames_relit": Spec("counter", "Frames whose light was off their product's and that "
                         "scored lower relit to it (the camera's light or gain drifted)",
                         ("camera",)),
    "alarms": Spec("counter", "Alarms raised (each spooled, then published)", ("camera",)),
    "frame_errors": Spec("counter", "Frames of a camera that could not be scored "
                         "(undecodable, engine fault)", ("camera",)),
    "errors": Spec("counter", "Faults and refused input by kind (bad_frame, camera_refused, "
                   "connection_refused, engine, publish, spool, worker, reload, ...)",
                   ("kind",)),
    "alarms_delivered": Spec("counter", "Alarms the broker acknowledged (QoS 1)"),
    "alarms_unspooled": Spec("counter", "Alarms the spool could not take (kept in memory, "
                             "still published)"),
    "alarms_dropped": Spec("counter", "Alarms dropped undelivered: spool_max_alarms (oldest "
                           "past spool.max_alarms), memory_full (spool unwritable and memory "
                           "full)", ("reason",), (("spool_max_alarms",), ("memory_full",))),
    "mqtt_connects": Spec("counter", "Connections made to the MQTT broker"),
    "mqtt_connect_failures": Spec("counter", "Connection attempts the broker refused or that "
                                  "failed"),
    "mqtt_dropped": Spec("counter", "Results, maps, unknowns and events not sent while "
                         "disconnected from the broker", ("topic",),
                         (("result",), ("map",), ("unknown",), ("events",))),
    "commands": Spec("counter", "Commands on <prefix>/<device>/cmd/...: accepted, rejected, "
                     "dropped (more than 64 waiting)", ("result",)),
    "ingest_connections_refused": Spec("sampled", "Camera connections refused at the "
                                       "ZeroMQ handshake (ingest.max_connections, CURVE)"),
    "healthy": Spec("gauge", "1 when /healthz reports healthy, else 0"),
    "mqtt_connected": Spec("gauge", "1 while connected to the MQTT broker, else 0"),
    "queue_depth": Spec("gauge", "Frames waiting to be scored"),
    "spooled_alarms": Spec("gauge", "Alarms waiting in the disk spool"),
    "memory_alarms": Spec("gauge", "Alarms held in memory because the spool cannot be written"),
    "ingest_connections": Spec("gauge", "Open camera connections over all ingest sockets"),
    "stage_seconds": Spec("histogram", "Latency per stage (backbone, router, expert, light_retry, "
                          "postprocess; total: from receipt to scored)", ("stage",)),
}


class _BeforeScrape:
    """First in the registry: runs the callbacks that set gauges before anything is read."""

    def __init__(self, callbacks: list[Callable[[], None]]) -> None:
        self.callbacks = callbacks

    def describe(self) -> list:
        return []

    def collect(self) -> list:
        for callback in list(self.callbacks):
            try:
                callback()
            except Exception:  # noqa: BLE001 - a failing callback must not fail the scrape
                log.exception("metrics callback %r failed", callback)
        return []


class _Sampled:
    """Counters whose running total another object keeps (``Metrics.set`` stores it)."""

    def __init__(self) -> None:
        self.values: dict[str, dict[tuple[str, ...], float]] = {
            n: {} if s.labels else {(): 0.0} for n, s in SPECS.items() if s.kind == "sampled"}
        self._lock = threading.Lock()

    def set(self, name: str, labels: tuple[str, ...], value: float) -> None:
        with self._lock:
            self.values[name][labels] = value

    def describe(self) -> list:
        return [CounterMetricFamily(f"{PREFIX}_{n}", SPECS[n].help, labels=SPECS[n].labels)
                for n in self.values]

    def collect(self) -> list:
        families = []
        with self._lock:
            for name, series in self.values.items():
                family = CounterMetricFamily(f"{PREFIX}_{name}", SPECS[name].help,
                                             labels=SPECS[name].labels)
                for labels, value in series.items():
                    family.add_metric(list(labels), value)
                families.append(family)
        return families


class Metrics:
    """One daemon's metrics on its own registry; thread-safe. ``render()`` is the exposition
    text served as ``content_type``; ``collectors`` are called as each scrape begins."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.collectors: list[Callable[[], None]] = []
        self.registry.register(_BeforeScrape(self.collectors))
        self._metrics: dict[str, Counter | Gauge | Histogram] = {}
        for name, spec in SPECS.items():
            kind = {"counter": Counter, "gauge": Gauge, "histogram": Histogram}.get(spec.kind)
            if kind is None:
                continue
            extra = {"buckets": BUCKETS} if kind is Histogram else {}
            metric = kind(f"{PREFIX}_{name}", spec.help, spec.labels, registry=self.registry,
                          **extra)
            for values in spec.initial:
                metric.labels(*values)
            self._metrics[name] = metric
        self._sampled = _Sampled()
        self.registry.register(self._sampled)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)

    def _get(self, name: str, *kinds: str):
        spec = SPECS.get(name)
        if spec is None or spec.kind not in kinds:
            raise KeyError(f"metric {name!r} is not a declared {'/'.join(kinds)} (add it to "
                           "moleflow.edge.metrics.SPECS with its help text)")
        return spec

    def _child(self, name: str, labels: dict[str, str]):
        metric = self._metrics[name]
        return metric.labels(**{k: str(v) for k, v in labels.items()}) if labels else metric

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        self._get(name, "counter")
        self._child(name, labels).inc(value)

    def set(self, name: str, value: float, **labels: str) -> None:
        """A gauge's value, or a sampled counter's running total."""
        spec = self._get(name, "gauge", "sampled")
        if spec.kind == "sampled":
            if sorted(labels) != sorted(spec.labels):
                raise ValueError(f"metric {name!r} takes the labels {spec.labels}, "
                                 f"got {sorted(labels)}")
            self._sampled.set(name, tuple(str(labels[k]) for k in spec.labels), float(value))
        else:
            self._child(name, labels).set(value)

    def observe(self, stage: str, seconds: float) -> None:
        self._metrics["stage_seconds"].labels(stage=stage).observe(seconds)

    def _samples(self, name: str) -> list:
        spec = self._get(name, "counter", "gauge", "sampled")
        families = (self._sampled.collect() if spec.kind == "sampled"
                    else self._metrics[name].collect())
        exposed = f"{PREFIX}_{name}" + ("" if spec.kind == "gauge" else "_total")
        return [s for f in families for s in f.samples if s.name == exposed]

    def value(self, name: str, **labels: str) -> float:
        """A counter's or gauge's value for exactly these labels (0 if never counted)."""
        want = {k: str(v) for k, v in labels.items()}
        return float(sum(s.value for s in self._samples(name) if s.labels == want))

    def total(self, name: str) -> float:
        """A counter's or gauge's sum over all its label values."""
        return float(sum(s.value for s in self._samples(name)))

    def series(self, name: str) -> list[tuple[dict[str, str], float]]:
        """Each label set a counter or gauge has, with its value."""
        return [(dict(s.labels), float(s.value)) for s in self._samples(name)]

    def render(self) -> str:
        """The Prometheus text exposition (``content_type``), after the ``collectors`` ran."""
        return generate_latest(self.registry).decode()

