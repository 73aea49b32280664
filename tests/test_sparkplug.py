"""Sparkplug B output against a real Mosquitto, decoded by a second, independent implementation:
Eclipse Tahu's JavaScript codec (npm ``sparkplug-payload``, protobufjs), run by node in a
subprocess and installed by the first test into ``.cache/sparkplug-js`` (.ci/run installs node
and npm). The daemon encodes with the Python protobuf module of the ``sparkplug`` extra."""

from __future__ import annotations

import base64
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import paho.mqtt.client as mqtt
import pytest
import yaml

from moleflow.data import load_class
from moleflow.engines.pipeline import EngineSet

from tests.conftest import run_without
from tests.daemon_helpers import Listener, PushCamera, daemon_config

pytest.importorskip("zmq", reason="pyzmq is part of the edge extra")
ROOT = Path(__file__).resolve().parents[1]
JS_PACKAGE = "sparkplug-payload@1.0.3"
GROUP, NODE = "plant1", "line1"


class TahuJs:
    """``node tests/sparkplug_codec.js`` over Tahu's JS codec."""

    def __init__(self, node: str, modules: Path) -> None:
        self.node, self.modules = node, modules

    def _run(self, mode: str, text: str) -> str:
        out = subprocess.run([self.node, str(ROOT / "tests" / "sparkplug_codec.js"), mode],
                             input=text, capture_output=True, text=True, timeout=60,
                             env={"SPARKPLUG_JS_MODULES": str(self.modules), "PATH": "/usr/bin"})
        assert out.returncode == 0, out.stderr
        return out.stdout

    def decode(self, payloads: list[bytes]) -> list[dict]:
        return json.loads(self._run("decode", json.dumps(
            [base64.b64encode(p).decode() for p in payloads])))

    def encode(self, payload: dict) -> bytes:
        return base64.b64decode(self._run("encode", json.dumps(payload)))


@pytest.fixture(scope="module")
def tahu_js() -> TahuJs:
    node, npm = shutil.which("node"), shutil.which("npm")
    if not (node and npm):
        pytest.skip("node and npm run Tahu's JS Sparkplug codec (.ci/run installs them)")
    modules = ROOT / ".cache" / "sparkplug-js"
    if not (modules / "node_modules" / "sparkplug-payload" / "package.json").is_file():
        modules.mkdir(parents=True, exist_ok=True)
        out = subprocess.run([npm, "install", "--prefix", str(modules), "--no-audit", "--no-fund",
                              "--ignore-scripts", JS_PACKAGE], capture_output=True, text=True,
                             timeout=600)
        assert out.returncode == 0, f"npm install {JS_PACKAGE} failed: {out.stderr[-2000:]}"
    return TahuJs(node, modules)


def metrics_of(payload: dict) -> dict[str, tuple[str, object]]:
    return {m["name"]: (m["type"], m["value"]) for m in payload["metrics"]}


SERVE = "import sys; from moleflow.cli import main; sys.exit(main(['serve', *sys.argv[1:]]))"


