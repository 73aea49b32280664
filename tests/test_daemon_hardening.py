"""The daemon under hostile input and faults, against real Mosquitto and real ZeroMQ sockets:
crafted messages that used to kill ingest or a batch, bounded cameras and connections, CURVE,
a bad reload, a busy metrics port, a dead ingest thread. The publisher and spool under faults:
test_publisher_faults.py; broker and TLS failures: test_broker_failures.py."""

from __future__ import annotations

import json
import time
from pathlib import Path

import cv2
import pytest

from moleflow.config import load_config
from moleflow.edge.queueing import FairQueue
from moleflow.data import load_class

from tests.daemon_helpers import (Listener, PushCamera, Running, check_payload,
                                  daemon_config, free_port, healthz, raw_frame, strict_loads,
                                  wait_until)

pytestmark = pytest.mark.mosquitto

zmq = pytest.importorskip("zmq", reason="pyzmq is part of the edge extra")
zmq_auth = pytest.importorskip("zmq.auth", reason="pyzmq is part of the edge extra")


# ----- crafted messages -----------------------------------------------------------------------
CRAFTED = {
    "5000 [": [b"[" * 5000, b"x"],
    "timestamp too big for a float": [b'{"msg": {"camera": "camA", "frame": "big", '
                                      b'"timestamp": 1' + b"0" * 400 + b'}}', b"x"],
    "NaN in the header": [b'{"msg": "camA|nan", "ts": NaN}', b"x"],
    "header over 64 KB": [json.dumps({"msg": "camA|h", "pad": "x" * 70000}).encode(), b"x"],
    "nested JSON": [b"[" * 100000 + b"]" * 100000, b"x"],
    "header a list": [b"[1, 2]", b"x"],
    "twelve parts": [b"x" * 1000] * 12,
    "empty parts": [b"", b""],
    "JPEG of absurd size": [b'{"msg": "camA|j"}',
                            b"\xff\xd8\xff\xc0\x00\x11\x08\xff\xff\xff\xff" + bytes(40) + b"\xff\xd9"],
}


def test_crafted_messages_cost_only_themselves(engine_set, broker, tmp_path, synthetic_root):
    """Each message that killed ingest or lost its batch: reported, and the valid frames sent
    around it (batched with it: one worker, batches of 4) are all published, as strict JSON."""
    port = free_port()
    listener = Listener(broker.port, "moleflow/line1/#")
    run = Running(daemon_config(engine_set, broker, tmp_path, [f"rep+tcp://127.0.0.1:{port}"],
                                **{"engines.workers": 1, "ingest.max_batch": 4,
                                   "ingest.queue_size": 64}))
    ctx = zmq.Context()
    req = ctx.socket(zmq.REQ)
    req.setsockopt(zmq.RCVTIMEO, 10000)
    req.connect(f"tcp://127.0.0.1:{port}")
    bgr = cv2.imread(str(load_class(synthetic_root, "alpha").test[0].path))
    try:
        sent = []
        for i, (name, parts) in enumerate(CRAFTED.items()):
            for msg in (parts, raw_frame("camA", f"v{i}", bgr, stamp="NaN" if i % 2 else "1e999")):
                req.send_multipart(msg)
                assert req.recv() == b"OK", f"no answer after {name}"  # ingest still alive
            sent.append(f"v{i}")
        results = listener.wait_for("camA/result", len(sent))
        assert sorted(r["frame"] for r in results) == sorted(sent)
        raw = [p for t, p, _ in listener.messages if t.endswith("camA/result")]
        for payload in raw:
            r = strict_loads(payload)
            assert r["sent_at"] is None  # NaN / overflowing stamps become null, not NaN
            check_payload("result", r)
        events = listener.wait_for("/events", len(CRAFTED))
        assert len(events) == len(CRAFTED) == run.daemon.metrics.total("errors")
        for e in events:
            check_payload("event", e)
        text = " ".join(e["detail"] for e in events)
        for reason in ("nested too deeply", "exceeds 65536 bytes", "NaN is not a JSON number",
                       "expected 2 message parts (JSON header, buffer), got 12",
                       "exceeds ingest.max_side"):
            assert reason in text
        assert run.daemon.health()["threads"]["ingest"]
    finally:
        ctx.destroy(linger=0)
        run.stop()
        listener.close()


