"""The daemon's Prometheus metrics (moleflow.edge.metrics on prometheus-client): the exposition
a Prometheus server parses, and a running daemon's /metrics with the publisher's and the
spool's counters after alarms were delivered and dropped."""

from __future__ import annotations

import ast
import time
import urllib.request
from pathlib import Path

import cv2
import pytest
from prometheus_client.parser import text_string_to_metric_families

from moleflow.edge.metrics import SPECS, Metrics

EDGE = Path(__file__).resolve().parents[1] / "edge"


def parse(text: str) -> tuple[dict, dict]:
    """(families by name, sample values by (sample name, sorted label items))."""
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in families.values() for s in f.samples}
    return families, samples


def test_every_metric_has_help_a_type_and_prometheus_names_on_its_own_registry():
    a, b = Metrics(), Metrics()  # two daemons in one process: no clash, nothing shared
    a.inc("frames_scored", camera="cam1")
    a.inc("errors", 2, kind="bad_frame")
    a.set("queue_depth", 3)
    families, samples = parse(a.render())
    for name, spec in SPECS.items():
        family = families[f"moleflow_{name}"]
        assert family.documentation == spec.help and len(spec.help) > 15
        assert family.type == {"sampled": "counter"}.get(spec.kind, spec.kind)
    assert samples[("moleflow_frames_scored_total", (("camera", "cam1"),))] == 1
    assert samples[("moleflow_errors_total", (("kind", "bad_frame"),))] == 2
    assert samples[("moleflow_queue_depth", ())] == 3
    assert samples[("moleflow_alarms_dropped_total", (("reason", "spool_max_alarms"),))] == 0
    for family in families.values():
        if family.type == "counter":
            assert all(s.name.endswith("_total") for s in family.samples), family.name
        assert not any(s.name.endswith("_created") for s in family.samples)
    text = a.render()
    assert "# HELP moleflow_frames_scored_total Frames scored by the engine set" in text
    assert "# TYPE moleflow_frames_scored_total counter" in text
    # the process and platform collectors are on the daemon's registry
    assert samples[("process_resident_memory_bytes", ())] > 0
    assert ("process_cpu_seconds_total", ()) in samples and "python_info" in families
    _, other = parse(b.render())
    assert ("moleflow_frames_scored_total", (("camera", "cam1"),)) not in other
    assert b.total("errors") == 0 and a.total("errors") == 2
    assert a.value("errors", kind="bad_frame") == 2 and a.value("errors", kind="x") == 0
    assert a.series("errors") == [({"kind": "bad_frame"}, 2.0)] and b.series("errors") == []
    assert a.content_type.startswith("text/plain; version=")


def test_label_values_are_escaped():
    m = Metrics()
    odd = 'cam "7"\\back\nslash'
    m.inc("frames_in", camera=odd)
    text = m.render()
    assert 'camera="cam \\"7\\"\\\\back\\nslash"' in text
    _, samples = parse(text)
    assert samples[("moleflow_frames_in_total", (("camera", odd),))] == 1
    assert m.value("frames_in", camera=odd) == 1


def test_stage_latencies_are_histograms():
    m = Metrics()
    for seconds in (0.0004, 0.003, 0.003, 0.07, 9.0):
        m.observe("backbone", seconds)
    m.observe("total", 0.2)
    families, samples = parse(m.render())
    assert families["moleflow_stage_seconds"].type == "histogram"

    def bucket(le: str, stage: str = "backbone") -> float:
        return samples[("moleflow_stage_seconds_bucket", (("le", le), ("stage", stage)))]

    assert (bucket("0.001"), bucket("0.005"), bucket("0.1"), bucket("5.0"),
            bucket("+Inf")) == (1, 3, 4, 4, 5)
    assert samples[("moleflow_stage_seconds_count", (("stage", "backbone"),))] == 5
    assert samples[("moleflow_stage_seconds_sum", (("stage", "backbone"),))] == \
        pytest.approx(9.0764)
    assert bucket("0.2", "total") == 1 and bucket("0.1", "total") == 0


def test_collectors_run_before_each_scrape_and_a_failing_one_costs_only_itself(caplog):
    m = Metrics()
    state = {"open": 4, "refused": 0}

    def broken() -> None:
        raise RuntimeError("collector fault")

    m.collectors.append(broken)
    m.collectors.append(lambda: (m.set("ingest_connections", state["open"]),
                                 m.set("ingest_connections_refused", state["refused"])))
    _, samples = parse(m.render())
    assert samples[("moleflow_ingest_connections", ())] == 4
    assert samples[("moleflow_ingest_connections_refused_total", ())] == 0
    state.update(open=2, refused=7)
    _, samples = parse(m.render())
    assert samples[("moleflow_ingest_connections", ())] == 2
    assert samples[("moleflow_ingest_connections_refused_total", ())] == 7
    assert m.value("ingest_connections_refused") == 7
    assert "collector fault" in caplog.text


def test_an_undeclared_metric_or_wrong_labels_are_clear_errors():
    m = Metrics()
    with pytest.raises(KeyError, match="'frames_lost' is not a declared counter.*SPECS"):
        m.inc("frames_lost", camera="a")
    with pytest.raises(KeyError, match="not a declared counter"):
        m.inc("queue_depth")  # a gauge
    with pytest.raises(ValueError):
        m.inc("frames_scored", kind="a")
    with pytest.raises(ValueError, match="takes the labels"):
        m.set("ingest_connections_refused", 1, camera="a")


