"""One expert of a trained MoLE-Flow as a plain flow: LoRA fused, adapter folded, one task.

``FusedExpert`` is what export traces: features (B, D, H, W) in, per-patch NLL (B, H, W) out.
Every LoRA linear becomes a plain weight ``W' = W + (alpha/rank)·B·A`` with bias ``b + b_t``;
the task input adapter and the positional encoding fold into one per-channel scale (or
whitening matrix), one (H, W, D) shift and one LayerNorm with the FiLM gamma/beta as its
affine weights; only this task's DIA blocks remain. No task indices, no LoRA branches.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from moleflow.train.flow import MoLEFlow, TaskAdapter


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


class FusedCoupling(nn.Module):
    """One shared ``AllInOneBlock`` of the flow for one task, channel-major: x (D, B·H·W).

    FrEIA's block: split x into x1, x2; ``a = 0.1·subnet(x1)``; ``x2 <- x2·exp(c·tanh(a_s)) + a_t``;
    then the global affine ``y·scale + offset`` and the hard permutation. Folded here: the 0.1
    into the last subnet layers, ``0.2·sigmoid(theta)`` into the context kernel, the global
    scale's log-det into one constant.
    """

    def __init__(self, blk, task: int, grid: tuple[int, int]) -> None:
        super().__init__()
        sub = blk.subnet
        self.c1 = blk.splits[0]
        self.clamp = float(blk.clamp)
        self.grid = tuple(grid)
        with torch.no_grad():
            scale = blk.global_scale_activation(blk.global_scale).reshape(-1)
            self.register_buffer("scale", scale[:, None].clone())
            self.register_buffer("offset", blk.global_offset.reshape(-1)[:, None].clone())
            self.register_buffer("perm", blk.perm.clone())
            self.log_scale = float(torch.log(scale).sum())
            self.ctx = None
            if sub.ctx_conv is not None:
                self.ctx = nn.Conv2d(self.c1, self.c1, sub.ctx_conv.kernel_size,
                                     padding=sub.ctx_conv.padding, groups=self.c1, bias=False)
                self.ctx.weight.copy_(0.2 * torch.sigmoid(sub.ctx_theta) * sub.ctx_conv.weight)
            self.w = nn.ParameterDict()
            for name, factor in (("s1", 1.0), ("s2", 0.1), ("t1", 1.0), ("t2", 0.1)):
                weight, bias = getattr(sub, name).fused(task)
                self.w[f"{name}_w"] = nn.Parameter(factor * weight.detach().clone())
                self.w[f"{name}_b"] = nn.Parameter(factor * bias.detach()[:, None].clone())

    def _lin(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.w[f"{name}_b"], self.w[f"{name}_w"], x)  # one Gemm with bias

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(D, M) -> output and the per-channel log-scales (D2, M) of the coupling."""
        x1, x2 = x[: self.c1], x[self.c1:]
        s_in = x1
        if self.ctx is not None:
            h, w = self.grid
            grid = x1.reshape(self.c1, -1, h, w).transpose(0, 1)  # (B, C, H, W)
            ctx = self.ctx(grid).transpose(0, 1).reshape(x1.shape)
            s_in = torch.cat([x1, ctx], dim=0)
        s = self._lin("s2", F.relu(self._lin("s1", s_in)))
        t = self._lin("t2", F.relu(self._lin("t1", x1)))
        log_s = self.clamp * torch.tanh(s)
        y = torch.cat([x1, x2 * torch.exp(log_s) + t], dim=0) * self.scale + self.offset
        return torch.index_select(y, 0, self.perm), log_s


class FusedDIA(nn.Module):
    """A task's DIA affine coupling, channel-major (same mathematics as ``AffineCoupling``)."""

    def __init__(self, blk) -> None:
        super().__init__()
        self.split, self.flip, self.clamp = blk.split, blk.flip, float(blk.clamp)
        self.layers = nn.ParameterList()
        with torch.no_grad():
            for net in (blk.s_net, blk.t_net):
                for lin in (net[0], net[2], net[4]):
                    self.layers.append(nn.Parameter(lin.weight.detach().clone()))
                    self.layers.append(nn.Parameter(lin.bias.detach()[:, None].clone()))

    def _mlp(self, offset: int, x: torch.Tensor) -> torch.Tensor:
        p = self.layers
        x = F.relu(torch.addmm(p[offset + 1], p[offset], x))
        x = F.relu(torch.addmm(p[offset + 3], p[offset + 2], x))
        return torch.addmm(p[offset + 5], p[offset + 4], x)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = x[: self.split], x[self.split:]
        cond, x2 = (b, a) if self.flip else (a, b)
        s = self.clamp * torch.tanh(self._mlp(0, cond) / self.clamp)
        out = x2 * torch.exp(s) + self._mlp(6, cond)
        return torch.cat([out, cond] if self.flip else [cond, out], dim=0), s


class FusedExpert(nn.Module):
    """The whole expert of ``task``: features (B, D, H, W) -> patch NLL (B, H, W).

    Channel-major after the adapter: the flow state is one (D, B·H·W) matrix, a column per
    patch, so every linear is one GEMM with its bias over all patches of the batch, splits and
    concatenations are contiguous row blocks; only the context convolutions see the grid, as
    (B, C, H, W), through a transpose of half the channels.
    """

    def __init__(self, model: MoLEFlow, task: int) -> None:
        super().__init__()
        if task not in model.tasks:
            raise ValueError(f"model has no task {task} (tasks: {model.tasks})")
        key = str(task)
        grid = tuple(model.grid_hw)
        self.grid = grid
        adapter = model.adapters[key] if key in model.adapters else None
        self.adapter = FoldedAdapter(adapter, model.pos, model.dim, grid)
        self.mixer = copy.deepcopy(model.mixer) if model.mixer is not None else None
        self.blocks = nn.ModuleList(FusedCoupling(blk, task, grid) for blk in model.blocks)
        self.dia = nn.ModuleList(FusedDIA(b) for b in (model.dia[key] if key in model.dia else []))
        self.log_norm = 0.5 * model.dim * math.log(2 * math.pi)
        self.log_scale = sum(b.log_scale for b in self.blocks)  # global affine scales' log-det

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        h, w = self.grid
        x = self.adapter(features.permute(0, 2, 3, 1))          # (B, H, W, D)
        if self.mixer is not None:
            x = self.mixer(x)
        z = x.permute(3, 0, 1, 2).reshape(x.shape[-1], -1)       # (D, B·H·W)
        # Each coupling returns its per-channel log-scales; summing the ones of equal width
        # first and reducing over channels once is the same log-det with fewer reductions.
        groups: dict[int, torch.Tensor] = {}
        for blk in list(self.blocks) + list(self.dia):
            z, log_s = blk(z)
            c = log_s.shape[0]
            groups[c] = log_s if c not in groups else groups[c] + log_s
        logdet = sum(g.sum(dim=0) for g in groups.values()) + self.log_scale
        nll = 0.5 * (z * z).sum(dim=0) + self.log_norm - logdet
        return nll.reshape(-1, h, w)
