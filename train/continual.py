"""The continual job: add product experts one task at a time, evaluate everything after each.

Evaluation never receives the task id: the router picks the expert (unless the ``wo_router``
ablation asks for the oracle). After every step each class seen so far is evaluated, giving the
per-step matrix (metrics.csv) from which forgetting is computed.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from moleflow.config import Config
from moleflow.conditions import Augmentation
from moleflow.scoring import PositionNorm
from moleflow.train.backbone import FeatureExtractor
from moleflow.train.bundle import RunBundle, RunError, TaskRecord
from moleflow.data import ClassData, DataError, load_class
from moleflow.train.evaluate import ClassResult, evaluate_class, fit_norm, write_overlays
from moleflow.train.features import FeatureStore, pooled
from moleflow.train.flow import MoLEFlow
from moleflow.measures import forgetting, mean_metrics
from moleflow.plots import write_evaluation_plot
from moleflow.train.router import PrototypeRouter, fit_prototype
from moleflow.train.trainer import TrainReport, train_task

log = logging.getLogger("moleflow")
METRICS = ("image_auroc", "pixel_auroc", "pixel_ap", "aupro", "routing_accuracy")


@dataclass
class Session:
    """A run bundle opened with its model, router, backbone and feature store."""
    bundle: RunBundle
    model: MoLEFlow | None
    router: PrototypeRouter
    store: FeatureStore
    norms: dict[int, PositionNorm]      # position statistics per task index

    @property
    def cfg(self) -> Config:
        return self.bundle.config


def open_session(run_dir: Path, config: Config, progress: bool = True,
                 create: bool = True) -> Session:
    """Open (or create) a run; an existing run keeps its stored model/backbone settings."""
    if RunBundle.exists(run_dir):
        bundle = RunBundle.open(run_dir)
        stored = bundle.config
        changed = [s for s in ("backbone", "model") if getattr(stored, s) != getattr(config, s)]
        if stored.data.image_size != config.data.image_size:
            changed.append("data.image_size")
        if changed:
            log.warning("run %s keeps its stored %s settings; the given ones are ignored",
                        run_dir, ", ".join(changed))
        bundle.config = Config(data=stored.data, backbone=stored.backbone, model=stored.model,
                               train=config.train, eval=config.eval, router=config.router,
                               calibration=config.calibration)
    elif create:
        bundle = None
    else:
        raise RunError(f"{run_dir} is not a run folder (no run.json)")
    cfg = bundle.config if bundle else config
    torch.set_num_threads(cfg.train.threads or torch.get_num_threads())
    extractor = FeatureExtractor(cfg.backbone)
    size = cfg.data.image_size
    if bundle is None:
        bundle = RunBundle.create(run_dir, config, extractor.identity(size), extractor.dim,
                                  extractor.grid(size))
    elif bundle.backbone_identity != extractor.identity(size):
        raise RunError(f"run {run_dir} was trained with backbone {bundle.backbone_identity}, "
                       f"but this one is {extractor.identity(size)}")
    cache = run_dir / "cache" if cfg.train.cache_features else None
    store = FeatureStore(extractor, size, cache, progress=progress)
    model = bundle.load_model(seed=cfg.train.seed) if bundle.tasks else None
    return Session(bundle, model, bundle.load_router(), store, bundle.load_norms())


def _class_data(session: Session, name: str, data_root: Path | None) -> ClassData:
    """Test data of an already learned class: from ``data_root`` if there, else where it came from."""
    record = next(t for t in session.bundle.tasks if t.name == name)
    for root in ([data_root] if data_root else []) + [Path(record.data_root)]:
        if (root / name / "train" / "good").is_dir():
            return load_class(root, name)
    raise DataError(f"class {name!r} of run {session.bundle.path} is not found in "
                    f"{data_root or record.data_root}: pass --data with its folder")


def _image_name(data: ClassData, path: Path) -> str:
    """How a run records one of a class's images (the held-out list): its path in the class
    folder."""
    return path.relative_to(data.root).as_posix()


def _light_frames(session: Session, data: ClassData, fit) -> np.ndarray | None:
    """The training images an expert's light reference is taken from; None when the backbone
    standardises every frame's light anyway (nothing to retry then)."""
    if session.cfg.backbone.standardise_light:
        return None
    return session.store.images_of([data.train[int(i)] for i in fit])


