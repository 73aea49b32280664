"""Calibration arithmetic: thresholds reach their rate, normalisation, the JSON file."""

from __future__ import annotations

import numpy as np
import pytest

from moleflow.thresholds import (Calibration, CalibrationError, binomial_interval,
                                    fit_expert, tail_threshold)


@pytest.mark.parametrize("n_fit", [13, 21, 200, 5000])
def test_threshold_reaches_the_false_alarm_target(n_fit):
    """Fitted on n normal scores, the expected false-alarm rate on new ones is the target."""
    rng = np.random.default_rng(n_fit)
    rates = []
    for _ in range(300):
        thr = tail_threshold(rng.normal(3.0, 2.0, n_fit), 0.01)
        rates.append(float((rng.normal(3.0, 2.0, 20000) > thr).mean()))
    assert 0.0075 <= float(np.mean(rates)) <= 0.0125


def test_student_t_quantiles():
    from moleflow.thresholds import student_t_quantile
    for p, dof, expected in [(0.99, 20, 2.528), (0.99, 9, 2.821), (0.995, 12, 3.055),
                             (0.95, 4, 2.132), (0.99, 1000, 2.330)]:  # scipy.stats.t.ppf
        assert student_t_quantile(p, dof) == pytest.approx(expected, abs=0.01)


def test_threshold_needs_finite_values():
    with pytest.raises(CalibrationError, match="at least 2 finite"):
        tail_threshold(np.array([1.0]), 0.01)
    with pytest.raises(CalibrationError, match="at least 2 finite"):
        tail_threshold(np.array([1.0, np.nan, 2.0]), 0.01)


def test_normalisation_is_monotone_bounded_and_half_at_threshold():
    cal = fit_expert(np.array([10.0, 11.0, 12.0, 13.0]), np.array([5.0, 6.0, 5.5, 6.5]),
                     np.array([1.0, 2.0, 1.5, 1.2]), 0.01, 0.005, "abc", "nll top-3")
    assert cal.normalise(cal.threshold) == pytest.approx(0.5)
    raw = np.array([-1e30, 0.0, cal.threshold - 1, cal.threshold + 1, 1e30])
    norm = cal.normalise(raw)
    assert np.all(np.diff(norm) >= 0)
    assert norm[0] == 0.0 and norm[-1] == 1.0 and np.isfinite(norm).all()
    assert list(cal.is_anomalous(raw)) == [False, False, False, True, True]
    assert cal.threshold >= 13.0 and cal.distance_limit >= 2.0


def test_calibration_file_round_trip_and_stale_entries(tmp_path):
    rule = "standardised top-3 0123456789abcdef"
    cal = fit_expert(np.arange(10.0), np.arange(10.0), np.arange(10.0), 0.02, 0.01, "sha-1", rule)
    table = Calibration({"bottle": cal})
    table.save(tmp_path / "calibration.json")
    back = Calibration.load(tmp_path / "calibration.json")
    assert back.for_expert("bottle", "sha-1", rule) == cal
    assert back.for_expert("bottle", "sha-2", rule) is None  # fitted on another graph: stale
    assert back.for_expert("bottle", "sha-1", "nll top-3") is None  # scores of another rule
    assert back.for_expert("cable", "sha-1", rule) is None
    (tmp_path / "calibration.json").write_text('{"format": 1, "experts": {"x": {"bad": 1}}}')
    with pytest.raises(CalibrationError, match="malformed"):
        Calibration.load(tmp_path / "calibration.json")


def test_binomial_interval_contains_the_rate():
    lo, hi = binomial_interval(1, 60)
    assert lo < 1 / 60 < hi and 0 <= lo and hi < 0.1
    assert binomial_interval(0, 20)[0] == pytest.approx(0.0, abs=1e-12)


def test_unknown_limits_follow_their_settings_and_are_recorded():
    rng = np.random.default_rng(3)
    scores, dists, typical = rng.normal(5, 1, 21), rng.normal(12, 2, 21), rng.normal(0, 0.3, 21)
    plain = fit_expert(scores, scores, dists, 0.01, 0.005, "sha", "rule", typical=typical,
                       codec="jpeg:90")
    wide = fit_expert(scores, scores, dists, 0.01, 0.005, "sha", "rule", typical=typical,
                      codec="jpeg:90", distance_factor=4.0, typicality_margin=5.0)
    assert plain.distance_limit == pytest.approx(tail_threshold(dists, 0.005))
    assert plain.typical_limit == pytest.approx(tail_threshold(typical, 0.005))
    assert wide.distance_limit == pytest.approx(4 * plain.distance_limit)
    assert wide.typical_limit == pytest.approx(np.median(typical) + 5.0)
    assert wide.threshold == plain.threshold  # the alarm threshold does not change
    assert wide.codec == "jpeg:90" and wide.unknown_rule != plain.unknown_rule
    # a calibration file from before typicality and codec existed still loads
    old = {k: v for k, v in plain.__dict__.items()
           if k not in ("typical_limit", "codec", "unknown_rule")}
    from moleflow.thresholds import ExpertCalibration
    legacy = ExpertCalibration(**old)
    assert legacy.typical_limit is None and legacy.codec == "lossless"


def test_unknown_needs_both_the_distance_and_the_typicality():
    """A far frame whose patches are mostly typical (a defect, a compressed frame) is known;
    a far frame unlike the expert nearly everywhere is unknown; old calibrations without a
    typicality limit decide by distance alone."""
    from types import SimpleNamespace

    from moleflow.engines.pipeline import Pipeline
    cal = fit_expert(np.arange(10.0), np.arange(10.0), np.arange(10.0), 0.01, 0.005, "s", "r",
                     typical=np.linspace(-0.5, 0.5, 10))
    legacy = fit_expert(np.arange(10.0), np.arange(10.0), np.arange(10.0), 0.01, 0.005, "s", "r")
    pipe = Pipeline.__new__(Pipeline)
    pipe.engines = SimpleNamespace(calibration={"a": cal, "old": legacy})
    far = np.array([False, True, True, True, True])
    typical = np.array([50.0, 0.1, 50.0, 0.1, np.inf])
    experts = ["a", "a", "a", "old", "none"]
    assert pipe.unknown(far, typical, experts).tolist() == [False, False, True, True, True]
