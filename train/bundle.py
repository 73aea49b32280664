"""The run folder: everything needed to continue training, evaluate or export.

    run.json                      format version, backbone identity, feature shape, tasks
    config.yaml                   the resolved configuration
    base.safetensors              shared flow (written once, after task 0)
    experts/task_000_<name>.safetensors   LoRA, input adapter, DIA of one task
    router/task_000_<name>.safetensors    router mean, precision, training distances
    scoring/task_000_<name>.safetensors   the expert's patch-NLL mean and std per grid position
    training.log, metrics.csv, final_results.csv, evaluation.png (ROC, AUROC per step),
    overlays/<class>/*.png, cache/

Tensors are stored as data (safetensors), never as pickled modules. Files of a task are written
once and never rewritten, so adding a task leaves the earlier experts byte-identical.
"""

from __future__ import annotations

import csv
import json
import platform
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors.numpy import load_file as load_np, save_file as save_np
from safetensors.torch import load_file, save_file

from moleflow.config import Config, parse_config
from moleflow.errors import MoleflowError
from moleflow.scoring import PositionNorm
from moleflow.train.flow import MoLEFlow
from moleflow.train.router import PrototypeRouter, TaskPrototype

RUN_FORMAT = 1
_TASK_KEY = re.compile(r"(?:^(?:adapters|dia)\.(\d+)\.|\.(?:lora_A|lora_B|task_bias)\.(\d+)$)")


class RunError(MoleflowError, RuntimeError):
    """The run folder is missing, incomplete, or incompatible with the request."""


def task_of_key(key: str) -> int | None:
    """Task index a state-dict key belongs to, or None for the shared base."""
    m = _TASK_KEY.search(key)
    return None if m is None else int(m.group(1) or m.group(2))


@dataclass
class TaskRecord:
    index: int
    name: str
    data_root: str
    train_seconds: float = 0.0
    val_images: list[str] = field(default_factory=list)  # train/good held out for calibration
    # random views the expert trained on: their count, the Augmentation's fields and seed
    # (0 / None in runs from before augmentation)
    augment_views: int = 0
    augmentation: dict | None = None
    augment_seed: int = 0

    @property
    def stem(self) -> str:
        return f"task_{self.index:03d}_{re.sub(r'[^A-Za-z0-9_.-]', '_', self.name)}"


