"""One expert of a trained MoLE-Flow as a plain flow: LoRA fused, adapter folded, one task.

``FusedExpert`` is what export traces: features (B, D, H, W) in, per-patch NLL (B, H, W) out.
Every LoRA linear becomes a plain linear with ``W' = W + (alpha/rank)·B·A`` and bias
``b + b_t``; the task input adapter and the positional encoding fold into one per-channel
scale (or whitening matrix), one (H, W, D) shift and one LayerNorm with the FiLM gamma/beta
as its affine weights; only this task's DIA blocks remain. No task indices, no LoRA branches.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from train.flow import MoLEFlow, TaskAdapter
from train.lora import LoRALinear


class FusedLinear(nn.Module):
    """A LoRA linear with one task's adapter folded into the weights."""

    def __init__(self, lin: LoRALinear, task: int) -> None:
        super().__init__()
        weight, bias = lin.fused(task)
        self.linear = nn.Linear(lin.base.in_features, lin.base.out_features)
        self.linear.weight.data.copy_(weight.detach())
        self.linear.bias.data.copy_(bias.detach())

    def forward(self, x: torch.Tensor, task: int | None = None) -> torch.Tensor:
        return self.linear(x)


class FoldedAdapter(nn.Module):
    """``(x - mean)·whiten + pos -> [LayerNorm] -> gamma·x + beta`` as scale, shift, LayerNorm."""

    def __init__(self, adapter: TaskAdapter | None, pos: torch.Tensor | None, dim: int,
                 grid: tuple[int, int]) -> None:
        super().__init__()
        pos = pos if pos is not None else torch.zeros(*grid, dim)
        self.dim = dim
        if adapter is None:
            self.register_buffer("scale", torch.ones(dim))
            self.register_buffer("shift", pos.clone())
            self.layernorm, self.matrix = False, False
            return
        whiten = adapter.whiten.detach()
        self.matrix = whiten.dim() == 2
        offset = adapter.mean @ whiten.T if self.matrix else adapter.mean * whiten
        gamma = 0.5 + 1.5 * torch.sigmoid(adapter.gamma_raw.detach())
        beta = 2.0 * torch.tanh(adapter.beta_raw.detach())
        self.layernorm = adapter.layernorm
        if self.layernorm:  # the LayerNorm's own affine weights carry the FiLM
            self.register_buffer("scale", whiten.T.contiguous() if self.matrix else whiten.clone())
            self.register_buffer("shift", pos - offset)
            self.register_buffer("gamma", gamma)
            self.register_buffer("beta", beta)
        else:  # gamma·(x·w + s) + beta == x·(w·gamma) + (gamma·s + beta)
            self.register_buffer("scale", (whiten.T * gamma) if self.matrix else whiten * gamma)
            self.register_buffer("shift", gamma * (pos - offset) + beta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, D)
        x = (x @ self.scale if self.matrix else x * self.scale) + self.shift
        if self.layernorm:
            x = F.layer_norm(x, (self.dim,), self.gamma, self.beta)
        return x


class FusedExpert(nn.Module):
    """The whole expert of ``task``: features (B, D, H, W) -> patch NLL (B, H, W)."""

    def __init__(self, model: MoLEFlow, task: int) -> None:
        super().__init__()
        if task not in model.tasks:
            raise ValueError(f"model has no task {task} (tasks: {model.tasks})")
        flow = copy.deepcopy(model)
        for blk in flow.blocks:
            for name in ("s1", "s2", "t1", "t2"):
                setattr(blk.subnet, name, FusedLinear(getattr(blk.subnet, name), task))
        key = str(task)
        adapter = flow.adapters[key] if key in flow.adapters else None
        self.adapter = FoldedAdapter(adapter, flow.pos, flow.dim, flow.grid_hw)
        flow.adapters = nn.ModuleDict()
        flow.dia = nn.ModuleDict({key: flow.dia[key]} if key in flow.dia else {})
        flow.pos = None
        self.flow, self.task = flow, task
        self.log_norm = 0.5 * flow.dim * math.log(2 * math.pi)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.adapter(features.permute(0, 2, 3, 1))
        if self.flow.mixer is not None:
            x = self.flow.mixer(x)
        z, logdet = self.flow.transform(x, self.task)
        return 0.5 * (z * z).sum(dim=-1) + self.log_norm - logdet
