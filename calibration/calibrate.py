"""``moleflow calibrate``: fit each expert's thresholds on its held-out normal images.

The images are the ones training held out (``train.val_fraction``), listed per expert in the
manifest and read from ``<data>/<expert>/``. Each is scored by its own expert (no routing, so
the threshold describes the expert, not the router), together with its routing distance to its
own prototype. An expert whose graph is unchanged keeps its calibration unless ``force``.

Where the class folder also has ``test/good`` (normal images neither trained on nor used here),
the measured false-alarm rate on them is reported next to the target, with the defect images'
detection rate. Needs no torch (the MVTec reader in ``moleflow.data`` is numpy/OpenCV only).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moleflow.thresholds import (CALIBRATION, Calibration, CalibrationError, ExpertCalibration,
                                    binomial_interval, fit_expert, unknown_rule)
from moleflow.config import CalibrationConfig
from moleflow.conditions import Condition, parse_condition
from moleflow.manifest import FileRef, Manifest
from moleflow.engines.pipeline import EngineSet, FrameScore, Pipeline, scoring_key
from moleflow.data import DataError, load_class, load_images

log = logging.getLogger("moleflow.calibrate")


@dataclass
class ExpertReport:
    name: str
    calibration: ExpertCalibration
    refitted: bool
    test_good: int = 0
    false_alarms: int = 0
    test_defective: int = 0
    detected: int = 0

    def line(self) -> str:
        c = self.calibration
        text = (f"{self.name:<14} held-out {c.n_images:>3} ({c.codec})  threshold "
                f"{c.threshold:10.3f}  "
                f"map {c.map_threshold:10.3f}  unknown beyond distance {c.distance_limit:.1f} "
                f"and typicality {c.typical_limit:.2f}")
        if self.test_good:
            lo, hi = binomial_interval(self.false_alarms, self.test_good)
            text += (f"  | test/good false alarms {self.false_alarms}/{self.test_good} "
                     f"= {self.false_alarms / self.test_good:6.1%} (95% CI {lo:.1%}–{hi:.1%}, "
                     f"target {c.false_alarm_rate:.1%})")
        if self.test_defective:
            text += f"  detected {self.detected}/{self.test_defective}"
        return text


def score_images(pipe: Pipeline, expert: str, images: np.ndarray, batch: int = 16
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Image scores, anomaly-map maxima, routing distances and typicalities of ``images``
    under ``expert``."""
    frames = score_frames(pipe, images, expert, batch)
    return (np.asarray([f.raw_score for f in frames]),
            np.asarray([float(f.map.max()) for f in frames]),
            np.asarray([f.distance for f in frames]), np.asarray([f.typicality for f in frames]))


def score_frames(pipe: Pipeline, images: np.ndarray, expert: str | None = None,
                 batch: int = 16) -> list[FrameScore]:
    """``images`` scored in batches, each by ``expert`` (None: routed, as on the line)."""
    out: list[FrameScore] = []
    for i in range(0, len(images), batch):
        chunk = images[i:i + batch]
        out += pipe.score(chunk, hints=None if expert is None else [expert] * len(chunk))
    return out


def calibrate_engine_set(root: Path, data_root: Path, cfg: CalibrationConfig,
                         force: bool = False, threads: int = 0) -> list[ExpertReport]:
    """Fit (or keep) every expert's calibration; write calibration.json and the manifest."""
    root = Path(root)
    engines = EngineSet.open(root, threads=threads, with_calibration=False)
    pipe = Pipeline(engines, with_maps=True)
    manifest: Manifest = engines.manifest
    path = root / CALIBRATION
    try:
        table = Calibration.load(path)
    except CalibrationError as exc:  # this command writes the file: start it afresh
        log.warning("%s; every expert is calibrated anew", exc)
        table = Calibration()
    size = engines.size
    codec = parse_condition(cfg.codec)
    reports = []
    for i, entry in enumerate(manifest.experts, 1):
        sha, scoring = entry.files["onnx"].sha256, scoring_key(manifest, entry)
        old = table.for_expert(entry.name, sha, scoring)
        cls_dir = Path(data_root) / entry.name
        refit = force or old is None or old.false_alarm_rate != cfg.false_alarm_rate \
            or old.unknown_rate != cfg.unknown_rate or old.codec != codec.name \
            or old.typical_limit is None or old.unknown_rule != unknown_rule(
                cfg.unknown_distance_factor, cfg.unknown_typicality)
        if refit:
            if len(entry.calibration_images) < cfg.min_images:
                raise CalibrationError(
                    f"expert {entry.name!r} has {len(entry.calibration_images)} held-out normal "
                    f"images, calibration needs {cfg.min_images}: train with "
                    "train.val_fraction > 0 (default 0.1) or lower calibration.min_images")
            paths = [cls_dir / rel for rel in entry.calibration_images]
            missing = [p for p in paths if not p.is_file()]
            if missing:
                raise DataError(f"held-out image {missing[0]} of expert {entry.name!r} is "
                                f"missing: pass --data with the folder the run was trained on")
            log.info("calibrating %s (%d/%d): %d held-out images through %s", entry.name, i,
                     len(manifest.experts), len(paths), codec.name)
            images = codec.apply(load_images(paths, size), seed=0)
            scores, maxima, dists, typical = score_images(pipe, entry.name, images)
            table.experts[entry.name] = fit_expert(
                scores, maxima, dists, cfg.false_alarm_rate, cfg.unknown_rate, sha, scoring,
                typical=typical, codec=codec.name,
                distance_factor=cfg.unknown_distance_factor,
                typicality_margin=cfg.unknown_typicality)
        else:
            log.info("%s (%d/%d): calibration still valid, kept", entry.name, i,
                     len(manifest.experts))
        report = ExpertReport(entry.name, table.experts[entry.name], refit)
        log.info("checking %s on its test images", entry.name)
        _check_on_test(pipe, report, cls_dir, size, codec)
        reports.append(report)  # the table is printed once, by the caller (summary)
    table.save(path)
    manifest.calibration = FileRef.of(root, path)
    manifest.save(root)
    return reports


def _check_on_test(pipe: Pipeline, report: ExpertReport, cls_dir: Path, size: int,
                   codec: Condition) -> None:
    """False alarms on test/good and detections on the defect images, when the class has them,
    the images passed through the calibration's codec as the line's frames are."""
    if not (cls_dir / "test").is_dir():
        return
    data = load_class(cls_dir.parent, cls_dir.name)
    good = [t.path for t in data.test if t.label == 0]
    bad = [t.path for t in data.test if t.label == 1]
    threshold = report.calibration.threshold
    if good:
        scores = score_images(pipe, report.name, codec.apply(load_images(good, size)))[0]
        report.test_good, report.false_alarms = len(good), int((scores > threshold).sum())
    if bad:
        scores = score_images(pipe, report.name, codec.apply(load_images(bad, size)))[0]
        report.test_defective, report.detected = len(bad), int((scores > threshold).sum())


def summary(reports: list[ExpertReport]) -> str:
    """Per-expert lines plus the pooled false-alarm rate on test/good."""
    lines = [r.line() for r in reports]
    n = sum(r.test_good for r in reports)
    if n:
        k = sum(r.false_alarms for r in reports)
        lo, hi = binomial_interval(k, n)
        target = reports[0].calibration.false_alarm_rate
        lines.append(f"pooled test/good false-alarm rate {k}/{n} = {k / n:.2%} (95% CI "
                     f"{lo:.1%}–{hi:.1%}), target {target:.1%}")
    return "\n".join(lines)