class Served:
    """``moleflow serve`` in its own process (so it can be killed), config from ``cfg``."""

    def __init__(self, cfg, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        conf = cfg.to_dict()
        conf["logging"]["json"] = False
        self.config = folder / "config.yaml"
        self.config.write_text(yaml.safe_dump(conf, sort_keys=False))
        self.log = open(folder / "daemon.log", "ab")
        self.proc = subprocess.Popen([sys.executable, "-c", SERVE, "--config", str(self.config)],
                                     stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT)
        self.folder = folder

    def end(self, sig: int) -> None:
        self.proc.send_signal(sig)
        self.proc.wait(60)
        self.log.close()

    def tail(self) -> str:
        return (self.folder / "daemon.log").read_text()[-3000:]


def spb(listener: Listener, kind: str) -> list[tuple[str, bytes]]:
    with listener.lock:
        return [(t, p) for t, p, _ in listener.messages if t.split("/")[2] == kind]


def wait(what, timeout: float = 120.0, served: Served | None = None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = what()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError("timed out" + (f"; daemon log: {served.tail()}" if served else ""))


@pytest.mark.mosquitto
@pytest.mark.slow
def test_sparkplug_births_data_and_deaths_decoded_by_tahu(engine_set, broker, tmp_path,
                                                          synthetic_root, tahu_js):
    camera = PushCamera()
    cfg = daemon_config(engine_set, broker, tmp_path, [camera.endpoint],
                        **{"sparkplug.enabled": True, "sparkplug.group_id": GROUP,
                           "ingest.products": ["cam9=alpha"]})
    sp = Listener(broker.port, "spBv1.0/#")
    results = Listener(broker.port, f"moleflow/{NODE}/#")
    served = Served(cfg, tmp_path / "run1")
    try:
        wait(lambda: spb(sp, "DBIRTH"), served=served)  # NBIRTH, then cam9's DBIRTH
        items = load_class(synthetic_root, "beta").test
        for i, item in enumerate(items):
            camera.send("cam1", i, cv2.imread(str(item.path)))
        json_results = results.wait_for("cam1/result", len(items), timeout=120)
        wait(lambda: len(spb(sp, "DDATA")) >= len(items) - 1, served=served)
        served.end(signal.SIGKILL)  # no clean stop: the broker publishes the will
        wait(lambda: spb(sp, "NDEATH"))
    finally:
        camera.close()
        if served.proc.poll() is None:
            served.end(signal.SIGKILL)
    with sp.lock:
        first = [(t, p) for t, p, _ in sp.messages]
    decoded = tahu_js.decode([p for _, p in first])
    topics = [t for t, _ in first]
    base = f"spBv1.0/{GROUP}"
    assert topics[:3] == [f"{base}/NBIRTH/{NODE}", f"{base}/DBIRTH/{NODE}/cam9",
                          f"{base}/DBIRTH/{NODE}/cam1"]
    assert topics[3:-1] == [f"{base}/DDATA/{NODE}/cam1"] * (len(items) - 1)
    assert topics[-1] == f"{base}/NDEATH/{NODE}"
    # seq 0, 1, 2, ... in publication order on every message but NDEATH, which has none
    assert [d["seq"] for d in decoded[:-1]] == list(range(len(decoded) - 1))
    assert "seq" not in decoded[-1]
    nbirth, ndeath = metrics_of(decoded[0]), metrics_of(decoded[-1])
    assert nbirth["bdSeq"][0] == "Int64" and ndeath == {"bdSeq": nbirth["bdSeq"]}
    assert nbirth["Node Control/Rebirth"] == ("Boolean", False)
    assert nbirth["experts"] == ("String", "alpha,beta")
    assert nbirth["backend"] == ("String", "onnxruntime")
    idle = metrics_of(decoded[1])  # cam9: born before any frame, all values null
    assert idle["frames"] == ("UInt64", 0) and idle["score"] == ("Double", None)
    # every frame's DBIRTH/DDATA carries what its JSON result says
    calibration = EngineSet.open(engine_set).calibration
    by_frame = {r["frame"]: r for r in json_results}
    alarms = 0
    for n, payload in enumerate(decoded[2:-1], start=1):
        m = metrics_of(payload)
        r = by_frame[m["frame"][1]]
        assert m["frame"] == ("String", str(n - 1))  # in frame order
        assert m["score"] == ("Double", r["score"]) and m["score_raw"] == ("Double",
                                                                         r["score_raw"])
        assert m["expert"] == ("String", r["expert"])
        assert m["threshold"] == ("Double", calibration[r["expert"]].threshold)
        assert m["anomalous"] == ("Boolean", r["decision"] == "anomalous")
        assert m["unknown"] == ("Boolean", r["unknown"])
        alarms += r["decision"] == "anomalous"
        assert m["frames"] == ("UInt64", n) and m["alarms"] == ("UInt64", alarms)
        assert abs(payload["timestamp"] / 1000 - r["scored_at"]) < 5
    assert alarms > 0
    bdseq = nbirth["bdSeq"][1]

    # a restart: the next bdSeq (kept next to the spool); an NCMD Rebirth (encoded by Tahu's
    # codec) births again; a clean stop publishes NDEATH with this session's bdSeq
    sp.messages.clear()
    served = Served(cfg, tmp_path / "run2")
    try:
        wait(lambda: spb(sp, "DBIRTH"), served=served)
        rebirth = tahu_js.encode({"timestamp": int(time.time() * 1000), "metrics": [
            {"name": "Node Control/Rebirth", "type": "Boolean", "value": True}]})
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        client.connect("127.0.0.1", broker.port)
        client.loop_start()
        for hostile in (b"\xff\x00not protobuf", b"\x0a" * 5000):  # ignored, logged
            client.publish(f"{base}/NCMD/{NODE}", hostile, qos=0).wait_for_publish(5)
        client.publish(f"{base}/NCMD/{NODE}", rebirth, qos=0).wait_for_publish(5)
        client.loop_stop()
        client.disconnect()
        wait(lambda: len(spb(sp, "DBIRTH")) >= 2, served=served)
        served.end(signal.SIGTERM)
        wait(lambda: spb(sp, "NDEATH"))
    finally:
        if served.proc.poll() is None:
            served.end(signal.SIGKILL)
        sp.close()
        results.close()
    with sp.lock:
        second = [(t, p) for t, p, _ in sp.messages if "/NCMD/" not in t]
    decoded = tahu_js.decode([p for _, p in second])
    kinds = [t.split("/")[2] for t, _ in second]
    assert kinds == ["NBIRTH", "DBIRTH", "NBIRTH", "DBIRTH", "NDEATH"], kinds
    assert [d.get("seq") for d in decoded] == [0, 1, 0, 1, None]
    session = [metrics_of(d)["bdSeq"] for d in decoded if d["metrics"][0]["name"] == "bdSeq"]
    assert session == [("Int64", (bdseq + 1) % 256)] * 3  # NBIRTH, NBIRTH again, NDEATH
    assert served.proc.returncode == 0, served.tail()


def test_sparkplug_without_its_extra_says_which_to_install(tmp_path):
    out = run_without(("sparkplub_b_packets",), (
        "from moleflow.edge.sparkplug import payload_module\n"
        "try:\n    payload_module()\nexcept Exception as exc:\n    print(exc)\n"))
    assert "sparkplug.enabled needs the 'sparkplug' extra" in out.stdout, out.stderr
    assert "moleflow-edge[sparkplug]" in out.stdout


class Recorder:
    """Stands in for the paho client: records what the node publishes."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    def publish(self, topic, payload, qos=0, retain=False):
        self.sent.append((topic, payload))
        return type("Info", (), {"rc": 0})()


def test_ddata_throttle_keeps_anomalous_frames_and_seq_wraps(tmp_path):
    from moleflow.config import load_config
    from moleflow.edge.metrics import Metrics
    from moleflow.edge.sparkplug import SparkplugNode, payload_module
    cfg = load_config(None, {"sparkplug.enabled": True, "sparkplug.min_interval": 3600.0,
                             "spool.path": str(tmp_path / "spool.sqlite")})
    node = SparkplugNode(cfg, {"experts": ["a"]}, Metrics())
    node.client = Recorder()
    node.connected.set()
    node._need_birth = True

    def frame(i: int, decision: str) -> None:
        node.frame({"camera": "c", "frame": str(i), "score": 0.1, "score_raw": 1.0,
                    "expert": "a", "unknown": False, "decision": decision}, 2.0)

    frame(0, "normal")                       # NBIRTH, DBIRTH with this frame
    for i in range(1, 600):                  # throttled: only the anomalous ones go out
        frame(i, "anomalous" if i % 2 else "normal")
    pb = payload_module()
    decoded = [(t.split("/")[2], pb.Payload.FromString(p)) for t, p in node.client.sent]
    assert [k for k, _ in decoded[:2]] == ["NBIRTH", "DBIRTH"]
    data = [p for k, p in decoded[2:]]
    assert all(k == "DDATA" for k, _ in decoded[2:]) and len(data) == 300
    assert [int({m.name: m for m in p.metrics}["frame"].string_value) for p in data] == \
        list(range(1, 600, 2))
    last = {m.name: m for m in data[-1].metrics}
    assert (last["frames"].long_value, last["alarms"].long_value) == (600, 300)
    seqs = [p.seq for _, p in decoded]
    assert seqs == [i % 256 for i in range(len(seqs))] and 0 in seqs[1:]  # wrapped past 255
    assert (tmp_path / "sparkplug-bdseq").read_text() == "1\n"  # the next start's bdSeq
