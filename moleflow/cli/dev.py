"""Developer and demo subcommands (the main job end to end, daemon benchmark, fuzz, soak): they
drive a real daemon through ``moleflow.devtools``."""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path

from moleflow.cli.common import (
    SHARED_DATA,
    config_of,
    data_flag,
    data_root,
    engines_flag,
    training_flags,
)
from moleflow.cli.workstation import cmd_train
from moleflow.errors import MoleflowError

log = logging.getLogger("moleflow")
DEMO_MARK = ".moleflow-demo"
"""Written into a folder ``moleflow demo`` created: only such a folder is ever replaced."""


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
    args.data, args.tasks = data, args.tasks or list_classes(data)  # the data first, then
    fresh_run_folder(args.run, args.force)                          # any folder is touched
    cmd_train(args)
    from moleflow.calibration.calibrate import calibrate_engine_set, summary
    from moleflow.engines.export import export_engine_set
    engines = args.run / "engines"
    export_engine_set(args.run, engines)
    cfg = config_of(args)
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


def fresh_run_folder(run: Path, force: bool = False) -> None:
    """An empty run folder for the demo. An existing one is replaced only when an earlier demo
    made it (its mark inside) or with ``--force``; anything else is refused, never deleted."""
    if run.exists() and not run.is_dir():
        raise MoleflowError(f"--run {run} is a file, not a folder")
    if run.is_dir() and any(run.iterdir()):
        if not (run / DEMO_MARK).is_file() and not force:
            raise MoleflowError(f"--run {run} exists and was not made by 'moleflow demo': "
                                "refusing to replace it (choose another --run, or add --force "
                                "to replace it)")
        log.info("replacing the earlier demo run in %s", run)
        shutil.rmtree(run)
    run.mkdir(parents=True, exist_ok=True)
    (run / DEMO_MARK).write_text("made by 'moleflow demo': the next demo with this --run "
                                 "replaces this folder\n")


def cmd_bench_daemon(args: argparse.Namespace) -> int:
    cfg = config_of(args)
    from moleflow.devtools.bench import bench_daemon, load_frames
    frames = load_frames(args.engines, data_root(args, cfg))
    print(bench_daemon(args.engines, frames, cfg, seconds=args.seconds, rate=args.rate,
                       rounds=args.rounds).lines())
    return 0


def cmd_fuzz(args: argparse.Namespace) -> int:
    """Hostile messages mixed with valid frames against the served daemon; non-zero when it
    crashed, lost a valid frame, or left a hostile message unreported."""
    from moleflow.devtools.fuzz import run_fuzz
    report = run_fuzz(args.engines, config_of(args), args.messages,
                      0 if args.seed is None else args.seed, args.valid, args.pattern, args.out,
                      args.data, args.patience)
    print(report.text())
    return 1 if report.failed else 0


def cmd_soak(args: argparse.Namespace) -> int:
    """The served daemon under a steady JPEG stream, its memory and fds sampled; non-zero when
    they drift past the tolerance after the warm-up."""
    from moleflow.devtools.soak import run_soak
    report = run_soak(args.engines, config_of(args), args.minutes, args.fps, args.cameras,
                      args.interval, args.tolerance, args.warmup, args.data,
                      emit=lambda line: print(line, flush=True))
    return 0 if report.ok else 1


def args_demo(p: argparse.ArgumentParser) -> None:
    training_flags(p)
    data_flag(p)
    p.add_argument("--run", type=Path, default=Path("runs/demo"), help="run folder (one the "
                   "demo made is replaced; any other existing folder is refused without --force)")
    p.add_argument("--force", action="store_true",
                   help="replace the run folder even if the demo did not create it")
    p.add_argument("--tasks", nargs="+", help="classes (default: all in the folder)")
    p.add_argument("--camera-codec", default="jpeg:90", metavar="CODEC",
                   help="how the demo camera sends frames: jpeg:Q (imagezmq send_jpg, "
                        "default jpeg:90) or raw (send_image)")


def args_bench_daemon(p: argparse.ArgumentParser) -> None:
    data_flag(p)
    engines_flag(p)
    p.add_argument("--seconds", type=float, default=12.0, help="sending time per round")
    p.add_argument("--rounds", type=int, default=3,
                   help="rounds of bare pipeline then daemon (medians are reported)")
    p.add_argument("--rate", type=float, default=0.0,
                   help="frames/s offered (0 = as fast as the sender can)")


def _served(p: argparse.ArgumentParser) -> None:
    engines_flag(p)
    data_flag(p, "MVTec-layout folder whose test images of the set's products are sent "
                 "(default: generated frames)")


def args_fuzz(p: argparse.ArgumentParser) -> None:
    _served(p)
    p.add_argument("--seed", type=int, help="seeds the messages")
    p.add_argument("--messages", type=int, default=5000,
                   help="hostile or ambiguous messages in the mixed phase")
    p.add_argument("--valid", type=int, help="valid frames among them (default: a quarter as "
                                             "many)")
    p.add_argument("--pattern", choices=("pull", "rep"), default="pull",
                   help="the daemon's socket: pull (PUSH senders) or rep (REQ senders)")
    p.add_argument("--out", type=Path, help="keep each daemon's config and log here")
    p.add_argument("--patience", type=float, default=4.0,
                   help="seconds an answer or result is waited for before it is lost")


def args_soak(p: argparse.ArgumentParser) -> None:
    _served(p)
    p.add_argument("--minutes", type=float, default=30.0, help="how long frames flow")
    p.add_argument("--fps", type=float, default=10.0, help="frames/s of each camera")
    p.add_argument("--cameras", type=int, default=2, help="cameras sending")
    p.add_argument("--interval", type=float, default=60.0, help="seconds between two samples")
    p.add_argument("--tolerance", type=float, default=5.0,
                   help="largest change of RSS and fds after the warm-up, per cent")
    p.add_argument("--warmup", type=float, help="warm-up minutes not compared (default: 3, or "
                                                "30 %% of a shorter run)")


COMMANDS = [
    ("demo", cmd_demo, args_demo, "the main job end to end on the available data"),
    ("bench-daemon", cmd_bench_daemon, args_bench_daemon,
     "drive a running daemon with a sender process: frames/s and latency to the MQTT result"),
    ("fuzz", cmd_fuzz, args_fuzz, "send hostile messages mixed with valid frames to the served "
                                  "daemon and check it stays up and reports each one"),
    ("soak", cmd_soak, args_soak, "serve a steady JPEG stream for minutes and watch the "
                                  "daemon's memory, fds and threads"),
]
"""(name, run, add its arguments, help) of each subcommand."""
