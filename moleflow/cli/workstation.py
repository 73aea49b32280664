"""Workstation subcommands: train, evaluate, benchmark and export experts; calibrate, build and
verify engine sets. Torch is imported inside each command, never at import time."""

from __future__ import annotations

import argparse
from pathlib import Path

from moleflow.cli.common import (
    config_of,
    data_flag,
    data_root,
    engines_flag,
    log_to,
    training_flags,
)
from moleflow.config import ConfigError


def cmd_train(args: argparse.Namespace) -> int:
    cfg = config_of(args)
    from moleflow.train.continual import step_matrix, train_tasks
    log_to(args.run)
    results = train_tasks(args.run, data_root(args, cfg), args.tasks, cfg, not args.quiet)
    from moleflow.train.bundle import RunBundle
    bundle = RunBundle.open(args.run)
    print(step_matrix(bundle, "image_auroc"))
    print(step_matrix(bundle, "pixel_auroc"))
    print(f"results: {args.run / 'final_results.csv'} ({len(results)} classes)")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    cfg = config_of(args)
    from moleflow.train.continual import eval_run
    log_to(args.run)
    eval_run(args.run, Path(cfg.data.root) if cfg.data.root else None, cfg, not args.quiet)
    print(f"results: {args.run / 'final_results.csv'}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    cfg = config_of(args)
    from moleflow.train.bench import bench_training
    bench_training(data_root(args, cfg), args.task, cfg, args.repeat)
    return 0


def cmd_robustness(args: argparse.Namespace) -> int:
    """Every class scored under named camera conditions: from a run's PyTorch model, or (with
    --engines) from an engine set with its calibrated decisions and "unknown" flags."""
    cfg = config_of(args)
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
    cfg = config_of(args)
    from moleflow.calibration.calibrate import calibrate_engine_set, summary
    reports = calibrate_engine_set(args.engines, data_root(args, cfg), cfg.calibration,
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
    cfg = config_of(args)
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
    cfg = config_of(args)
    from moleflow.engines.bench import bench_engines, format_rows
    rows = bench_engines(args.run, args.engines, Path(cfg.data.root) if cfg.data.root else None,
                         cfg.train.threads, rounds=args.repeat)
    print(format_rows(rows))
    return 0


def _run(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--run", type=Path, required=required, help="run folder")


def args_train(p: argparse.ArgumentParser) -> None:
    training_flags(p)
    data_flag(p)
    _run(p)
    p.add_argument("--tasks", nargs="+", required=True, help="classes, in order")


def args_eval(p: argparse.ArgumentParser) -> None:
    data_flag(p)
    _run(p)


def args_bench(p: argparse.ArgumentParser) -> None:
    training_flags(p)
    data_flag(p)
    p.add_argument("--task", default=None, help="class to train (default: the first)")
    p.add_argument("--repeat", type=int, default=1, help="timed repetitions")


def args_robustness(p: argparse.ArgumentParser) -> None:
    data_flag(p)
    p.add_argument("--run", type=Path, help="run folder (PyTorch model)")
    p.add_argument("--engines", type=Path, help="engine-set folder (calibrated decisions and "
                                                "unknown flags)")
    p.add_argument("--leave-one-out", action="store_true",
                   help="with --engines: also score each class's frames against the set "
                        "without its expert (how many are called unknown)")
    p.add_argument("--conditions", nargs="+", metavar="COND",
                   help="conditions, e.g. lossless jpeg:85 shift:4 (default: all; see "
                        "docs/robustness.md)")


def args_export(p: argparse.ArgumentParser) -> None:
    _run(p)
    p.add_argument("--out", type=Path, required=True, help="engine-set folder to write")


def args_calibrate(p: argparse.ArgumentParser) -> None:
    data_flag(p)
    engines_flag(p)
    p.add_argument("--force", action="store_true",
                   help="refit experts whose calibration is still valid")


def args_build(p: argparse.ArgumentParser) -> None:
    engines_flag(p)
    p.add_argument("--precision", choices=("fp16", "fp32"), default="fp16")
    p.add_argument("--max-batch", type=int, default=8, help="largest batch of the plans")
    p.add_argument("--workspace-mb", type=int, default=1024,
                   help="builder workspace limit (keep it small on Jetson)")


def args_verify(p: argparse.ArgumentParser) -> None:
    data_flag(p)
    _run(p)
    engines_flag(p)


def args_bench_engines(p: argparse.ArgumentParser) -> None:
    args_verify(p)
    p.add_argument("--repeat", type=int, default=3, help="timed passes over the frames")


COMMANDS = [
    ("train", cmd_train, args_train, "add product experts to a run (task by task) and evaluate"),
    ("eval", cmd_eval, args_eval, "evaluate every expert of a run, routed, without task ids"),
    ("bench", cmd_bench, args_bench, "time the training of one expert and print the figures"),
    ("robustness", cmd_robustness, args_robustness,
     "score every class under camera conditions (JPEG, light, noise, blur, shift, rotation)"),
    ("export", cmd_export, args_export,
     "export a run's experts (LoRA fused) to an ONNX engine set"),
    ("calibrate", cmd_calibrate, args_calibrate,
     "fit thresholds per expert on held-out normal images"),
    ("build", cmd_build, args_build, "build TensorRT plans of an engine set on this GPU"),
    ("verify", cmd_verify, args_verify, "check an engine set against its run (parity, FP16)"),
    ("bench-engines", cmd_bench_engines, args_bench_engines,
     "per-frame cost: PyTorch eager vs ONNX Runtime"),
]
"""(name, run, add its arguments, help) of each subcommand."""
