"""The engine set's ``manifest.json``: what each file is, and the sha256 and size it must have.

An engine set is a folder of plain files (ONNX graphs, TensorRT plans, ``router.npz``,
``calibration.json``) described by one manifest. Loading checks the manifest's structure
(``validate_manifest``); readers verify every file they open against its size and hash and
refuse a mismatch, so a half-copied or hand-edited engine set never scores frames.
No torch here: the edge daemon reads manifests.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from moleflow.errors import MoleflowError

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
    """A file of the engine set, relative to its folder, with its sha256 and size (``bytes``
    None: a manifest written before sizes were recorded; the sha256 still decides)."""
    path: str
    sha256: str
    bytes: int | None = None

    @classmethod
    def of(cls, root: Path, path: Path) -> FileRef:
        return cls(path.relative_to(root).as_posix(), sha256_of(path), path.stat().st_size)


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
    def load(cls, root: Path) -> Manifest:
        path = Path(root) / MANIFEST
        if not path.is_file():
            raise EngineSetError(f"{root} is not an engine set (no {MANIFEST}): create one with "
                                 f"'moleflow export --run RUN --out {root}'")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise EngineSetError(f"{path}: not valid JSON ({exc})") from exc
        validate_manifest(raw, str(path))
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
    def file_refs(self) -> list[FileRef]:
        """Every engine file the manifest lists: graphs and plans of every precision, position
        statistics, router, calibration."""
        refs = list(self.backbone["files"].values())
        for e in self.experts:
            refs += list(e.files.values()) + ([e.position_norm] if e.position_norm else [])
        return refs + [self.router] + ([self.calibration] if self.calibration else [])

    def verify_files(self, root: Path) -> None:
        """Check every listed file's size and sha256 (``verified``), not only those a back end
        loads: what ``serve`` checks before the daemon starts."""
        for ref in self.file_refs():
            verified(root, ref)

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
    size = path.stat().st_size
    if ref.bytes is not None and size != ref.bytes:
        raise EngineSetError(f"engine file {path} does not match {MANIFEST}: {size} bytes, "
                             f"recorded {ref.bytes} (re-export or re-copy the engine set)")
    actual = sha256_of(path)
    if actual != ref.sha256:
        raise EngineSetError(f"engine file {path} does not match {MANIFEST}: sha256 {actual[:16]}… "
                             f"!= {ref.sha256[:16]}… (re-export or re-copy the engine set)")
    return path


# ----- the manifest's structure ------------------------------------------------------------------
_KINDS = {dict: "an object", list: "a list", str: "a string", int: "an integer",
          (int, float): "a number", bool: "true or false"}
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _field(obj: dict, key: str, where: str, kind: type | tuple, required: bool = True) -> Any:
    """``obj[key]`` checked to be of ``kind`` (JSON booleans are not numbers); None when absent
    or null and not ``required``. Errors name the field's dotted path."""
    name = f"{where}.{key}" if where else key
    value = obj.get(key)
    if value is None:
        if required:
            raise EngineSetError(f"field {name} is missing")
        return None
    if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
        raise EngineSetError(f"field {name} must be {_KINDS[kind]}, got {json.dumps(value)[:60]}")
    return value


def _positive(obj: dict, key: str, where: str, kind: type | tuple = int, least: float = 1) -> None:
    """``obj[key]``: a finite number of ``kind``, at least ``least`` (sizes, counts, sigmas)."""
    value = _field(obj, key, where, kind)
    if not least <= value < float("inf"):
        raise EngineSetError(f"field {where}.{key} must be at least {least}, got {value}")


def _numbers(obj: dict, key: str, where: str, n: int, kind: type | tuple = (int, float),
             positive: bool = False) -> None:
    """``obj[key]``: a list of ``n`` finite numbers of ``kind`` (all above 0 if ``positive``)."""
    values = _field(obj, key, where, list)
    ok = len(values) == n and all(
        isinstance(v, kind) and not isinstance(v, bool) and abs(v) != float("inf") and v == v
        and (v > 0 or not positive) for v in values)
    if not ok:
        what = ("positive " if positive else "") + ("integers" if kind is int else "numbers")
        raise EngineSetError(f"field {where}.{key} must be a list of {n} {what}, got "
                             f"{json.dumps(values)[:60]}")


