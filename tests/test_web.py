"""The daemon's HTTP server (moleflow.edge.http): routes, refusals and the read-only page.

The route tests run the real server on a loopback port over a small source of canned answers
(the evidence JPEGs are real files); the daemon tests run the real daemon with a real broker and
ZeroMQ camera; the browser test renders the page in a headless Chromium.
"""

from __future__ import annotations

import http.client
import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from moleflow.edge.http import WebSource, serve_http
from tests.daemon_helpers import free_port

STATUS = {"status": {"version": "0.1.0", "device": "line1", "uptime_s": 12.5,
                     "mqtt_connected": True},
          "health": {"status": "healthy", "healthy": True, "reasons": []},
          "cameras": [{"camera": "cam<1>", "frames_in": 3, "frames_scored": 3, "alarms": 1,
                       "unknown": 0, "dropped": 0, "errors": 0}],
          "experts": [{"name": "alpha", "calibrated": True, "threshold": 1.5,
                       "map_threshold": 2.0, "false_alarm_rate": 0.01, "codec": "lossless"}]}


class FakeMetrics:
    content_type = "text/plain; version=0.0.4; charset=utf-8"

    def render(self) -> str:
        return "# TYPE moleflow_frames_in counter\nmoleflow_frames_in 3\n"


class Source:
    """Canned answers; records which evidence names the server asked for."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.asked: list[str] = []
        self.healthy = True
        self.alarms = [{"camera": "cam<1>", "frame": "7", "score_raw": float("nan"),
                        "evidence": {"frame": "a-frame.jpg", "overlay": "a-overlay.jpg",
                                     "url": "/evidence/a-frame.jpg"}}]

    def path_of(self, name: str) -> Path | None:
        self.asked.append(name)
        path = self.folder / name
        return path if path.is_file() else None

    def web(self, metrics=None) -> WebSource:
        return WebSource(status=lambda: STATUS,
                         health=lambda: {"status": "x", "healthy": self.healthy},
                         alarms=lambda: self.alarms, evidence=self.path_of,
                         metrics=metrics or FakeMetrics())


def request(port: int, path: str, method: str = "GET") -> tuple[int, dict, bytes]:
    """One raw request (http.client sends the path exactly as given: no dot-segment cleanup)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def server_once(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("web")
    folder = tmp_path / "evidence"
    folder.mkdir()
    image = np.zeros((48, 64, 3), np.uint8)
    image[10:30, 20:40] = (0, 0, 255)
    for name in ("a-frame.jpg", "a-overlay.jpg"):
        cv2.imwrite(str(folder / name), image)
    (tmp_path / "config.yaml").write_text("secret: do-not-serve\n")
    (folder / "notes.txt").write_text("not evidence\n")
    source = Source(folder)
    port = free_port()
    server = serve_http(source.web(), "127.0.0.1", port)
    yield source, port
    server.shutdown()


@pytest.fixture()
def served(server_once):
    """The module's server over canned answers, its source's records cleared."""
    source, port = server_once
    source.asked.clear()
    source.healthy = True
    return source, port


def test_page_assets_json_routes_metrics_and_health(served):
    source, port = served
    code, head, body = request(port, "/")
    assert code == 200 and head["content-type"].startswith("text/html")
    assert b'src="/app.js"' in body and b'href="/style.css"' in body
    assert "script-src 'self'" in head["content-security-policy"]
    for path, kind in (("/app.js", "text/javascript"), ("/style.css", "text/css")):
        code, head, body = request(port, path)
        assert code == 200 and head["content-type"].startswith(kind) and len(body) > 500
    code, head, body = request(port, "/api/status")
    assert code == 200 and head["content-type"] == "application/json"
    assert json.loads(body) == STATUS and head["cache-control"] == "no-store"
    code, _, body = request(port, "/api/alarms")
    alarms = json.loads(body)  # a NaN in a payload goes out as null: strict JSON
    assert code == 200 and alarms[0]["score_raw"] is None and b"NaN" not in body
    code, head, body = request(port, "/metrics")
    assert code == 200 and head["content-type"] == FakeMetrics.content_type
    assert body.decode() == FakeMetrics().render()
    code, _, body = request(port, "/healthz")
    assert code == 200 and json.loads(body) == {"status": "x", "healthy": True}
    source.healthy = False
    assert request(port, "/healthz")[0] == 503
    code, head, body = request(port, "/evidence/a-overlay.jpg")
    assert code == 200 and head["content-type"] == "image/jpeg"
    assert cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR).shape == (48, 64, 3)


