"""Helpers for the daemon's integration tests: a real Mosquitto broker and an MQTT listener."""

from __future__ import annotations

import urllib.request

import urllib.error

import json
import threading
import time
from pathlib import Path

import pytest

from moleflow.config import load_config
from moleflow.devtools.harness import Mosquitto, free_port, mosquitto_path

__all__ = ["Broker", "Listener", "PushCamera", "Running", "check_payload", "daemon_config",
           "free_port", "raw_frame"]


def Broker(folder: Path) -> Mosquitto:
    """Mosquitto on a free loopback port, with persistence so sessions survive a restart;
    skips the test where Mosquitto is not installed."""
    if mosquitto_path() is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto; .ci/run does)")
    return Mosquitto(folder, persistence=True)


class Listener:
    """An MQTT subscriber that records every message under a topic filter."""

    def __init__(self, port: int, topic: str = "#", client_id: str | None = None,
                 clean: bool = True) -> None:
        import paho.mqtt.client as mqtt
        self.messages: list[tuple[str, bytes, bool]] = []
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or "",
                                  clean_session=clean)
        self.client.reconnect_delay_set(0.1, 0.5)

        def on_connect(client, userdata, flags, reason_code, properties):
            client.subscribe(topic, qos=1)

        def on_subscribe(client, userdata, mid, reason_codes, properties):
            self.subscribed.set()

        def on_message(client, userdata, msg):
            with self.lock:
                self.messages.append((msg.topic, msg.payload, msg.retain))

        self.client.on_connect = on_connect
        self.client.on_subscribe = on_subscribe
        self.client.on_message = on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self.subscribed.wait(5), "subscription not acknowledged"

    def json(self, suffix: str) -> list[dict]:
        with self.lock:
            return [json.loads(p) for t, p, _ in self.messages if t.endswith(suffix)]

    def wait_for(self, suffix: str, count: int, timeout: float = 30.0) -> list[dict]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            got = self.json(suffix)
            if len(got) >= count:
                return got
            time.sleep(0.05)
        raise AssertionError(f"{len(self.json(suffix))} of {count} messages on *{suffix} "
                             f"within {timeout} s; topics seen: "
                             f"{sorted({t for t, _, _ in self.messages})}")

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


SCHEMA = json.loads((Path(__file__).resolve().parents[1] / "docs" /
                     "mqtt-payloads.schema.json").read_text())


def check_payload(kind: str, payload: dict) -> None:
    """Validate a payload against its JSON schema in docs/mqtt-payloads.schema.json."""
    import jsonschema
    schema = {"$defs": SCHEMA["$defs"], "$ref": f"#/$defs/{kind}"}
    jsonschema.validate(payload, schema)


def daemon_config(engines, broker, tmp_path, endpoints, **extra):
    overrides = {"engines.path": str(engines), "mqtt.port": broker.port,
                 "mqtt.device_id": "line1", "ingest.endpoints": endpoints,
                 "spool.path": str(tmp_path / "spool.sqlite"), "metrics.port": 0,
                 "evidence.folder": str(tmp_path / "evidence"),
                 "mqtt.map_interval": 0.0, **extra}
    return load_config(None, overrides)


class Running:
    """A daemon on a background thread."""

    def __init__(self, cfg) -> None:
        from moleflow.edge.daemon import Daemon
        self.daemon = Daemon(cfg)
        self.thread = threading.Thread(target=self.daemon.run, daemon=True)
        self.thread.start()
        assert self.daemon.publisher.connected.wait(10), "daemon did not reach the broker"

    def stop(self) -> None:
        self.daemon.stop()
        self.thread.join(timeout=30)
        assert not self.thread.is_alive()


def raw_frame(camera: str, frame: str, bgr, stamp: str | None = None) -> list[bytes]:
    """``send_image``'s message with the msg text "camera|frame[|stamp]"."""
    from moleflow.devtools.drive import raw_message
    return raw_message(bgr, f"{camera}|{frame}" + (f"|{stamp}" if stamp is not None else ""))


class PushCamera:
    """A camera's PUSH socket on a free loopback port; the daemon binds ``endpoint``."""

    def __init__(self) -> None:
        import zmq
        self.port = free_port()
        self.ctx = zmq.Context()
        self.socket = self.ctx.socket(zmq.PUSH)
        self.socket.connect(f"tcp://127.0.0.1:{self.port}")

    @property
    def endpoint(self) -> str:
        return f"pull+tcp://127.0.0.1:{self.port}"

    def send(self, camera: str, frame, bgr, stamp: str | None = None) -> None:
        self.socket.send_multipart(raw_frame(camera, str(frame), bgr, stamp))

    def close(self) -> None:
        self.ctx.destroy(linger=0)


def strict_loads(payload: bytes):
    """A parser that refuses NaN/Infinity, as strict SCADA clients do."""
    def refuse(name):
        raise ValueError(f"{name} is not JSON")
    return json.loads(payload, parse_constant=refuse)


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout} s: {what}")


def healthz(port: int) -> dict:
    """The daemon's /healthz document ({} while its endpoint is not up yet)."""
    try:
        return json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz",
                                                 timeout=5).read())
    except urllib.error.HTTPError as err:  # 503 carries the same document
        return json.loads(err.read())
    except urllib.error.URLError:
        return {}
