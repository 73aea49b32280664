"""Sparkplug B output (``sparkplug.enabled``): the daemon as a Sparkplug edge node, each camera
a device, on a connection of its own to the MQTT broker (``mqtt.*``: host, TLS, login) whose
last will is the node's NDEATH (an MQTT connection has one will; the JSON output's is its
``offline`` status).

Topics ``spBv1.0/<group_id>/<TYPE>/<edge_node_id>[/<camera>]``:

* NBIRTH on every connect (seq 0): ``bdSeq`` (Int64), ``Node Control/Rebirth`` and
  ``Node Control/Reload`` (Boolean, writable by NCMD), ``version``, ``experts``,
  ``calibrated`` (comma-joined), ``backend``, ``precision`` (String);
* DBIRTH per camera after the NBIRTH (cameras of ``ingest.cameras`` and ``ingest.products``,
  and each new camera before its first data): ``score``, ``score_raw``, ``threshold``
  (Double; the expert's raw-score threshold, null without calibration), ``anomalous``,
  ``unknown`` (Boolean), ``expert``, ``frame`` (String), ``frames``, ``alarms`` (UInt64 totals);
* DDATA per scored frame (at most one per ``sparkplug.min_interval`` seconds and camera, but
  every anomalous frame), with all the device metrics;
* NDATA when a reload changes the node metrics;
* NDEATH (``bdSeq`` only, QoS 1) as the connection's will, and published before a clean stop.

Every message but NDEATH carries ``seq`` 0..255, wrapping, in publication order; ``bdSeq``
goes up by one on each new connection (0..255) and is kept next to the alarm spool, so a
restarted daemon never reuses the bdSeq whose NDEATH the broker may still hold. Payloads are
the Eclipse Tahu protobuf (``sparkplug_b.proto``) from the optional ``sparkplug`` extra,
imported only when enabled. paho's callbacks only record state and wake the node's thread.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import threading
import time
from pathlib import Path
from collections.abc import Callable, Iterable
from typing import Any

from moleflow.config import Config, MqttConfig
from moleflow.errors import MoleflowError

log = logging.getLogger("moleflow.sparkplug")
INT64, UINT64, DOUBLE, BOOLEAN, STRING = 4, 8, 10, 11, 12   # Tahu DataType values
REBIRTH, RELOAD = "Node Control/Rebirth", "Node Control/Reload"
DEVICE_METRICS = (("score", DOUBLE), ("score_raw", DOUBLE), ("threshold", DOUBLE),
                  ("anomalous", BOOLEAN), ("unknown", BOOLEAN), ("expert", STRING),
                  ("frame", STRING), ("frames", UINT64), ("alarms", UINT64))
NODE_METRICS = (("version", STRING), ("experts", STRING), ("calibrated", STRING),
                ("backend", STRING), ("precision", STRING))
MAX_COMMANDS = 16


class SparkplugError(MoleflowError, RuntimeError):
    """Sparkplug output cannot be set up (the extra is missing, a TLS file is bad)."""


def payload_module():
    """The Tahu ``sparkplug_b_pb2`` module (the ``sparkplug`` extra), imported on demand."""
    try:
        from sparkplub_b_packets.core import sparkplug_b_pb2  # the package's own spelling
    except ImportError as exc:
        raise SparkplugError("sparkplug.enabled needs the 'sparkplug' extra: pip install "
                             "'moleflow-edge[sparkplug]' (sparkplug-b-packets, protobuf)"
                             ) from exc
    return sparkplug_b_pb2


def mqtt_client(cfg: MqttConfig, client_id: str):
    """A paho client set up like the publisher's (login, TLS), clean session, MQTT 3.1.1."""
    import paho.mqtt.client as mqtt
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=mqtt.MQTTv311, clean_session=True)
    if cfg.username:
        client.username_pw_set(cfg.username, os.environ.get(cfg.password_env))
    if cfg.tls:
        try:
            client.tls_set(ca_certs=cfg.ca_file, certfile=cfg.cert_file, keyfile=cfg.key_file)
        except (OSError, ValueError) as exc:
            raise SparkplugError(f"mqtt.ca_file/cert_file/key_file: cannot set up TLS for "
                                 f"Sparkplug ({exc})") from exc
    client.reconnect_delay_set(min_delay=1, max_delay=30)
    return client


def node_values(status: dict) -> dict[str, Any]:
    """The node metrics' values from the daemon's status document."""
    return {"version": str(status.get("version", "")),
            "experts": ",".join(status.get("experts", [])),
            "calibrated": ",".join(status.get("calibrated", [])),
            "backend": str(status.get("backend", "")),
            "precision": str(status.get("precision", ""))}


