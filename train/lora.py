"""Linear layers with one LoRA adapter per task: ``h = (W + (alpha/rank)·B·A) x + b + b_t``.

The first task's adapter trains together with the shared base (which adapts ``W`` itself), so
it keeps the research scale (``first_alpha`` 1: 1/64); every later task's adapter is its only
way to change the frozen subnets and gets ``alpha`` (64: scale 1).

The adapter is applied by fusing ``W + s·B·A`` once per call instead of running the low-rank
branch per patch: a batch holds ~16k patches, so forming the fused matrix is negligible and the
per-patch cost equals the base layer's. With ``B = 0`` (its initial value) the output is
bit-identical to the base layer. The same fusion is what export writes into the expert graphs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class LoRALinear(nn.Module):
    """A shared base ``nn.Linear`` plus per-task low-rank updates and task biases."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float,
                 use_lora: bool = True, zero_init: bool = False,
                 first_alpha: float | None = None) -> None:
        super().__init__()
        self.base = nn.Linear(in_features, out_features)
        if zero_init:
            nn.init.zeros_(self.base.weight)
            nn.init.zeros_(self.base.bias)
        self.rank = min(rank, in_features, out_features)
        self.scale = alpha / self.rank                       # tasks after the first
        self.first_scale = (alpha if first_alpha is None else first_alpha) / self.rank
        self.use_lora = use_lora
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.task_bias = nn.ParameterDict()

    def add_task(self, task: int) -> None:
        """Create task ``task``'s adapter: A Xavier-uniform, B and the task bias zero."""
        if not self.use_lora:
            return
        key = str(task)
        a = torch.empty(self.rank, self.base.in_features)
        nn.init.xavier_uniform_(a)
        self.lora_A[key] = nn.Parameter(a)
        self.lora_B[key] = nn.Parameter(torch.zeros(self.base.out_features, self.rank))
        self.task_bias[key] = nn.Parameter(torch.zeros(self.base.out_features))

    def fused(self, task: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight and bias of task ``task``'s expert with the adapter folded in."""
        if not self.use_lora:
            return self.base.weight, self.base.bias
        key = str(task)
        weight = self.base.weight + self.scale_of(task) * (self.lora_B[key] @ self.lora_A[key])
        return weight, self.base.bias + self.task_bias[key]

    def scale_of(self, task: int) -> float:
        """``alpha / rank`` of task ``task``'s adapter."""
        return self.first_scale if task == 0 else self.scale

    def task_parameters(self, task: int) -> list[nn.Parameter]:
        if not self.use_lora:
            return []
        key = str(task)
        return [self.lora_A[key], self.lora_B[key], self.task_bias[key]]

    def forward(self, x: torch.Tensor, task: int) -> torch.Tensor:
        weight, bias = self.fused(task)
        return F.linear(x, weight, bias)

    def extra_repr(self) -> str:
        return (f"in={self.base.in_features}, out={self.base.out_features}, rank={self.rank}, "
                f"scale={self.first_scale:.4g} (task 0) / {self.scale:.4g}, "
                f"tasks={list(self.lora_A.keys())}")


def inverse_sigmoid(p: float) -> float:
    return math.log(p / (1.0 - p))
