"""The daemon under hostile input and faults, against real Mosquitto and real ZeroMQ sockets:
crafted messages that used to kill ingest or a batch, the MQTT message-id wrap, a spool that
cannot be written, silent broker/TLS failures, bounded cameras and connections, CURVE."""

from __future__ import annotations

import json
import logging
import signal
import sqlite3
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import cv2
import pytest

from moleflow.config import load_config
from moleflow.edge.daemon import Daemon
from moleflow.edge.health import assess
from moleflow.edge.publisher import Publisher, strict_json
from moleflow.edge.queueing import FairQueue
from moleflow.edge.spool import AlarmSpool
from moleflow.data import load_class

from tests.daemon_helpers import (Broker, Listener, PushCamera, Running, check_payload,
                                  daemon_config, free_port, raw_frame)

pytestmark = pytest.mark.mosquitto

zmq = pytest.importorskip("zmq", reason="pyzmq is part of the edge extra")
import zmq.auth  # noqa: E402 (after the skip)


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


def tls_files(folder: Path) -> dict[str, Path]:
    """A CA, a server certificate for the name 'localhost' (not for 127.0.0.1), a client
    certificate, and a second CA that signed none of them."""
    folder.mkdir(parents=True, exist_ok=True)

    def sh(*args):
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)
    for ca in ("ca", "other"):
        sh("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={ca}",
           "-keyout", f"{ca}.key", "-out", f"{ca}.crt")
    for name, cn in (("server", "localhost"), ("client", "camera-client")):
        sh("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={cn}", "-keyout",
           f"{name}.key", "-out", f"{name}.csr")
        (folder / f"{name}.ext").write_text(f"subjectAltName=DNS:{cn}\n")
        sh("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
           "-CAcreateserial", "-days", "2", "-out", f"{name}.crt", "-extfile", f"{name}.ext")
    return {n: folder / n for n in ("ca.crt", "other.crt", "server.crt", "server.key",
                                    "client.crt", "client.key")}


@pytest.fixture()
def tls_broker(tmp_path):
    """Mosquitto with TLS that requires a client certificate signed by its CA."""
    import shutil
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    files = tls_files(tmp_path / "tls")
    b = Broker(tmp_path / "tls-mosquitto")
    # run as root (CI), mosquitto would switch to its own user, who cannot read pytest's
    # private temporary folders; elsewhere the option is ignored
    b.conf.write_text(f"user root\nlistener {b.port} 127.0.0.1\nallow_anonymous true\n"
                      f"cafile {files['ca.crt']}\ncertfile {files['server.crt']}\n"
                      f"keyfile {files['server.key']}\nrequire_certificate true\n")
    b.start()
    yield b, files
    b.stop()


def health_says(mport: int, words: str, timeout: float = 30.0) -> dict:
    doc: dict = {}

    def check():
        nonlocal doc
        doc = healthz(mport)  # degraded: the daemon runs (not restarted), the broker is wrong
        return doc.get("status") == "degraded" and any(words in r for r in doc["reasons"])
    wait_until(check, timeout, f"/healthz naming {words!r}; last: {doc}")
    return doc


@pytest.mark.parametrize("case", ["wrong host", "wrong port", "wrong CA", "hostname mismatch"])
def test_silent_broker_failures_are_logged_and_unhealthy(case, engine_set, tls_broker, tmp_path,
                                                         caplog):
    b, files = tls_broker
    tls = {"mqtt.tls": True, "mqtt.cert_file": str(files["client.crt"]),
           "mqtt.key_file": str(files["client.key"])}
    extra = {"wrong host": {"mqtt.host": "broker.invalid"},
             "wrong port": {"mqtt.port": free_port()},
             "wrong CA": {**tls, "mqtt.ca_file": str(files["other.crt"])},
             "hostname mismatch": {**tls, "mqtt.ca_file": str(files["ca.crt"])}}[case]
    expect = {"wrong host": "cannot connect to broker.invalid", "wrong port": "Connection refused", "wrong CA": "CERTIFICATE_VERIFY_FAILED",
              "hostname mismatch": "mismatch"}[case]
    mport = free_port()
    cfg = daemon_config(engine_set, b, tmp_path, [f"pull+tcp://127.0.0.1:{free_port()}"],
                        **{"metrics.port": mport, **extra})
    with caplog.at_level(logging.WARNING):
        daemon = Daemon(cfg)
        thread = threading.Thread(target=daemon.run, daemon=True)
        thread.start()
        try:
            doc = health_says(mport, expect)
            assert doc["status"] == "degraded" and not doc["mqtt"]["connected"], doc
            assert expect in caplog.text
        finally:
            daemon.stop()
            thread.join(30)


def test_tls_client_certificate_connects(engine_set, tls_broker, tmp_path):
    """The broker requires a client certificate: mqtt.cert_file/key_file give it; the server's
    certificate names 'localhost', so that is the host (127.0.0.1 is the mismatch case)."""
    b, files = tls_broker
    cfg = load_config(None, {"mqtt.host": "localhost", "mqtt.port": b.port, "mqtt.tls": True,
                             "mqtt.device_id": "line9", "mqtt.ca_file": str(files["ca.crt"]),
                             "mqtt.cert_file": str(files["client.crt"]),
                             "mqtt.key_file": str(files["client.key"])}).mqtt
    pub = Publisher(cfg, AlarmSpool(tmp_path / "s.sqlite"), {})
    pub.start()
    try:
        assert pub.connected.wait(15), pub.mqtt_fault.state()
    finally:
        pub.stop()


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
    server_public, _ = zmq.auth.load_certificate(keys / "server.key")

    def camera(secret_file: Path):
        sock = ctx.socket(zmq.REQ)
        sock.curve_publickey, sock.curve_secretkey = zmq.auth.load_certificate(secret_file)
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
        except socket.timeout:
            pass
        server.settimeout(3)
        with pytest.raises(socket.timeout):
            while True:
                assert server.recv(256).decode().split("\n")[0] != "WATCHDOG=1"
    finally:
        run.stop()
        server.close()
