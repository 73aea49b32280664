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
                             (0.95, 4, 2.132), (0.99, 1000, 2.330),  # printed t tables
                             (0.99, 2, 6.965), (0.975, 1, 12.706), (0.999, 3, 10.215)]:
        assert student_t_quantile(p, dof) == pytest.approx(expected, abs=1e-3)


def _t_grid():
    """Every dof from the smallest calibration.min_images allows, every p the thresholds use
    (1 - rate for calibration's false_alarm_rate / unknown_rate range)."""
    from dataclasses import fields
    from moleflow.config.training import CalibrationConfig
    meta = {f.name: f.metadata for f in fields(CalibrationConfig)}
    low_dof = int(meta["min_images"]["min"]) - 1
    rates = [meta["false_alarm_rate"], meta["unknown_rate"]]
    rate_lo, rate_hi = min(m["min"] for m in rates), max(m["max"] for m in rates)
    dofs = list(range(low_dof, 121)) + [150, 200, 500, 1000, 5000, 100000]
    ps = [1.0 - r for r in np.geomspace(rate_lo, rate_hi, 23)] + [0.9, 0.99, 0.995]
    return low_dof, dofs, ps


@pytest.mark.parametrize("with_scipy", [True, False], ids=["scipy", "no-scipy"])
def test_student_t_quantile_matches_scipy_with_and_without_it(with_scipy, monkeypatch):
    """The workstation's answer is scipy's; without scipy (the edge device) the fallback is
    within 1e-6 of it for every dof and p calibration can ask for (the old series was 2 % low
    at dof 2)."""
    import sys
    stats = pytest.importorskip("scipy.stats")
    from moleflow import thresholds
    calls = []
    if not with_scipy:
        monkeypatch.setitem(sys.modules, "scipy.stats", None)  # import scipy.stats fails
        monkeypatch.setattr(thresholds, "_t_quantile",
                            lambda p, d, f=thresholds._t_quantile: calls.append(d) or f(p, d))
        with pytest.raises(ImportError):
            import scipy.stats  # noqa: F401
    low_dof, dofs, ps = _t_grid()
    assert low_dof == 2
    worst = 0.0
    for dof in dofs:
        for p in ps:
            got = thresholds.student_t_quantile(p, dof)
            want = float(stats.t.ppf(p, dof))
            worst = max(worst, abs(got - want) / max(abs(want), 0.01))  # p 0.5: t 0
            assert thresholds.student_t_quantile(1.0 - p, dof) == pytest.approx(-got)
    assert worst < 1e-6
    if with_scipy:
        assert not calls
    else:  # every answer came from the fallback
        assert len(calls) >= 2 * len(dofs) * len(ps) and set(calls) == set(dofs)
    # the bug this replaced: 6.81 instead of 6.96 at dof 2, p 0.99
    assert thresholds.student_t_quantile(0.99, 2) == pytest.approx(6.9646, abs=1e-4)


def test_student_t_fallback_closed_forms_and_bad_input():
    import math
    from moleflow.thresholds import _t_quantile
    assert _t_quantile(0.75, 1) == pytest.approx(1.0)                  # tan(pi/4)
    assert _t_quantile(0.5, 7) == 0.0
    assert _t_quantile(0.9, 2) == pytest.approx(0.8 * math.sqrt(2 / 0.36))
    # dof 4: t = 2 sqrt(q - 1), q = cos(acos(sqrt(a)) / 3) / sqrt(a), a = 4 p (1 - p)
    a = 4 * 0.995 * 0.005
    q = math.cos(math.acos(math.sqrt(a)) / 3) / math.sqrt(a)
    assert _t_quantile(0.995, 4) == pytest.approx(2 * math.sqrt(q - 1), rel=1e-10)
    for p, dof in [(0.0, 5), (1.0, 5), (0.9, 0), (0.9, 2.5)]:
        with pytest.raises(ValueError, match="p must|dof must"):
            _t_quantile(p, dof)


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
