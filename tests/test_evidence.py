"""Evidence per alarm: the overlay renderer, the evidence store's retention and safety, the
daemon's alarms naming JPEG files that exist, and map messages that name their frame."""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from moleflow.config import EvidenceConfig, load_config
from moleflow.edge.evidence import EvidenceError, EvidenceStore, safe_part
from moleflow.edge.messages import png_text, png_with_text
from moleflow.overlay import BOX, Layout, render_overlay

THR = 0.6


def _scene(size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """A dark grey textured part and a 64x64 map with one hot disc (upper left) over THR."""
    rng = np.random.default_rng(0)
    frame = np.repeat(rng.integers(20, 90, (size, size, 1), dtype=np.uint8), 3, axis=2)
    amap = np.full((64, 64), 0.3, np.float32)
    yy, xx = np.mgrid[:64, :64]
    amap += 0.6 * np.exp(-((yy - 16) ** 2 + (xx - 16) ** 2) / (2 * 6.0 ** 2))
    return frame, amap


def _white(px: np.ndarray) -> np.ndarray:
    return (px >= 200).all(axis=-1)


def _green(px: np.ndarray) -> np.ndarray:
    """Drawn green (anti-aliased too): on the grey frame only the outline is this green."""
    b, g, r = (px[..., i].astype(int) for i in range(3))
    return (g > r + 40) & (g > b + 40)


def test_overlay_keeps_the_part_and_draws_contour_bar_and_banner():
    frame, amap = _scene()
    out = render_overlay(frame, amap, map_threshold=THR, score=0.93, threshold=0.5, regions=[])
    lay = Layout.of(256, 256)
    assert out.dtype == np.uint8 and out.shape == (256 + lay.banner, 256 + lay.bar, 3)
    view = out[lay.banner:, :256]
    # the part stays visible: far from the hot disc the frame's own pixels, untouched
    assert np.array_equal(view[128:, 128:], frame[128:, 128:])
    # the hot disc is tinted (heat blended), not replaced: still correlated with the frame
    big = cv2.resize(amap, (256, 256))
    hot = big >= THR
    assert np.abs(view[hot].astype(int) - frame[hot]).mean() > 20
    # the threshold contour: white (the frame is dark) exactly along the map >= THR border
    border = cv2.morphologyEx(hot.astype(np.uint8), cv2.MORPH_GRADIENT, np.ones((3, 3)))
    assert _white(view)[border > 0].mean() > 0.3
    near = cv2.dilate(border, np.ones((7, 7))) > 0
    assert _white(view)[~near].sum() == 0
    # colour bar: JET from red (top) to blue (bottom) in the right-hand panel
    bar = out[lay.banner:, 256:]
    column = bar[:, int(4 * lay.unit) + 4]
    top_px, bottom_px = column[10].astype(int), column[-10].astype(int)
    assert top_px[2] > 100 and top_px[2] > top_px[0]      # red at the top (BGR)
    assert bottom_px[0] > 100 and bottom_px[0] > bottom_px[2]  # blue at the bottom
    assert _white(bar).sum() > 20                           # its scale is written beside it
    # banner: ANOMALOUS in red, the score line in white
    banner = out[:lay.banner]
    reds = (banner[..., 2] > 200) & (banner[..., 0] < 120)
    assert reds.sum() > 30 and _white(banner).sum() > 30
    normal = render_overlay(frame, amap, map_threshold=THR, score=0.2, threshold=0.5)
    greens = (normal[:lay.banner, :, 1] > 180) & (normal[:lay.banner, :, 2] < 160)
    assert greens.sum() > 30 and ((normal[:lay.banner, :, 2] > 200)
                                  & (normal[:lay.banner, :, 0] < 120)).sum() == 0


def test_overlay_draws_regions_and_ground_truth_and_takes_any_map_size():
    frame, amap = _scene(200)
    gt = np.zeros((50, 50), np.uint8)
    gt[30:45, 30:45] = 255  # lower right, away from the hot disc
    region = {"x": 8, "y": 8, "w": 16, "h": 16, "box": [0.125, 0.125, 0.375, 0.375]}
    out = render_overlay(frame, amap, map_threshold=THR, score=0.9, threshold=0.5,
                         regions=[region], ground_truth=gt, label="cam1 #7")
    lay = Layout.of(200, 200)
    view = out[lay.banner:, :200]
    assert (view[25, 25:75] == BOX).all(axis=-1).mean() > 0.9       # the box's top edge
    green = _green(view)
    assert green[118:182, 118:182].sum() > 40  # around the mask (lower right) ...
    assert green[100:, :100].sum() == 0 and green[:100, 100:].sum() == 0  # ... and only there
    big = render_overlay(cv2.resize(frame, (512, 512)), amap, map_threshold=THR, score=None,
                         threshold=None)
    big_lay = Layout.of(512, 512)
    assert big.shape == (512 + big_lay.banner, 512 + big_lay.bar, 3) and big_lay.unit == 2.0
    with pytest.raises(ValueError, match="anomaly_map"):
        render_overlay(frame, np.zeros(5), map_threshold=THR, score=1, threshold=0.5)
    with pytest.raises(ValueError, match="frame"):
        render_overlay(np.zeros((4, 4, 3), np.uint8), amap, map_threshold=THR, score=1,
                       threshold=0.5)


def _cfg(folder: Path, **kw) -> EvidenceConfig:
    return replace(EvidenceConfig(), folder=str(folder), **kw)


def _save(store: EvidenceStore, frame: str, when: float | None = None) -> dict[str, str]:
    img = np.random.default_rng(len(frame)).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    return store.save("cam/1", frame, {"frame": img, "overlay": img}, when=when)


def test_retention_by_count_keeps_the_newest_alarms(tmp_path):
    store = EvidenceStore(_cfg(tmp_path / "ev", max_files=6))
    names = [_save(store, f"f{i}") for i in range(5)]
    assert sorted(p.name for p in (tmp_path / "ev").iterdir()) == sorted(
        n for saved in names[2:] for n in saved.values())
    assert names[0]["frame"].startswith("cam_1-f0-") and names[0]["frame"].endswith("-frame.jpg")
    assert store.path_of(names[0]["overlay"]) is None                     # pruned
    kept = store.path_of(names[4]["overlay"])
    assert kept == tmp_path / "ev" / names[4]["overlay"]
    assert cv2.imdecode(np.frombuffer(kept.read_bytes(), np.uint8), cv2.IMREAD_COLOR).shape \
        == (64, 64, 3)
    recent = store.recent()
    assert [r["files"] for r in recent] == [list(n.values()) for n in names[:1:-1]]
    assert store.usage()["files"] == 6 and store.usage()["pruned"] == 2


def test_retention_by_age_and_bytes_and_across_restarts(tmp_path):
    folder = tmp_path / "ev"
    store = EvidenceStore(_cfg(folder, max_age_s=100.0))
    old = _save(store, "old", when=time.time() - 500)   # pruned as soon as it is written
    assert not (folder / old["frame"]).exists() and store.recent() == []
    fresh = _save(store, "fresh")
    assert (folder / fresh["frame"]).exists()
    # a restart adopts what it finds: files older than max_age_s go, the rest stay servable
    stale = folder / "cam-9-20200101T000000.000Z-frame.jpg"
    stale.write_bytes(b"\xff\xd8old")
    os.utime(stale, (time.time() - 1000, time.time() - 1000))
    other = folder / "notes.txt"
    other.write_text("not evidence")
    cut_short = folder / ".cam-1-x-frame.jpg.tmp"
    cut_short.write_bytes(b"\xff\xd8")
    again = EvidenceStore(_cfg(folder, max_age_s=100.0))
    assert not stale.exists() and not cut_short.exists() and other.exists()
    assert again.path_of(fresh["overlay"]) == folder / fresh["overlay"]
    assert again.path_of("notes.txt") is None
    # bytes: each alarm here is two ~12 kB JPEGs; a bound of 2.5 alarms keeps the newest two
    store = EvidenceStore(_cfg(tmp_path / "b", max_bytes=1))
    one = _save(store, "x0")
    assert store.recent() == [] and not (tmp_path / "b" / one["frame"]).exists()
    size = sum((tmp_path / "ev" / n).stat().st_size for n in fresh.values())
    store = EvidenceStore(_cfg(tmp_path / "c", max_bytes=int(2.5 * size)))
    saved = [_save(store, "fresh") for _ in range(4)]   # same frame id: names stay distinct
    assert len({n["frame"] for n in saved}) == 4
    assert [r["files"] for r in store.recent()] == [list(n.values()) for n in saved[:1:-1]]
    assert store.usage()["bytes"] <= 2.5 * size


def test_path_of_serves_only_what_the_store_keeps(tmp_path):
    folder = tmp_path / "ev"
    store = EvidenceStore(_cfg(folder))
    names = _save(store, "../../etc/passwd")
    assert ".." not in names["frame"] and "/" not in names["frame"]
    assert store.path_of(names["frame"]) == folder / names["frame"]
    (folder / "intruder-frame.jpg").write_bytes(b"x")       # written by someone else
    (tmp_path / "outside-frame.jpg").write_bytes(b"x")
    for bad in ("intruder-frame.jpg", "../outside-frame.jpg", "..", "a/b-frame.jpg",
                f"/{names['frame']}", names["frame"] + "/", "", "x" * 300, None):
        assert store.path_of(bad) is None, bad
    (folder / names["frame"]).unlink()                     # deleted behind the store's back
    assert store.path_of(names["frame"]) is None
    assert safe_part("..") == "_" and safe_part("a b/c|d") == "a_b_c_d" and safe_part("") == "_"
    assert EvidenceStore(_cfg("")).path_of(names["overlay"]) is None


def test_an_unwritable_folder_or_a_full_disk_raises_evidence_error_and_leaves_nothing(
        tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the folder should be")
    store = EvidenceStore(_cfg(blocker / "evidence"))
    with pytest.raises(EvidenceError, match="evidence.folder: cannot write"):
        _save(store, "1")
    assert store.usage()["failed"] == 1 and store.recent() == []
    store = EvidenceStore(_cfg(tmp_path / "ev"))
    real_replace = os.replace
    calls = []

    def full_disk(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the overlay, after the frame was written
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(EvidenceError, match="No space left"):
        _save(store, "2")
    assert list((tmp_path / "ev").iterdir()) == []  # the frame written first was removed
    with pytest.raises(EvidenceError, match="switched off"):
        _save(EvidenceStore(_cfg("")), "3")


def test_map_png_names_its_frame_and_stays_a_png():
    ok, png = cv2.imencode(".png", np.arange(64, dtype=np.uint8).reshape(8, 8))
    tagged = png_with_text(png.tobytes(), {"frame": "f-17", "camera": "cam1"})
    assert png_text(tagged) == {"frame": "f-17", "camera": "cam1"}
    decoded = cv2.imdecode(np.frombuffer(tagged, np.uint8), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(decoded, np.arange(64, dtype=np.uint8).reshape(8, 8))


def test_evidence_folder_defaults_under_the_units_state_directory():
    unit = (Path(__file__).resolve().parents[1] / "systemd" / "moleflow.service").read_text()
    assert "StateDirectory=moleflow" in unit  # /var/lib/moleflow, writable under strict
    cfg = load_config(None, {})
    for path in (cfg.spool.path, cfg.evidence.folder):
        assert path.startswith("/var/lib/moleflow/"), path
    assert load_config(None, {"evidence.folder": ""}).evidence.folder == ""


def test_training_overlays_use_the_renderer_with_the_ground_truth(tmp_path):
    pytest.importorskip("torch")
    from moleflow.train.evaluate import write_overlays
    frame, amap = _scene(64)
    mask = np.zeros((64, 64), bool)
    mask[8:24, 8:24] = True
    items = [SimpleNamespace(path=tmp_path / f"{i}.png", defect=d, label=int(d != "good"))
             for i, d in enumerate(["crack", "good", "good"])]
    result = SimpleNamespace(scores=np.array([3.0, 1.0, 0.5]), labels=np.array([1, 0, 0]),
                             maps=np.stack([cv2.resize(amap, (64, 64))] + [np.full((64, 64), .3,
                                                                                   np.float32)] * 2),
                             data=SimpleNamespace(test=items))
    store = SimpleNamespace(masks=lambda data: np.stack([mask, ~mask & False, ~mask & False]),
                            images_of=lambda paths: np.stack([frame[..., ::-1]] * len(paths)))
    written = write_overlays(result, store, tmp_path / "overlays", 2)
    assert [p.name for p in written] == ["crack_0.png", "good_1.png"]
    img = cv2.imread(str(written[0]))
    lay = Layout.of(64, 64)
    assert img.shape == (64 + lay.banner, 64 + lay.bar, 3)
    assert _green(img[lay.banner:, :64]).sum() > 20  # the mask's outline



def test_evaluation_plot_draws_roc_curves_and_step_bars(tmp_path):
    from moleflow.measures import auroc
    from moleflow.plots import PALETTE, roc_curve, write_evaluation_plot
    rng = np.random.default_rng(1)
    labels = np.r_[np.zeros(30), np.ones(20)]
    scores = np.round(np.r_[rng.normal(0, 1, 30), rng.normal(1.5, 1, 20)], 1)  # with ties
    fpr, tpr = roc_curve(labels, scores)
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1
    area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    assert area == pytest.approx(auroc(labels, scores))
    curves = {"alpha": (labels, scores, auroc(labels, scores)), "beta": (labels, -scores, 0.2)}
    one = cv2.imread(str(write_evaluation_plot(tmp_path / "one.png", curves, [0], ["alpha"],
                                               np.array([[0.9]]))))
    two = cv2.imread(str(write_evaluation_plot(tmp_path / "two.png", curves, [0, 1],
                                               ["alpha", "beta"],
                                               np.array([[0.9, np.nan], [0.88, 0.7]]))))
    assert one.shape == (440, 440, 3) and two.shape[0] == 440 and two.shape[1] > 700
    for i in range(2):  # each class's curve (ROC panel) and its bars (step panel)
        colour = (one == PALETTE[i]).all(axis=-1)
        assert colour.sum() > 200
        assert (two[:, 440:] == PALETTE[i]).all(axis=-1).sum() > 200

# ----- the daemon, end to end: a real broker, real sockets, real files -----------------------
def _anomalous_frames(engine_set: Path, synthetic_root: Path) -> list:
    """Defective beta images the engine set flags (scored offline, as the daemon will)."""
    from moleflow.data import load_class, load_images
    from moleflow.engines.pipeline import EngineSet, Pipeline
    items = [t for t in load_class(synthetic_root, "beta").test if t.label == 1]
    scores = Pipeline(EngineSet.open(engine_set)).score(load_images([t.path for t in items], 64))
    flagged = [t for t, s in zip(items, scores) if s.anomalous]
    assert flagged, "the small engine set flags none of beta's defects"
    return flagged[:3]


def _daemon_run(engine_set, broker, tmp_path, synthetic_root, **extra):
    from tests.daemon_helpers import Listener, PushCamera, Running, daemon_config
    listener = Listener(broker.port, "moleflow/line1/#")
    camera = PushCamera()
    run = Running(daemon_config(engine_set, broker, tmp_path, [camera.endpoint], **extra))
    frames = _anomalous_frames(engine_set, synthetic_root)
    try:
        for i, item in enumerate(frames):  # a camera each: every frame's map is due
            camera.send(f"cam{i}", f"frame {i}/x", cv2.imread(str(item.path)))
        alarms = listener.wait_for("/alarm", len(frames))
        listener.wait_for("/result", len(frames))
    finally:
        run.stop()
        camera.close()
        listener.close()
    return run.daemon, listener, alarms


def test_an_alarm_names_its_evidence_and_the_map_names_its_frame(engine_set, broker, tmp_path,
                                                                 synthetic_root):
    from tests.daemon_helpers import check_payload
    daemon, listener, alarms = _daemon_run(
        engine_set, broker, tmp_path, synthetic_root, **{"mqtt.map_interval": 0.001,
                                                        "evidence.publish_snapshot": True})
    folder = tmp_path / "evidence"
    for alarm in alarms:
        check_payload("alarm", alarm)
        ev = alarm["evidence"]
        assert ev["url"] == f"/evidence/{ev['overlay']}"
        assert ev["frame"].startswith(f"{alarm['camera']}-frame_{alarm['frame'][-3]}_x-")
        frame = cv2.imread(str(folder / ev["frame"]))
        overlay = cv2.imread(str(folder / ev["overlay"]))
        assert frame.shape == (64, 64, 3)                          # the scored frame
        lay = Layout.of(64, 64)
        assert overlay.shape == (64 + lay.banner, 64 + lay.bar, 3)  # with banner and bar
        assert (folder / ev["overlay"]).read_bytes()[:2] == b"\xff\xd8"  # JPEG
        assert daemon.evidence.path_of(ev["overlay"]) == folder / ev["overlay"]
    # the web page's view: the latest alarm payloads, and the store's files
    assert [a["frame"] for a in daemon.recent_alarms] == [a["frame"] for a in alarms]
    assert daemon.recent_alarms.maxlen == 50
    # every result whose map went out says so, and that PNG names the frame and camera
    results = {(r["camera"], r["frame"]): r for r in listener.json("/result")}
    maps = [(t, p) for t, p, _ in listener.messages if t.endswith("/map")]
    assert len(maps) == len(alarms)
    for topic, png in maps:
        text = png_text(png)
        assert topic == f"moleflow/line1/{text['camera']}/map"
        assert results[(text["camera"], text["frame"])]["map"] is True
        assert float(text["map_threshold"]) > 0 and float(text["top"]) > 0
        assert cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED).shape == (64, 64)
    snaps = {t: p for t, p, _ in listener.messages if t.endswith("/snapshot")}
    assert len(snaps) == len(alarms)
    for alarm in alarms:
        snap = snaps[f"moleflow/line1/{alarm['camera']}/snapshot"]
        assert snap == (folder / alarm["evidence"]["overlay"]).read_bytes()


def test_an_unwritable_evidence_folder_loses_no_alarm(engine_set, broker, tmp_path,
                                                      synthetic_root, caplog):
    from tests.daemon_helpers import check_payload
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    daemon, listener, alarms = _daemon_run(engine_set, broker, tmp_path, synthetic_root,
                                           **{"evidence.folder": str(blocker / "evidence")})
    assert alarms and all(a["evidence"] is None for a in alarms)
    for a in alarms:
        check_payload("alarm", a)
    events = [e for e in listener.json("/events") if e["event"] == "evidence_error"]
    assert len(events) == len(alarms)
    assert "alarm sent without evidence" in events[0]["detail"]
    assert str(blocker) in events[0]["detail"]
    for e in events:
        check_payload("event", e)
    assert daemon.metrics.value("errors", kind="evidence_error") == len(alarms)
    assert daemon.metrics.total("alarms") == len(alarms)
    assert "without evidence" in caplog.text
