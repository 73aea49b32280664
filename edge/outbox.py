"""A scored frame's messages, in the order they must go out.

``Outbox.frame`` counts the frame and appends its messages to the batch's ``actions`` (the
daemon runs them in queue order): the result (and ``unknown``), the SCADA side's copy, for an
alarm its regions and evidence files (edge.evidence; never at the alarm's cost) and the spooled
alarm, and the anomaly map when one is due (edge.messages builds the payloads).
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable
from typing import Any

import numpy as np

from moleflow.config import Config
from moleflow.edge.evidence import EvidenceStore
from moleflow.edge.frames import Frame
from moleflow.edge.messages import (MapThrottle, alarm_evidence, alarm_regions, map_png,
                                    result_payload)
from moleflow.edge.metrics import Metrics
from moleflow.edge.publisher import Publisher
from moleflow.engines.pipeline import FrameScore, Pipeline

Actions = list[Callable[[], object]]


class Outbox:
    def __init__(self, cfg: Config, metrics: Metrics, publisher: Publisher, scada: Any,
                 report: Callable[[str, str], None]) -> None:
        self.cfg, self.metrics, self.publisher, self.scada = cfg, metrics, publisher, scada
        self.report = report  # (kind, detail): counted, logged (throttled), an event
        self.maps = MapThrottle(cfg.mqtt.map_interval)
        self.evidence = EvidenceStore(cfg.evidence)  # alarm frames + overlays (the web page's)
        self.recent_alarms: collections.deque[dict] = collections.deque(maxlen=50)

    def frame(self, pipeline: Pipeline, frame: Frame, s: FrameScore, started: float,
              done: float, actions: Actions) -> None:
        """Metrics now; the frame's messages are appended to ``actions`` (sent in order)."""
        cam, send = frame.camera, self.publisher.send
        result = result_payload(self.cfg.mqtt.device_id, frame, s, started, done)
        self._count(cam, s, done - frame.received_at)
        map_due = self.maps.due(cam, done)
        if map_due:
            result["map"] = True  # this frame's map goes out on <camera>/map
        actions.append(functools.partial(send, f"{cam}/result", result))
        cal = pipeline.engines.calibration.get(s.expert)
        actions.append(functools.partial(self.scada.frame, result, cal and cal.threshold))
        if s.unknown:
            actions.append(functools.partial(send, f"{cam}/unknown", result))
        if not (s.anomalous or map_due):
            return
        amap = pipeline.anomaly_map(s.patch_nll)
        if s.anomalous:
            alarm = {**result, "regions": alarm_regions(amap, cal.map_threshold)}
            alarm["evidence"] = self._evidence(frame, amap, cal, alarm, actions)
            actions.append(functools.partial(self._alarm, cam, alarm))
        png = map_png(amap, cal, frame, done) if map_due else None
        if png is not None:
            actions.append(functools.partial(send, f"{cam}/map", png))

    def _count(self, camera: str, s: FrameScore, total: float) -> None:
        self.metrics.inc("frames_scored", camera=camera)
        self.metrics.observe("total", total)
        for stage, v in s.timings.items():
            self.metrics.observe(stage, v)
        if s.unknown:
            self.metrics.inc("frames_unknown", camera=camera)
        if s.relit:
            self.metrics.inc("frames_relit", camera=camera)

    def _evidence(self, frame: Frame, amap: np.ndarray, cal, alarm: dict,
                  actions: Actions) -> dict | None:
        """The alarm's evidence files (None when off or when they cannot be written: the
        reason is logged, counted and reported, and the alarm goes out all the same)."""
        snapshot = self.cfg.evidence.publish_snapshot
        try:
            evidence, jpeg = alarm_evidence(self.evidence, frame, amap, cal, alarm, snapshot)
        except Exception as exc:  # noqa: BLE001 - evidence never costs an alarm
            self.report("evidence_error", f"{frame.camera}/{frame.frame_id}: alarm sent "
                                          f"without evidence: {exc}")
            return None
        if jpeg is not None:
            actions.append(functools.partial(self.publisher.send, f"{frame.camera}/snapshot",
                                             jpeg))
        return evidence

    def _alarm(self, camera: str, payload: dict) -> None:
        self.publisher.alarm(camera, payload)  # spooled first: none is lost
        self.recent_alarms.append(payload)
        self.metrics.inc("alarms", camera=camera)