@dataclass
class RunBundle:
    path: Path
    config: Config
    backbone_identity: str
    dim: int
    grid: tuple[int, int]
    tasks: list[TaskRecord] = field(default_factory=list)

    # ----- creation / opening ----------------------------------------------------------------
    @classmethod
    def create(cls, path: Path, config: Config, backbone_identity: str, dim: int,
               grid: tuple[int, int]) -> RunBundle:
        path.mkdir(parents=True, exist_ok=True)
        bundle = cls(path, config, backbone_identity, dim, tuple(grid))
        (path / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        bundle._write_manifest()
        return bundle

    @classmethod
    def exists(cls, path: Path) -> bool:
        return (path / "run.json").is_file()

    @classmethod
    def open(cls, path: Path) -> RunBundle:
        meta_path = path / "run.json"
        if not meta_path.is_file():
            raise RunError(f"{path} is not a run folder (no run.json): train a first task with "
                           f"'moleflow train --run {path} --data DIR --tasks NAME'")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != RUN_FORMAT:
            raise RunError(f"{meta_path}: run format {meta.get('format')} is not supported "
                           f"(this version reads format {RUN_FORMAT})")
        raw = yaml.safe_load((path / "config.yaml").read_text())
        model = raw.get("model") if isinstance(raw, dict) else None
        if isinstance(model, dict) and "lora_alpha_first" not in model:
            # runs from before the first task had its own alpha used one alpha for all tasks
            model["lora_alpha_first"] = model.get("lora_alpha", 1.0)
        backbone = raw.get("backbone") if isinstance(raw, dict) else None
        if isinstance(backbone, dict) and "standardise_light" not in backbone:
            # runs from before the key: their identity says whether frames were standardised
            backbone["standardise_light"] = str(meta.get("backbone", "")).endswith("|light")
        config = parse_config(raw)
        tasks = [TaskRecord(**t) for t in meta["tasks"]]
        return cls(path, config, meta["backbone"], meta["dim"], tuple(meta["grid"]), tasks)

    def _write_manifest(self) -> None:
        meta = {"format": RUN_FORMAT, "backbone": self.backbone_identity, "dim": self.dim,
                "grid": list(self.grid), "tasks": [t.__dict__ for t in self.tasks],
                "versions": {"torch": torch.__version__, "python": platform.python_version()}}
        tmp = self.path / "run.json.tmp"
        tmp.write_text(json.dumps(meta, indent=2))
        tmp.replace(self.path / "run.json")

    # ----- tasks ---------------------------------------------------------------------------
    def expert_file(self, record: TaskRecord) -> Path:
        return self.path / "experts" / f"{record.stem}.safetensors"

    def router_file(self, record: TaskRecord) -> Path:
        return self.path / "router" / f"{record.stem}.safetensors"

    def norm_file(self, record: TaskRecord) -> Path:
        return self.path / "scoring" / f"{record.stem}.safetensors"

    def save_norm(self, record: TaskRecord, norm: PositionNorm) -> None:
        """Write a task's position statistics (once: never rewritten)."""
        (self.path / "scoring").mkdir(exist_ok=True)
        save_np(norm.to_arrays(), str(self.norm_file(record)), metadata={"name": record.name})

    def load_norms(self) -> dict[int, PositionNorm]:
        """Position statistics by task index, of the tasks that have them (runs from before
        they existed lack them until ``moleflow eval`` computes them)."""
        norms = {}
        for record in self.tasks:
            path = self.norm_file(record)
            if path.is_file():
                try:
                    norms[record.index] = PositionNorm.from_arrays(load_np(str(path)))
                except ValueError as exc:
                    raise RunError(f"run file {path} is damaged: {exc}") from exc
        return norms

    def save_task(self, model: MoLEFlow, record: TaskRecord, proto: TaskPrototype,
                  norm: PositionNorm) -> None:
        """Write a newly trained task's files (and the base after the first task)."""
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        if not self.tasks:
            save_file({k: v for k, v in state.items() if task_of_key(k) is None},
                      str(self.path / "base.safetensors"))
        expert = {k: v for k, v in state.items() if task_of_key(k) == record.index}
        for folder in ("experts", "router"):
            (self.path / folder).mkdir(exist_ok=True)
        save_file(expert, str(self.expert_file(record)), metadata={"name": record.name})
        save_np({"mean": proto.mean, "precision": proto.precision,
                 "train_distances": proto.train_distances}, str(self.router_file(record)),
                metadata={"name": record.name})
        self.save_norm(record, norm)
        self.tasks.append(record)
        self._write_manifest()

    def load_model(self, seed: int = 0) -> MoLEFlow:
        """Rebuild the flow with every stored expert."""
        cfg = self.config.resolved_model()
        model = MoLEFlow(self.dim, self.grid, cfg, seed=seed)
        state = dict(load_file(str(self._need(self.path / "base.safetensors"))))
        for record in self.tasks:
            model.add_task(record.index)
            state.update(load_file(str(self._need(self.expert_file(record)))))
        model.load_state_dict(state, strict=True)
        return model.eval().requires_grad_(False)

    def load_router(self) -> PrototypeRouter:
        router = PrototypeRouter()
        for record in self.tasks:
            arrays = load_np(str(self._need(self.router_file(record))))
            router.add(TaskPrototype(record.name, arrays["mean"], arrays["precision"],
                                     arrays["train_distances"]))
        return router

    @staticmethod
    def _need(path: Path) -> Path:
        if not path.is_file():
            raise RunError(f"run file {path} is missing: the run folder is incomplete")
        return path

    # ----- results -------------------------------------------------------------------------
    def append_metrics(self, rows: list[dict[str, Any]]) -> None:
        _write_csv(self.path / "metrics.csv", rows, append=True)

    def read_metrics(self) -> list[dict[str, str]]:
        path = self.path / "metrics.csv"
        if not path.is_file():
            return []
        with open(path, newline="") as fh:
            return list(csv.DictReader(fh))

    def write_final(self, rows: list[dict[str, Any]]) -> None:
        _write_csv(self.path / "final_results.csv", rows, append=False)


def _write_csv(path: Path, rows: list[dict[str, Any]], append: bool) -> None:
    if not rows:
        return
    new = not (append and path.is_file())
    with open(path, "a" if append else "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6f}" if isinstance(v, (float, np.floating)) else v)
                             for k, v in row.items()})
