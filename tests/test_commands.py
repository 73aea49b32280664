"""Per-camera products (``ingest.products``) and the command topics (``cmd/product``,
``cmd/reload``) against a real Mosquitto broker and real ZeroMQ sockets."""

from __future__ import annotations

import json
import time

import cv2
import paho.mqtt.client as mqtt
import pytest

from moleflow.config import ConfigError, load_config
from moleflow.data import load_class
from moleflow.edge.commands import check_products, parse_products

from tests.daemon_helpers import Listener, PushCamera, Running, check_payload, daemon_config

pytest.importorskip("zmq", reason="pyzmq is part of the edge extra")
pytestmark = pytest.mark.mosquitto
ROOT = "moleflow/line1"


def publish(port: int, topic: str, payload: bytes | str, retain: bool = False) -> None:
    """One QoS 1 publication, acknowledged by the broker before returning."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)
    finally:
        client.loop_stop()
        client.disconnect()


def score_one(camera: PushCamera, listener: Listener, cam: str, frame: str, bgr) -> dict:
    """Send one frame and return its JSON result."""
    before = len(listener.json(f"{cam}/result"))
    camera.send(cam, frame, bgr)
    result = listener.wait_for(f"{cam}/result", before + 1)[-1]
    assert result["frame"] == frame
    return result


def acks(listener: Listener, count: int) -> list[dict]:
    events = listener.wait_for("/events", count)
    got = [e for e in listener.json("/events") if e["event"].startswith("command_")]
    deadline = time.time() + 20
    while len(got) < count and time.time() < deadline:
        time.sleep(0.05)
        got = [e for e in listener.json("/events") if e["event"].startswith("command_")]
    assert len(got) >= count, f"{len(got)} of {count} command events; events: {events}"
    for e in got:
        check_payload("event", e)
    return got


def test_products_config_is_checked_at_load_and_against_the_engine_set(engine_set, broker,
                                                                      tmp_path):
    assert parse_products(["cam0=alpha", " cam1 = beta "]) == {"cam0": "alpha", "cam1": "beta"}
    for bad, reason in ((["cam0"], "must be camera=product"), (["cam 0=alpha"], "letters"),
                        (["a=alpha", "a=beta"], "given twice"), (["cam0=al/pha"], "letters")):
        with pytest.raises(ConfigError, match=reason) as err:
            load_config(None, {"ingest.products": bad})
        assert str(err.value).startswith("ingest.products:")
    cfg = load_config(None, {"ingest.products": ["cam0=alpha", "cam1=gamma"]})
    check_products(load_config(None, {"ingest.products": ["cam0=alpha"]}), ["alpha", "beta"])
    with pytest.raises(ConfigError, match="camera 'cam1' is set to product 'gamma', which is "
                                          r"not an expert of the engine set \(alpha, beta\)"):
        check_products(cfg, ["alpha", "beta"])
    # the daemon refuses to start with it, naming the key
    from moleflow.edge.daemon import Daemon
    with pytest.raises(ConfigError, match="ingest.products: camera 'cam1'"):
        Daemon(daemon_config(engine_set, broker, tmp_path, ["pull+tcp://127.0.0.1:1"],
                             **{"ingest.products": ["cam1=gamma"]}))


def test_camera_product_from_config_and_cmd_product(engine_set, broker, tmp_path,
                                                    synthetic_root):
    camera = PushCamera()
    listener = Listener(broker.port, f"{ROOT}/#")
    run = Running(daemon_config(engine_set, broker, tmp_path, [camera.endpoint],
                                **{"ingest.products": ["cam1=beta"]}))
    try:
        alpha = cv2.imread(str(load_class(synthetic_root, "alpha").test[0].path))
        # alpha's image is routed to alpha; cam1 is pinned to beta by the config
        assert score_one(camera, listener, "cam2", "r1", alpha)["expert"] == "alpha"
        pinned = score_one(camera, listener, "cam1", "p1", alpha)
        assert pinned["expert"] == "beta" and pinned["unknown"] is False
        # a frame's own hint wins over its camera's product
        before = len(listener.json("cam1/result"))
        camera.socket.send_multipart([json.dumps({"msg": json.dumps(
            {"camera": "cam1", "frame": "h1", "product": "alpha"})}).encode(),
            cv2.imencode(".jpg", alpha)[1].tobytes()])
        assert listener.wait_for("cam1/result", before + 1)[-1]["expert"] == "alpha"

        # cmd/product: cam2 to beta, acknowledged with the command's id
        publish(broker.port, f"{ROOT}/cmd/product",
                json.dumps({"camera": "cam2", "product": "beta", "id": "c-1"}))
        ack = acks(listener, 1)[0]
        assert ack["event"] == "command_accepted" and ack["command"] == "product"
        assert (ack["camera"], ack["product"], ack["id"]) == ("cam2", "beta", "c-1")
        assert score_one(camera, listener, "cam2", "r2", alpha)["expert"] == "beta"
        # null: back to routing (also for a camera pinned by the config)
        publish(broker.port, f"{ROOT}/cmd/product", json.dumps({"camera": "cam1",
                                                                "product": None}))
        ack = acks(listener, 2)[1]
        assert ack["event"] == "command_accepted" and ack["product"] is None
        assert score_one(camera, listener, "cam1", "p2", alpha)["expert"] == "alpha"
        assert run.daemon.scada.products.snapshot() == {"cam2": "beta"}
        assert run.daemon.metrics.total("commands") == 2
    finally:
        camera.close()
        run.stop()
        listener.close()


HOSTILE = [  # (topic suffix, payload, what the rejection says)
    ("product", b"{not json", "payload is not JSON"),
    ("product", b'{"camera": "cam1", "product": NaN}', "payload is not JSON"),
    ("product", b"[" * 100000 + b"]" * 100000, "payload over 4096 bytes"),
    ("product", b"[" * 2000 + b"]" * 2000, "payload is not JSON"),
    ("product", b"\xff\xfe\x00garbage", "payload is not JSON"),
    ("product", b'["cam1", "beta"]', "payload must be a JSON object"),
    ("product", b'{"camera": "cam1"}', "product is missing"),
    ("product", b'{"product": "beta"}', "camera is missing"),
    ("product", b'{"camera": "../../etc", "product": "beta"}', "must be 1..64 letters"),
    ("product", b'{"camera": 7, "product": "beta"}', "camera must be a string"),
    ("product", b'{"camera": "cam1", "product": "gamma"}', "not an expert of the running"),
    ("product", b'{"camera": "cam1", "product": "beta", "prodcut": 1}', "unknown key 'prodcut'"),
    ("product", b'{"camera": "cam1", "product": "beta", "id": {"a": 1}}', "id must be"),
    ("shutdown", b"{}", "unknown command 'shutdown'"),
    ("reload", b"now", "payload is not JSON"),
]


def test_hostile_commands_are_rejected_and_scoring_goes_on(engine_set, broker, tmp_path,
                                                           synthetic_root):
    camera = PushCamera()
    listener = Listener(broker.port, f"{ROOT}/#")
    # a retained command would be carried out again on every reconnect: refused
    publish(broker.port, f"{ROOT}/cmd/product", b'{"camera": "cam1", "product": "beta"}',
            retain=True)
    run = Running(daemon_config(engine_set, broker, tmp_path, [camera.endpoint]))
    try:
        alpha = cv2.imread(str(load_class(synthetic_root, "alpha").test[0].path))
        assert "retained command ignored" in acks(listener, 1)[0]["detail"]
        for suffix, payload, _ in HOSTILE:
            publish(broker.port, f"{ROOT}/cmd/{suffix}", payload)
        got = acks(listener, len(HOSTILE) + 1)
        assert all(e["event"] == "command_rejected" for e in got), got
        for (suffix, _, reason), event in zip(HOSTILE, got[1:]):
            assert event["command"] == suffix and reason in event["detail"], (reason, event)
        assert run.daemon.scada.products.snapshot() == {}
        assert run.daemon.health()["threads"]["commands"] is True
        assert score_one(camera, listener, "cam1", "after", alpha)["expert"] == "alpha"

        # cmd/reload: accepted, then the reload's own event
        publish(broker.port, f"{ROOT}/cmd/reload", b"")
        deadline = time.time() + 60
        while time.time() < deadline and not any(
                e["event"] in ("engines_reloaded", "reload_failed")
                for e in listener.json("/events")):
            time.sleep(0.1)
        events = listener.json("/events")
        assert [e["event"] for e in events[-2:]] == ["command_accepted", "engines_reloaded"], \
            events[-3:]
        assert score_one(camera, listener, "cam1", "reloaded", alpha)["expert"] == "alpha"
    finally:
        camera.close()
        run.stop()
        listener.close()
