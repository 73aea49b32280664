"""The daemon's SCADA side in one object, so the daemon calls it in a few places only:
per-camera products and the command topics (``moleflow.edge.commands``), and the optional
Sparkplug B output (``moleflow.edge.sparkplug``, imported only when ``sparkplug.enabled``)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from moleflow.edge.commands import CameraProducts, Commands

log = logging.getLogger("moleflow.scada")


class Scada:
    def __init__(self, daemon: Any) -> None:
        cfg = daemon.cfg
        self.daemon = daemon
        self.products = CameraProducts(cfg.ingest.products)
        self.commands = Commands(cfg, daemon.publisher, self.products,
                                 lambda: daemon.pipeline.engines.expert_names(), daemon.reload,
                                 daemon.metrics)
        self.sparkplug = None
        if cfg.sparkplug.enabled:
            from moleflow.edge.sparkplug import SparkplugNode
            cameras = list(dict.fromkeys([*cfg.ingest.cameras, *self.products.snapshot()]))
            self.sparkplug = SparkplugNode(cfg, daemon._status(), daemon.metrics,
                                           daemon.reload, cameras)

    def start(self) -> None:
        self.commands.start()
        if self.sparkplug is not None:
            self.sparkplug.start()

    def stop(self) -> None:
        """After the last frame is scored, before the publisher's stop."""
        if self.sparkplug is not None:
            self.sparkplug.stop()
        self.commands.stop()

    def threads_alive(self) -> dict[str, bool]:
        alive = {"commands": self.commands.alive()}
        if self.sparkplug is not None:
            alive["sparkplug"] = self.sparkplug.alive()
        return alive

    def hints(self, batch: Sequence[Any], hints: Sequence[str | None], experts: Any
              ) -> list[str | None]:
        """Frame hints (already checked), else each camera's product; a camera product that
        is not an expert of the running set is reported (``bad_hint``) and routed."""
        out, problems = self.products.hints([f.camera for f in batch], hints, experts)
        for problem in problems:
            self.daemon._ingest_error("bad_hint", problem)
        return out

    def frame(self, result: dict, threshold: float | None) -> None:
        """A scored frame's result, as published (an ordered action: frame order kept)."""
        if self.sparkplug is not None:
            self.sparkplug.frame(result, threshold)

    def reloaded(self, status: dict) -> None:
        if self.sparkplug is not None:
            self.sparkplug.node_status(status)
