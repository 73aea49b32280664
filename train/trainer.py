"""Training of one task's expert: loss, optimiser, schedule, freezing of everything shared."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from moleflow.config import ModelConfig, TrainConfig
from moleflow.train.flow import MoLEFlow, nll_from_latent

log = logging.getLogger("moleflow.train")


def flow_loss(z: torch.Tensor, logdet: torch.Tensor, cfg: TrainConfig,
              tail: bool = True) -> torch.Tensor:
    """(1 - w)·mean patch NLL + w·mean over images of their top-ratio patch NLLs + λ·mean(logdet²)."""
    nll = nll_from_latent(z, logdet).flatten(1)  # (B, P)
    loss = nll.mean()
    if tail and cfg.tail_weight > 0:
        k = max(1, int(math.ceil(cfg.tail_ratio * nll.shape[1])))
        tail_term = nll.topk(k, dim=1).values.mean()
        loss = (1 - cfg.tail_weight) * loss + cfg.tail_weight * tail_term
    return loss + cfg.logdet_weight * (logdet**2).mean()


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up, then cosine from 1 to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


@dataclass
class TrainReport:
    task: int
    epochs: int
    seconds: float
    final_loss: float
    skipped_batches: int
    trainable_params: int


def freeze_for_task(model: MoLEFlow, task: int) -> list[torch.nn.Parameter]:
    """Make only ``task``'s trainable parameters require gradients; return them."""
    model.requires_grad_(False)
    params = model.trainable_parameters(task)
    for p in params:
        p.requires_grad_(True)
    return params


def train_task(model: MoLEFlow, task: int, feats: torch.Tensor, cfg: TrainConfig,
               model_cfg: ModelConfig, progress: bool = True,
               views: list[torch.Tensor] | None = None) -> TrainReport:
    """Fit ``task``'s expert (and the base when it is the first task) on features (N, D, H, W).

    With ``views`` (the same images' features as they are and under random camera changes,
    each (N, D, H, W)), every image of a batch takes one view drawn at random: an epoch costs
    the same, and the density learns what the line's frames look like."""
    start = time.perf_counter()
    params = freeze_for_task(model, task)
    first = model.is_first(task)
    lr = cfg.lr_first if first else cfg.lr
    noise = cfg.feature_noise_first if first else cfg.feature_noise
    batch_size = cfg.batch_size_first if first else cfg.batch_size
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + task)
    n = len(feats)
    stacked = torch.stack(views) if views is not None and len(views) > 1 else None
    if stacked is not None and stacked.shape[1] != n:
        raise ValueError(f"views have {stacked.shape[1]} images, features {n}")
    steps_per_epoch = max(1, math.ceil(n / batch_size))
    total = cfg.epochs * steps_per_epoch
    warmup = 0 if first else cfg.warmup_epochs * steps_per_epoch
    model.train()
    step, skipped, last_loss = 0, 0, float("nan")
    bar = tqdm(range(cfg.epochs), desc=f"task {task}", unit="ep", disable=not progress)
    for epoch in bar:
        order = torch.randperm(n, generator=gen)
        running, count = 0.0, 0
        for i in range(0, n, batch_size):
            for group in optimizer.param_groups:
                group["lr"] = lr * lr_factor(step, total, warmup, cfg.min_lr_ratio)
            step += 1
            idx = order[i:i + batch_size]
            if stacked is None:
                batch = feats[idx]
            else:
                batch = stacked[torch.randint(len(stacked), (len(idx),), generator=gen), idx]
            x = model.embed(batch, task)
            if noise > 0:
                x = x + noise * torch.randn(x.shape, generator=gen)
            z, logdet = model.transform(x, task)
            loss = flow_loss(z, logdet, cfg, tail=model_cfg.use_tail_loss)
            if not torch.isfinite(loss) or loss.item() > 1e6:
                skipped += 1
                continue
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            running, count = running + loss.item(), count + 1
        last_loss = running / max(count, 1)
        bar.set_postfix(loss=f"{last_loss:.3f}")
        log.debug("task %d epoch %d/%d loss %.4f", task, epoch + 1, cfg.epochs, last_loss)
    model.eval()
    model.requires_grad_(False)
    seconds = time.perf_counter() - start
    if skipped:
        log.warning("task %d: skipped %d batches with a non-finite or exploding loss", task, skipped)
    return TrainReport(task, cfg.epochs, seconds, last_loss, skipped, sum(p.numel() for p in params))


@torch.no_grad()
def patch_scores(model: MoLEFlow, feats: torch.Tensor, task: int,
                 batch_size: int = 32) -> torch.Tensor:
    """Patch NLL maps (N, H, W) of features scored by ``task``'s expert, in fixed batches."""
    model.eval()
    out = [model.patch_nll(feats[i:i + batch_size], task)[0]
           for i in range(0, len(feats), batch_size)]
    return torch.cat(out)