class SparkplugNode:
    def __init__(self, cfg: Config, status: dict, metrics: Any,
                 reload: Callable[[], None] | None = None, cameras: Iterable[str] = ()) -> None:
        self.pb = payload_module()
        spb = cfg.sparkplug
        self.node = spb.edge_node_id or cfg.mqtt.device_id
        self.base = f"spBv1.0/{spb.group_id}"
        self.min_interval, self.metrics, self.reload = spb.min_interval, metrics, reload
        self.state_path = Path(cfg.spool.path).with_name("sparkplug-bdseq")
        self.bdseq = self._load_bdseq()
        self.node_metrics = node_values(status)
        self.cameras: dict[str, dict] = {c: self._fresh() for c in cameras}
        self.connected = threading.Event()
        self._lock = threading.RLock()     # seq, births and publication order
        self._seq = 0
        self._born: set[str] = set()
        self._need_birth = False
        self._commands: collections.deque[bytes] = collections.deque(maxlen=MAX_COMMANDS)
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sparkplug", daemon=True)
        self.client = mqtt_client(cfg.mqtt, f"moleflow-{cfg.mqtt.device_id}-spb")
        self.client.will_set(self._topic("NDEATH"), self._death(), qos=1, retain=False)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.message_callback_add(self._topic("NCMD"), self._on_command)
        self.host, self.port, self.keepalive = cfg.mqtt.host, cfg.mqtt.port, cfg.mqtt.keepalive

    @staticmethod
    def _fresh() -> dict:
        return {"values": {name: None for name, _ in DEVICE_METRICS} | {"frames": 0, "alarms": 0},
                "sent": 0.0}

    def _topic(self, kind: str, device: str | None = None) -> str:
        return f"{self.base}/{kind}/{self.node}" + (f"/{device}" if device else "")

    # ----- bdSeq kept across restarts ----------------------------------------------------------
    def _load_bdseq(self) -> int:
        try:
            return int(self.state_path.read_text().strip()) % 256
        except (OSError, ValueError):
            return 0

    def _save_bdseq(self, value: int) -> None:
        try:
            self.state_path.write_text(f"{value}\n")
        except OSError as exc:
            log.warning("cannot keep the Sparkplug bdSeq in %s (%s)", self.state_path, exc)

    # ----- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()
        log.info("Sparkplug B: edge node %s/%s on %s:%d", self.base, self.node, self.host,
                 self.port)
        self.client.connect_async(self.host, self.port, self.keepalive)
        self.client.loop_start()

    def stop(self) -> None:
        """Publish NDEATH (a clean disconnect sends no will), then disconnect."""
        self._closing.set()
        self._wake.set()
        self._thread.join(timeout=5)
        if self.connected.is_set():
            with self._lock:
                info = self.client.publish(self._topic("NDEATH"), self._death(), qos=1)
            try:
                info.wait_for_publish(timeout=2.0)
            except (RuntimeError, ValueError):
                pass
        self.client.disconnect()
        self.client.loop_stop()

    def alive(self) -> bool:
        return self._thread.is_alive()

    # paho's network thread: record state, wake the node's thread; never publish or raise
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        try:
            if reason_code.is_failure:
                log.error("Sparkplug: broker refused the connection: %s", reason_code)
                return
            client.subscribe(self._topic("NCMD"), qos=0)
            self._need_birth = True  # no lock here: a publisher may hold it, waiting on paho
            self.connected.set()
            self._wake.set()
        except Exception:  # noqa: BLE001
            log.exception("Sparkplug on_connect")

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        try:
            self.connected.clear()
            self.bdseq = (self.bdseq + 1) % 256  # the next connection: its own bdSeq and will
            client.will_set(self._topic("NDEATH"), self._death(), qos=1, retain=False)
        except Exception:  # noqa: BLE001
            log.exception("Sparkplug on_disconnect")

    def _on_command(self, client, userdata, msg) -> None:
        try:
            self._commands.append(bytes(msg.payload[:65536]))
            self._wake.set()
        except Exception:  # noqa: BLE001
            log.exception("Sparkplug on_message")

    def _run(self) -> None:
        while not self._closing.is_set():
            self._wake.wait(1.0)
            self._wake.clear()
            try:
                while self._commands:
                    self._command(self._commands.popleft())
                with self._lock:
                    if self.connected.is_set() and self._need_birth:
                        self._births()
            except Exception:  # noqa: BLE001 - the node's thread must go on
                log.exception("Sparkplug")
                time.sleep(0.5)

    def _command(self, data: bytes) -> None:
        """NCMD: ``Node Control/Rebirth`` true publishes the births again; ``Node
        Control/Reload`` true reloads the engine set (as SIGHUP)."""
        try:
            payload = self.pb.Payload.FromString(data)
        except Exception as exc:  # noqa: BLE001 - DecodeError and whatever hostile bytes raise
            log.warning("Sparkplug NCMD is not a Sparkplug B payload: %s", exc)
            return
        for m in payload.metrics:
            wanted = m.WhichOneof("value") == "boolean_value" and m.boolean_value
            if m.name == REBIRTH and wanted:
                with self._lock:
                    self._need_birth = True
            elif m.name == RELOAD and wanted and self.reload is not None:
                self.reload()
            else:
                log.warning("Sparkplug NCMD: metric %r ignored (writable: %s, %s set to true)",
                            m.name[:80], REBIRTH, RELOAD)

    # ----- payloads ----------------------------------------------------------------------------
    def _payload(self, metrics: Iterable[tuple[str, int, Any]], seq: int | None) -> bytes:
        now = int(time.time() * 1000)
        p = self.pb.Payload(timestamp=now)
        for name, dtype, value in metrics:
            m = p.metrics.add(name=name, datatype=dtype, timestamp=now)
            if value is None or (dtype == DOUBLE and not math.isfinite(value)):
                m.is_null = True
            elif dtype == BOOLEAN:
                m.boolean_value = bool(value)
            elif dtype == DOUBLE:
                m.double_value = float(value)
            elif dtype in (INT64, UINT64):
                m.long_value = int(value)
            else:
                m.string_value = str(value)
        if seq is not None:
            p.seq = seq
        return p.SerializeToString()

    def _death(self) -> bytes:
        return self._payload([("bdSeq", INT64, self.bdseq)], None)

    def _send(self, kind: str, device: str | None, metrics: list) -> None:
        """Publish with the next seq (the caller holds the lock: seq order is wire order)."""
        seq, self._seq = self._seq, (self._seq + 1) % 256
        info = self.client.publish(self._topic(kind, device), self._payload(metrics, seq), qos=0)
        if info.rc != 0:
            self.metrics.inc("mqtt_dropped", topic="sparkplug")

    def _device_metrics(self, camera: str) -> list:
        values = self.cameras[camera]["values"]
        return [(name, dtype, values[name]) for name, dtype in DEVICE_METRICS]

    def _births(self) -> None:
        self._seq = 0
        node = [("bdSeq", INT64, self.bdseq), (REBIRTH, BOOLEAN, False), (RELOAD, BOOLEAN, False)]
        node += [(name, dtype, self.node_metrics[name]) for name, dtype in NODE_METRICS]
        self._send("NBIRTH", None, node)
        self._save_bdseq((self.bdseq + 1) % 256)
        self._need_birth = False
        self._born = set()
        for camera in self.cameras:
            self._dbirth(camera)
        log.info("Sparkplug: NBIRTH (bdSeq %d) and %d DBIRTH", self.bdseq, len(self.cameras))

    def _dbirth(self, camera: str) -> None:
        self._send("DBIRTH", camera, self._device_metrics(camera))
        self._born.add(camera)
        self.cameras[camera]["sent"] = time.monotonic()

    # ----- the daemon's side -------------------------------------------------------------------
    def frame(self, result: dict, threshold: float | None) -> None:
        """A scored frame (its JSON result): DBIRTH first for a new camera, then DDATA."""
        camera, anomalous = result["camera"], result.get("decision") == "anomalous"
        now = time.monotonic()
        with self._lock:
            state = self.cameras.setdefault(camera, self._fresh())
            values = state["values"]
            values.update(score=result.get("score"), score_raw=result.get("score_raw"),
                          threshold=threshold, anomalous=anomalous,
                          unknown=bool(result.get("unknown")), expert=result.get("expert"),
                          frame=result.get("frame"), frames=values["frames"] + 1,
                          alarms=values["alarms"] + anomalous)
            if not self.connected.is_set():
                self.metrics.inc("mqtt_dropped", topic="sparkplug")
                return
            if self._need_birth:
                self._births()
            elif camera not in self._born:
                self._dbirth(camera)  # the DBIRTH carries this frame's values
            elif anomalous or now - state["sent"] >= self.min_interval:
                self._send("DDATA", camera, self._device_metrics(camera))
                state["sent"] = now

    def node_status(self, status: dict) -> None:
        """After a reload: NDATA with the node metrics that changed."""
        fresh = node_values(status)
        with self._lock:
            changed = [(n, t, fresh[n]) for n, t in NODE_METRICS
                       if fresh[n] != self.node_metrics[n]]
            self.node_metrics = fresh
            if changed and self.connected.is_set() and not self._need_birth:
                self._send("NDATA", None, changed)