def _file_ref(value: Any, name: str) -> None:
    """One FileRef object: a relative path inside the set, a sha256, optionally a size."""
    if not isinstance(value, dict):
        raise EngineSetError(f"field {name} must be an object with path and sha256"
                             + (" (it is missing)" if value is None else ""))
    extra = set(value) - {"path", "sha256", "bytes"}
    if extra:
        raise EngineSetError(f"field {name} has unknown keys {sorted(extra)}")
    path = PurePosixPath(_field(value, "path", name, str))
    if path.is_absolute() or ".." in path.parts or not path.parts:
        raise EngineSetError(f"field {name}.path {str(path)!r} is not a path inside the engine "
                             "set")
    if not _SHA256.fullmatch(_field(value, "sha256", name, str)):
        raise EngineSetError(f"field {name}.sha256 must be 64 lower-case hex digits")
    size = _field(value, "bytes", name, int, required=False)
    if size is not None and size < 0:
        raise EngineSetError(f"field {name}.bytes must not be negative")


def _file_map(obj: dict, key: str, where: str) -> None:
    """A map of file kinds ("onnx", "plan_fp16" ...) to FileRef objects."""
    for kind, ref in _field(obj, key, where, dict).items():
        _file_ref(ref, f"{where}.{key}.{kind}")


def _expert(e: Any, where: str) -> str:
    """One entry of ``experts``; returns its name."""
    if not isinstance(e, dict):
        raise EngineSetError(f"field {where} must be an object")
    name = _field(e, "name", where, str)
    _field(e, "task", where, int)
    _file_map(e, "files", where)
    images = _field(e, "calibration_images", where, list, required=False) or []
    if not all(isinstance(i, str) for i in images):
        raise EngineSetError(f"field {where}.calibration_images must be a list of paths")
    if e.get("position_norm") is not None:
        _file_ref(e["position_norm"], f"{where}.position_norm")
    return name


def validate_manifest(raw: Any, source: str = MANIFEST) -> None:
    """Check the structure of a parsed manifest (``source`` names it in errors): every field a
    reader uses is present and of its type, so a hand-edited manifest is refused here, naming
    the field, instead of failing later with a KeyError or TypeError inside a loader."""
    try:
        if not isinstance(raw, dict):
            raise EngineSetError(f"must be a JSON object, got a JSON {type(raw).__name__}")
        if raw.get("format") != FORMAT:
            raise EngineSetError(f"engine-set format {raw.get('format')!r} is not supported "
                                 f"(this version reads format {FORMAT})")
        _file_map(_field(raw, "backbone", "", dict), "files", "backbone")
        inp = _field(raw, "input", "", dict)
        _positive(inp, "size", "input")
        _numbers(inp, "mean", "input", 3)
        _numbers(inp, "std", "input", 3, positive=True)
        _field(inp, "standardise", "input", bool, required=False)
        features = _field(raw, "features", "", dict)
        _positive(features, "dim", "features")
        _numbers(features, "grid", "features", 2, int, positive=True)
        scoring = _field(raw, "scoring", "", dict)
        _positive(scoring, "top_k", "scoring")
        _positive(scoring, "smoothing_sigma", "scoring", (int, float), least=0)
        if "light_retry" in scoring:
            _positive(scoring, "light_retry", "scoring", (int, float), least=0)
        names = [_expert(e, f"experts[{i}]")
                 for i, e in enumerate(_field(raw, "experts", "", list))]
        if not names or len(set(names)) != len(names):
            raise EngineSetError(f"field experts must list experts of distinct names, got {names}")
        _file_ref(raw.get("router"), "router")
        if raw.get("calibration") is not None:
            _file_ref(raw["calibration"], "calibration")
        for key, kind in (("precision", str), ("tensorrt", dict), ("software", dict)):
            _field(raw, key, "", kind, required=False)
    except EngineSetError as exc:
        raise EngineSetError(f"{source}: {exc}") from None
