"""Calibrated decisions per expert: thresholds, score normalisation, "unknown product" limits.

Fitted on held-out normal images (train/good images the expert never trained on). A threshold
for a target false-alarm rate ``far`` is the larger of the empirical ``1 - far`` quantile and a
normal fit's prediction bound: with a few dozen images the empirical quantile alone sits on the
largest sample and the fit extrapolates the tail, and taking the larger errs towards fewer
false alarms. Raw scores map to [0, 1] by a logistic centred on the threshold (0.5 there), with
the held-out scores' spread as its scale. numpy and the standard library (scipy if installed).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np

from moleflow.errors import MoleflowError

CALIBRATION = "calibration.json"
FORMAT = 1


class CalibrationError(MoleflowError, RuntimeError):
    """Calibration cannot be fitted, read, or does not belong to this engine set."""


def student_t_quantile(p: float, dof: int) -> float:
    """Quantile of Student's t: ``scipy.stats.t.ppf`` where scipy is installed (the workstation),
    else ``_t_quantile`` (the edge device has no scipy; the two agree to 3e-8)."""
    try:
        from scipy.stats import t as student_t
    except ImportError:
        return _t_quantile(p, dof)
    return float(student_t.ppf(p, dof))


def _t_quantile(p: float, dof: int) -> float:
    """Student's t quantile without scipy, for 0 < p < 1 and an integer ``dof`` >= 1: closed
    forms for dof 1 and 2, the exact finite series of the distribution function inverted by
    safeguarded Newton steps up to dof 100, the Cornish-Fisher series in 1/dof beyond (error
    below 1e-8 there; it is 30 % off at dof 2, which is why it is not used below)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"student_t_quantile: p must lie strictly between 0 and 1, got {p!r}")
    if dof < 1 or int(dof) != dof:
        raise ValueError(f"student_t_quantile: dof must be a whole number >= 1, got {dof!r}")
    dof = int(dof)
    if p < 0.5:
        return -_t_quantile(1.0 - p, dof)
    if p == 0.5:
        return 0.0
    if dof == 1:
        return math.tan(math.pi * (p - 0.5))
    if dof == 2:
        return (2 * p - 1) * math.sqrt(2.0 / (4 * p * (1 - p)))
    z = NormalDist().inv_cdf(p)
    if dof > 100:
        v = float(dof)
        return (z + (z**3 + z) / (4 * v) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * v**2)
                + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * v**3)
                + (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z)
                / (92160 * v**4))
    log_density = (math.lgamma((dof + 1) / 2) - math.lgamma(dof / 2)
                   - 0.5 * math.log(dof * math.pi))
    target, lo, hi = p - 0.5, 0.0, max(1.0, z)
    while _t_central(hi, dof) < target:
        lo, hi = hi, 2.0 * hi
    t = 0.5 * (lo + hi)
    for _ in range(200):
        g = _t_central(t, dof) - target
        lo, hi = (t, hi) if g < 0 else (lo, t)
        new = t - g / math.exp(log_density - (dof + 1) / 2 * math.log1p(t * t / dof))
        if not lo < new < hi:  # a Newton step out of the bracket: bisect instead
            new = 0.5 * (lo + hi)
        if abs(new - t) <= 1e-13 * max(1.0, t):
            return new
        t = new
    return t


