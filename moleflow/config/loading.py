"""Reading and checking a configuration: YAML in, a validated ``Config`` out, every problem
named by its key; and the documented default file (``config.yaml``)."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from moleflow.config.options import ConfigError
from moleflow.config.schema import Config
from moleflow.names import camera_products


def _codec_problem(value: str) -> str | None:
    from moleflow.conditions import ConditionError, parse_condition
    try:
        cond = parse_condition(value)
    except ConditionError as exc:
        return str(exc)
    if cond.kind not in ("lossless", "jpeg"):
        return f"must be 'lossless' or 'jpeg:Q' (Q 1..100), got {value!r}"
    return None


def _topic_level_problem(value: str) -> str | None:
    """One MQTT topic level: subscribers' wildcards and separators would make the daemon's
    topics collide with other devices' or be unpublishable."""
    bad = sorted({c for c in value if c in "/+#" or not c.isprintable() or c.isspace()})
    if not value or bad:
        return f"must be one MQTT topic level without {'/+#'} or spaces, got {value!r}"
    return None


def _topic_problem(value: str) -> str | None:
    levels = value.split("/")
    if any(_topic_level_problem(level) for level in levels):
        return (f"must be MQTT topic levels joined by '/', without wildcards (+ #), spaces "
                f"or empty levels, got {value!r}")
    return None


def _camera_products_problem(value: list) -> str | None:
    """``ingest.products``: ``camera=product`` strings, each camera once."""
    try:
        camera_products(value)
    except ValueError as exc:
        return str(exc)
    return None


def meta_empty_ok(f: dataclasses.Field) -> bool:
    return bool(f.metadata.get("empty_ok"))


CHECKS = {"codec": _codec_problem, "topic_level": _topic_level_problem,
          "topic": _topic_problem, "camera_products": _camera_products_problem}


def _check_value(key: str, f: dataclasses.Field, hint: Any, value: Any) -> Any:
    """Check one value against its type hint and bounds; return it normalised."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    optional = origin in (typing.Union, types.UnionType) and type(None) in args
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key}: a value is required (got null)")
    base = next(a for a in args if a is not type(None)) if optional else hint
    base = typing.get_origin(base) or base
    if base is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: must be true or false, got {value!r}")
    elif base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: must be an integer, got {value!r}")
    elif base is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key}: must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: must be a number, got {value!r}")
        value = float(value)
    elif base is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: must be a string, got {value!r}")
    elif base is list:
        item = f.metadata.get("item", int)
        if not isinstance(value, list) or not (value or meta_empty_ok(f)) or not all(
                isinstance(v, item) and not isinstance(v, bool) for v in value):
            kind = "integers" if item is int else "strings"
            what = "a list" if meta_empty_ok(f) else "a non-empty list"
            raise ConfigError(f"{key}: must be {what} of {kind}, got {value!r}")
    meta = f.metadata
    if meta.get("check"):
        problem = CHECKS[meta["check"]](value)
        if problem:
            raise ConfigError(f"{key}: {problem}")
    if meta.get("choices") and value not in meta["choices"]:
        raise ConfigError(f"{key}: must be one of {', '.join(map(str, meta['choices']))}; "
                          f"got {value!r}")
    if meta.get("min") is not None and value < meta["min"]:
        raise ConfigError(f"{key}: must be >= {meta['min']}, got {value!r}")
    if meta.get("max") is not None and value > meta["max"]:
        raise ConfigError(f"{key}: must be <= {meta['max']}, got {value!r}")
    return value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'}: must be a mapping of options, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"{where}{unknown[0]}: unknown option (known: {', '.join(fields)})")
    values = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if dataclasses.is_dataclass(hints[name]):
            values[name] = _build(hints[name], raw.get(name), key)
        elif name in raw:
            values[name] = _check_value(key, f, hints[name], raw[name])
    return cls(**values)


def parse_config(raw: dict[str, Any] | None) -> Config:
    """Validate a config mapping (as read from YAML) into a ``Config``."""
    return _build(Config, raw, "")


def load_config(path: str | Path | None = None,
                overrides: dict[str, Any] | None = None) -> Config:
    """Read ``path`` (defaults when None), apply ``{"section.option": value}`` overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path}: top level must be a mapping of sections")
    for dotted, value in (overrides or {}).items():
        section, _, option = dotted.partition(".")
        node = raw.setdefault(section, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{section}: must be a mapping of options, got {node!r}")
        node[option] = value
    return parse_config(raw)


def describe(cls: type = Config, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(key, default, description) of every option, for docs and the config.yaml test."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(hints[f.name]):
            rows += describe(hints[f.name], key)
        else:
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            rows.append((key, default, f.metadata.get("help", "")))
    return rows


def documented_yaml() -> str:
    """The default configuration as commented YAML: what ``config.yaml`` at the root holds."""
    lines = ["# MoLE-Flow Edge configuration: every option with its default and meaning.",
             "# Validated at start (unknown keys and bad values are reported with their key).",
             "# Command-line flags override these keys, e.g. --epochs, --preset, "
             "--set train.lr=1e-4.", ""]
    hints = typing.get_type_hints(Config)
    for section in dataclasses.fields(Config):
        lines.append(f"{section.name}:")
        for f in dataclasses.fields(hints[section.name]):
            d = f.default_factory() if f.default is dataclasses.MISSING else f.default
            if d is None or isinstance(d, bool):
                value = {None: "null", True: "true", False: "false"}[d]
            elif isinstance(d, list):
                value = f"[{', '.join(repr(v) if isinstance(v, str) else str(v) for v in d)}]"
            elif isinstance(d, str) and (not d or d[0] in "*&!|>%@`'\"{[" or ": " in d):
                value = repr(d)
            else:
                value = repr(d) if isinstance(d, float) else str(d)
            m = f.metadata
            extra = []
            if m.get("choices"):
                extra.append("one of: " + ", ".join(m["choices"]))
            if m.get("min") is not None or m.get("max") is not None:
                hi = m.get("max") if m.get("max") is not None else ""
                extra.append(f"range: {m.get('min', '')}..{hi}")
            comment = m["help"] + (f" ({'; '.join(extra)})" if extra else "")
            lines.append(f"  {f.name}: {value}  # {comment}")
        lines.append("")
    return "\n".join(lines)