def test_cameras_connections_and_message_size_are_bounded(engine_set, broker, tmp_path,
                                                         synthetic_root):
    port = free_port()
    cfg = daemon_config(engine_set, broker, tmp_path, [f"pull+tcp://127.0.0.1:{port}"],
                        **{"ingest.max_cameras": 2, "ingest.max_connections": 2,
                           "ingest.max_message_bytes": 100_000})
    run = Running(cfg)
    ctx = zmq.Context()
    bgr = cv2.imread(str(load_class(synthetic_root, "alpha").test[0].path))
    pushes = []
    try:
        for _ in range(2):
            pushes.append(ctx.socket(zmq.PUSH))
            pushes[-1].connect(f"tcp://127.0.0.1:{port}")
        wait_until(lambda: run.daemon.ingest.connections == 2, 10, "two connections")
        extra = ctx.socket(zmq.PUSH)
        extra.connect(f"tcp://127.0.0.1:{port}")
        wait_until(lambda: run.daemon.ingest.refused >= 1, 10, "a third connection refused")
        extra.close(0)
        for cam in ("cam1", "cam2", "cam3", "cam4"):
            pushes[0].send_multipart(raw_frame(cam, "1", bgr))
        # 12 parts of 20 KB each pass the per-part limit but not the total
        pushes[1].send_multipart([b"y" * 20_000] * 12)
        pushes[1].send_multipart([b'{"msg": "cam1|big"}', b"\xff\xd8" + bytes(150_000)])
        wait_until(lambda: run.daemon.metrics.total("frames_scored") >= 2
                   and run.daemon.metrics.total("errors") >= 5, 20, "frames and errors")
        m = run.daemon.metrics
        assert m.value("errors", kind="camera_refused") == 2
        assert m.value("errors", kind="connection_refused") == 1
        assert m.value("errors", kind="bad_frame") == 2
        # no series for refused cameras ('?': messages too broken to name one)
        assert {labels["camera"] for labels, _ in m.series("frames_in")} == {
            "cam1", "cam2", "?"}
    finally:
        ctx.destroy(linger=0)  # closes every socket, also one a failed wait left open
        run.stop()


def test_a_flooding_camera_cannot_starve_a_slow_one() -> None:
    q: FairQueue[str] = FairQueue(size=16)
    scored = []
    for tick in range(300):              # 90 frames of "fast" for every 1 of "slow"
        for k in range(90):
            q.admits("fast") and q.put("fast", f"f{tick}.{k}")
        if tick % 30 == 0:
            q.admits("slow") and q.put("slow", f"s{tick}")
        scored += q.take(2)              # the scorer keeps up with a fraction only
    assert [s for s in scored if s.startswith("s")] == [f"s{t}" for t in range(0, 300, 30)]
    allowed: FairQueue[str] = FairQueue(size=4, cameras=["a"])
    assert allowed.admits("a") and not allowed.admits("b") and allowed.admits("?")


def test_curve_lets_only_known_cameras_in(engine_set, broker, tmp_path, synthetic_root):
    """ingest.curve_secret_key + curve_clients: a camera with an allowed key is scored; one
    with another key is refused at the handshake and reported."""
    from moleflow.cli import main
    keys = tmp_path / "keys"
    assert main(["keys", "--out", str(keys), "--name", "server"]) == 0
    assert main(["keys", "--out", str(keys / "clients"), "--name", "cam1"]) == 0
    assert main(["keys", "--out", str(keys / "strangers"), "--name", "intruder"]) == 0
    port = free_port()
    listener = Listener(broker.port, "moleflow/line1/#")
    run = Running(daemon_config(engine_set, broker, tmp_path, [f"rep+tcp://127.0.0.1:{port}"],
                                **{"ingest.curve_secret_key": str(keys / "server.key_secret"),
                                   "ingest.curve_clients": str(keys / "clients")}))
    ctx = zmq.Context()
    bgr = cv2.imread(str(load_class(synthetic_root, "alpha").test[0].path))
    server_public, _ = zmq_auth.load_certificate(keys / "server.key")

    def camera(secret_file: Path):
        sock = ctx.socket(zmq.REQ)
        sock.curve_publickey, sock.curve_secretkey = zmq_auth.load_certificate(secret_file)
        sock.curve_serverkey = server_public
        sock.setsockopt(zmq.RCVTIMEO, 3000)
        sock.setsockopt(zmq.SNDTIMEO, 3000)  # a refused REQ socket has no peer to send to
        sock.connect(f"tcp://127.0.0.1:{port}")
        return sock
    try:
        good = camera(keys / "clients" / "cam1.key_secret")
        good.send_multipart(raw_frame("cam1", "1", bgr))
        assert good.recv() == b"OK"
        assert listener.wait_for("cam1/result", 1)[0]["frame"] == "1"
        bad = camera(keys / "strangers" / "intruder.key_secret")
        with pytest.raises(zmq.Again):  # refused at the handshake: no send, or no answer
            bad.send_multipart(raw_frame("cam2", "1", bgr))
            bad.recv()
        event = listener.wait_for("/events", 1)[0]
        assert event["event"] == "connection_refused" and "key not allowed" in event["detail"]
        assert not [r for r in listener.json("/result") if r["camera"] == "cam2"]
    finally:
        ctx.destroy(linger=0)
        run.stop()
        listener.close()


