"""Mathematics of the flow: invertibility, log-determinants, LoRA identities, frozen base."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from FrEIA.modules import AllInOneBlock

from moleflow.config import ModelConfig, TrainConfig
from moleflow.train.flow import (AffineCoupling, ContextSubnet, FlowState, MoLEFlow, PermutedBlock,
                        positional_encoding_2d, whitening_statistics)
from moleflow.train.lora import LoRALinear
from moleflow.train.trainer import flow_loss, freeze_for_task, train_task

@pytest.fixture(autouse=True, scope="module")
def _float64():
    """Numerical Jacobians need double precision."""
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def _randomise(model: torch.nn.Module, scale: float = 0.3, seed: int = 0) -> None:
    """Give every parameter (zero-initialised ones too) a random value so no path is trivial."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "w_perm" not in name:
                p.add_(scale * torch.randn(p.shape, generator=gen))


def _model(dim: int = 6, grid=(3, 3), tasks: int = 2, **kw) -> MoLEFlow:
    cfg = ModelConfig(**{"coupling_blocks": 2, "lora_rank": 2, "scale_context_kernel": 3,
                         "spatial_context_kernel": 3, **kw})
    torch.manual_seed(0)
    model = MoLEFlow(dim, grid, cfg).double()
    for t in range(tasks):
        model.add_task(t, torch.randn(5, dim, *grid) * (torch.rand(dim)[:, None, None] + 0.5) + 1)
    model.double()
    _randomise(model)
    return model.eval()


def test_flow_is_invertible():
    model = _model()
    x = torch.randn(2, 3, 3, 6)
    for task in (0, 1):
        z, logdet = model.transform(x, task)
        back, inv_logdet = model.inverse(z, task)
        assert torch.allclose(back, x, atol=1e-10)
        assert torch.allclose(inv_logdet, -logdet, atol=1e-10)


def test_logdet_matches_numerical_jacobian_over_the_grid():
    """With spatial context the Jacobian couples patches, but stays block-triangular: the sum of
    the per-patch log-dets must equal log|det J| of the whole grid."""
    model = _model(grid=(2, 2))
    x = torch.randn(1, 2, 2, 6)
    z, logdet = model.transform(x, 1)
    jac = torch.autograd.functional.jacobian(lambda v: model.transform(v, 1)[0], x)
    jac = jac.reshape(x.numel(), x.numel())
    assert torch.allclose(torch.linalg.slogdet(jac).logabsdet, logdet.sum(), atol=1e-8)


def test_per_patch_logdet_without_context():
    """Without spatial context each patch is its own sample: its log-det is its own block's."""
    model = _model(grid=(2, 2), scale_context_kernel=0)
    x = torch.randn(1, 2, 2, 6)
    _, logdet = model.transform(x, 0)
    jac = torch.autograd.functional.jacobian(lambda v: model.transform(v, 0)[0], x)
    jac = jac.reshape(4, 6, 4, 6)
    for p in range(4):
        assert torch.allclose(torch.linalg.slogdet(jac[p, :, p, :]).logabsdet,
                              logdet.reshape(-1)[p], atol=1e-8)
        others = [q for q in range(4) if q != p]
        assert torch.count_nonzero(jac[p][:, others]) == 0


def test_dia_block_inverse_and_logdet():
    blk = AffineCoupling(6, flip=True, clamp=1.9)
    _randomise(blk)
    x = torch.randn(5, 6)
    y, ld = blk(x)
    back, ild = blk.inverse(y)
    assert torch.allclose(back, x, atol=1e-12) and torch.allclose(ild, -ld)
    jac = torch.autograd.functional.jacobian(lambda v: blk(v[None])[0][0], x[0])
    assert torch.allclose(torch.linalg.slogdet(jac).logabsdet, ld[0], atol=1e-10)


def test_dia_starts_as_identity():
    blk = AffineCoupling(6, flip=False, clamp=1.9)
    x = torch.randn(4, 6)
    y, ld = blk(x)
    assert torch.equal(y, x) and torch.count_nonzero(ld) == 0


