"""MQTT out (paho-mqtt 2.x): status with a last will, results, alarms through the disk spool.

Topics under ``<prefix>/<device_id>``: ``status`` (retained; ``online`` on connect,
``offline`` as the last will and on a clean stop), ``<camera>/result`` (QoS 0),
``<camera>/alarm`` (QoS 1, spooled), ``<camera>/map`` (PNG), ``<camera>/unknown``, ``events``.
The client reconnects on its own (``connect_async`` + ``loop_start``, back-off 1–30 s). Alarms
are written to the spool first and deleted when the broker acknowledges them; a single pump
publishes the spool in order whenever connected, so alarms raised during an outage go out
first and in order. Results, maps and events are dropped (and counted) while disconnected.
"""

from __future__ import annotations

import json
import logging
import os
import threading
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
        self.client.connect_async(self.cfg.host, self.cfg.port, self.cfg.keepalive)
        self.client.loop_start()

    def stop(self, timeout: float = 5.0) -> None:
        """Deliver what the spool holds (up to ``timeout``), publish ``offline``, disconnect."""
        if self.connected.is_set():
            self.pump()
            deadline = threading.Event()
            for _ in range(int(timeout * 20)):
                if len(self.spool) == 0:
                    break
                deadline.wait(0.05)
            info = self.client.publish(f"{self.root}/status", json.dumps({"state": "offline"}),
                                       qos=1, retain=True)
            info.wait_for_publish(timeout=2.0)
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.warning("MQTT broker %s:%d refused the connection: %s", self.cfg.host,
                        self.cfg.port, reason_code)
            return
        log.info("MQTT connected to %s:%d", self.cfg.host, self.cfg.port)
        with self._lock:
            self._inflight.clear()
            self._sent.clear()
        self.connected.set()
        self.counters["mqtt_connects"] = self.counters.get("mqtt_connects", 0) + 1
        client.publish(f"{self.root}/status", json.dumps({"state": "online", **self.status}),
                       qos=1, retain=True)
        threading.Thread(target=self.pump, name="spool-pump", daemon=True).start()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        if self.connected.is_set():
            log.warning("MQTT disconnected (%s); alarms are spooled until it is back",
                        reason_code)
        self.connected.clear()

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self._lock:
            row = self._inflight.pop(mid, None)
        if row is not None:
            self.spool.ack(row)
            self.counters["alarms_delivered"] = self.counters.get("alarms_delivered", 0) + 1
            self.pump()

    # ----- publishing ------------------------------------------------------------------------
    def alarm(self, camera: str, payload: dict) -> None:
        """Spool an alarm, then let the pump publish it in order."""
        self.spool.put(f"{self.root}/{camera}/alarm", json.dumps(payload).encode())
        self.pump()

    def pump(self) -> None:
        """Publish spooled alarms oldest first, keeping at most MAX_INFLIGHT unacknowledged."""
        if not self.connected.is_set():
            return
        with self._lock:
            room = MAX_INFLIGHT - len(self._inflight)
            if room <= 0:
                return
            for row, topic, payload in self.spool.pending(limit=room + len(self._sent)):
                if row in self._sent:
                    continue
                info = self.client.publish(topic, payload, qos=1)
                if info.rc != 0:  # not connected after all: the rows stay spooled
                    break
                self._inflight[info.mid] = row
                self._sent.add(row)
                room -= 1
                if room <= 0:
                    break

    def send(self, suffix: str, payload: bytes | str | dict, qos: int = 0) -> bool:
        """Publish a result, map, unknown or event; False (counted) while disconnected."""
        if not self.connected.is_set():
            key = suffix.rsplit("/", 1)[-1] + "_dropped"
            self.counters[key] = self.counters.get(key, 0) + 1
            return False
        if isinstance(payload, dict):
            payload = json.dumps(payload)
        return self.client.publish(f"{self.root}/{suffix}", payload, qos=qos).rc == 0
