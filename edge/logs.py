"""Structured logs: one JSON object per line (journald keeps them whole), or plain text."""

from __future__ import annotations

import json
import logging
import threading
import time


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                 + f".{int(record.msecs):03d}Z", "level": record.levelname,
                 "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(level: str, as_json: bool) -> None:
    root = logging.getLogger()
    for handler in root.handlers:
        handler.setFormatter(JsonFormatter() if as_json else
                             logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.setLevel(level)


class Throttle:
    """Which occurrences of a repeating fault get a log line: the first of each key, then at
    most one every ``every`` seconds, counting the ones left out (the events and counters
    keep every occurrence; the journal must not flood). Thread-safe."""

    def __init__(self, every: float) -> None:
        self.every = float(every)
        self._seen: dict[str, tuple[float, int]] = {}  # key -> (last logged, left out since)
        self._lock = threading.Lock()

    def due(self, key: str, force: bool = False) -> int | None:
        """None when this occurrence is not to be logged; else how many were left out since
        the last line (``force``: log now, e.g. the fault changed)."""
        now = time.monotonic()
        with self._lock:
            last, left_out = self._seen.get(key, (None, 0))
            if force or last is None or now - last >= self.every:
                self._seen[key] = (now, 0)
                return left_out
            self._seen[key] = (last, left_out + 1)
            return None
