"""The edge daemon against a real Mosquitto broker and real ZeroMQ sockets (imagezmq senders).

Mechanics run on a small engine set trained on the synthetic classes; decisions on real
anomalous images are in test_daemon_real.py.
"""

from __future__ import annotations

import json
import threading
import time

import cv2
import numpy as np
import pytest

from moleflow.cli import main
from moleflow.conditions import parse_condition
from moleflow.engines.pipeline import EngineSet, Pipeline
from moleflow.data import load_class, load_images

from tests.daemon_helpers import (Listener, PushCamera, Running, check_payload, daemon_config,
                                  free_port)

pytestmark = pytest.mark.mosquitto

imagezmq = pytest.importorskip("imagezmq", reason="imagezmq is a test dependency ('.[dev]')")
zmq = pytest.importorskip("zmq", reason="pyzmq is part of the edge extra")

def test_req_rep_raw_and_jpeg_frames_become_results_and_alarms(engine_set, broker, tmp_path,
                                                              synthetic_root):
    port = free_port()
    listener = Listener(broker.port, "moleflow/line1/#")
    run = Running(daemon_config(engine_set, broker, tmp_path, [f"rep+tcp://127.0.0.1:{port}"]))
    try:
        data = load_class(synthetic_root, "beta")
        items = data.test
        sender = imagezmq.ImageSender(connect_to=f"tcp://127.0.0.1:{port}")
        for i, item in enumerate(items):
            bgr = cv2.imread(str(item.path))
            msg = f"cam1|{i}|{time.time()}"
            if i % 2:
                ok, jpg = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 95])
                assert sender.send_jpg(msg, jpg.tobytes()) == b"OK"
            else:
                assert sender.send_image(msg, bgr) == b"OK"
        # a frame whose contrast the camera turned up: scored again in the product's light
        bright = parse_condition("contrast:+40").apply(cv2.imread(str(items[0].path)))
        assert sender.send_image(f"cam1|{len(items)}|{time.time()}", bright) == b"OK"
        results = listener.wait_for("cam1/result", len(items) + 1)
        sender.close()
        # the same images scored offline by the engine set give the same decisions
        raw = load_images([t.path for t in items[::2]], 64)
        offline = Pipeline(EngineSet.open(engine_set)).score(
            np.concatenate([raw, bright[None, ..., ::-1]]))
        by_frame = {int(r["frame"]): r for r in results}
        for k, f in zip([*range(0, len(items), 2), len(items)], offline):
            r = by_frame[k]
            assert r["expert"] == f.expert == "beta"
            assert r["decision"] == ("anomalous" if f.anomalous else "normal")
            assert r["score_raw"] == pytest.approx(f.raw_score, rel=1e-4)
            assert 0.0 <= r["score"] <= 1.0 and r["latency_ms"]["total"] > 0
            assert r["light_offset"] == pytest.approx(f.light_offset, abs=0.01)
            assert r["relit"] == f.relit
        assert by_frame[len(items)]["light_offset"] > 2  # over eval.light_retry: retried
        assert "light_retry" in by_frame[len(items)]["latency_ms"]
        alarms = listener.json("cam1/alarm")
        assert len(alarms) == sum(r["decision"] == "anomalous" for r in results) > 0
        for r in results:
            check_payload("result", r)
        for a in alarms:
            check_payload("alarm", a)
        assert all(a["regions"] and set(a["regions"][0]) >= {"x", "y", "w", "h", "box"}
                   for a in alarms)
    finally:
        run.stop()
        listener.close()
    status = [json.loads(p) for t, p, _ in listener.messages if t.endswith("/status")]
    assert status[0]["state"] == "online" and status[0]["experts"] == ["alpha", "beta"]
    for st in status:
        check_payload("status", st)
    assert status[-1]["state"] == "offline"  # published on a clean stop


def test_pub_sub_sender_with_product_hint(engine_set, broker, tmp_path, synthetic_root):
    port = free_port()
    listener = Listener(broker.port, "moleflow/line1/#")
    sender = imagezmq.ImageSender(connect_to=f"tcp://127.0.0.1:{port}", REQ_REP=False)
    run = Running(daemon_config(engine_set, broker, tmp_path, [f"sub+tcp://127.0.0.1:{port}"]))
    try:
        bgr = cv2.imread(str(load_class(synthetic_root, "alpha").test[0].path))
        deadline = time.time() + 20
        while not listener.json("cam2/result") and time.time() < deadline:
            sender.send_image(json.dumps({"camera": "cam2", "frame": "h1", "product": "beta"}),
                              bgr)  # PUB/SUB drops frames until the subscription is up
            time.sleep(0.2)
        result = listener.wait_for("cam2/result", 1)[0]
        assert result["expert"] == "beta"  # the hint bypassed the router (alpha is nearer)
        assert result["frame"] == "h1"
    finally:
        run.stop()
        listener.close()
        sender.close()


