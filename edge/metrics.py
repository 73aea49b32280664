"""Prometheus text metrics and a health endpoint, from the standard library only."""

from __future__ import annotations

import threading
from typing import Callable

BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


class Metrics:
    """Counters by (name, labels) and latency histograms per stage; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counters: dict[tuple[str, tuple], float] = {}
        self.gauges: dict[tuple[str, tuple], float] = {}
        self.hist: dict[str, list[float]] = {}       # stage -> bucket counts + [sum, count]
        self.collectors: list[Callable[[], None]] = []  # set gauges just before each scrape

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self.counters[key] = self.counters.get(key, 0.0) + value

    def set(self, name: str, value: float, **labels: str) -> None:
        with self._lock:
            self.gauges[(name, tuple(sorted(labels.items())))] = value

    def observe(self, stage: str, seconds: float) -> None:
        with self._lock:
            h = self.hist.setdefault(stage, [0.0] * (len(BUCKETS) + 2))
            for i, b in enumerate(BUCKETS):
                if seconds <= b:
                    h[i] += 1
            h[-2] += seconds
            h[-1] += 1

    def value(self, name: str, **labels: str) -> float:
        with self._lock:
            return self.counters.get((name, tuple(sorted(labels.items()))), 0.0)

    def total(self, name: str) -> float:
        with self._lock:
            return sum(v for (n, _), v in self.counters.items() if n == name)

    def render(self) -> str:
        for collect in self.collectors:  # outside the lock: collectors call set()
            collect()
        def fmt(labels: tuple) -> str:
            return "{" + ",".join(f'{k}="{v}"' for k, v in labels) + "}" if labels else ""
        lines = []
        with self._lock:
            for kind, table in (("counter", self.counters), ("gauge", self.gauges)):
                for name in sorted({n for n, _ in table}):
                    lines.append(f"# TYPE moleflow_{name} {kind}")
                    for (n, labels), v in sorted(table.items()):
                        if n == name:
                            lines.append(f"moleflow_{name}{fmt(labels)} {v:g}")
            if self.hist:
                lines.append("# TYPE moleflow_stage_seconds histogram")
            for stage, h in sorted(self.hist.items()):
                for b, c in zip(BUCKETS, h):
                    lines.append(f'moleflow_stage_seconds_bucket{{stage="{stage}",le="{b}"}} {c:g}')
                lines.append(f'moleflow_stage_seconds_bucket{{stage="{stage}",le="+Inf"}} '
                             f'{h[-1]:g}')
                lines.append(f'moleflow_stage_seconds_sum{{stage="{stage}"}} {h[-2]:g}')
                lines.append(f'moleflow_stage_seconds_count{{stage="{stage}"}} {h[-1]:g}')
        return "\n".join(lines) + "\n"

