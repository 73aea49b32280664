"""What the daemon's web page shows, gathered from the daemon's parts for ``moleflow.edge.http``.

``web_source(daemon)`` hands the HTTP server a ``WebSource`` of small callables: the server
never holds the daemon itself. Parts a daemon may not have (the recent alarms, the evidence
store) read as empty: no alarms listed, every evidence name 404.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from moleflow.edge.http import WebSource
from moleflow.edge.queueing import UNPARSED

#: per-camera counters on the page: (field, metric name, its other labels)
CAMERA_COUNTERS = (("frames_in", "frames_in", {}), ("frames_scored", "frames_scored", {}),
                   ("alarms", "alarms", {}), ("unknown", "frames_unknown", {}),
                   ("dropped", "frames_dropped", {"reason": "queue_full"}),
                   ("errors", "frame_errors", {}))
MAX_ALARMS = 50


def camera_counters(daemon: Any) -> list[dict]:
    """One row per camera the daemon admitted, in name order; then ``?`` for messages too
    broken to name a camera, if there were any."""
    with daemon.cond:
        cameras = sorted(daemon.queue.cameras())
    if daemon.metrics.value("frames_in", camera=UNPARSED):  # messages naming no camera
        cameras.append(UNPARSED)
    rows = []
    for cam in cameras:
        row: dict[str, Any] = {"camera": cam}
        for field, metric, labels in CAMERA_COUNTERS:
            row[field] = int(daemon.metrics.value(metric, camera=cam, **labels))
        rows.append(row)
    return rows


def experts(daemon: Any) -> list[dict]:
    """The running engine set's experts with their calibration (None where uncalibrated)."""
    engines = daemon.pipeline.engines
    rows = []
    for name in engines.expert_names():
        cal = engines.calibration.get(name)
        row: dict[str, Any] = {"name": name, "calibrated": cal is not None}
        if cal is not None:
            row.update(threshold=cal.threshold, map_threshold=cal.map_threshold,
                       false_alarm_rate=cal.false_alarm_rate, unknown_rate=cal.unknown_rate,
                       n_images=cal.n_images, codec=getattr(cal, "codec", None))
        rows.append(row)
    return rows


def status(daemon: Any) -> dict:
    """``/api/status``: the daemon's status, its health, the cameras and the experts."""
    health = daemon.health()
    doc = dict(daemon._status())
    doc.update(uptime_s=round(time.monotonic() - daemon.started_at, 1),
               mqtt_connected=bool(health.get("mqtt_connected")), time=time.time())
    return {"status": doc, "health": health, "cameras": camera_counters(daemon),
            "experts": experts(daemon)}


def recent_alarms(daemon: Any) -> list[dict]:
    """The latest alarm payloads, newest first (none before the daemon keeps any)."""
    kept = getattr(daemon, "recent_alarms", None)
    if not kept:
        return []
    for _ in range(3):  # a worker may append while we copy
        try:
            items = list(kept)
            break
        except RuntimeError:
            continue
    else:
        return []
    return items[::-1][:MAX_ALARMS]


def evidence_path(daemon: Any, name: str) -> Path | None:
    store = getattr(daemon, "evidence", None)
    path_of = getattr(store, "path_of", None)
    return path_of(name) if callable(path_of) else None


def web_source(daemon: Any) -> WebSource:
    return WebSource(status=lambda: status(daemon), health=daemon.health,
                     alarms=lambda: recent_alarms(daemon),
                     evidence=lambda name: evidence_path(daemon, name), metrics=daemon.metrics)