def ensure_norms(session: Session, data_root: Path | None) -> None:
    """Compute and store the position statistics that a run from before they existed lacks,
    from each such task's training images and their views (those it was trained on, not the
    held-out ones)."""
    for record in session.bundle.tasks:
        if record.index in session.norms:
            continue
        data = _class_data(session, record.name, data_root)
        held = set(record.val_images)
        fit = [i for i, p in enumerate(data.train) if _image_name(data, p) not in held]
        aug = Augmentation(**record.augmentation) if record.augmentation else None
        views = session.store.views(data, record.augment_views, aug, record.augment_seed)
        feats = torch.cat([v[torch.as_tensor(fit)] for v in views])
        norm = fit_norm(session.model, feats, record.index, session.cfg.eval.batch_size,
                        _light_frames(session, data, fit))
        session.bundle.save_norm(record, norm)
        session.norms[record.index] = norm
        log.info("task %d: %s: position statistics computed from %d training images (the run "
                 "predates them)", record.index, record.name, len(fit))


def validation_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (sorted) of the images to train on and of those held out for calibration.

    A seeded draw, so the same folder always gives the same split; at least two images are
    always left to train on.
    """
    k = min(int(round(n * fraction)), max(0, n - 2)) if fraction > 0 else 0
    held = np.sort(np.random.default_rng(seed).permutation(n)[:k])
    return np.setdiff1d(np.arange(n), held), held


def evaluate_all(session: Session, data_root: Path | None) -> dict[str, ClassResult]:
    """Evaluate every learned class, routed (the oracle only under the wo_router ablation)."""
    use_router = session.cfg.resolved_model().use_router
    ensure_norms(session, data_root)
    results = {}
    tasks = session.bundle.tasks
    for i, record in enumerate(tasks, 1):
        log.info("evaluating %s (%d/%d), routed", record.name, i, len(tasks))
        data = _class_data(session, record.name, data_root)
        results[record.name] = evaluate_class(session.model, session.router if use_router else None,
                                              session.store, data, record.index, session.cfg.eval,
                                              session.norms)
    return results


def _log_step(step: int, results: dict[str, ClassResult]) -> None:
    for name, res in results.items():
        m = res.metrics
        log.info("step %d | %-12s image AUROC %.4f  pixel AUROC %.4f  pixel AP %.4f  AUPRO %.4f"
                 "  routing %.3f", step, name, m.image_auroc, m.pixel_auroc, m.pixel_ap, m.aupro,
                 m.routing_accuracy)


def train_tasks(run_dir: Path, data_root: Path, tasks: list[str], config: Config,
                progress: bool = True) -> dict[str, ClassResult]:
    """Add ``tasks`` to the run one after another; returns the final routed evaluation."""
    session = open_session(run_dir, config, progress)
    known = {t.name for t in session.bundle.tasks}
    dup = [t for t in tasks if t in known]
    if dup:
        raise RunError(f"--tasks names {', '.join(dup)}, already learned in run {run_dir}: "
                       "experts are never retrained; choose new classes")
    if len(set(tasks)) != len(tasks):
        raise RunError(f"--tasks lists a class twice: {' '.join(tasks)}")
    datas = [load_class(data_root, name) for name in tasks]  # fail fast on bad data
    cfg = session.cfg
    results: dict[str, ClassResult] = {}
    for data in datas:
        index = len(session.bundle.tasks)
        all_views = session.store.views(data, cfg.train.augment_views,
                                        cfg.train.augmentation(), cfg.train.seed)
        fit, held = validation_split(len(all_views[0]), cfg.train.val_fraction, cfg.train.seed)
        views = [v[torch.from_numpy(fit)] for v in all_views]
        feats = views[0]
        val_images = [_image_name(data, data.train[i]) for i in held]
        if session.model is None:
            torch.manual_seed(cfg.train.seed)
            session.model = MoLEFlow(session.bundle.dim, session.bundle.grid,
                                     cfg.resolved_model(), seed=cfg.train.seed)
        torch.manual_seed(cfg.train.seed * 1000 + index)
        session.model.add_task(index, feats)
        log.info("task %d: %s, %d training images (%d held out for calibration)", index,
                 data.name, len(feats), len(held))
        report: TrainReport = train_task(session.model, index, feats, cfg.train,
                                         cfg.resolved_model(), progress, views)
        log.info("task %d: trained %d parameters in %.1f s (%d epochs, final loss %.3f)", index,
                 report.trainable_params, report.seconds, report.epochs, report.final_loss)
        # the router and the position statistics see every view: a frame from the line
        # (compressed, jittered) is as typical of its product as the file it came from
        every = torch.cat(views)
        proto = fit_prototype(data.name, pooled(every), shrinkage=cfg.router.shrinkage,
                              fixed_shrinkage=cfg.router.fixed_shrinkage, ridge=cfg.router.ridge)
        session.router.add(proto)
        norm = fit_norm(session.model, every, index, cfg.eval.batch_size,
                        _light_frames(session, data, fit))
        del every
        session.norms[index] = norm
        aug = cfg.train.augmentation()
        record = TaskRecord(index, data.name, str(data_root), round(report.seconds, 2),
                            val_images, len(views) - 1, asdict(aug) if aug else None,
                            cfg.train.seed)
        session.bundle.save_task(session.model, record, proto, norm)
        results = evaluate_all(session, data_root)
        _log_step(index, results)
        session.bundle.append_metrics([{"step": index, "trained": data.name, "class": name,
                                        **res.metrics.as_dict()} for name, res in results.items()])
    finish(session, results)
    return results


def eval_run(run_dir: Path, data_root: Path | None, config: Config,
             progress: bool = True) -> dict[str, ClassResult]:
    """Evaluate a run's experts on every learned class (routed) and write final results."""
    session = open_session(run_dir, config, progress, create=False)
    if not session.bundle.tasks:
        raise RunError(f"run {run_dir} has no trained task yet")
    results = evaluate_all(session, data_root)
    finish(session, results)
    return results


