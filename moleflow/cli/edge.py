"""Edge subcommands: serve (the daemon systemd starts, or only its config check), keys, config.
Nothing here imports torch."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from moleflow.cli.common import config_of
from moleflow.config import ConfigError, describe, documented_yaml


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the edge daemon (what systemd starts), or only check its configuration."""
    cfg = config_of(args)
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
    from moleflow.edge.commands import check_products
    check_products(cfg, list(engines.experts))  # ingest.products name experts of this set
    if engines.uncalibrated:
        print(f"moleflow: WARNING: expert(s) {', '.join(engines.uncalibrated)} of {root} have no "
              "calibration for their graph: no alarm will be raised for their frames (run "
              f"'moleflow calibrate --engines {root} --data DIR')", file=sys.stderr)
    print(f"config OK: engine set {root} ({len(engines.experts)} experts, "
          f"{cfg.engines.backend} {cfg.engines.precision}), {len(cfg.ingest.endpoints)} camera "
          f"socket(s), MQTT {cfg.mqtt.host}:{cfg.mqtt.port}")
    return 0


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
    cfg = config_of(args)
    if args.documented:
        print(documented_yaml(), end="")
    elif args.defaults:
        for key, default, help_ in describe():
            print(f"{key} = {default!r}  # {help_}")
    else:
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    return 0


def args_serve(p: argparse.ArgumentParser) -> None:
    p.add_argument("--validate-config", action="store_true",
                   help="check the config and the engine set's files, then exit")


def args_keys(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, required=True, help="folder for the key files")
    p.add_argument("--name", default="server", help="file name stem (server, camera1)")


def args_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--defaults", action="store_true", help="list every option")
    p.add_argument("--documented", action="store_true",
                   help="print the commented default config (what config.yaml holds)")


COMMANDS = [
    ("serve", cmd_serve, args_serve, "run the edge daemon: ZeroMQ frames in, MQTT results out"),
    ("config", cmd_config, args_config, "validate a config file and print it resolved"),
    ("keys", cmd_keys, args_keys, "make a ZeroMQ CURVE key pair for the daemon (ingest."
                                  "curve_secret_key) or a camera (ingest.curve_clients)"),
]
"""(name, run, add its arguments, help) of each subcommand."""
