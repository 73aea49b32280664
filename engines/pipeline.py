"""An engine set loaded for scoring: backbone -> router -> one expert -> score, map, decision.

``EngineSet.open`` verifies the manifest's hashes and loads every graph with the chosen back
end, checking what it reads (``validate_engine_set`` checks every file, for ``serve
--validate-config``); ``Pipeline.score`` takes uint8 RGB frames at the set's input size and
returns one ``FrameScore`` per frame, with the time spent in each stage. Each frame costs one
backbone pass, a Mahalanobis distance per expert (a few microseconds) and one expert pass,
whatever the number of experts. numpy, OpenCV and the runtime back end only: no torch.
"""

from __future__ import annotations

import logging
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moleflow.thresholds import Calibration, CalibrationError, ExpertCalibration
from moleflow.scoring import (PositionNorm, anomaly_maps, image_scores, keep_lower,
                             light_retries, mahalanobis, map_values, preprocess,
                             routed_image_scores, standardised, typicality)
from moleflow.manifest import EngineSetError, ExpertEntry, Manifest, verified
from moleflow.engines.runtime import BACKENDS, Graph, file_key

log = logging.getLogger("moleflow.engines")


def load_npz(path: Path, required: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The arrays of the .npz at ``path``; the ``required`` ones must be there and, when
    numeric, finite (a NaN precision or statistic would silently mis-route or mis-score every
    frame). Any problem is an EngineSetError naming the file."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {name: z[name] for name in z.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as exc:
        raise EngineSetError(f"{path}: not a readable .npz archive ({exc})") from exc
    missing = [name for name in required if name not in arrays]
    if missing:
        raise EngineSetError(f"{path}: lacks the array(s) {', '.join(missing)}")
    for name in required:
        if arrays[name].dtype.kind in "fiu" and not np.all(np.isfinite(arrays[name])):
            raise EngineSetError(f"{path}: array {name!r} holds non-finite values")
    return arrays


@dataclass
class RuntimeRouter:
    """The prototype router from ``router.npz``: nearest task by Mahalanobis distance."""
    names: list[str]
    means: np.ndarray           # (T, D)
    precisions: np.ndarray      # (T, D, D)

    @classmethod
    def load(cls, path: Path, dim: int) -> RuntimeRouter:
        """From ``router.npz`` of ``dim``-channel features, its arrays' shapes checked."""
        z = load_npz(path, ("names", "means", "precisions"))
        names, means, precisions = z["names"], z["means"], z["precisions"]
        t = len(names)
        if (names.ndim != 1 or means.dtype.kind not in "fiu" or precisions.dtype.kind not in "fiu"
                or means.shape != (t, dim) or precisions.shape != (t, dim, dim)):
            raise EngineSetError(f"{path}: expected names ({t},), means ({t}, {dim}) and "
                                 f"precisions ({t}, {dim}, {dim}), got {names.shape}, "
                                 f"{means.dtype} {means.shape}, {precisions.dtype} "
                                 f"{precisions.shape}")
        return cls([str(n) for n in names], means.astype(np.float64),
                   precisions.astype(np.float64))

    def distances(self, pooled: np.ndarray) -> np.ndarray:
        """(N, T) distance of each frame's pooled feature to each task."""
        return np.stack([mahalanobis(pooled, m, p) for m, p in zip(self.means, self.precisions)],
                        axis=1)


@dataclass
class EngineSet:
    root: Path
    manifest: Manifest
    backbone: Graph
    experts: dict[str, Graph]
    router: RuntimeRouter
    calibration: dict[str, ExpertCalibration]     # only experts calibrated on these very files
    backend: str
    precision: str
    norms: dict[str, PositionNorm] | None = None  # per expert, when image scores standardise

    @classmethod
    def open(cls, root: Path, backend: str = "onnxruntime", precision: str = "fp32",
             threads: int = 0, experts: list[str] | None = None,
             with_calibration: bool = True, warn: bool = True) -> EngineSet:
        """Load (a subset of) the engine set at ``root``, verifying every file's sha256
        (``with_calibration`` False: without its calibration, as ``calibrate`` does, which
        fits it anew). Experts left without a valid calibration never raise an alarm
        (``uncalibrated``): a warning names them unless ``warn`` is False (a caller that
        reports them itself)."""
        root = Path(root)
        manifest = Manifest.load(root)
        key = file_key(backend, precision)
        if backend == "tensorrt":
            from moleflow.engines.tensorrt_backend import check_compatible
            check_compatible(manifest.tensorrt)
        load = BACKENDS[backend]

        def graph(files: dict, what: str) -> Graph:
            if key not in files:
                hint = ("build it with 'moleflow build'" if key.startswith("plan")
                        else "re-export the engine set")
                raise EngineSetError(f"{what} has no {key} file in {root}: {hint}")
            return load(verified(root, files[key]), threads=threads)

        entries = manifest.experts if experts is None else [manifest.expert(n) for n in experts]
        loaded = {e.name: graph(e.files, f"expert {e.name!r}") for e in entries}
        norms = _load_norms(root, manifest, entries)
        router = RuntimeRouter.load(verified(root, manifest.router),
                                    int(manifest.features["dim"]))
        if router.names != [e.name for e in manifest.experts]:
            raise EngineSetError(f"{root}: router.npz lists {router.names}, the manifest "
                                 f"{[e.name for e in manifest.experts]}")
        calib = _load_calibration(root, manifest, entries) if with_calibration else {}
        backbone = graph(manifest.backbone["files"], "backbone")
        engines = cls(root, manifest, backbone, loaded, router, calib, backend, precision, norms)
        if with_calibration and warn and engines.uncalibrated:
            log.warning("engine set %s: expert(s) %s have no calibration for their graph: no "
                        "alarm will be raised for their frames (run 'moleflow calibrate "
                        "--engines %s --data DIR')", root, ", ".join(engines.uncalibrated), root)
        return engines

    @property
    def uncalibrated(self) -> list[str]:
        """Loaded experts without a calibration fitted on their graph under the set's scoring
        rule (none in the manifest, none for them in it, or a stale one): their frames get no
        decision (``FrameScore.anomalous`` None), so they never raise an alarm."""
        return [name for name in self.experts if name not in self.calibration]

    @property
    def size(self) -> int:
        return int(self.manifest.input["size"])

    def expert_names(self) -> list[str]:
        return list(self.experts)


SCORING_RULES = {"image_score": ("standardised", "nll"), "anomaly_map": ("likelihood", "nll")}


def scoring_rule(manifest: Manifest, key: str) -> str:
    """The manifest's ``scoring[key]`` rule ('image_score' or 'anomaly_map'); engine sets from
    before the choice existed score and map raw NLLs: 'nll'."""
    rule = manifest.scoring.get(key, "nll")
    if rule not in SCORING_RULES[key]:
        raise EngineSetError(f"manifest scoring.{key} {rule!r} is not one of "
                             f"{', '.join(SCORING_RULES[key])}")
    return rule


def light_retry(manifest: Manifest) -> float:
    """The manifest's ``scoring.light_retry`` (spreads; 0 = off, as in sets from before it, and
    wherever the backbone standardises every frame's light anyway: nothing to retry then)."""
    if manifest.input.get("standardise"):
        return 0.0
    return float(manifest.scoring.get("light_retry", 0.0))


def scoring_key(manifest: Manifest, entry: ExpertEntry) -> str:
    """How an expert's image scores and maps are computed, for calibration: a calibration
    fitted under another rule (or other statistics) does not apply to these."""
    rule = scoring_rule(manifest, "image_score")
    key = f"{rule} top-{int(manifest.scoring['top_k'])}"
    if rule == "standardised" and entry.position_norm is not None:
        key += f" {entry.position_norm.sha256[:16]}"
    retry = light_retry(manifest)
    key += f", light retry {retry:g}" if retry > 0 else ""
    return key + f", map {scoring_rule(manifest, 'anomaly_map')}"


def _load_calibration(root: Path, manifest: Manifest, entries: list[ExpertEntry]
                      ) -> dict[str, ExpertCalibration]:
    """The valid calibrations of ``entries`` (by name) from the manifest's calibration file."""
    if manifest.calibration is None:
        return {}
    try:
        table = Calibration.load(verified(root, manifest.calibration))
    except CalibrationError as exc:
        raise EngineSetError(str(exc)) from exc
    found = {e.name: table.for_expert(e.name, e.files["onnx"].sha256, scoring_key(manifest, e))
             for e in entries}
    return {name: cal for name, cal in found.items() if cal is not None}


def validate_engine_set(root: Path, backend: str = "onnxruntime", precision: str = "fp32",
                        threads: int = 0) -> EngineSet:
    """What ``serve --validate-config`` checks, beyond what the daemon's own open would: the
    size and sha256 of every listed file (all precisions, not only the served ones), the
    scoring rules, and for the tensorrt back end a plan of the precision for every graph
    before TensorRT is imported. Returns the set opened as the daemon opens it (every served
    graph loaded, router, statistics and calibration read and checked) without logging its
    ``uncalibrated`` experts, those that will raise no alarm: the caller reports them."""
    root = Path(root)
    manifest = Manifest.load(root)
    manifest.verify_files(root)
    for key in SCORING_RULES:
        scoring_rule(manifest, key)
    if backend == "tensorrt":
        key = file_key(backend, precision)
        lacking = [f"expert {e.name!r}" for e in manifest.experts if key not in e.files]
        lacking += ["backbone"] if key not in manifest.backbone["files"] else []
        if lacking:
            raise EngineSetError(f"{root}: no {key} plan for {', '.join(lacking)}: build them "
                                 f"on this device with 'moleflow build --engines {root} "
                                 f"--precision {precision}'")
    return EngineSet.open(root, backend, precision, threads, warn=False)


def _load_norms(root: Path, manifest: Manifest, entries: list[ExpertEntry]
                ) -> dict[str, PositionNorm] | None:
    if scoring_rule(manifest, "image_score") != "standardised":
        return None
    norms = {}
    for e in entries:
        if e.position_norm is None:
            raise EngineSetError(f"expert {e.name!r} in {root} has no position statistics, "
                                 "which scoring.image_score 'standardised' needs: re-export")
        path = verified(root, e.position_norm)
        try:
            norm = PositionNorm.from_arrays(load_npz(path, ("mean", "std")), str(path))
        except ValueError as exc:
            raise EngineSetError(str(exc)) from exc
        if norm.mean.shape != tuple(manifest.features["grid"]):
            raise EngineSetError(f"{path}: statistics grid {norm.mean.shape} is not the "
                                 f"feature grid {manifest.features['grid']}")
        norms[e.name] = norm
    return norms


@dataclass
class FrameScore:
    """Everything the pipeline knows about one frame."""
    expert: str                 # the expert that scored it (nearest prototype, or the hint)
    distance: float             # routing distance to that expert
    raw_score: float            # uncalibrated image score: mean of the top-k patch scores
                                # (NLLs, standardised per position under that scoring rule)
    score: float | None         # calibrated score in [0, 1] (None: expert not calibrated)
    anomalous: bool | None      # decision (None: expert not calibrated)
    unknown: bool               # no expert claims the frame: it is far from the nearest
                                # product's prototype and unlike its expert's images as a whole
    patch_nll: np.ndarray       # (h, w) grid
    map: np.ndarray | None      # (S, S) smoothed anomaly map (when asked for)
    timings: dict[str, float] = field(default_factory=dict)   # seconds per stage (batch share)
    typicality: float = 0.0     # median patch score of the frame under its expert
    light_offset: float | None = None  # spreads from the expert's training frames' light
                                       # (None: the expert keeps no light reference)
    relit: bool = False         # the frame relit to its product's light scored lower, and
                                # its score, map and typicality are that frame's


class Pipeline:
    """Scores frames with an ``EngineSet``; see the module docstring."""

    def __init__(self, engines: EngineSet, with_maps: bool = True) -> None:
        self.engines = engines
        m = engines.manifest
        self.mean, self.std = tuple(m.input["mean"]), tuple(m.input["std"])
        self.standardise = bool(m.input.get("standardise", False))
        self.top_k = int(m.scoring["top_k"])
        self.light_retry = light_retry(m)
        self.sigma = float(m.scoring["smoothing_sigma"])
        self.map_rule = scoring_rule(m, "anomaly_map")
        self.dim = int(m.features["dim"])
        self.with_maps = with_maps
        self.index = {name: i for i, name in enumerate(engines.router.names)}

    def features(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 RGB (N, S, S, 3) -> patch features (N, D, h, w) and pooled features (N, D)."""
        size = self.engines.size
        if images.ndim != 4 or images.shape[1:] != (size, size, 3) or images.dtype != np.uint8:
            raise ValueError(f"frames must be uint8 (N, {size}, {size}, 3), got "
                             f"{images.dtype} {images.shape}")
        out = self.engines.backbone(preprocess(images, self.mean, self.std, self.standardise))
        return out["features"], out["pooled"]

    def route(self, pooled: np.ndarray, hints: list[str | None] | None = None
              ) -> tuple[list[str], np.ndarray, np.ndarray]:
        """Expert per frame (the nearest loaded one, or the hint), its distance, and whether
        that distance exceeds the expert's calibrated limit (the first of the two tests of an
        unknown product, see ``unknown``)."""
        dist = self.engines.router.distances(pooled)
        names = self.engines.router.names
        chosen: list[str] = []
        picked = np.empty(len(pooled))
        unknown = np.zeros(len(pooled), dtype=bool)
        for i in range(len(pooled)):
            hint = hints[i] if hints else None
            if hint is not None and hint not in self.engines.experts:
                raise EngineSetError(f"product hint {hint!r} is not an expert of this engine set "
                                     f"({', '.join(self.engines.experts)})")
            j = self.index[hint] if hint is not None else self._nearest_loaded(dist[i])
            picked[i] = dist[i, j]
            cal = self.engines.calibration.get(names[j])
            unknown[i] = hint is None and cal is not None and dist[i, j] > cal.distance_limit
            chosen.append(names[j])
        return chosen, picked, unknown

    def _nearest_loaded(self, row: np.ndarray) -> int:
        order = np.argsort(row)
        return next(int(j) for j in order if self.engines.router.names[j] in self.engines.experts)

    def anomaly_maps(self, patch_nll: np.ndarray) -> np.ndarray:
        """Smoothed anomaly maps (N, S, S) at the input size from patch-NLL grids (N, h, w)."""
        return anomaly_maps(map_values(patch_nll, self.map_rule, self.dim), self.engines.size,
                            self.sigma)

    def anomaly_map(self, patch_nll: np.ndarray) -> np.ndarray:
        """One frame's smoothed anomaly map from its patch-NLL grid."""
        return self.anomaly_maps(patch_nll[None])[0]

    def unknown(self, far: np.ndarray, typical: np.ndarray, experts: list[str]) -> np.ndarray:
        """A frame is an unknown product when its routing distance is over the expert's limit
        (``far``) and its typicality too: a defective or compressed frame of a known product
        can move the image-level feature, but only a product the expert has not learned is
        unlike it nearly everywhere. Calibrations from before the typicality limit existed
        decide by the distance alone."""
        out = np.asarray(far, dtype=bool).copy()
        for i, name in enumerate(experts):
            cal = self.engines.calibration.get(name)
            if out[i] and cal is not None and cal.typical_limit is not None:
                out[i] = typical[i] > cal.typical_limit
        return out

    def image_scores(self, patch_nll: np.ndarray, experts: list[str]) -> np.ndarray:
        """Uncalibrated image scores of grids, grid ``i`` scored by expert ``experts[i]``."""
        return routed_image_scores(patch_nll, experts, self.engines.norms, self.top_k)

    def _grids(self, feats: np.ndarray, owners: list[str]) -> np.ndarray:
        """Patch-NLL grids (N, h, w), frame ``i`` by expert ``owners[i]`` (one call per expert)."""
        grids = np.zeros((len(feats),) + feats.shape[2:], dtype=np.float32)
        for name in sorted(set(owners)):
            sel = np.asarray([c == name for c in owners])
            grids[sel] = self.expert_nll(name, np.ascontiguousarray(feats[sel]))
        return grids

    def expert_nll(self, name: str, features: np.ndarray) -> np.ndarray:
        return self.engines.experts[name](features)["patch_nll"]

    def warm_up(self, max_batch: int, concurrency: int = 1) -> None:
        """Run every batch size up to ``max_batch`` through the backbone and each expert, from
        ``concurrency`` threads at once, up and down again, before the first frame.

        ONNX Runtime's memory arenas grow on each new shape and on concurrent runs of a shape,
        and never shrink: unwarmed, the daemon's memory steps up whenever a burst first brings
        a new combination (hours into a run). Warmed, its peak is reached at start and stays
        flat (demo set, 2 workers: 97 MiB opened, 487 MiB warmed, +4 MiB after 240 random
        mixed batches), and no size is a latency spike; a reload is warmed before the swap.
        """
        from concurrent.futures import ThreadPoolExecutor
        size, names = self.engines.size, self.engines.expert_names()
        workers = max(1, concurrency)
        with ThreadPoolExecutor(workers) as pool:  # each shape run by every worker at once
            for b in list(range(1, max_batch + 1)) + list(range(max_batch, 0, -1)):
                for name in names:
                    frames = np.zeros((b, size, size, 3), np.uint8)
                    list(pool.map(lambda _, f=frames, h=[name] * b: self.score(f, h), range(workers)))

    def score(self, images: np.ndarray, hints: list[str | None] | None = None) -> list[FrameScore]:
        """Score a batch of frames end to end (frames of one expert share one expert call).

        Safe to call from several threads at once (each call has its own arrays; ONNX Runtime
        sessions allow concurrent runs)."""
        if len(images) == 0:
            return []
        t0 = time.perf_counter()
        feats, pooled = self.features(images)
        t1 = time.perf_counter()
        chosen, dist, far = self.route(pooled, hints)
        t2 = time.perf_counter()
        grids = self._grids(feats, chosen)
        t3 = time.perf_counter()
        picked, relit, offsets = light_retries(images, chosen, self.engines.norms,
                                               self.light_retry)
        taken = np.zeros(len(images), dtype=bool)
        if picked:  # light off the expert's: scored again relit, the lower score counts
            again = self._grids(self.features(relit)[0], [chosen[i] for i in picked])
            taken[picked] = keep_lower(grids, picked, again, chosen, self.engines.norms,
                                       self.top_k)
        t3r = time.perf_counter()
        patch_scores = standardised(grids, chosen, self.engines.norms)  # once for both
        raw = image_scores(patch_scores, self.top_k)
        typical = typicality(patch_scores)
        unknown = self.unknown(far, typical, chosen)
        maps = self.anomaly_maps(grids) if self.with_maps else None
        t4 = time.perf_counter()
        n = len(images)
        timings = {"backbone": (t1 - t0) / n, "router": (t2 - t1) / n, "expert": (t3 - t2) / n,
                   "postprocess": (t4 - t3r) / n}
        if picked:
            timings["light_retry"] = (t3r - t3) / n
        out = []
        for i, name in enumerate(chosen):
            cal = self.engines.calibration.get(name)
            out.append(FrameScore(
                expert=name, distance=float(dist[i]), raw_score=float(raw[i]),
                score=float(cal.normalise(raw[i])) if cal else None,
                anomalous=bool(cal.is_anomalous(raw[i])) if cal else None,
                unknown=bool(unknown[i]), typicality=float(typical[i]), patch_nll=grids[i],
                map=maps[i] if maps is not None else None, timings=dict(timings),
                light_offset=None if np.isnan(offsets[i]) else float(offsets[i]),
                relit=bool(taken[i])))
        return out
