"""``moleflow fuzz`` and ``moleflow soak`` against the real daemon (a child process, Mosquitto,
ZeroMQ sockets) on a small engine set trained on a synthetic class."""

from __future__ import annotations

import pytest

from moleflow.calibration.calibrate import calibrate_engine_set
from moleflow.cli import main
from moleflow.config import CalibrationConfig, load_config
from moleflow.devtools.drive import synthetic_frames
from moleflow.devtools.fuzz import CAMERAS, run_fuzz
from moleflow.devtools.fuzz_cases import EITHER, HOSTILE, KINDS, VALID, Forge, plan
from moleflow.devtools.harness import mosquitto_path
from moleflow.devtools.soak import Row, compare, parse_rows
from moleflow.engines.export import export_engine_set
from moleflow.train.continual import train_tasks

pytestmark = [pytest.mark.mosquitto, pytest.mark.slow]

zmq = pytest.importorskip("zmq", reason="pyzmq is part of the edge extra")

SMALL = {"train.epochs": 2, "data.image_size": 64, "model.coupling_blocks": 2,
         "model.lora_rank": 8, "eval.overlays_per_class": 0, "train.val_fraction": 0.34}


@pytest.fixture(scope="module")
def engine_set(synthetic_root, tmp_path_factory):
    """One expert (alpha): the tools need a daemon that scores, not a good one."""
    if mosquitto_path() is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto; .ci/run does)")
    base = tmp_path_factory.mktemp("fuzz_soak")
    train_tasks(base / "run", synthetic_root, ["alpha"], load_config(None, SMALL),
                progress=False)
    export_engine_set(base / "run", base / "engines")
    calibrate_engine_set(base / "engines", synthetic_root, CalibrationConfig())
    return base / "engines"


def test_plan_holds_every_kind_with_unique_ids():
    forge = Forge(synthetic_frames(4, 32), seed=3)
    cases = plan(forge, hostile=200, valid=50, cameras=CAMERAS)
    assert {c.kind for c in cases} == {k.name for k in KINDS} | {VALID}
    assert len({c.frame_id for c in cases}) == len(cases) == 250
    assert sum(c.expect == VALID for c in cases) == 50
    assert {c.expect for c in cases} == {VALID, HOSTILE, EITHER}
    crafted = {c.kind: c.parts for c in cases}
    assert crafted["deep_brackets_5000"] == [b"[" * 5000, b"x"]
    assert b'"timestamp": NaN' in crafted["nan_timestamp"][0]
    assert b"1" + b"0" * 400 in crafted["huge_int_timestamp"][0]
    assert len(crafted["header_over_64k"][0]) > 65536
    assert [len(p) for p in crafted["twelve_1mb_parts"]] == [1 << 20] * 12


def test_fuzz_daemon_survives_and_reports_every_hostile_message(engine_set, tmp_path):
    report = run_fuzz(engine_set, load_config(None), messages=300, seed=0, out=tmp_path,
                      patience=2.0)
    text = report.text()
    print(text)
    checks = {c.name: c for c in report.checks}
    broken = {p.kind: p.outcome for p in report.probes if not p.ok}
    assert not broken, f"kinds mishandled alone: {broken}"
    assert checks["daemon alive"].ok
    assert checks["ingest answered to the end"].ok, checks["ingest answered to the end"].detail
    valid = checks["every valid frame has one result"]
    assert valid.ok, valid.detail
    counted = checks["every non-valid message reported or scored, once"]
    assert counted.ok, counted.detail
    assert checks["every MQTT payload is strict JSON"].ok, \
        checks["every MQTT payload is strict JSON"].detail
    assert not report.failed, text


def test_soak_prints_a_row_per_interval_and_compares_after_warmup(engine_set, capsys):
    rc = main(["soak", "--engines", str(engine_set), "--minutes", "0.2", "--interval", "2",
               "--fps", "5", "--cameras", "2", "--tolerance", "25"])
    out = capsys.readouterr().out
    rows = parse_rows(out)
    assert len(rows) == 7, out  # minute 0, then every 2 s for 12 s
    assert [round(r.minute * 60) for r in rows] == [0, 2, 4, 6, 8, 10, 12]
    assert rows[0].sent <= 2 and rows[-1].sent >= 100  # 2 cameras x 5 frames/s x 12 s
    assert all(b.sent >= a.sent and b.results >= a.results for a, b in zip(rows, rows[1:]))
    assert rows[-1].results > 0.8 * rows[-1].sent
    assert all(r.rss_mib > 20 and r.fds > 3 and r.threads > 2 for r in rows)
    assert "after the warm-up (minute 0.07 -> 0.20)" in out and "PASS" in out
    assert rc == 0, out


def test_soak_compare_flags_drift_after_the_warmup_only():
    rows = [Row(m, rss, fds, 10, 0, 0, 0) for m, rss, fds in
            [(0, 50.0, 10), (1, 100.0, 20), (2, 101.0, 20), (3, 104.0, 20)]]
    lines, ok = compare(rows, warmup_minutes=1, tolerance=5)
    assert ok and "+4.0 %" in lines[0]  # the warm-up's doubling is not compared
    lines, ok = compare(rows[:3] + [Row(3, 100.0, 22, 10, 0, 0, 0)], 1, 5)
    assert not ok and "fds 20 -> 22 (+10.0 %)" in lines[0]
    assert not compare(rows, warmup_minutes=3, tolerance=5)[1]  # nothing after it to compare
