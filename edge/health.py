"""What ``/healthz`` and the systemd watchdog say, from the daemon's parts.

``unhealthy``: a thread the daemon needs is dead or stuck (ingest, the alarm pump, paho's
network thread, a scoring worker) — the watchdog stops being pinged, so systemd restarts the
service. ``degraded``: the daemon works but something an operator must fix is wrong (the broker
unreachable or refusing, the alarm spool unwritable, experts without calibration) — reported
with the reason, the watchdog keeps being pinged (a restart would not fix a broker). ``/healthz``
answers 200 only when ``healthy``.
"""

from __future__ import annotations

STUCK_S = 10.0          # a loop that has not come round for this long is stuck
MQTT_GRACE_S = 10.0     # no broker this long after start (without a reported cause) degrades


def assess(threads: dict[str, bool], ages: dict[str, float], io: dict, uptime_s: float,
           uncalibrated: list[str], stopping: bool) -> dict:
    """The health document: ``status``, ``healthy``, ``reasons`` and the parts' states."""
    problems = [f"thread {name} is not running" for name, ok in sorted(threads.items()) if not ok]
    problems += [f"{name} loop stuck for {age:.0f} s" for name, age in sorted(ages.items())
                 if age >= STUCK_S]
    if stopping:
        problems.append("stopping")
    warnings = []
    mqtt, spool = io["mqtt"], io["spool"]
    if not mqtt["connected"] and (mqtt["error"] or uptime_s >= MQTT_GRACE_S):
        warnings.append(f"mqtt: {mqtt['error'] or 'not connected'}")
    if not spool["ok"]:
        warnings.append(f"spool: {spool['error']}")
    elif spool["memory_alarms"]:
        warnings.append(f"spool: {spool['memory_alarms']} alarms held in memory")
    if uncalibrated:
        warnings.append(f"experts without calibration (no alarms): {', '.join(uncalibrated)}")
    status = "unhealthy" if problems else "degraded" if warnings else "healthy"
    return {"status": status, "healthy": status == "healthy", "reasons": problems + warnings,
            "threads": threads, "loop_age_s": {k: round(v, 3) for k, v in ages.items()},
            **io}
