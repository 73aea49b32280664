"""MQTT out (paho-mqtt 2.x): status with a last will, results, alarms through the disk spool.

Topics under ``<prefix>/<device_id>``: ``status`` (retained; ``online`` on connect,
``offline`` as the last will and on a clean stop), ``<camera>/result`` (QoS 0),
``<camera>/alarm`` (QoS 1, spooled), ``<camera>/map`` (PNG), ``<camera>/unknown``, ``events``.
The client reconnects on its own (``connect_async`` + ``loop_start``, back-off 1–30 s). Alarms
are written to the spool first and deleted when the broker acknowledges them; one pump thread
publishes the spool in order whenever connected, so alarms raised during an outage go out
first and in order. Results, maps and events are dropped (and counted) while disconnected.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import Any

from edge.config import MqttConfig
from edge.errors import MoleflowError
from edge.spool import AlarmSpool

log = logging.getLogger("moleflow.mqtt")
MAX_INFLIGHT = 100


class MqttError(MoleflowError, RuntimeError):
    """The MQTT client cannot be set up (bad TLS file, missing package)."""


class Publisher:
    def __init__(self, cfg: MqttConfig, spool: AlarmSpool, status: dict[str, Any],
                 counters: dict[str, float] | None = None) -> None:
        try:
            import paho.mqtt.client as mqtt
        except ImportError as exc:
            raise MqttError("the daemon needs paho-mqtt >= 2 (pip install '.[edge]')") from exc
        self.cfg, self.spool, self.status = cfg, spool, dict(status)
        self.root = f"{cfg.prefix}/{cfg.device_id}"
        self.counters = counters if counters is not None else {}
        self.connected = threading.Event()
        self._lock = threading.Lock()
        self._inflight: dict[int, int] = {}    # MQTT message id -> spool row id
        self._sent: set[int] = set()           # spool rows published on this connection
        self._acked: set[int] = set()          # message ids acknowledged before being recorded
        self._announce = False
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._pump_thread = threading.Thread(target=self._pump, name="spool-pump", daemon=True)
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                             client_id=f"moleflow-{cfg.device_id}", protocol=mqtt.MQTTv311)
        client.will_set(f"{self.root}/status", json.dumps({"state": "offline"}), qos=1,
                        retain=True)
        if cfg.username:
            client.username_pw_set(cfg.username, os.environ.get(cfg.password_env))
        if cfg.tls:
            try:
                client.tls_set(ca_certs=cfg.ca_file)
            except (OSError, ValueError) as exc:
                raise MqttError(f"mqtt.ca_file: cannot set up TLS ({exc})") from exc
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.max_inflight_messages_set(MAX_INFLIGHT)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        self.client = client

    # ----- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self._pump_thread.start()
        self.client.connect_async(self.cfg.host, self.cfg.port, self.cfg.keepalive)
        self.client.loop_start()

    def stop(self, timeout: float = 5.0) -> None:
        """Deliver what the spool holds (up to ``timeout``), publish ``offline``, disconnect."""
        if self.connected.is_set():
            self._wake.set()
            deadline = time.monotonic() + timeout
            while len(self.spool) and time.monotonic() < deadline:
                time.sleep(0.05)
            info = self.client.publish(f"{self.root}/status", json.dumps({"state": "offline"}),
                                       qos=1, retain=True)
            try:
                info.wait_for_publish(timeout=2.0)
            except RuntimeError:  # the connection went away meanwhile
                pass
        self._closing.set()
        self._wake.set()
        self._pump_thread.join(timeout=5)
        self.client.disconnect()
        self.client.loop_stop()

    # paho calls these on its network thread, holding its own locks: they only record state
    # and wake the pump; they never publish or wait (that could deadlock against publish()).
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.warning("MQTT broker %s:%d refused the connection: %s", self.cfg.host,
                        self.cfg.port, reason_code)
            return
        log.info("MQTT connected to %s:%d", self.cfg.host, self.cfg.port)
        with self._lock:
            self._inflight.clear()
            self._sent.clear()
            self._acked.clear()
            self._announce = True
        self.connected.set()
        self.counters["mqtt_connects"] = self.counters.get("mqtt_connects", 0) + 1
        self._wake.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        if self.connected.is_set():
            log.warning("MQTT disconnected (%s); alarms are spooled until it is back",
                        reason_code)
        self.connected.clear()

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self._lock:
            row = self._inflight.pop(mid, None)
            if row is None:
                self._acked.add(mid)  # acknowledged before the pump recorded it
                return
        self.spool.ack(row)
        self.counters["alarms_delivered"] = self.counters.get("alarms_delivered", 0) + 1
        self._wake.set()

    # ----- publishing ------------------------------------------------------------------------
    def announce(self, status: dict[str, Any]) -> None:
        """Replace the retained ``online`` status (e.g. after experts were added)."""
        with self._lock:
            self.status = dict(status)
            self._announce = True
        self._wake.set()

    def alarm(self, camera: str, payload: dict) -> None:
        """Spool an alarm; the pump publishes the spool in order."""
        self.spool.put(f"{self.root}/{camera}/alarm", json.dumps(payload).encode())
        self._wake.set()

    def _pump(self) -> None:
        """Publish the status after each connect, then spooled alarms oldest first, keeping at
        most MAX_INFLIGHT unacknowledged."""
        while not self._closing.is_set():
            self._wake.wait(1.0)
            self._wake.clear()
            if not self.connected.is_set():
                continue
            with self._lock:
                announce, self._announce = self._announce, False
            if announce:
                self.client.publish(f"{self.root}/status",
                                    json.dumps({"state": "online", **self.status}), qos=1,
                                    retain=True)
            with self._lock:
                room = MAX_INFLIGHT - len(self._inflight)
                rows = [r for r in self.spool.pending(limit=max(0, room) + len(self._sent))
                        if r[0] not in self._sent][:max(0, room)]
                self._sent.update(r[0] for r in rows)
            for row, topic, payload in rows:
                info = self.client.publish(topic, payload, qos=1)
                if info.rc != 0:  # not connected after all: the row stays spooled
                    with self._lock:
                        self._sent.discard(row)
                    continue
                with self._lock:
                    acked = info.mid in self._acked
                    self._acked.discard(info.mid)
                    if not acked:
                        self._inflight[info.mid] = row
                if acked:
                    self.spool.ack(row)
                    self.counters["alarms_delivered"] = \
                        self.counters.get("alarms_delivered", 0) + 1

    def send(self, suffix: str, payload: bytes | str | dict, qos: int = 0) -> bool:
        """Publish a result, map, unknown or event; False (counted) while disconnected."""
        if not self.connected.is_set():
            key = suffix.rsplit("/", 1)[-1] + "_dropped"
            self.counters[key] = self.counters.get(key, 0) + 1
            return False
        if isinstance(payload, dict):
            payload = json.dumps(payload)
        return self.client.publish(f"{self.root}/{suffix}", payload, qos=qos).rc == 0
