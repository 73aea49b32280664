"""The alarm publisher and its spool under faults, against a real Mosquitto: the MQTT
message-id wrap, a spool that cannot be written or deleted from, alarms past max_alarms, strict
JSON payloads, and the health rules."""

from __future__ import annotations

import logging
import signal
import sqlite3
import time
from pathlib import Path

import pytest

from moleflow.config import load_config
from moleflow.edge.health import assess
from moleflow.edge.publisher import Publisher, strict_json
from moleflow.edge.spool import AlarmSpool

from tests.daemon_helpers import (Listener, free_port, strict_loads,
                                  wait_until)

pytestmark = pytest.mark.mosquitto


# ----- MQTT: message-id wrap, spool faults ---------------------------------------------------
def make_publisher(broker_port: int, tmp_path: Path, **spool_kw) -> Publisher:
    cfg = load_config(None, {"mqtt.port": broker_port, "mqtt.device_id": "line9"}).mqtt
    spool = AlarmSpool(tmp_path / "spool.sqlite", **spool_kw)
    pub = Publisher(cfg, spool, {"experts": []})
    pub.start()
    assert pub.connected.wait(10)
    return pub


def test_alarms_stay_spooled_until_acknowledged_after_70000_qos0_messages(broker, tmp_path):
    """paho's 16-bit message ids wrap after 65,535 messages; QoS 0 results must never be
    mistaken for an alarm's acknowledgement (a paused broker acknowledges nothing)."""
    listener = Listener(broker.port, "moleflow/line9/+/alarm")
    pub = make_publisher(broker.port, tmp_path)
    try:
        for i in range(70_500):
            assert pub.send("cam/result", b'{"n": %d}' % i)
        pub.client.publish("moleflow/line9/flush", b"", qos=1).wait_for_publish(30)
        broker.proc.send_signal(signal.SIGSTOP)
        try:
            for i in range(3):
                pub.alarm("cam", {"frame": str(i), "time": time.time()})
            time.sleep(3.0)
            assert len(pub.spool) == 3  # nothing acknowledged: nothing forgotten
            assert pub.metrics.total("alarms_delivered") == 0
        finally:
            broker.proc.send_signal(signal.SIGCONT)
        wait_until(lambda: len(pub.spool) == 0, 30, "alarms acknowledged after SIGCONT")
        got = listener.wait_for("/alarm", 3)
        assert sorted(a["frame"] for a in got)[:3] == ["0", "1", "2"]
    finally:
        pub.stop()
        listener.close()


class FullDisk:
    """An sqlite connection whose statements starting with ``fail`` raise as on a full or
    failing filesystem (what sqlite3 raises then)."""

    def __init__(self, db, fail: tuple[str, ...] = ("INSERT",),
                 error: str = "database or disk is full") -> None:
        self.db, self.fail, self.error = db, fail, error

    def execute(self, sql, *args):
        if sql.startswith(self.fail):
            raise sqlite3.OperationalError(self.error)
        return self.db.execute(sql, *args)

    def close(self):
        self.db.close()


def test_a_full_spool_still_publishes_counts_and_reports(broker, tmp_path, caplog):
    listener = Listener(broker.port, "moleflow/line9/#")
    pub = make_publisher(broker.port, tmp_path)
    pub.spool._db = FullDisk(pub.spool._db)
    try:
        with caplog.at_level(logging.ERROR, logger="moleflow.mqtt"):
            for i in range(5):
                pub.alarm("cam", {"frame": str(i), "time": time.time()})
        got = listener.wait_for("cam/alarm", 5)
        assert [a["frame"] for a in got] == ["0", "1", "2", "3", "4"]
        assert pub.metrics.total("alarms_unspooled") == 5
        wait_until(lambda: pub.metrics.total("alarms_delivered") == 5, 10, "acknowledged")
        assert "database or disk is full" in caplog.text
        assert listener.wait_for("/events", 1)[0]["event"] == "spool_error"
        health = pub.health()["spool"]
        assert not health["ok"] and "disk is full" in health["error"]
        assert health["memory_alarms"] == 0
    finally:
        pub.stop()
        listener.close()


def test_a_failing_delete_keeps_mqtt_alive_and_reconnecting(broker, tmp_path):
    """An acknowledgement whose delete fails used to raise on paho's network thread (no more
    reconnects). Now the alarm stays spooled (sent again, not lost) and the client reconnects."""
    listener = Listener(broker.port, "moleflow/line9/+/alarm")
    pub = make_publisher(broker.port, tmp_path)
    pub.spool._db = FullDisk(pub.spool._db, fail=("DELETE",), error="disk I/O error")
    try:
        pub.alarm("cam", {"frame": "d1"})
        listener.wait_for("/alarm", 1)
        wait_until(lambda: pub.metrics.value("errors", kind="spool") >= 1, 10, "delete failed")
        assert pub.threads_alive() == {"spool-pump": True, "mqtt-network": True}
        broker.stop()
        wait_until(lambda: not pub.connected.is_set(), 10, "disconnect noticed")
        broker.start()
        assert pub.connected.wait(40), "MQTT did not reconnect"
        assert len(pub.spool) == 1
        listener.wait_for("/alarm", 2)  # published again on the new connection
    finally:
        pub.stop()
        listener.close()


def test_alarms_dropped_past_max_alarms_are_counted_and_logged(tmp_path, caplog):
    cfg = load_config(None, {"mqtt.port": free_port()}).mqtt  # nobody listens: all spooled
    pub = Publisher(cfg, AlarmSpool(tmp_path / "s.sqlite", max_alarms=10), {})
    with caplog.at_level(logging.ERROR, logger="moleflow.mqtt"):
        for i in range(13):
            pub.alarm("cam", {"frame": str(i)})
    assert len(pub.spool) == 10
    assert pub.metrics.value("alarms_dropped", reason="spool_max_alarms") == 3
    assert "spool.max_alarms 10" in caplog.text


def test_payloads_are_strict_json() -> None:
    text = strict_json({"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": -float("inf")}})
    assert strict_loads(text.encode()) == {"a": None, "b": [1.0, None], "c": {"d": None}}


# ----- health tells the truth -------------------------------------------------------------------
def test_health_rules() -> None:
    io = {"mqtt": {"connected": True, "error": None, "for_s": None},
          "spool": {"ok": True, "error": None, "memory_alarms": 0}}
    ok = assess({"ingest": True}, {"ingest": 0.1}, io, 100.0, [], False)
    assert ok["status"] == "healthy" and ok["reasons"] == []
    dead = assess({"ingest": False}, {"ingest": 0.1}, io, 100.0, [], False)
    assert dead["status"] == "unhealthy" and "thread ingest is not running" in dead["reasons"]
    stuck = assess({"ingest": True}, {"ingest": 12.0}, io, 100.0, [], False)
    assert stuck["status"] == "unhealthy"
    down = dict(io, mqtt={"connected": False, "error": "cannot connect", "for_s": 3})
    assert assess({}, {}, down, 1.0, [], False)["status"] == "degraded"
    assert assess({}, {}, io, 1.0, ["beta"], False)["reasons"] == [
        "experts without calibration (no alarms): beta"]