def test_permuted_block_equals_freia_all_in_one_block():
    state = FlowState(0, (1, 2, 2))
    cfg = ModelConfig(lora_rank=2, scale_context_kernel=0)
    make = lambda ci, co: ContextSubnet(ci, co, 8, state, cfg)  # noqa: E731
    np.random.seed(3)
    torch.manual_seed(3)
    ours = PermutedBlock([(6,)], subnet_constructor=make, affine_clamping=1.9).double()
    np.random.seed(3)
    torch.manual_seed(3)
    ref = AllInOneBlock([(6,)], subnet_constructor=make, affine_clamping=1.9).double()
    for blk in (ours, ref):
        for lin in blk.subnet.linears():
            lin.add_task(0)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(4, 6)
    (a,), ja = ours((x,))
    (b,), jb = ref((x,))
    assert torch.allclose(a, b, atol=1e-12) and torch.allclose(ja, jb, atol=1e-12)
    (ra,), _ = ours((a,), rev=True)
    assert torch.allclose(ra, x, atol=1e-12)
    # training sees the same gradients through the index gather as through FrEIA's matmul
    grads = []
    for blk in (ours, ref):
        xg = x.clone().double().requires_grad_(True)
        (y,), j = blk((xg,))
        ((y ** 2).sum() + j.sum()).backward()
        grads.append([xg.grad] + [p.grad for n, p in sorted(blk.named_parameters())
                                  if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 5
    for g_ours, g_ref in zip(*grads):
        assert torch.allclose(g_ours, g_ref, atol=1e-12)


def test_lora_with_zero_B_equals_base_exactly():
    lin = LoRALinear(7, 5, rank=3, alpha=1.0)
    lin.add_task(0)
    x = torch.randn(11, 7)
    assert torch.equal(lin(x, 0), torch.nn.functional.linear(x, lin.base.weight, lin.base.bias))


def test_lora_fused_equals_unfused_branch():
    lin = LoRALinear(7, 5, rank=3, alpha=2.0)
    lin.add_task(0)
    _randomise(lin)
    x = torch.randn(11, 7)
    key = "0"
    unfused = (x @ lin.base.weight.T + lin.base.bias
               + (2.0 / 3) * (x @ lin.lora_A[key].T) @ lin.lora_B[key].T + lin.task_bias[key])
    assert torch.allclose(lin(x, 0), unfused, atol=1e-12)
    assert lin.scale == pytest.approx(2.0 / 3)


def test_positional_encoding_layout():
    pe = positional_encoding_2d(8, 3, 4).double()
    assert pe.shape == (3, 4, 8)
    # first half encodes the column: constant down a column, sin(0)=0 / cos(0)=1 at column 0
    assert torch.equal(pe[0, :, :4], pe[2, :, :4])
    assert torch.allclose(pe[:, 0, 0], torch.zeros(3)) and torch.allclose(pe[:, 0, 1], torch.ones(3))
    assert torch.equal(pe[:, 0, 4:], pe[:, 3, 4:])  # second half encodes the row


def _features(n: int, dim: int, grid=(4, 4), shift: float = 0.0, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, *grid, generator=gen) + shift


def test_later_task_leaves_base_and_earlier_experts_untouched():
    torch.set_default_dtype(torch.float32)
    try:
        cfg = ModelConfig(coupling_blocks=2, lora_rank=4)
        model = MoLEFlow(8, (4, 4), cfg)
        tcfg = TrainConfig(epochs=2, batch_size=4)
        model.add_task(0)
        train_task(model, 0, _features(8, 8), tcfg, cfg, progress=False)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        model.add_task(1)
        task1 = {id(p) for p in model.expert_parameters(1)}
        train_task(model, 1, _features(8, 8, shift=2.0, seed=1), tcfg, cfg, progress=False)
        after = model.state_dict()
        for key, value in before.items():
            assert torch.equal(value, after[key]), f"{key} changed while training task 1"
        changed = [n for n, p in model.named_parameters()
                   if id(p) in task1 and n in after and n not in before]
        assert changed, "task 1 has parameters of its own"
        assert any(not torch.equal(p, torch.zeros_like(p))
                   for n, p in model.named_parameters() if ".lora_B.1" in n)
    finally:
        torch.set_default_dtype(torch.float64)


def test_trainable_sets():
    model = _model(tasks=2)
    base = {id(p) for p in model.base_parameters()}
    t0 = {id(p) for p in model.trainable_parameters(0)}
    t1 = {id(p) for p in model.trainable_parameters(1)}
    assert base <= t0 and not (base & t1) and not (t0 & t1)
    freeze_for_task(model, 1)
    assert {id(p) for p in model.parameters() if p.requires_grad} == t1


def test_tail_loss_weights_the_worst_patches():
    z = torch.zeros(2, 4, 5, 3)
    z[0, 0, 0] = 10.0  # one bad patch
    logdet = torch.zeros(2, 4, 5)
    cfg = TrainConfig(tail_weight=0.7, tail_ratio=0.05, logdet_weight=0.0)
    plain = dataclasses.replace(cfg, tail_weight=0.0)
    assert flow_loss(z, logdet, cfg) > flow_loss(z, logdet, plain)
    assert flow_loss(z, logdet, cfg, tail=False) == flow_loss(z, logdet, plain)


@pytest.mark.parametrize("mode", ["channel", "full"])
def test_whitening_statistics_whiten_the_task(mode):
    gen = torch.Generator().manual_seed(0)
    mix = torch.randn(5, 5, generator=gen, dtype=torch.float64)
    feats = (torch.randn(40, 6, 6, 5, generator=gen, dtype=torch.float64) @ mix.T + 3.0)
    feats = feats.permute(0, 3, 1, 2)  # (N, D, H, W) with correlated channels
    mean, whiten = (t.double() for t in whitening_statistics(feats, mode, shrink=0.0))
    flat = feats.permute(0, 2, 3, 1).reshape(-1, 5)
    white = (flat - mean) * whiten if mode == "channel" else (flat - mean) @ whiten.T
    cov = torch.cov(white.T)
    if mode == "channel":
        assert torch.allclose(cov.diagonal(), torch.ones(5, dtype=cov.dtype), atol=1e-3)
    else:
        assert torch.allclose(cov, torch.eye(5, dtype=cov.dtype), atol=1e-3)
    assert torch.allclose(white.mean(0), torch.zeros(5, dtype=cov.dtype), atol=1e-3)


def test_first_task_lora_has_its_own_scale():
    """Task 0 trains with the base at the research scale; later tasks use alpha / rank."""
    lin = LoRALinear(7, 5, rank=4, alpha=4.0, first_alpha=1.0)
    for task in (0, 1):
        lin.add_task(task)
    _randomise(lin)
    x = torch.randn(11, 7)
    for task, scale in ((0, 0.25), (1, 1.0)):
        key = str(task)
        unfused = (x @ lin.base.weight.T + lin.base.bias
                   + scale * (x @ lin.lora_A[key].T) @ lin.lora_B[key].T + lin.task_bias[key])
        assert torch.allclose(lin(x, task), unfused, atol=1e-12)
        assert lin.scale_of(task) == scale
    assert LoRALinear(7, 5, rank=4, alpha=4.0).scale_of(0) == 1.0  # one alpha when not split


def test_runs_from_before_the_split_alpha_keep_one_alpha(tmp_path):
    import yaml
    from moleflow.config import load_config
    from moleflow.train.bundle import RunBundle
    cfg = load_config(None, {"model.lora_alpha": 3.0})
    bundle = RunBundle.create(tmp_path / "run", cfg, "ident", 8, (4, 4))
    raw = yaml.safe_load((bundle.path / "config.yaml").read_text())
    del raw["model"]["lora_alpha_first"]  # as written by earlier versions
    (bundle.path / "config.yaml").write_text(yaml.safe_dump(raw))
    model = RunBundle.open(bundle.path).config.model
    assert model.lora_alpha_first == model.lora_alpha == 3.0


@pytest.mark.parametrize("identity, standardised", [("lite0|w|[2, 3]|avg3|64", False),
                                                    ("lite0|w|[2, 3]|avg3|64|light", True)])
def test_runs_from_before_light_standardisation_read_it_from_their_identity(
        tmp_path, identity, standardised):
    import yaml
    from moleflow.config import load_config
    from moleflow.train.bundle import RunBundle
    bundle = RunBundle.create(tmp_path / "run", load_config(None, {}), identity, 8, (4, 4))
    raw = yaml.safe_load((bundle.path / "config.yaml").read_text())
    del raw["backbone"]["standardise_light"]  # as written by earlier versions
    (bundle.path / "config.yaml").write_text(yaml.safe_dump(raw))
    assert RunBundle.open(bundle.path).config.backbone.standardise_light is standardised


@pytest.mark.parametrize("first_key, later_key, quiet, loud", [
    ("feature_noise_first", "feature_noise", 0.0, 0.5),
    ("lr_first", "lr", 1e-3, 5e-3),
    ("batch_size_first", "batch_size", 4, 2),
])
def test_first_task_and_later_tasks_train_with_their_own_settings(first_key, later_key, quiet,
                                                                   loud):
    """The *_first setting applies while task 0 fits the base, the plain one to later tasks."""
    torch.set_default_dtype(torch.float32)
    try:
        cfg = ModelConfig(coupling_blocks=2, lora_rank=4)

        def trained(first: float, later: float) -> dict[int, dict[str, torch.Tensor]]:
            torch.manual_seed(0)
            model = MoLEFlow(8, (4, 4), cfg)
            tcfg = TrainConfig(**{"epochs": 2, "batch_size": 4, "batch_size_first": 4,
                                  first_key: first, later_key: later})
            states = {}
            for task in (0, 1):
                model.add_task(task)
                train_task(model, task, _features(8, 8, shift=task, seed=task), tcfg, cfg,
                           progress=False)
                states[task] = {k: v.clone() for k, v in model.state_dict().items()}
            return states

        base, later_loud = trained(quiet, quiet), trained(quiet, loud)
        first_loud = trained(loud, quiet)
        same = lambda a, b: all(torch.equal(a[k], b[k]) for k in a)  # noqa: E731
        assert same(base[0], later_loud[0]), f"{later_key} reached the first task"
        assert not same(base[1], later_loud[1]), f"{later_key} was not applied to a later task"
        assert not same(base[0], first_loud[0]), f"{first_key} was not applied to the first task"
    finally:
        torch.set_default_dtype(torch.float64)
