"""Camera and product names: what the ingest keeps of a camera's name (letters, digits and
``-_.``, at most 64 characters), so a name in the config or in a command can match a frame's.
One rule for the config loader (``ingest.products``), the command topics and the ingest."""

from __future__ import annotations

from collections.abc import Sequence

NAME_CHARS = "-_."
MAX_NAME = 64


def name_problem(value: object, what: str) -> str | None:
    """Why ``value`` is not a camera or product name, or None."""
    if not isinstance(value, str):
        return f"{what} must be a string, got {type(value).__name__}"
    if not value or len(value) > MAX_NAME or not all(c.isalnum() or c in NAME_CHARS
                                                     for c in value):
        return f"{what} {value[:80]!r} must be 1..{MAX_NAME} letters, digits, '-', '_' or '.'"
    return None


def camera_products(pairs: Sequence[str]) -> dict[str, str]:
    """``["cam0=bottle", ...]`` -> ``{"cam0": "bottle"}``; ValueError naming the bad item."""
    table: dict[str, str] = {}
    for item in pairs:
        camera, sep, product = (p.strip() for p in item.partition("="))
        problem = ("must be camera=product (e.g. cam0=bottle)" if not sep else
                   name_problem(camera, "camera") or name_problem(product, "product"))
        if problem or camera in table:
            raise ValueError(f"{item!r}: {problem or f'camera {camera!r} is given twice'}")
        table[camera] = product
    return table