def test_metrics_without_a_content_type_get_prometheus_text(tmp_path):
    class Plain:
        def render(self) -> str:
            return "moleflow_up 1\n"
    port = free_port()
    server = serve_http(Source(tmp_path).web(Plain()), "127.0.0.1", port)
    try:
        code, head, body = request(port, "/metrics")
    finally:
        server.shutdown()
    assert code == 200 and head["content-type"] == "text/plain; version=0.0.4"
    assert body == b"moleflow_up 1\n"


@pytest.mark.parametrize("path", [
    "/evidence/../config.yaml", "/evidence/%2e%2e/config.yaml", "/evidence/%2E%2E%2Fconfig.yaml",
    "/evidence/..%2fconfig.yaml", "/evidence/..%5cconfig.yaml", "/evidence/../../etc/passwd",
    "/evidence//etc/passwd", "/evidence/a/../a-frame.jpg", "/evidence/.a-frame.jpg",
    "/evidence/a-frame.jpg/", "/evidence/a-frame.jpg%00.txt", "/evidence/notes.txt",
    "/evidence/missing.jpg", "/evidence/", "/evidence", "/config.yaml", "/../config.yaml",
    "/web/app.js", "/api", "/api/status/x", "/nope"])
def test_unknown_paths_and_traversal_get_404(served, path):
    source, port = served
    code, _, body = request(port, path)
    assert code == 404, path
    assert b"secret" not in body and b"root:" not in body
    # only a plain file name ever reaches the evidence store
    assert all(name in ("missing.jpg",) for name in source.asked), source.asked


def test_head_is_get_without_a_body_and_other_methods_get_405(served):
    _, port = served
    for path in ("/", "/api/status", "/evidence/a-frame.jpg", "/metrics"):
        code, head, body = request(port, path, "HEAD")
        assert code == 200 and body == b""
        assert int(head["content-length"]) == len(request(port, path)[2]) > 0
    assert request(port, "/nope", "HEAD")[0] == 404
    for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "BREW"):
        code, head, _ = request(port, "/api/status", method)
        assert code == 405 and head["allow"] == "GET, HEAD", method


def test_a_failing_route_answers_500_and_the_server_keeps_serving(tmp_path):
    def broken() -> dict:
        raise RuntimeError("status exploded")
    source = Source(tmp_path)
    web = source.web()
    port = free_port()
    server = serve_http(WebSource(status=broken, health=web.health, alarms=web.alarms,
                                  evidence=web.evidence, metrics=web.metrics),
                        "127.0.0.1", port)
    try:
        code, _, body = request(port, "/api/status")
        assert code == 500 and "status exploded" in json.loads(body)["error"]
        assert request(port, "/api/alarms")[0] == 200
    finally:
        server.shutdown()
    with pytest.raises(OSError):  # shutdown() released the port: nothing answers any more
        request(port, "/api/alarms")


def test_a_busy_port_raises(tmp_path):
    import socket
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        with pytest.raises(OSError):
            serve_http(Source(tmp_path).web(), "127.0.0.1", taken.getsockname()[1])
    finally:
        taken.close()


def test_strict_json_replaces_non_finite_numbers_and_numpy_values():
    from moleflow.edge.wirejson import finite_values
    doc = finite_values({"a": [math.inf, np.float32(0.5), np.int64(3)], "b": np.array([1, 2]),
                       1: (float("nan"), None, True, "x")})
    assert doc == {"a": [None, 0.5, 3], "b": [1, 2], "1": [None, None, True, "x"]}
    json.dumps(doc, allow_nan=False)


# ----- the real daemon: its routes and its page in a headless Chromium --------------------------

