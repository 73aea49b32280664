"""JSON that strict parsers accept (RFC 8259 has no NaN): what the daemon sends on MQTT and on
its HTTP routes. Non-finite floats become null; numpy scalars and arrays plain numbers."""

from __future__ import annotations

import json
import math
from typing import Any


def finite_values(value: Any) -> Any:
    """``value`` with non-finite floats as None, numpy scalars/arrays as plain numbers/lists and
    mapping keys as strings; anything else JSON cannot carry as its ``str``."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): finite_values(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_values(v) for v in value]
    if hasattr(value, "tolist"):  # numpy scalar or array
        return finite_values(value.tolist())
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)


def strict_json(payload: Any) -> str:
    """JSON text a strict parser accepts (the payload as it is when it has nothing to mend)."""
    try:
        return json.dumps(payload, allow_nan=False)
    except ValueError:
        return json.dumps(finite_values(payload), allow_nan=False)