def test_hostile_frames_are_reported_and_scoring_goes_on(engine_set, broker, tmp_path,
                                                         synthetic_root):
    camera = PushCamera()
    listener = Listener(broker.port, "moleflow/line1/#")
    cfg = daemon_config(engine_set, broker, tmp_path, [camera.endpoint],
                        **{"ingest.max_message_bytes": 200_000})
    run = Running(cfg)
    try:
        bgr = cv2.imread(str(load_class(synthetic_root, "alpha").test[0].path))
        ok, jpg = cv2.imencode(".jpg", bgr)
        header = json.dumps({"msg": "cam3|bad"}).encode()
        hostile = [
            [b"\x00\x01garbage", b"more garbage"],                                # not JSON
            [header, jpg.tobytes()[: len(jpg) // 2]],                           # truncated JPEG
            [json.dumps({"msg": "cam3|x", "dtype": "float64", "shape": [64, 64, 3]}).encode(),
             bytes(64 * 64 * 3 * 8)],                                          # wrong dtype
            [json.dumps({"msg": "cam3|x", "dtype": "uint8", "shape": [64, 64, 3]}).encode(),
             bytes(100)],                                                      # wrong size
            [header, b"\xff\xd8" + bytes(300_000)],                             # oversized
            [b"only one part"],
        ]
        for parts in hostile:
            camera.socket.send_multipart(parts)
        camera.send("cam3", "good", bgr)
        assert listener.wait_for("cam3/result", 1)[0]["frame"] == "good"
        events = listener.wait_for("/events", len(hostile))
        text = " ".join(e["detail"] for e in events)
        for e in events:
            check_payload("event", e)
        for reason in ("not JSON", "truncated", "dtype must be uint8", "buffer has 100 bytes",
                       "exceeds ingest.max_message_bytes", "expected 2 message parts"):
            assert reason in text
        assert run.daemon.metrics.total("errors") == len(hostile)
    finally:
        camera.close()
        run.stop()
        listener.close()


def test_retained_status_and_last_will(engine_set, broker, tmp_path):
    run = Running(daemon_config(engine_set, broker, tmp_path, [f"pull+tcp://127.0.0.1:{free_port()}"]))
    try:
        # the status is published just after the connection: subscribe once it is out, so the
        # late subscriber's copy can only be the broker's retained one
        first = Listener(broker.port, "moleflow/line1/status")
        first.wait_for("status", 1)
        first.close()
        late = Listener(broker.port, "moleflow/line1/status")
        state = late.wait_for("status", 1)[0]
        assert state["state"] == "online"  # retained: a late subscriber still learns it
        assert late.messages[0][2] is True
        run.daemon.publisher.client.socket().close()  # the connection dies without DISCONNECT
        deadline = time.time() + 15
        while time.time() < deadline and "offline" not in [s["state"] for s in late.json("status")]:
            time.sleep(0.05)
        states = [s["state"] for s in late.json("status")]
        assert "offline" in states  # the broker published the last will
        late.wait_for("status", states.index("offline") + 2)  # ... and it came back online
        assert late.json("status")[-1]["state"] == "online"
        late.close()
    finally:
        run.stop()


def test_spool_delivers_every_alarm_after_a_broker_outage(engine_set, broker, tmp_path,
                                                          synthetic_root):
    camera = PushCamera()
    listener = Listener(broker.port, "moleflow/line1/+/alarm", client_id="scada", clean=False)
    # three workers taking one frame each finish out of order: alarms must still leave in order
    run = Running(daemon_config(engine_set, broker, tmp_path, [camera.endpoint],
                                **{"engines.workers": 3, "ingest.max_batch": 1}))

    def send(i: int, bgr: np.ndarray) -> None:
        camera.send("cam4", i, bgr)

    try:
        bad = [t.path for t in load_class(synthetic_root, "alpha").test if t.label == 1]
        frames = [cv2.imread(str(p)) for p in bad]
        alarming = [i for i, f in enumerate(Pipeline(EngineSet.open(engine_set)).score(
            load_images(bad, 64))) if f.anomalous]
        assert alarming, "the test needs frames that raise alarms"
        seq = list(range(12))
        for i in seq[:4]:
            send(i, frames[i % len(frames)])
        time.sleep(1.0)
        broker.stop()                                    # broker goes away mid-stream
        listener.client.loop_stop()
        for i in seq[4:]:
            send(i, frames[i % len(frames)])
        expected = [str(i) for i in seq if i % len(frames) in alarming]
        deadline = time.time() + 20
        while run.daemon.metrics.total("alarms") < len(expected) and time.time() < deadline:
            time.sleep(0.05)
        assert len(run.daemon.spool) > 0                 # waiting on disk
        broker.start()
        listener.client.loop_start()
        got = listener.wait_for("/alarm", len(expected), timeout=60)
        frames_got = [a["frame"] for a in got]
        assert sorted(set(frames_got), key=int) == expected          # none lost
        firsts = list(dict.fromkeys(frames_got))
        assert firsts == expected                                     # in order
        deadline = time.time() + 10
        while len(run.daemon.spool) and time.time() < deadline:
            time.sleep(0.05)
        assert len(run.daemon.spool) == 0
    finally:
        camera.close()
        run.stop()
        listener.close()


def test_reload_adds_an_expert_while_frames_flow(engine_set, broker, tmp_path, synthetic_root):
    import shutil
    live = tmp_path / "engines"
    shutil.copytree(engine_set, live)
    manifest = json.loads((live / "manifest.json").read_text())
    manifest["experts"] = manifest["experts"][:1]  # serve alpha only at first
    router = np.load(live / "router.npz")
    per_task = {"names", "means", "precisions", "distance_quantiles"}
    np.savez(live / "router_one.npz", **{k: router[k][:1] if k in per_task else router[k]
                                         for k in router.files})
    from moleflow.manifest import FileRef
    manifest["router"] = FileRef.of(live, live / "router_one.npz").__dict__
    (live / "manifest.json").write_text(json.dumps(manifest))
    camera = PushCamera()
    listener = Listener(broker.port, "moleflow/line1/#")
    run = Running(daemon_config(live, broker, tmp_path, [camera.endpoint]))
    try:
        assert run.daemon.pipeline.engines.expert_names() == ["alpha"]
        shutil.copy(engine_set / "manifest.json", live / "manifest.json")  # "export" of beta
        bgr = cv2.imread(str(load_class(synthetic_root, "beta").test[0].path))
        stop = threading.Event()

        def stream() -> None:
            i = 0
            while not stop.is_set():
                camera.send("cam5", i, bgr)
                i += 1
                time.sleep(0.02)

        sender = threading.Thread(target=stream, daemon=True)
        sender.start()
        listener.wait_for("cam5/result", 3)
        run.daemon.reload()
        event = next(e for e in listener.wait_for("/events", 1) if e["event"] == "engines_reloaded")
        assert event["added"] == ["beta"]
        check_payload("event", event)
        n = len(listener.json("cam5/result"))
        listener.wait_for("cam5/result", n + 3)          # frames kept flowing
        stop.set()
        sender.join()
        assert listener.json("cam5/result")[-1]["expert"] == "beta"
    finally:
        camera.close()
        run.stop()
        listener.close()


def test_validate_config_checks_keys_endpoints_and_files(engine_set, tmp_path, capsys):
    good = tmp_path / "edge.yaml"
    good.write_text(f"engines:\n  path: {engine_set}\n")
    assert main(["serve", "--config", str(good), "--validate-config"]) == 0
    assert "config OK" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"engines:\n  path: {engine_set}\nmqtt:\n  prot: 1883\n")
    assert main(["serve", "--config", str(bad), "--validate-config"]) == 2
    assert "mqtt.prot: unknown option" in capsys.readouterr().err
    bad.write_text(f"engines:\n  path: {engine_set}\ningest:\n  endpoints: ['tcp://x:1']\n")
    assert main(["serve", "--config", str(bad), "--validate-config"]) == 2
    assert "ingest.endpoints" in capsys.readouterr().err
    bad.write_text(f"engines:\n  path: {tmp_path / 'nowhere'}\n")
    assert main(["serve", "--config", str(bad), "--validate-config"]) == 2
    assert "no manifest.json" in capsys.readouterr().err


def test_notify_watchdog_metrics_and_health(engine_set, broker, tmp_path, monkeypatch,
                                            synthetic_root):
    import socket
    import urllib.request
    notify = tmp_path / "notify.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(notify))
    server.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify))
    camera, mport = PushCamera(), free_port()
    run = Running(daemon_config(engine_set, broker, tmp_path, [camera.endpoint],
                                **{"metrics.port": mport}))
    try:
        got = set()
        while not {"READY=1", "WATCHDOG=1"} <= got:
            got.add(server.recv(256).decode().split("\n")[0])
        bgr = cv2.imread(str(load_class(synthetic_root, "alpha").test[0].path))
        camera.send("cam6", 1, bgr)
        deadline = time.time() + 10
        while run.daemon.metrics.total("frames_scored") < 1 and time.time() < deadline:
            time.sleep(0.05)
        text = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5).read()
        text = text.decode()
        assert 'moleflow_frames_in_total{camera="cam6"} 1.0' in text
        assert 'moleflow_frames_scored_total{camera="cam6"} 1.0' in text
        assert 'moleflow_stage_seconds_count{stage="backbone"} 1.0' in text
        assert "moleflow_mqtt_connects_total 1.0" in text  # the publisher's counters too
        assert "moleflow_healthy 1.0" in text and "moleflow_ingest_connections 1.0" in text
        assert "# HELP moleflow_frames_scored_total " in text and "process_cpu_seconds" in text
        health = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{mport}/healthz",
                                                   timeout=5).read())
        assert health["healthy"] and health["mqtt_connected"] and health["experts"]
        assert health["status"] == "healthy" and health["reasons"] == []
        assert all(health["threads"].values()) and {"ingest", "spool-pump", "mqtt-network",
                                                    "score-0"} <= set(health["threads"])
    finally:
        camera.close()
        run.stop()
        server.close()
