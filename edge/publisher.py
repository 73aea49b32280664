"""MQTT out (paho-mqtt 2.x): status with a last will, results, alarms through the disk spool.

Topics under ``<prefix>/<device_id>``: ``status`` (retained; ``online`` on connect,
``offline`` as the last will and on a clean stop), ``<camera>/result`` (QoS 0),
``<camera>/alarm`` (QoS 1, spooled), ``<camera>/map`` (PNG), ``<camera>/unknown``,
``<camera>/snapshot`` (JPEG), ``events``.
The client reconnects on its own (``connect_async`` + ``loop_start``, back-off 1–30 s).

Alarms are written to the spool first and deleted when the broker has acknowledged them; one
pump thread publishes the spool in order whenever connected, so alarms raised during an outage
go out first and in order. The pump keeps each alarm's own ``MQTTMessageInfo`` and deletes the
row only when that very publication is acknowledged: message ids are never matched, so neither
the QoS 0 traffic nor paho's 16-bit id wrap-around can retire an alarm early, and everything is
forgotten on a new connection (the spool is published again: twice rather than never). An alarm
the spool cannot take (a full disk) is kept in memory and published all the same, counted and
reported. Results, maps and events are dropped (and counted) while disconnected.

paho's callbacks only record state and wake the pump; they never raise (an exception there
would end paho's network thread and with it every reconnect). Payloads are strict JSON: a NaN
or an infinity becomes ``null``.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import sys
import threading
import time
from typing import Any

from moleflow.config import MqttConfig
from moleflow.errors import MoleflowError
from moleflow.edge.logs import Throttle
from moleflow.edge.metrics import Metrics
from moleflow.edge.spool import AlarmSpool, SpoolError
from moleflow.edge.wirejson import strict_json

log = logging.getLogger("moleflow.mqtt")
MAX_INFLIGHT = 100
MAX_MEMORY_ALARMS = 10000   # alarms held in memory while the spool cannot be written
LOG_EVERY_S = 60.0          # a fault that persists is logged again this often


class MqttError(MoleflowError, RuntimeError):
    """The MQTT client cannot be set up (bad TLS file, missing package)."""


class Fault:
    """The latest fault of one component: what it was, since when, logged at most once a
    minute while it lasts (a broker that stays away must not flood the journal)."""

    def __init__(self, name: str) -> None:
        self.name, self.reason, self.since = name, None, None
        self._lock = threading.Lock()
        self._throttle = Throttle(LOG_EVERY_S)

    def set(self, reason: str) -> None:
        now = time.monotonic()
        with self._lock:
            changed = reason != self.reason
            self.reason = reason
            self.since = self.since if self.since is not None else now
        if self._throttle.due(self.name, force=changed) is not None:
            log.error("%s: %s", self.name, reason)

    def clear(self) -> None:
        with self._lock:
            was, self.reason, self.since = self.reason, None, None
        if was:
            log.info("%s: recovered (was: %s)", self.name, was)

    def state(self) -> dict:
        with self._lock:
            age = None if self.since is None else round(time.monotonic() - self.since, 1)
            return {"error": self.reason, "for_s": age}


class Publisher:
    def __init__(self, cfg: MqttConfig, spool: AlarmSpool, status: dict[str, Any],
                 metrics: Metrics | None = None) -> None:
        try:
            import paho.mqtt.client as mqtt
        except ImportError as exc:
            raise MqttError("the daemon needs paho-mqtt >= 2 (pip install '.[edge]')") from exc
        self.cfg, self.spool, self.status = cfg, spool, dict(status)
        self.root = f"{cfg.prefix}/{cfg.device_id}"
        self.metrics = metrics if metrics is not None else Metrics()
        self.connected = threading.Event()
        self.started_at = time.monotonic()
        self.mqtt_fault, self.spool_fault = Fault("MQTT"), Fault("alarm spool")
        self.heartbeat = time.monotonic()
        self._lock = threading.Lock()
        self._inflight: dict[int, Any] = {}   # alarm key -> its MQTTMessageInfo (this connection)
        self._sent: set[int] = set()          # alarm keys published on this connection
        self._memory: collections.OrderedDict[int, tuple[str, bytes]] = \
            collections.OrderedDict()          # alarms the spool could not take (keys < 0)
        self._memory_key = 0
        self._announce = False
        self._wake = threading.Event()
        self.subscriptions: dict[str, Any] = {}  # topic filter -> on_message (subscribe())
        self._closing = threading.Event()
        self._pump_thread = threading.Thread(target=self._pump, name="spool-pump", daemon=True)
        self.client = self._client(mqtt)

    def _client(self, mqtt):
        cfg = self.cfg
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2,
                             client_id=f"moleflow-{cfg.device_id}", protocol=mqtt.MQTTv311)
        client.will_set(f"{self.root}/status", json.dumps({"state": "offline"}), qos=1,
                        retain=True)
        if cfg.username:
            client.username_pw_set(cfg.username, os.environ.get(cfg.password_env))
        if (cfg.cert_file is None) != (cfg.key_file is None):
            raise MqttError("mqtt.cert_file and mqtt.key_file go together (client certificate "
                            "and its key)")
        if cfg.tls:
            try:
                client.tls_set(ca_certs=cfg.ca_file, certfile=cfg.cert_file,
                               keyfile=cfg.key_file)
            except (OSError, ValueError) as exc:
                raise MqttError(f"mqtt.ca_file/cert_file/key_file: cannot set up TLS "
                                f"({exc})") from exc
        elif cfg.cert_file:
            raise MqttError("mqtt.cert_file needs mqtt.tls: true")
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.max_inflight_messages_set(MAX_INFLIGHT)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        return client

    # ----- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self._pump_thread.start()
        log.info("MQTT connecting to %s:%d%s", self.cfg.host, self.cfg.port,
                 " (TLS)" if self.cfg.tls else "")
        self.client.connect_async(self.cfg.host, self.cfg.port, self.cfg.keepalive)
        self.client.loop_start()

    def stop(self, timeout: float = 5.0) -> None:
        """Deliver what the spool holds (up to ``timeout``), publish ``offline``, disconnect."""
        if self.connected.is_set():
            self._wake.set()
            deadline = time.monotonic() + timeout
            while self.waiting() and time.monotonic() < deadline:
                time.sleep(0.05)
            info = self.client.publish(f"{self.root}/status", json.dumps({"state": "offline"}),
                                       qos=1, retain=True)
            try:
                info.wait_for_publish(timeout=2.0)
            except (RuntimeError, ValueError):  # the connection went away meanwhile
                pass
        self._closing.set()
        self._wake.set()
        self._pump_thread.join(timeout=5)
        self.client.disconnect()
        self.client.loop_stop()

    def threads_alive(self) -> dict[str, bool]:
        """The pump and paho's network thread (which also does every reconnect)."""
        network = getattr(self.client, "_thread", None)  # paho keeps it private
        return {"spool-pump": self._pump_thread.is_alive(),
                "mqtt-network": network is not None and network.is_alive()}

    def waiting(self) -> int:
        """Alarms not yet acknowledged: spooled on disk plus held in memory."""
        with self._lock:
            memory = len(self._memory)
        return (self._spooled() or 0) + memory

    def _spooled(self) -> int | None:
        """Alarms in the spool file; None (the fault reported) when it cannot be read."""
        try:
            return len(self.spool)
        except SpoolError as exc:
            self._spool_error(exc)
            return None

    def health(self) -> dict:
        with self._lock:
            memory = len(self._memory)
        mqtt = {"connected": self.connected.is_set(), **self.mqtt_fault.state()}
        spooled = self._spooled()
        spool = {"ok": self.spool_fault.reason is None, "spooled_alarms": spooled,
                 "memory_alarms": memory, "dropped_alarms": self.spool.dropped,
                 **self.spool_fault.state()}
        return {"mqtt": mqtt, "spool": spool}

    # paho calls these on its network thread, holding its own locks: they only record state
    # and wake the pump; they never publish, wait or raise.
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        try:
            if reason_code.is_failure:
                self.metrics.inc("mqtt_connect_failures")
                self.mqtt_fault.set(f"broker {self.cfg.host}:{self.cfg.port} refused the "
                                    f"connection: {reason_code}")
                return
            log.info("MQTT connected to %s:%d", self.cfg.host, self.cfg.port)
            self.mqtt_fault.clear()
            with self._lock:
                self._inflight.clear()  # a new connection: every unacknowledged alarm again
                self._sent.clear()
                self._announce = True
            for topic in list(self.subscriptions):  # a clean session: subscribe again each time
                client.subscribe(topic, qos=1)
            self.connected.set()
            self.metrics.inc("mqtt_connects")
            self._wake.set()
        except Exception:  # noqa: BLE001 - see above
            log.exception("MQTT on_connect")

    def _on_connect_fail(self, client, userdata) -> None:
        try:  # paho calls this inside its ``except OSError``: the exception says why
            exc = sys.exc_info()[1]
            self.metrics.inc("mqtt_connect_failures")
            self.mqtt_fault.set(f"cannot connect to {self.cfg.host}:{self.cfg.port}: "
                                f"{exc or 'connection failed'}; retrying (alarms are "
                                "spooled meanwhile)")
        except Exception:  # noqa: BLE001
            log.exception("MQTT on_connect_fail")

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        try:
            if self.connected.is_set() and not self._closing.is_set():
                self.mqtt_fault.set(f"disconnected from {self.cfg.host}:{self.cfg.port} "
                                    f"({reason_code}); alarms are spooled until it is back")
            self.connected.clear()
        except Exception:  # noqa: BLE001
            log.exception("MQTT on_disconnect")

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        self._wake.set()  # the pump looks at its alarms' infos; nothing else to record

    # ----- publishing ------------------------------------------------------------------------
    def subscribe(self, topic: str, on_message) -> None:
        """Receive ``topic`` (a filter) on this connection from the next connect on (commands);
        ``on_message`` runs on paho's thread and must not raise or publish."""
        self.subscriptions[topic] = on_message
        self.client.message_callback_add(topic, on_message)
        if self.connected.is_set():
            self.client.subscribe(topic, qos=1)

    def announce(self, status: dict[str, Any]) -> None:
        """Replace the retained ``online`` status (e.g. after experts were added)."""
        with self._lock:
            self.status = dict(status)
            self._announce = True
        self._wake.set()

    def alarm(self, camera: str, payload: dict) -> None:
        """Spool an alarm (in memory if the spool cannot take it); the pump publishes them in
        order. Never raises: an alarm is the one message that must not be lost."""
        topic, data = f"{self.root}/{camera}/alarm", strict_json(payload).encode()
        dropped = self.spool.dropped
        try:
            self.spool.put(topic, data)
            if self.spool_fault.reason:
                self.spool_fault.clear()
        except SpoolError as exc:
            self._spool_error(exc)
            self._remember(topic, data)
        lost = self.spool.dropped - dropped
        if lost:
            self.metrics.inc("alarms_dropped", lost, reason="spool_max_alarms")
            log.error("alarm spool full (spool.max_alarms %d): the %d oldest alarms were "
                      "dropped undelivered", self.spool.max_alarms, lost)
            self.send("events", {"event": "alarms_dropped", "count": lost,
                                 "detail": f"spool.max_alarms {self.spool.max_alarms} reached",
                                 "time": time.time()})
        self._wake.set()

    def _remember(self, topic: str, data: bytes) -> None:
        with self._lock:
            self._memory_key -= 1
            self._memory[self._memory_key] = (topic, data)
            over = len(self._memory) - MAX_MEMORY_ALARMS
            for _ in range(max(0, over)):
                self._memory.popitem(last=False)
        self.metrics.inc("alarms_unspooled")
        if over > 0:
            self.metrics.inc("alarms_dropped", over, reason="memory_full")
            log.error("alarm spool unwritable and %d alarms in memory: the oldest dropped",
                      MAX_MEMORY_ALARMS)

    def _spool_error(self, exc: Exception) -> None:
        self.metrics.inc("errors", kind="spool")
        first = self.spool_fault.reason is None
        self.spool_fault.set(f"{exc}; alarms are held in memory and still published")
        if first:
            self.send("events", {"event": "spool_error", "detail": str(exc),
                                 "time": time.time()})

    def _pump(self) -> None:
        """Publish the status after each connect, then waiting alarms oldest first, keeping at
        most MAX_INFLIGHT unacknowledged; retire the acknowledged ones."""
        while not self._closing.is_set():
            self.heartbeat = time.monotonic()
            with self._lock:
                busy = bool(self._inflight)
            self._wake.wait(0.05 if busy else 1.0)
            self._wake.clear()
            try:
                self._retire()
                if self.connected.is_set():
                    self._publish_due()
            except Exception:  # noqa: BLE001 - the pump is the alarms' only way out
                self.metrics.inc("errors", kind="publisher")
                log.exception("alarm pump")
                time.sleep(0.5)

    def _retire(self) -> None:
        """Forget the alarms whose own publication the broker acknowledged (PUBACK)."""
        with self._lock:
            done = [key for key, info in self._inflight.items() if info.is_published()]
            for key in done:
                del self._inflight[key]
        for key in done:
            try:
                if key < 0:
                    with self._lock:
                        self._memory.pop(key, None)
                else:
                    self.spool.ack(key)
            except SpoolError as exc:  # stays spooled: delivered again after a reconnect
                self._spool_error(exc)
                continue
            with self._lock:
                self._sent.discard(key)
            self.metrics.inc("alarms_delivered")

    def _publish_due(self) -> None:
        with self._lock:
            announce, self._announce = self._announce, False
            status = dict(self.status)
        if announce:
            self.client.publish(f"{self.root}/status", json.dumps({"state": "online", **status}),
                                qos=1, retain=True)
        for key, topic, payload in self._due():
            info = self.client.publish(topic, payload, qos=1)
            with self._lock:
                if info.rc != 0:  # not connected after all: it stays waiting
                    self._sent.discard(key)
                else:
                    self._inflight[key] = info

    def _due(self) -> list[tuple[int, str, bytes]]:
        """The oldest waiting alarms not yet published on this connection, as many as fit."""
        with self._lock:
            room, skip = MAX_INFLIGHT - len(self._inflight), len(self._sent)
        if room <= 0:
            return []
        try:
            rows = self.spool.pending(limit=room + skip)
        except SpoolError as exc:
            self._spool_error(exc)
            rows = []
        with self._lock:
            rows = [r for r in rows if r[0] not in self._sent]
            rows += [(k, t, p) for k, (t, p) in self._memory.items() if k not in self._sent]
            rows = rows[:room]
            self._sent.update(r[0] for r in rows)
        return rows

    def send(self, suffix: str, payload: bytes | str | dict, qos: int = 0) -> bool:
        """Publish a result, map, unknown or event; False (counted) while disconnected."""
        kind = suffix.rsplit("/", 1)[-1]
        if not self.connected.is_set():
            self.metrics.inc("mqtt_dropped", topic=kind)
            return False
        if isinstance(payload, dict):
            payload = strict_json(payload)
        try:
            return self.client.publish(f"{self.root}/{suffix}", payload, qos=qos).rc == 0
        except (ValueError, OSError) as exc:  # e.g. a payload over the MQTT limit
            self.metrics.inc("errors", kind="publish")
            log.warning("MQTT publish on %s failed: %s", suffix, exc)
            return False
