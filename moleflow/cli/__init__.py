"""The ``moleflow`` command line: one entry point, a subcommand per job.

Training-side subcommands import torch lazily, so the edge side of this module (config checks
now, the daemon later) runs in an environment without torch.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Callable

import yaml

from moleflow.config import PRESETS, ConfigError, describe, documented_yaml, load_config
from moleflow.errors import MoleflowError

log = logging.getLogger("moleflow")
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mvtec256"


def _setting(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or "." not in key:
        raise argparse.ArgumentTypeError(f"--set expects section.option=value, got {text!r}")
    return key, yaml.safe_load(value)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="YAML config (default: built-in defaults, "
                                               "documented in config.yaml)")
    p.add_argument("--set", dest="settings", action="append", type=_setting, default=[],
                   metavar="SECTION.OPTION=VALUE", help="override any config key (repeatable)")
    p.add_argument("--epochs", type=int, help="train.epochs")
    p.add_argument("--preset", choices=sorted(PRESETS), help="model.preset (ablation)")
    p.add_argument("--image-size", type=int, help="data.image_size")
    p.add_argument("--seed", type=int, help="train.seed")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _config(args: argparse.Namespace):
    overrides = dict(args.settings)
    for flag, key in (("epochs", "train.epochs"), ("preset", "model.preset"),
                      ("image_size", "data.image_size"), ("seed", "train.seed")):
        if getattr(args, flag, None) is not None:
            overrides[key] = getattr(args, flag)
    if getattr(args, "data", None) is not None:
        overrides["data.root"] = str(args.data)
    return load_config(args.config, overrides)


def _data_root(args: argparse.Namespace, cfg) -> Path:
    if cfg.data.root is None:
        raise ConfigError("data.root: no data folder given (use --data DIR or data.root)")
    return Path(cfg.data.root)


def _log_to(run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run_dir / "training.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)


def cmd_train(args: argparse.Namespace) -> int:
    cfg = _config(args)
    from moleflow.train.continual import step_matrix, train_tasks
    _log_to(args.run)
    results = train_tasks(args.run, _data_root(args, cfg), args.tasks, cfg, not args.quiet)
    from moleflow.train.bundle import RunBundle
    bundle = RunBundle.open(args.run)
    print(step_matrix(bundle, "image_auroc"))
    print(step_matrix(bundle, "pixel_auroc"))
    print(f"results: {args.run / 'final_results.csv'} ({len(results)} classes)")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    cfg = _config(args)
    from moleflow.train.continual import eval_run
    _log_to(args.run)
    eval_run(args.run, Path(cfg.data.root) if cfg.data.root else None, cfg, not args.quiet)
    print(f"results: {args.run / 'final_results.csv'}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job end to end: train and evaluate the default sequence on the shared data (or
    generated images), export and calibrate the engine set, then serve it: broker, daemon, a
    camera replaying the test images, and a summary of what came out on MQTT."""
    data = args.data
    if data is None and SHARED_DATA.is_dir():
        data = SHARED_DATA
    if data is None:
        from moleflow.train.synthetic import make_synthetic_mvtec
        data = make_synthetic_mvtec(args.run.parent / "synthetic-data", size=128, n_train=80)
        log.info("no data folder given and ../shared/data absent: generated images in %s", data)
        args.image_size = args.image_size or 128
    from moleflow.data import list_classes
    args.data, args.tasks = data, args.tasks or list_classes(data)
    if args.run.exists():
        import shutil
        shutil.rmtree(args.run)
    cmd_train(args)
    from moleflow.calibration.calibrate import calibrate_engine_set, summary
    from moleflow.engines.export import export_engine_set
    engines = args.run / "engines"
    export_engine_set(args.run, engines)
    cfg = _config(args)
    print(summary(calibrate_engine_set(engines, data, cfg.calibration, threads=cfg.train.threads)))
    print(f"engine set: {engines / 'manifest.json'} (serve it with ONNX Runtime, or build "
          f"TensorRT plans with 'moleflow build --engines {engines}')")
    from moleflow.devtools.demo import replay
    line = args.run / "line"
    result = replay(engines, data, args.tasks, cfg, line, codec=args.camera_codec)
    print(result.text())
    print(f"alarm frames with their regions: {line / 'alarms'}; heat-map overlays: "
          f"{args.run / 'overlays'}; daemon log: {line / 'daemon.log'}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    cfg = _config(args)
    from moleflow.train.bench import bench_training
    bench_training(_data_root(args, cfg), args.task, cfg, args.repeat)
    return 0


def cmd_robustness(args: argparse.Namespace) -> int:
    """Every class scored under named camera conditions: from a run's PyTorch model, or (with
    --engines) from an engine set with its calibrated decisions and "unknown" flags."""
    cfg = _config(args)
    from moleflow.conditions import DEFAULT_CONDITIONS, parse_condition
    from moleflow.robustness import format_table
    conditions = [parse_condition(c) for c in (args.conditions or DEFAULT_CONDITIONS)]
    data = Path(cfg.data.root) if cfg.data.root else None
    if args.engines is not None:
        from moleflow.calibration.robustness import engine_robustness
        if data is None:
            raise ConfigError("data.root: the engine-set benchmark needs --data")
        rows = engine_robustness(args.engines, data, conditions, threads=cfg.train.threads,
                                 progress=not args.quiet)
        if args.leave_one_out:
            from moleflow.calibration.robustness import leave_one_out
            for left, cond, unknown, frames in leave_one_out(args.engines, data, conditions,
                                                             threads=cfg.train.threads):
                print(f"without the {left} expert, {cond}: {unknown}/{frames} of its frames "
                      f"unknown ({unknown / frames:.1%})")
    elif args.run is not None:
        from moleflow.train.robustness import run_robustness
        rows = run_robustness(args.run, data, conditions, cfg, not args.quiet)
    else:
        raise ConfigError("robustness needs --run RUN or --engines ENGINE_SET")
    print(format_table(rows))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from moleflow.engines.export import export_engine_set
    manifest = export_engine_set(args.run, args.out)
    print(f"engine set: {args.out / 'manifest.json'} ({len(manifest.experts)} experts: "
          f"{', '.join(e.name for e in manifest.experts)})")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    cfg = _config(args)
    from moleflow.calibration.calibrate import calibrate_engine_set, summary
    reports = calibrate_engine_set(args.engines, _data_root(args, cfg), cfg.calibration,
                                   force=args.force, threads=cfg.train.threads)
    print(summary(reports))
    print(f"calibration: {args.engines / 'calibration.json'}")
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from moleflow.engines.tensorrt_backend import build_engine_set
    manifest = build_engine_set(args.engines, args.precision, args.max_batch,
                                workspace_mb=args.workspace_mb)
    print(f"TensorRT {manifest.tensorrt['version']} {args.precision} plans for "
          f"{manifest.tensorrt['gpu']}: {len(manifest.experts)} experts + backbone")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    cfg = _config(args)
    from moleflow.engines.verify import verify_engine_set
    checks = verify_engine_set(args.run, args.engines, Path(cfg.data.root) if cfg.data.root
                               else None, cfg.train.threads)
    for c in checks:
        print(c.line())
    worst = max(c.expert_max_rel for c in checks)
    print(f"max relative error of the fused experts: {worst:.2e}; FP16 finite everywhere: "
          f"{all(c.fp16_finite for c in checks)}")
    return 0


def cmd_bench_engines(args: argparse.Namespace) -> int:
    cfg = _config(args)
    from moleflow.engines.bench import bench_engines, format_rows
    rows = bench_engines(args.run, args.engines, Path(cfg.data.root) if cfg.data.root else None,
                         cfg.train.threads, rounds=args.repeat)
    print(format_rows(rows))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the edge daemon (what systemd starts), or only check its configuration."""
    cfg = _config(args)
    from moleflow.edge.ingest import parse_endpoint
    for text in cfg.ingest.endpoints:
        parse_endpoint(text)
    if not cfg.engines.path:
        raise ConfigError("engines.path: no engine set given (the folder with manifest.json)")
    root = Path(cfg.engines.path)
    if args.validate_config:
        return _validate_engines(cfg, root)
    from moleflow.manifest import Manifest
    Manifest.load(root).verify_files(root)
    import signal
    from moleflow.edge.daemon import Daemon
    from moleflow.edge.logs import setup_logging
    setup_logging(cfg.logging.level, cfg.logging.json)
    daemon = Daemon(cfg)
    signal.signal(signal.SIGTERM, lambda *_: daemon.stop())
    signal.signal(signal.SIGINT, lambda *_: daemon.stop())
    signal.signal(signal.SIGHUP, lambda *_: daemon.reload())
    daemon.run()
    return 0


def _validate_engines(cfg, root: Path) -> int:
    """``serve --validate-config``'s engine-set part: every file checked and the set opened as
    the daemon would (``validate_engine_set``); experts that will raise no alarm are a
    warning, not a failure (a line may run an expert uncalibrated on purpose while collecting
    its held-out images)."""
    from moleflow.engines.pipeline import validate_engine_set
    from moleflow.engines.runtime import parallelism
    _, threads = parallelism(cfg.engines.backend, cfg.engines.workers, cfg.engines.threads)
    engines = validate_engine_set(root, cfg.engines.backend, cfg.engines.precision, threads)
    if engines.uncalibrated:
        print(f"moleflow: WARNING: expert(s) {', '.join(engines.uncalibrated)} of {root} have no "
              "calibration for their graph: no alarm will be raised for their frames (run "
              f"'moleflow calibrate --engines {root} --data DIR')", file=sys.stderr)
    print(f"config OK: engine set {root} ({len(engines.experts)} experts, "
          f"{cfg.engines.backend} {cfg.engines.precision}), {len(cfg.ingest.endpoints)} camera "
          f"socket(s), MQTT {cfg.mqtt.host}:{cfg.mqtt.port}")
    return 0


def cmd_bench_daemon(args: argparse.Namespace) -> int:
    cfg = _config(args)
    from moleflow.devtools.bench import bench_daemon, load_frames
    frames = load_frames(args.engines, _data_root(args, cfg))
    print(bench_daemon(args.engines, frames, cfg, seconds=args.seconds, rate=args.rate,
                       rounds=args.rounds).lines())
    return 0


def cmd_fuzz(args: argparse.Namespace) -> int:
    """Hostile messages mixed with valid frames against the served daemon; non-zero when it
    crashed, lost a valid frame, or left a hostile message unreported."""
    from moleflow.devtools.fuzz import run_fuzz
    report = run_fuzz(args.engines, _config(args), args.messages,
                      0 if args.seed is None else args.seed, args.valid, args.pattern, args.out,
                      args.data, args.patience)
    print(report.text())
    return 1 if report.failed else 0


def cmd_soak(args: argparse.Namespace) -> int:
    """The served daemon under a steady JPEG stream, its memory and fds sampled; non-zero when
    they drift past the tolerance after the warm-up."""
    from moleflow.devtools.soak import run_soak
    report = run_soak(args.engines, _config(args), args.minutes, args.fps, args.cameras,
                      args.interval, args.tolerance, args.warmup, args.data,
                      emit=lambda line: print(line, flush=True))
    return 0 if report.ok else 1


def cmd_keys(args: argparse.Namespace) -> int:
    """A ZeroMQ CURVE key pair: NAME.key (public: give it to the other side) and
    NAME.key_secret (keep it where only its owner reads it)."""
    import zmq.auth
    args.out.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(str(args.out), args.name)
    Path(secret).chmod(0o600)
    print(f"public key: {public}\nsecret key: {secret} (mode 0600)")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    cfg = _config(args)
    if args.documented:
        print(documented_yaml(), end="")
    elif args.defaults:
        for key, default, help_ in describe():
            print(f"{key} = {default!r}  # {help_}")
    else:
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moleflow", description="MoLE-Flow Edge: continual "
                                     "visual anomaly detection (train, evaluate, serve)")
    sub = parser.add_subparsers(dest="command", required=True)
    commands: dict[str, tuple[Callable, str]] = {
        "train": (cmd_train, "add product experts to a run (task by task) and evaluate"),
        "eval": (cmd_eval, "evaluate every expert of a run, routed, without task ids"),
        "demo": (cmd_demo, "the main job end to end on the available data"),
        "bench": (cmd_bench, "time the training of one expert and print the figures"),
        "robustness": (cmd_robustness, "score every class under camera conditions (JPEG, "
                                       "light, noise, blur, shift, rotation)"),
        "export": (cmd_export, "export a run's experts (LoRA fused) to an ONNX engine set"),
        "calibrate": (cmd_calibrate, "fit thresholds per expert on held-out normal images"),
        "build": (cmd_build, "build TensorRT plans of an engine set on this GPU"),
        "verify": (cmd_verify, "check an engine set against its run (parity, FP16)"),
        "bench-engines": (cmd_bench_engines, "per-frame cost: PyTorch eager vs ONNX Runtime"),
        "serve": (cmd_serve, "run the edge daemon: ZeroMQ frames in, MQTT results out"),
        "bench-daemon": (cmd_bench_daemon, "drive a running daemon with a sender process: "
                                           "frames/s and latency to the MQTT result"),
        "config": (cmd_config, "validate a config file and print it resolved"),
        "keys": (cmd_keys, "make a ZeroMQ CURVE key pair for the daemon (ingest."
                           "curve_secret_key) or a camera (ingest.curve_clients)"),
        "fuzz": (cmd_fuzz, "send hostile messages mixed with valid frames to the served daemon "
                           "and check it stays up and reports each one"),
        "soak": (cmd_soak, "serve a steady JPEG stream for minutes and watch the daemon's "
                           "memory, fds and threads"),
    }
    for name, (fn, help_) in commands.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(fn=fn)
        _common(p)
        if name in ("train", "eval", "demo", "bench", "calibrate", "verify", "bench-engines",
                    "bench-daemon", "robustness"):
            p.add_argument("--data", type=Path, help="MVTec-layout folder (data.root)")
        if name in ("train", "eval", "export", "verify", "bench-engines"):
            p.add_argument("--run", type=Path, required=True, help="run folder")
        if name == "bench-daemon":
            p.add_argument("--seconds", type=float, default=12.0,
                           help="sending time per round")
            p.add_argument("--rounds", type=int, default=3,
                           help="rounds of bare pipeline then daemon (medians are reported)")
            p.add_argument("--rate", type=float, default=0.0,
                           help="frames/s offered (0 = as fast as the sender can)")
        if name in ("calibrate", "build", "verify", "bench-engines", "bench-daemon"):
            p.add_argument("--engines", type=Path, required=True, help="engine-set folder")
        if name == "robustness":
            p.add_argument("--run", type=Path, help="run folder (PyTorch model)")
            p.add_argument("--engines", type=Path, help="engine-set folder (calibrated "
                           "decisions and unknown flags)")
            p.add_argument("--leave-one-out", action="store_true",
                           help="with --engines: also score each class's frames against the "
                                "set without its expert (how many are called unknown)")
            p.add_argument("--conditions", nargs="+", metavar="COND",
                           help="conditions, e.g. lossless jpeg:85 shift:4 (default: all; see "
                                "docs/robustness.md)")
        if name == "export":
            p.add_argument("--out", type=Path, required=True, help="engine-set folder to write")
        if name == "calibrate":
            p.add_argument("--force", action="store_true",
                           help="refit experts whose calibration is still valid")
        if name == "build":
            p.add_argument("--precision", choices=("fp16", "fp32"), default="fp16")
            p.add_argument("--max-batch", type=int, default=8, help="largest batch of the plans")
            p.add_argument("--workspace-mb", type=int, default=1024,
                           help="builder workspace limit (keep it small on Jetson)")
        if name == "bench-engines":
            p.add_argument("--repeat", type=int, default=3, help="timed passes over the frames")
        if name == "train":
            p.add_argument("--tasks", nargs="+", required=True, help="classes, in order")
        if name == "demo":
            p.add_argument("--run", type=Path, default=Path("runs/demo"), help="run folder")
            p.add_argument("--tasks", nargs="+", help="classes (default: all in the folder)")
            p.add_argument("--camera-codec", default="jpeg:90", metavar="CODEC",
                           help="how the demo camera sends frames: jpeg:Q (imagezmq send_jpg, "
                                "default jpeg:90) or raw (send_image)")
        if name == "bench":
            p.add_argument("--task", default=None, help="class to train (default: the first)")
            p.add_argument("--repeat", type=int, default=1, help="timed repetitions")
        if name in ("fuzz", "soak"):
            p.add_argument("--engines", type=Path, required=True, help="engine-set folder")
            p.add_argument("--data", type=Path, help="MVTec-layout folder whose test images of "
                           "the set's products are sent (default: generated frames)")
        if name == "fuzz":  # --seed (above) seeds the messages here
            p.add_argument("--messages", type=int, default=5000,
                           help="hostile or ambiguous messages in the mixed phase")
            p.add_argument("--valid", type=int, help="valid frames among them (default: a "
                                                     "quarter as many)")
            p.add_argument("--pattern", choices=("pull", "rep"), default="pull",
                           help="the daemon's socket: pull (PUSH senders) or rep (REQ senders)")
            p.add_argument("--out", type=Path, help="keep each daemon's config and log here")
            p.add_argument("--patience", type=float, default=4.0,
                           help="seconds an answer or result is waited for before it is lost")
        if name == "soak":
            p.add_argument("--minutes", type=float, default=30.0, help="how long frames flow")
            p.add_argument("--fps", type=float, default=10.0, help="frames/s of each camera")
            p.add_argument("--cameras", type=int, default=2, help="cameras sending")
            p.add_argument("--interval", type=float, default=60.0,
                           help="seconds between two samples")
            p.add_argument("--tolerance", type=float, default=5.0,
                           help="largest change of RSS and fds after the warm-up, per cent")
            p.add_argument("--warmup", type=float, help="warm-up minutes not compared "
                                                        "(default: 3, or 30 %% of a shorter run)")
        if name == "serve":
            p.add_argument("--validate-config", action="store_true",
                           help="check the config and the engine set's files, then exit")
        if name == "keys":
            p.add_argument("--out", type=Path, required=True, help="folder for the key files")
            p.add_argument("--name", default="server", help="file name stem (server, camera1)")
        if name == "config":
            p.add_argument("--defaults", action="store_true", help="list every option")
            p.add_argument("--documented", action="store_true",
                           help="print the commented default config (what config.yaml holds)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    try:
        return args.fn(args)
    except ConfigError as exc:
        print(f"moleflow: config error: {exc}", file=sys.stderr)
    except MoleflowError as exc:  # data, run, backbone problems: the message names the file
        print(f"moleflow: error: {exc}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