def get_json(port: int, path: str):
    code, head, body = request(port, path)
    assert code == 200 and head["content-type"] == "application/json", (path, code, body[:200])
    return json.loads(body)


@pytest.fixture(scope="module")
def live(engine_set, synthetic_root, tmp_path_factory):
    """A daemon (real broker, PUSH camera) that scored beta's test images as camera cam1 (the
    defective ones with HTML in their frame ids), one undecodable cam1 message and one message
    naming no camera."""
    import time
    from types import SimpleNamespace

    from moleflow.data import load_class
    from tests.daemon_helpers import (Broker, Listener, PushCamera, Running, daemon_config,
                                      raw_frame)
    tmp = tmp_path_factory.mktemp("web_daemon")
    broker = Broker(tmp / "mosquitto").start()
    camera, port = PushCamera(), free_port()
    listener = Listener(broker.port, "moleflow/line1/cam1/#")
    try:
        run = Running(daemon_config(engine_set, broker, tmp, [camera.endpoint],
                                    **{"metrics.port": port,
                                       "evidence.folder": str(tmp / "evidence")}))
    except BaseException:
        camera.close()
        listener.close()
        broker.stop()
        raise
    try:
        items = load_class(synthetic_root, "beta").test
        for i, item in enumerate(items):
            frame = f"<b>{i}</b>" if item.label else str(i)
            camera.send("cam1", frame, cv2.imread(str(item.path)))
        broken = raw_frame("cam1", "broken", cv2.imread(str(items[0].path)))
        camera.socket.send_multipart([broken[0], b"\0" * 10])
        camera.socket.send_multipart([b"not a header"])  # names no camera: the row "?"
        deadline, doc, alarms = time.time() + 60, {}, []
        while time.time() < deadline:
            doc, alarms = get_json(port, "/api/status"), get_json(port, "/api/alarms")
            row, nameless = (doc["cameras"] + [{}, {}])[:2]
            if (row.get("frames_scored") == len(items) and row.get("errors") == 1
                    and row.get("alarms") == len(alarms) > 0 and nameless.get("errors") == 1):
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"the daemon did not score {len(items)} frames with an alarm "
                                 f"and a bad frame: {doc.get('cameras')}, {len(alarms)} alarms")
        results = listener.wait_for("cam1/result", len(items))
        yield SimpleNamespace(daemon=run.daemon, port=port, items=items, results=results,
                              alarms=listener.wait_for("cam1/alarm", len(alarms)))
    finally:
        camera.close()
        run.stop()
        listener.close()
        broker.stop()


@pytest.mark.mosquitto
def test_daemon_status_alarms_and_evidence_routes(live):
    port, n = live.port, len(live.items)
    doc = get_json(port, "/api/status")
    assert set(doc) == {"status", "health", "cameras", "experts"}
    st = doc["status"]
    assert st["device"] == "line1" and st["version"] and st["experts"] == ["alpha", "beta"]
    assert st["uptime_s"] > 0 and st["mqtt_connected"] is True
    assert doc["health"]["status"] in ("healthy", "degraded") and "reasons" in doc["health"]
    assert [e["name"] for e in doc["experts"]] == ["alpha", "beta"]
    for e in doc["experts"]:
        assert e["calibrated"] is True and e["codec"] and e["n_images"] > 0
        assert math.isfinite(e["threshold"]) and math.isfinite(e["map_threshold"])
        assert 0 < e["false_alarm_rate"] < 1
    alarms = get_json(port, "/api/alarms")
    unknown = sum(r["unknown"] for r in live.results)  # as the results on MQTT said
    assert doc["cameras"] == [{"camera": "cam1", "frames_in": n + 1, "frames_scored": n,
                               "alarms": len(live.alarms), "unknown": unknown,
                               "dropped": 0, "errors": 1},
                              {"camera": "?", "frames_in": 1, "frames_scored": 0, "alarms": 0,
                               "unknown": 0, "dropped": 0, "errors": 1}]
    # the page's alarms are the ones published, newest first
    assert sorted((a["frame"], a["score_raw"]) for a in alarms) == \
        sorted((a["frame"], a["score_raw"]) for a in live.alarms)
    # newest first: the reverse of the order they went out on MQTT (the frames' order; with two
    # scoring workers a later batch may finish first, so scored_at need not be sorted)
    assert [a["frame"] for a in alarms] == [a["frame"] for a in reversed(live.alarms)]
    assert all(a["camera"] == "cam1" and a["regions"] and a["expert"] == "beta"
               for a in alarms)
    for a in alarms:
        for kind in ("frame", "overlay"):
            code, head, body = request(port, "/evidence/" + a["evidence"][kind])
            image = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR)
            assert code == 200 and head["content-type"] == "image/jpeg" and image.shape[0] > 0
    for path in ("/evidence/../spool.sqlite", "/evidence/%2e%2e/spool.sqlite",
                 "/evidence/%2e%2e%2fspool.sqlite", "/evidence/spool.sqlite", "/nope"):
        assert request(port, path)[0] == 404, path
    assert request(port, "/api/alarms", "POST")[0] == 405
    code, head, body = request(port, "/metrics")  # as before the page came
    assert code == 200 and head["content-type"].startswith("text/plain")
    assert b"moleflow_frames_scored" in body and b'camera="cam1"' in body
    code, _, body = request(port, "/healthz")
    assert code == (200 if json.loads(body)["healthy"] else 503)