def _t_central(t: float, dof: int) -> float:
    """P(0 < T < t) for t >= 0 and an integer dof (Abramowitz & Stegun 26.7.3 and 26.7.4)."""
    theta = math.atan(t / math.sqrt(dof))
    c2, total, term = math.cos(theta) ** 2, 1.0, 1.0
    if dof % 2:  # odd: (2/pi)(theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ...))
        for k in range(1, (dof - 1) // 2):
            term *= c2 * (2 * k) / (2 * k + 1)
            total += term
        return (theta + math.sin(theta) * math.cos(theta) * total) / math.pi
    for k in range(1, dof // 2):  # even: sin (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ...)
        term *= c2 * (2 * k - 1) / (2 * k)
        total += term
    return 0.5 * math.sin(theta) * total


def tail_threshold(values: np.ndarray, rate: float) -> float:
    """Value exceeded by a fraction ``rate`` of samples like ``values`` (see module docstring).

    The normal fit uses the prediction bound ``mean + t·s·sqrt(1 + 1/n)``, which accounts for
    the mean and spread being estimated from the same few samples; the plain ``mean + z·s``
    would give about twice the target rate from twenty images.
    """
    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2 or not np.all(np.isfinite(v)):
        raise CalibrationError(f"need at least 2 finite values to fit a threshold, got {v!r}")
    n = len(v)
    bound = v.mean() + student_t_quantile(1.0 - rate, n - 1) * v.std(ddof=1) * np.sqrt(1 + 1 / n)
    return float(max(np.quantile(v, 1.0 - rate), bound))


@dataclass
class ExpertCalibration:
    """One expert's decision rule, fitted on ``n_images`` held-out normal images."""
    threshold: float            # raw image score at the target false-alarm rate
    scale: float                # logistic scale of the [0, 1] normalisation
    map_threshold: float        # anomaly-map value marking anomalous pixels (alarm regions)
    distance_limit: float       # routing distance above which a frame is "unknown"
    n_images: int
    false_alarm_rate: float
    unknown_rate: float
    expert_sha256: str          # the expert graph these scores came from
    held_out_scores: list[float] = field(default_factory=list)
    scoring: str = ""           # how scores and maps were computed (pipeline.scoring_key)
    # typicality (median patch score) above which a frame far from the prototype is unknown
    # (None in calibrations from before it existed: the distance alone decides)
    typical_limit: float | None = None
    codec: str = "lossless"     # what the held-out images went through (calibration.codec)
    unknown_rule: str = ""      # the settings the unknown limits were set with (unknown_rule)

    def normalise(self, raw: np.ndarray | float) -> np.ndarray:
        """Raw image scores -> [0, 1], exactly 0.5 at the threshold."""
        z = (np.asarray(raw, dtype=np.float64) - self.threshold) / self.scale
        return 0.5 * (1.0 + np.tanh(0.5 * np.clip(z, -80, 80)))  # logistic, overflow-free

    def is_anomalous(self, raw: np.ndarray | float) -> np.ndarray:
        return np.asarray(raw) > self.threshold


def fit_expert(scores: np.ndarray, map_maxima: np.ndarray, distances: np.ndarray, far: float,
               unknown_rate: float, expert_sha256: str, scoring: str,
               typical: np.ndarray | None = None, codec: str = "lossless",
               distance_factor: float = 1.0, typicality_margin: float = 0.0
               ) -> ExpertCalibration:
    """Fit one expert from its held-out normals' image scores, map maxima, routing distances
    and typicalities.

    An unknown product must pass two limits (``Pipeline.unknown``): the routing distance's
    ``unknown_rate`` tail times ``distance_factor``, and the typicality's tail, at least
    ``typicality_margin`` above the held-out median (in standardised patch scores: a frame
    whose median patch is that many standard deviations off)."""
    scores = np.asarray(scores, dtype=np.float64)
    threshold = tail_threshold(scores, far)
    spread = float(scores.std(ddof=1)) if len(scores) > 1 else 1.0
    typical_limit = None
    if typical is not None:
        typical_limit = max(tail_threshold(typical, unknown_rate),
                            float(np.median(typical)) + typicality_margin)
    return ExpertCalibration(
        threshold=threshold, scale=max(spread, 1e-6 * max(1.0, abs(threshold))),
        map_threshold=tail_threshold(map_maxima, far),
        distance_limit=distance_factor * tail_threshold(distances, unknown_rate),
        n_images=len(scores), false_alarm_rate=far, unknown_rate=unknown_rate,
        expert_sha256=expert_sha256, held_out_scores=[round(float(s), 6) for s in scores],
        scoring=scoring, typical_limit=typical_limit, codec=codec,
        unknown_rule=unknown_rule(distance_factor, typicality_margin))


def unknown_rule(distance_factor: float, typicality_margin: float) -> str:
    """How a calibration's unknown limits were set (a change refits them)."""
    return f"distance x{distance_factor:g}, typicality +{typicality_margin:g}"


@dataclass
class Calibration:
    """``calibration.json``: every calibrated expert of an engine set, by name."""
    experts: dict[str, ExpertCalibration] = field(default_factory=dict)
    format: int = FORMAT

    def save(self, path: Path) -> None:
        data: dict[str, Any] = {"format": self.format,
                                "experts": {k: asdict(v) for k, v in sorted(self.experts.items())}}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> Calibration:
        if not path.is_file():
            return cls()
        try:
            raw = json.loads(path.read_text())
            if not isinstance(raw, dict) or not isinstance(raw.get("experts"), dict):
                raise TypeError("expected an object with an 'experts' object")
            if raw.get("format") != FORMAT:
                raise CalibrationError(f"{path}: calibration format {raw.get('format')!r} is not "
                                       f"supported (this version reads {FORMAT})")
            experts = {k: ExpertCalibration(**v) for k, v in raw["experts"].items()}
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
            raise CalibrationError(f"{path}: malformed calibration file ({exc!r})") from exc
        for name, cal in experts.items():
            _check_values(cal, f"{path}: expert {name!r}")
        return cls(experts)

    def for_expert(self, name: str, expert_sha256: str, scoring: str) -> ExpertCalibration | None:
        """The expert's calibration if it was fitted on this very expert graph under this
        scoring rule, else None."""
        cal = self.experts.get(name)
        ok = cal is not None and cal.expert_sha256 == expert_sha256 and cal.scoring == scoring
        return cal if ok else None


_FINITE = ("threshold", "scale", "map_threshold", "distance_limit", "false_alarm_rate",
           "unknown_rate")


def _check_values(cal: ExpertCalibration, where: str) -> None:
    """A calibration read from a file decides alarms: its limits must be finite numbers (a
    string or NaN threshold would compare False with every score and silence the expert), its
    scale positive, its identifying fields strings."""
    def finite(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    bad = [f for f in _FINITE if not finite(getattr(cal, f))]
    bad += [] if cal.typical_limit is None or finite(cal.typical_limit) else ["typical_limit"]
    if bad:
        raise CalibrationError(f"{where}: {', '.join(bad)} must be finite numbers")
    if cal.scale <= 0:
        raise CalibrationError(f"{where}: scale must be positive, got {cal.scale}")
    if not all(isinstance(getattr(cal, f), str) for f in ("expert_sha256", "scoring", "codec")):
        raise CalibrationError(f"{where}: expert_sha256, scoring and codec must be strings")


def binomial_interval(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a rate k/n (for reporting measured false-alarm rates)."""
    if n == 0:
        return 0.0, 1.0
    z = NormalDist().inv_cdf(0.5 + level / 2)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)
