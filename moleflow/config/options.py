"""Config building blocks: the error every config problem raises and ``opt``, a field with its
description and bounds (read by the loader's checks and by ``moleflow config --documented``)."""

from __future__ import annotations

from dataclasses import field
from typing import Any

from moleflow.errors import MoleflowError


class ConfigError(MoleflowError, ValueError):
    """A configuration problem, its message naming the key (``section.option``)."""


def opt(default: Any, help: str, *, min: float | None = None, max: float | None = None,
        choices: tuple | None = None, item: type = int, check: str | None = None,
        empty_ok: bool = False) -> Any:
    """A config field with its description and bounds (``item``: element type of a list;
    ``check``: a named value check from ``CHECKS``; ``empty_ok``: a list may be empty)."""
    meta = {"help": help, "min": min, "max": max, "choices": choices, "item": item,
            "check": check, "empty_ok": empty_ok}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)