def chromium() -> str:
    import shutil
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip("no chromium binary (apt-get install chromium; .ci/run does)")
    return found


def browse(url: str, profile: Path, *args: str) -> str:
    import subprocess
    out = subprocess.run([chromium(), "--headless=new", "--no-sandbox", "--disable-gpu",
                          f"--user-data-dir={profile}", "--virtual-time-budget=5000", *args,
                          url], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@pytest.mark.browser
@pytest.mark.mosquitto
def test_the_page_in_a_headless_browser(live, tmp_path):
    import re
    url = f"http://127.0.0.1:{live.port}/"
    dom = browse(url, tmp_path / "profile", "--dump-dom")
    status, alarms = get_json(live.port, "/api/status"), get_json(live.port, "/api/alarms")
    section = lambda name: dom[dom.index(f'id="{name}"'):].split("</table>")[0]  # noqa: E731
    experts = section("experts")
    for e in status["experts"]:
        assert f'<td class="name">{e["name"]}</td>' in experts
        assert f">{e['threshold']:.3f}</td>" in experts and e["codec"] in experts
    cells = re.findall(r'<td class="(?:name|num[^"]*)">([^<]*)</td>', section("cameras"))
    assert cells == [v for cam in status["cameras"] for v in [cam["camera"]] + [
        f"{cam[k]:,}" for k in ("frames_in", "frames_scored", "alarms", "unknown", "dropped",
                                "errors")]]
    assert cells[0] == "cam1" and cells[7] == "?"
    rows = section("alarms").split("<tr>")[2:]  # after the header row
    assert len(rows) == len(alarms) > 0
    first = alarms[0]
    # the frame id's HTML is shown as text, never parsed into elements
    assert f"<td>{first['frame'].replace('<', '&lt;').replace('>', '&gt;')}</td>" in rows[0]
    assert "<b>" not in section("alarms")
    assert f"<strong>{first['score_raw']:.3f}</strong>" in rows[0]
    assert f'src="/evidence/{first["evidence"]["overlay"]}"' in rows[0]
    assert f'href="/evidence/{first["evidence"]["frame"]}"' in rows[0]
    assert 'data-loaded="yes"' in rows[0]  # the browser fetched and decoded the thumbnail
    assert f'<td class="num">{len(first["regions"])}</td>' in rows[0]
    assert 'id="device" class="device">line1<' in dom and "connected" in dom

    shot = tmp_path / "page.png"
    browse(url, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1280,900")
    image = cv2.imread(str(shot), cv2.IMREAD_COLOR)
    assert image is not None and image.shape == (900, 1280, 3)
    assert image.std() > 20 and len(np.unique(image.reshape(-1, 3), axis=0)) > 100
    header = image[:40].reshape(-1, 3).mean(axis=0)
    assert header.max() < 90  # the dark title bar was painted: the style sheet applied