# ----- engine set and config gaps ---------------------------------------------------------------
@pytest.mark.parametrize("broken", ["a JSON list", "no input.mean"])
def test_a_bad_reload_keeps_the_running_set(broken, engine_set, broker, tmp_path, synthetic_root):
    """SIGHUP with a broken manifest used to stop the daemon: now it reports reload_failed and
    goes on scoring with the set it had."""
    import shutil
    live = tmp_path / "engines"
    shutil.copytree(engine_set, live)
    camera = PushCamera()
    listener = Listener(broker.port, "moleflow/line1/#")
    run = Running(daemon_config(live, broker, tmp_path, [camera.endpoint]))
    bgr = cv2.imread(str(load_class(synthetic_root, "beta").test[0].path))
    try:
        manifest = json.loads((live / "manifest.json").read_text())
        if broken == "a JSON list":
            manifest = [manifest]
        else:
            del manifest["input"]["mean"]
        (live / "manifest.json").write_text(json.dumps(manifest))
        run.daemon.reload()
        event = next(e for e in listener.wait_for("/events", 1) if e["event"] == "reload_failed")
        assert "manifest.json" in event["detail"]
        check_payload("event", event)
        camera.send("cam7", "after", bgr)
        assert listener.wait_for("cam7/result", 1)[0]["expert"] == "beta"
        assert run.thread.is_alive() and run.daemon.metrics.value("errors", kind="reload") == 1
    finally:
        camera.close()
        run.stop()
        listener.close()


def test_metrics_port_in_use_and_topic_levels_are_named(engine_set, broker, tmp_path, capsys):
    import socket
    from moleflow.cli import main
    from moleflow.config import ConfigError
    for bad in ("edge/#", "line+1", ""):
        with pytest.raises(ConfigError, match="mqtt.device_id"):
            load_config(None, {"mqtt.device_id": bad})
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    conf = tmp_path / "edge.yaml"
    conf.write_text(json.dumps({"engines": {"path": str(engine_set)},
                                "mqtt": {"port": broker.port},
                                "ingest": {"endpoints": [f"pull+tcp://127.0.0.1:{free_port()}"]},
                                "spool": {"path": str(tmp_path / "s.sqlite")},
                                "metrics": {"port": taken.getsockname()[1]}}))
    try:
        assert main(["serve", "--config", str(conf)]) == 2
        assert "metrics.port: cannot listen on 127.0.0.1" in capsys.readouterr().err
    finally:
        taken.close()


def test_a_dead_ingest_thread_stops_the_watchdog(engine_set, broker, tmp_path, monkeypatch):
    """The watchdog covers every thread: with ingest gone, /healthz says unhealthy and the
    pings stop, so systemd restarts the daemon (it used to stay "healthy" and deaf)."""
    import socket
    notify = tmp_path / "notify.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(notify))
    server.settimeout(3)
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify))
    mport = free_port()
    run = Running(daemon_config(engine_set, broker, tmp_path,
                                [f"pull+tcp://127.0.0.1:{free_port()}"], **{"metrics.port": mport}))
    try:
        wait_until(lambda: healthz(mport).get("status") == "healthy", 15, "healthy at first")
        while server.recv(256).decode().split("\n")[0] != "WATCHDOG=1":
            pass
        run.daemon.ingest._stop.set()  # the thread ends as if it had crashed
        wait_until(lambda: healthz(mport).get("status") == "unhealthy", 15, "unhealthy")
        assert "thread ingest is not running" in healthz(mport)["reasons"]
        time.sleep(1.5)  # the main loop noticed; drain what was sent before
        server.settimeout(0.1)
        try:
            while True:
                server.recv(256)
        except TimeoutError:
            pass
        server.settimeout(3)
        with pytest.raises(socket.timeout):
            while True:
                assert server.recv(256).decode().split("\n")[0] != "WATCHDOG=1"
    finally:
        run.stop()
        server.close()
