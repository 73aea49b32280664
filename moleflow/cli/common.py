"""What every subcommand shares: the config flags, the training flags (only for the commands
that train), and reading the configuration they give."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import yaml

from moleflow.config import PRESETS, ConfigError, load_config

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "mvtec256"


def _setting(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or "." not in key:
        raise argparse.ArgumentTypeError(f"--set expects section.option=value, got {text!r}")
    return key, yaml.safe_load(value)


def config_flags(p: argparse.ArgumentParser) -> None:
    """--config, --set and --quiet: every subcommand."""
    p.add_argument("--config", type=Path, help="YAML config (default: built-in defaults, "
                                               "documented in config.yaml)")
    p.add_argument("--set", dest="settings", action="append", type=_setting, default=[],
                   metavar="SECTION.OPTION=VALUE", help="override any config key (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def training_flags(p: argparse.ArgumentParser) -> None:
    """Shortcuts for training keys: only the subcommands that train take them."""
    p.add_argument("--epochs", type=int, help="train.epochs")
    p.add_argument("--preset", choices=sorted(PRESETS), help="model.preset (ablation)")
    p.add_argument("--image-size", type=int, help="data.image_size")
    p.add_argument("--seed", type=int, help="train.seed")


def data_flag(p: argparse.ArgumentParser, help_: str = "MVTec-layout folder (data.root)") -> None:
    p.add_argument("--data", type=Path, help=help_)


def engines_flag(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--engines", type=Path, required=required, help="engine-set folder")


def config_of(args: argparse.Namespace):
    overrides = dict(args.settings)
    for flag, key in (("epochs", "train.epochs"), ("preset", "model.preset"),
                      ("image_size", "data.image_size"), ("seed", "train.seed")):
        if getattr(args, flag, None) is not None:
            overrides[key] = getattr(args, flag)
    if getattr(args, "data", None) is not None:
        overrides["data.root"] = str(args.data)
    return load_config(args.config, overrides)


def data_root(args: argparse.Namespace, cfg) -> Path:
    if cfg.data.root is None:
        raise ConfigError("data.root: no data folder given (use --data DIR or data.root)")
    return Path(cfg.data.root)


def log_to(run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run_dir / "training.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
