"""The daemon's start-up and systemd pieces: opening and warming the engine set, and
``sd_notify`` (Type=notify readiness, watchdog pings, stopping)."""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path

from moleflow.config import Config, ConfigError
from moleflow.edge.commands import check_products
from moleflow.engines.pipeline import EngineSet, Pipeline
from moleflow.engines.runtime import limit_library_threads, parallelism

log = logging.getLogger("moleflow.daemon")


def sd_notify(message: str) -> bool:
    """Send ``message`` to systemd's notify socket (Type=notify, watchdog); False outside it."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
        return True
    except OSError:
        return False


def load_engines(cfg: Config) -> Pipeline:
    if not cfg.engines.path:
        raise ConfigError("engines.path: no engine set given (the folder with manifest.json)")
    workers, threads = parallelism(cfg.engines.backend, cfg.engines.workers,
                                   cfg.engines.threads)
    limit_library_threads(threads)
    engines = EngineSet.open(Path(cfg.engines.path), backend=cfg.engines.backend,
                             precision=cfg.engines.precision, threads=threads)
    check_products(cfg, engines.expert_names())  # ingest.products: each one an expert
    pipeline = Pipeline(engines, with_maps=False)  # maps only for alarms and due map messages
    started = time.perf_counter()
    pipeline.warm_up(cfg.ingest.max_batch, workers)
    log.info("engine set warmed up (batches of 1..%d, %d workers) in %.1f s",
             cfg.ingest.max_batch, workers, time.perf_counter() - started)
    return pipeline
