"""The engine set's ``manifest.json``: what each file is, and the sha256 it must have.

An engine set is a folder of plain files (ONNX graphs, TensorRT plans, ``router.npz``,
``calibration.json``) described by one manifest. Readers verify every file they open against
its hash and refuse a mismatch, so a half-copied or hand-edited engine set never scores frames.
No torch here: the edge daemon reads manifests.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edge.errors import MoleflowError

MANIFEST = "manifest.json"
FORMAT = 1


class EngineSetError(MoleflowError, RuntimeError):
    """The engine set is missing, incomplete, tampered with, or of another format."""


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class FileRef:
    """A file of the engine set, relative to its folder, with its sha256."""
    path: str
    sha256: str

    @classmethod
    def of(cls, root: Path, path: Path) -> "FileRef":
        return cls(path.relative_to(root).as_posix(), sha256_of(path))


@dataclass
class ExpertEntry:
    name: str
    task: int
    files: dict[str, FileRef]            # "onnx", "onnx_fp16", later "plan_fp16" ...
    calibration_images: list[str] = field(default_factory=list)  # held-out train/good images
    position_norm: FileRef | None = None  # .npz: patch-NLL mean and std per grid position


@dataclass
class Manifest:
    """Everything a runtime needs to know about an engine set."""
    backbone: dict[str, Any]             # name, identity, files
    input: dict[str, Any]                # size, layout, colour, mean, std, dtype
    features: dict[str, Any]             # dim, grid
    scoring: dict[str, Any]              # top_k, smoothing_sigma, image_score, anomaly_map
    experts: list[ExpertEntry]
    router: FileRef
    calibration: FileRef | None = None
    precision: str = "fp32"              # precision of the files a runtime should prefer
    tensorrt: dict[str, Any] | None = None   # version, GPU, compute capability of built plans
    software: dict[str, str] = field(default_factory=dict)
    format: int = FORMAT

    # ----- reading / writing -----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, root: Path) -> None:
        tmp = root / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        tmp.replace(root / MANIFEST)

    @classmethod
    def load(cls, root: Path) -> "Manifest":
        path = Path(root) / MANIFEST
        if not path.is_file():
            raise EngineSetError(f"{root} is not an engine set (no {MANIFEST}): create one with "
                                 f"'moleflow export --run RUN --out {root}'")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise EngineSetError(f"{path}: not valid JSON ({exc})") from exc
        if raw.get("format") != FORMAT:
            raise EngineSetError(f"{path}: engine-set format {raw.get('format')!r} is not "
                                 f"supported (this version reads format {FORMAT})")
        try:
            backbone = dict(raw["backbone"])
            backbone["files"] = {k: FileRef(**v) for k, v in backbone["files"].items()}
            experts = [ExpertEntry(e["name"], int(e["task"]),
                                   {k: FileRef(**v) for k, v in e["files"].items()},
                                   list(e.get("calibration_images", [])),
                                   FileRef(**e["position_norm"]) if e.get("position_norm")
                                   else None)
                       for e in raw["experts"]]
            calib = raw.get("calibration")
            return cls(backbone, raw["input"], raw["features"], raw["scoring"], experts,
                       FileRef(**raw["router"]), FileRef(**calib) if calib else None,
                       raw.get("precision", "fp32"), raw.get("tensorrt"),
                       raw.get("software", {}), raw["format"])
        except (KeyError, TypeError, ValueError) as exc:
            raise EngineSetError(f"{path}: malformed manifest ({exc!r})") from exc

    # ----- queries ---------------------------------------------------------------------------
    def expert(self, name: str) -> ExpertEntry:
        for e in self.experts:
            if e.name == name:
                return e
        raise EngineSetError(f"engine set has no expert {name!r} "
                             f"(experts: {', '.join(e.name for e in self.experts)})")


def verified(root: Path, ref: FileRef) -> Path:
    """Path of ``ref`` inside ``root`` after checking that its sha256 matches the manifest."""
    path = Path(root) / ref.path
    if not path.is_file():
        raise EngineSetError(f"engine file {path} listed in {MANIFEST} is missing")
    actual = sha256_of(path)
    if actual != ref.sha256:
        raise EngineSetError(f"engine file {path} does not match {MANIFEST}: sha256 {actual[:16]}… "
                             f"!= {ref.sha256[:16]}… (re-export or re-copy the engine set)")
    return path