def metric_matrix(bundle: RunBundle, metric: str) -> tuple[list[int], list[str], np.ndarray]:
    """Steps, classes and the (step, class) matrix of ``metric`` from metrics.csv (NaN: not yet
    learned)."""
    rows = bundle.read_metrics()
    steps = sorted({int(r["step"]) for r in rows})
    classes = [t.name for t in bundle.tasks]
    matrix = np.full((len(steps), len(classes)), np.nan)
    for r in rows:
        if r["class"] in classes:
            matrix[steps.index(int(r["step"])), classes.index(r["class"])] = float(r[metric])
    return steps, classes, matrix


def forgetting_by_class(bundle: RunBundle, metric: str) -> dict[str, float]:
    """Best earlier value minus the final value of ``metric`` per class, from metrics.csv."""
    steps, classes, matrix = metric_matrix(bundle, metric)
    return dict(zip(classes, forgetting(matrix).tolist())) if steps else {}


def finish(session: Session, results: dict[str, ClassResult]) -> None:
    """final_results.csv, overlays, and the per-class table in the log."""
    bundle = session.bundle
    fg_img = forgetting_by_class(bundle, "image_auroc")
    fg_pix = forgetting_by_class(bundle, "pixel_auroc")
    rows = []
    for name, res in results.items():
        rows.append({"class": name, "task": res.task, **res.metrics.as_dict(),
                     "forgetting_image_auroc": fg_img.get(name, float("nan")),
                     "forgetting_pixel_auroc": fg_pix.get(name, float("nan"))})
    mean = mean_metrics({n: r.metrics for n, r in results.items()})
    rows.append({"class": "mean", "task": "", **mean.as_dict(),
                 "forgetting_image_auroc": _nanmean(fg_img.values()),
                 "forgetting_pixel_auroc": _nanmean(fg_pix.values())})
    bundle.write_final(rows)
    for name, res in results.items():
        write_overlays(res, session.store, bundle.path / "overlays" / name,
                       session.cfg.eval.overlays_per_class)
    steps, classes, matrix = metric_matrix(bundle, "image_auroc")
    write_evaluation_plot(bundle.path / "evaluation.png",  # ROC per class, AUROC per step
                          {n: (r.labels, r.scores, r.metrics.image_auroc)
                           for n, r in results.items()}, steps, classes, matrix)
    log.info("final results (%d classes, routed):\n%s", len(results), format_table(rows))


def _nanmean(values) -> float:
    finite = [v for v in values if not np.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def format_table(rows: list[dict]) -> str:
    head = f"{'class':<14}" + "".join(f"{m:>18}" for m in METRICS)
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['class']:<14}" + "".join(f"{r[m]:>18.4f}" for m in METRICS))
    return "\n".join(lines)


def step_matrix(bundle: RunBundle, metric: str = "image_auroc") -> str:
    """The per-step matrix (rows: after task t, columns: classes) as text."""
    steps, classes, matrix = metric_matrix(bundle, metric)
    out = [f"{metric:<22}" + "".join(f"{c:>12}" for c in classes)]
    for step, row in zip(steps, matrix):
        out.append(f"after task {step:<11}" + "".join(
            f"{'':>12}" if np.isnan(v) else f"{v:>12.4f}" for v in row))
    return "\n".join(out)