def test_every_metric_the_edge_code_counts_is_declared_with_its_labels():
    """Each ``metrics.inc/set("name", ..., label=...)`` in edge/ names a declared metric of
    that kind with exactly its labels (a typo would raise only when that path runs)."""
    calls = []
    for path in sorted(EDGE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("inc", "set")
                    and isinstance(node.func.value, ast.Attribute)
                    and node.func.value.attr == "metrics"):
                name = node.args[0]
                assert isinstance(name, ast.Constant), f"{path.name}:{node.lineno}"
                calls.append((f"{path.name}:{node.lineno}", node.func.attr, name.value,
                              sorted(k.arg for k in node.keywords)))
    assert len(calls) > 25
    for where, method, name, labels in calls:
        spec = SPECS.get(name)
        assert spec is not None, f"{where}: {name!r} is not in SPECS"
        kinds = ("counter",) if method == "inc" else ("gauge", "sampled")
        assert spec.kind in kinds, f"{where}: {name!r} is a {spec.kind}"
        assert labels == sorted(spec.labels), f"{where}: {name!r} labels {labels}"
    from moleflow.edge.webstate import CAMERA_COUNTERS  # the page reads these by name
    for _, name, labels in CAMERA_COUNTERS:
        assert sorted(["camera", *labels]) == sorted(SPECS[name].labels)


# ----- a running daemon -----------------------------------------------------------------------
def scrape(port: int) -> dict:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
    return parse(text.decode())[1]


def wait_for(port: int, key: tuple, value: float, timeout: float = 30.0) -> dict:
    deadline = time.time() + timeout
    while True:
        samples = scrape(port)
        if samples.get(key) == value or time.time() > deadline:
            assert samples.get(key) == value, f"{key}: {samples.get(key)}, not {value}"
            return samples
        time.sleep(0.1)


@pytest.mark.mosquitto
@pytest.mark.slow
def test_publisher_and_spool_counters_reach_metrics(engine_set, broker, tmp_path,
                                                    synthetic_root):
    from moleflow.data import load_class, load_images
    from moleflow.engines.pipeline import EngineSet, Pipeline
    from tests.daemon_helpers import PushCamera, Running, daemon_config, free_port
    bad = [t.path for t in load_class(synthetic_root, "alpha").test if t.label == 1]
    scores = Pipeline(EngineSet.open(engine_set)).score(load_images(bad, 64))
    alarming = [cv2.imread(str(p)) for p, s in zip(bad, scores) if s.anomalous]
    assert alarming, "the test needs frames that raise alarms"
    camera, mport = PushCamera(), free_port()
    run = Running(daemon_config(engine_set, broker, tmp_path, [camera.endpoint],
                                **{"metrics.port": mport, "spool.max_alarms": 10}))
    alarms = ("moleflow_alarms_total", (("camera", "cam1"),))
    delivered = ("moleflow_alarms_delivered_total", ())
    spool_drops = ("moleflow_alarms_dropped_total", (("reason", "spool_max_alarms"),))

    def dropped(topic: str) -> tuple:
        return ("moleflow_mqtt_dropped_total", (("topic", topic),))

    try:
        for i in range(3):  # connected: each alarm acknowledged by the broker
            camera.send("cam1", i, alarming[i % len(alarming)])
        m = wait_for(mport, delivered, 3)
        assert m[alarms] == 3 and m[("moleflow_mqtt_connects_total", ())] == 1
        assert m[spool_drops] == 0 and m[dropped("result")] == 0
        assert m[("moleflow_mqtt_connected", ())] == 1
        broker.stop()  # away: 14 alarms for a spool of 10, results and events not sent
        deadline = time.time() + 10
        while run.daemon.publisher.connected.is_set() and time.time() < deadline:
            time.sleep(0.05)
        for i in range(3, 17):
            camera.send("cam1", i, alarming[i % len(alarming)])
        m = wait_for(mport, alarms, 17)
        assert run.daemon.spool.dropped == 4 and m[spool_drops] == 4
        assert m[dropped("result")] == 14
        assert m[dropped("events")] >= 4  # an alarms_dropped event for each
        assert m[("moleflow_spooled_alarms", ())] == 10 and m[delivered] == 3
        assert m[("moleflow_mqtt_connected", ())] == 0
        assert m[("moleflow_frames_scored_total", (("camera", "cam1"),))] == 17
        assert run.daemon.health()["spool"]["dropped_alarms"] == 4
        broker.start()  # back: the ten spooled alarms are delivered
        m = wait_for(mport, delivered, 13, timeout=60)
        assert m[("moleflow_mqtt_connects_total", ())] == 2
        assert ("moleflow_mqtt_connect_failures_total", ()) in m
        m = wait_for(mport, ("moleflow_spooled_alarms", ()), 0)
        assert m[spool_drops] == 4 and m[("moleflow_mqtt_connected", ())] == 1
        assert m[("moleflow_stage_seconds_count", (("stage", "total"),))] == 17
    finally:
        camera.close()
        run.stop()
