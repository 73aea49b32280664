"""``moleflow bench``: how long one expert takes to train, printed as figures."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch

from moleflow.config import Config
from moleflow.train.backbone import FeatureExtractor
from moleflow.data import list_classes, load_class
from moleflow.train.features import FeatureStore
from moleflow.train.flow import MoLEFlow
from moleflow.train.trainer import train_task


def matmul_gflops(threads: int, size: int = 1024, seconds: float = 0.5) -> float:
    """This machine's float32 matrix-multiply throughput (GFLOP/s) at ``threads`` threads.

    Training is mostly such products, so the figure says how fast the machine was while the
    benchmark ran: shared VMs vary by a factor of two from day to day.
    """
    torch.set_num_threads(threads)
    a = torch.randn(size, size, generator=torch.Generator().manual_seed(0))
    a @ a  # warm-up
    count, start = 0, time.perf_counter()
    while True:
        a @ a
        count += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return 2 * size**3 * count / elapsed / 1e9


def bench_training(data_root: Path, task: str | None, cfg: Config, repeat: int = 1) -> list[float]:
    """Time feature extraction (uncached: the images and their ``train.augment_views`` random
    views) and the training of a first expert on one class."""
    threads = cfg.train.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    name = task or list_classes(data_root)[0]
    data = load_class(data_root, name)
    totals = []
    for r in range(repeat):
        t0 = time.perf_counter()
        extractor = FeatureExtractor(cfg.backbone)
        with tempfile.TemporaryDirectory() as tmp:
            store = FeatureStore(extractor, cfg.data.image_size, Path(tmp), progress=False)
            views = store.views(data, cfg.train.augment_views, cfg.train.augmentation(),
                                cfg.train.seed)
            feats = views[0]
        t1 = time.perf_counter()
        torch.manual_seed(cfg.train.seed)
        model = MoLEFlow(extractor.dim, extractor.grid(cfg.data.image_size), cfg.resolved_model())
        model.add_task(0, feats)
        report = train_task(model, 0, feats, cfg.train, cfg.resolved_model(), progress=False,
                            views=views)
        total = time.perf_counter() - t0
        totals.append(total)
        gflops = matmul_gflops(threads)
        print(f"bench train | class {name} | {len(feats)} images at {cfg.data.image_size}px | "
              f"threads {torch.get_num_threads()} of {os.cpu_count()} cores | features "
              f"({len(views)} views) {t1 - t0:.1f} s | training {report.epochs} epochs "
              f"{report.seconds:.1f} s "
              f"({report.seconds / report.epochs:.2f} s/epoch) | one expert total {total:.1f} s "
              f"({total / 60:.2f} min) | machine: float32 matmul {gflops:.0f} GFLOP/s | "
              f"run {r + 1}/{repeat}")
    return totals
