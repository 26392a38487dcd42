"""IBP through the Brevitas models: sound bounds, tighter logit differences, a loss that trains."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn import functional as F  # noqa: N812

from hw_dq.data import load_split
from hw_dq.errors import ConfigError
from hw_dq.nn.ibp import (
    certified_fraction,
    eps_schedule,
    ibp_bounds,
    ibp_loss,
    ibp_margins,
    ibp_margins_and_logits,
    kappa_schedule,
)
from hw_dq.nn.models import create_model

EPS = 4 / 255


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_split("sample", "train").take(64, seed=0).tensors()
    return x, y


def _model(wbits, abits, batch) -> torch.nn.Module:
    torch.manual_seed(0)
    m = create_model("tiny", wbits, abits)
    m.train()
    with torch.no_grad():  # give BatchNorm real running statistics (and a learned range its calibration)
        for _ in range(3):
            m(batch[0])
    return m.eval()


@pytest.mark.parametrize("bits", [(2, 2), (None, None)], ids=["w2a2", "float"])
def test_bounds_contain_the_forward_of_points_in_the_box(bits, batch):
    x, y = batch
    model = _model(*bits, batch)
    with torch.no_grad():
        lo, hi = ibp_bounds(model, (x - EPS).clamp(0, 1), (x + EPS).clamp(0, 1))
        lb = ibp_margins(model, x, y, EPS)
        assert (hi - lo).mean() > 0
        g = torch.Generator().manual_seed(1)
        for k in range(8):
            if k < 4:
                d = (torch.rand(x.shape, generator=g) * 2 - 1) * EPS
            else:  # corners of the box, where linear bounds are attained
                d = (torch.randint(0, 2, x.shape, generator=g) * 2 - 1) * EPS
            z = model((x + d).clamp(0, 1))
            assert (z >= lo - 1e-4).all() and (z <= hi + 1e-4).all()
            diff = z.gather(1, y[:, None]) - z
            assert (diff >= lb - 1e-4).all()
    # the logit differences are at least as tight as two logit bounds, and strictly tighter somewhere
    naive = lo.gather(1, y[:, None]) - hi
    naive[torch.arange(len(y)), y] = 0
    assert (lb >= naive - 1e-5).all() and (lb > naive + 1e-3).any()


@pytest.mark.parametrize("bits", [(2, 2), (None, None)], ids=["w2a2", "float"])
def test_training_mode_bounds_use_the_clean_batch_statistics(bits, batch):
    """In training mode BatchNorm normalises with the clean batch's statistics, so the bounds IBP trains on
    are those of the network with that affine map: the same as in eval mode with running statistics set
    to the clean batch's (biased) statistics. The box centres' statistics, used before, give other bounds:
    their variance shrinks as intervals widen, which widens the next interval further."""
    x, y = batch
    torch.manual_seed(0)
    model = create_model("tiny", *bits, act_range="fixed")
    model.train()
    stats = {}
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    hooks = [m.register_forward_hook(lambda m, i, o: stats.__setitem__(m, i[0].detach())) for m in bns]
    with torch.no_grad():
        model(x)
        for h in hooks:
            h.remove()
        eps = 8 / 255
        train_lb = ibp_margins(model, x, y, eps)
        for m in bns:
            dims = [0] + list(range(2, stats[m].dim()))
            m.running_mean.copy_(stats[m].mean(dims))
            m.running_var.copy_(stats[m].var(dims, unbiased=False))
        model.eval()
        eval_lb = ibp_margins(model, x, y, eps)
        assert torch.allclose(train_lb, eval_lb, atol=1e-4)
        # and those bounds hold for the points of the box under that affine map (its corners)
        d = (torch.randint(0, 2, x.shape, generator=torch.Generator().manual_seed(1)) * 2 - 1) * eps
        z = model((x + d).clamp(0, 1))
        assert ((z.gather(1, y[:, None]) - z) >= train_lb - 1e-4).all()


@pytest.mark.parametrize("bits", [(2, 2), (None, None)], ids=["w2a2", "float"])
def test_one_pass_gives_the_clean_forward_and_its_running_statistics(bits, batch):
    """Certified training's single pass: its logits are ``model(x)`` in training mode, its margins are
    ``ibp_margins``', and BatchNorm's running statistics move exactly as one clean forward moves them;
    ``ibp_margins`` alone leaves them as they are."""
    x, y = batch
    torch.manual_seed(0)
    ref = create_model("tiny", *bits, act_range="fixed").train()
    one = copy.deepcopy(ref)
    stats = lambda m: [t.clone() for k, t in m.state_dict().items() if "running" in k]  # noqa: E731
    before = stats(one)
    with torch.no_grad():
        ibp_margins(one, x, y, 2 / 255)
        assert all(torch.equal(a, b) for a, b in zip(stats(one), before, strict=True))
        z = ref(x)
        lb, logits = ibp_margins_and_logits(one, x, y, 2 / 255)
        assert torch.allclose(logits, z, atol=1e-4)
        for a, b, c in zip(stats(one), stats(ref), before, strict=True):
            assert torch.allclose(a, b, atol=1e-6) and not torch.equal(a, c)
        assert torch.allclose(lb, ibp_margins(one, x, y, 2 / 255), atol=1e-5)


def test_the_rounded_box_is_a_staircase_and_the_relaxed_box_grows_with_eps(batch):
    """The 8-bit input quantizer rounds a box of radius below half a level back to the pixel itself:
    exact bounds at 0.4/255 are the clean margins, and 0.6/255 gives the same bounds as one whole
    level. The relaxed training box is none of these: its bounds loosen steadily with eps."""
    x, y = batch
    model = _model(4, 4, batch)
    with torch.no_grad():
        exact = {e: ibp_margins(model, x, y, e / 255) for e in (0.0, 0.4, 0.6, 1.0)}
        relaxed = {e: ibp_margins(model, x, y, e / 255, relax_input=True) for e in (0.0, 0.4, 0.6, 1.0)}
    assert torch.allclose(exact[0.4], exact[0.0], atol=1e-5) and torch.allclose(exact[0.6], exact[1.0], atol=1e-5)
    assert not torch.allclose(exact[0.6], exact[0.4], atol=1e-3)
    assert torch.allclose(relaxed[0.0], exact[0.0], atol=1e-5)
    gaps = [float((relaxed[0.0] - relaxed[e]).mean()) for e in (0.4, 0.6, 1.0)]
    assert 0 < gaps[0] < gaps[1] < gaps[2]


def test_relu_grad_reaches_layers_whose_intervals_cover_the_whole_range(batch):
    """With the whole image space as the box, the first layer's intervals cover the clipped range of
    the 2-bit ReLU and the clip stops every gradient of the bounds to that layer's weights (eval mode:
    no batch statistics to carry one); ``relu_grad`` gives them one, with the same values."""
    x, y = batch
    model = _model(2, 2, batch)
    first = model.features[0].weight
    grads, values = {}, {}
    for flag in (False, True):
        first.grad = None
        lb = ibp_margins(model, x, y, 1.0, relu_grad=flag)
        F.cross_entropy(-lb, y).backward()
        grads[flag], values[flag] = float(first.grad.abs().sum()), lb.detach()
    assert torch.equal(values[False], values[True])
    assert grads[False] == 0.0 < grads[True]


def test_eps0_margins_are_the_clean_logit_differences(batch):
    x, y = batch
    model = _model(2, 2, batch)
    with torch.no_grad():
        z = model(x)
        assert torch.allclose(ibp_margins(model, x, y, 0.0), z.gather(1, y[:, None]) - z, atol=1e-4)


def test_ibp_loss_trains_a_tiny_batch(batch):
    x, y = batch
    torch.manual_seed(0)
    model = create_model("tiny", 2, 2)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def robust_ce() -> float:
        model.eval()
        with torch.no_grad():
            v = float(F.cross_entropy(-ibp_margins(model, x, y, 2 / 255), y))
        model.train()
        return v

    first, before = None, robust_ce()
    for _step in range(25):
        loss = ibp_loss(model, x, y, 2 / 255, kappa=0.5)
        assert loss.requires_grad and torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
    assert loss.item() < 0.85 * first
    assert robust_ce() < before
    assert 0.0 <= certified_fraction(model.eval(), x, y, 2 / 255) <= 1.0


def test_smooth_ramp_starts_slowly_and_joins_the_linear_rise():
    """Shi et al.'s ramp: t^4 for the first quarter, then linear with the same slope, same end points."""
    total, kw = 1000, dict(warmup=0.1, ramp=0.8, shape="smooth")
    vals = [eps_schedule(s, total, 1.0, **kw) for s in range(total + 1)]
    lin = [eps_schedule(s, total, 1.0, warmup=0.1, ramp=0.8) for s in range(total + 1)]
    assert vals[100] == 0.0 and vals[900] == 1.0 and vals == sorted(vals)
    assert vals[300] == pytest.approx(0.077, abs=0.001)  # a quarter of the ramp: 7.7% of eps, not 25%
    assert all(v <= w + 1e-12 for v, w in zip(vals, lin, strict=True)) and vals[180] < 0.05 * lin[180]
    before, after = vals[300] - vals[299], vals[302] - vals[301]
    assert abs(before - after) < 0.02 * after  # no kink where the pieces meet
    assert kappa_schedule(300, total, 0.2, **kw) == pytest.approx(1 - 0.8 * vals[300])


def test_schedules_and_errors():
    assert eps_schedule(0, 100, 8.0) == 0.0 and eps_schedule(10, 100, 8.0) == 0.0
    assert eps_schedule(35, 100, 8.0) == pytest.approx(4.0) and eps_schedule(99, 100, 8.0) == 8.0
    vals = [eps_schedule(s, 100, 1.0) for s in range(100)]
    assert vals == sorted(vals)
    assert kappa_schedule(0, 100) == 1.0 and kappa_schedule(99, 100, 0.5) == 0.5
    with pytest.raises(ConfigError):
        eps_schedule(1, 0, 1.0)
    with pytest.raises(ConfigError, match="shape"):
        eps_schedule(1, 10, 1.0, shape="cubic")
    x = torch.rand(2, 3, 32, 32)
    with pytest.raises(ConfigError, match="IBP supports"):
        ibp_margins(create_model("wrn", 2, 2, width=1, depth=10), x, torch.zeros(2, dtype=torch.long), 0.01)
    with pytest.raises(ConfigError, match="invalid IBP eps"):
        ibp_margins(create_model("tiny", 2, 2), x, torch.zeros(2, dtype=torch.long), -1.0)
    with pytest.raises(ConfigError, match="kappa"):
        ibp_loss(create_model("tiny", 2, 2), x, torch.zeros(2, dtype=torch.long), 0.01, kappa=2.0)


def test_row_projection_bounds_each_layers_interval_growth(batch):
    """After ``project_rows_`` every BN-folded operator row has l1 norm <= C, so a box's radius grows by at
    most C through each float conv/linear + BatchNorm pair (checked by propagating a box), while the
    spectral projection leaves that growth far above C on the same model."""
    from hw_dq.nn import lipschitz
    from hw_dq.nn.ibp import _layer, project_rows_

    x = batch[0]
    model = _model(None, None, batch)
    c = 1.5
    before = project_rows_(model, c)
    assert max(before.values()) > 2 * c  # the projection had work to do
    after = project_rows_(model, c)
    assert all(v <= c * (1 + 1e-5) for v in after.values())
    shapes = lipschitz.input_shapes(model, tuple(x.shape[1:]))
    checked = 0
    for ref in lipschitz.lipschitz_layers(model):
        if ref.bn is None:
            continue
        r_in = EPS
        c_in = torch.rand((4, *shapes[ref.name]), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            l1, h1, _ = _layer(ref.bn, *_layer(ref.layer, c_in - r_in, c_in + r_in, c_in))
        assert float((h1 - l1).max() / 2) <= c * r_in * (1 + 1e-4)
        checked += 1
    assert checked >= 2
    # the spectral bound at the same C leaves the Linf growth of some layer well above C
    other = _model(None, None, batch)
    lipschitz.project_(other, c, target="bn_folded", first_iters=50)
    assert max(project_rows_(other, 1e9).values()) > 2 * c
    with pytest.raises(ConfigError, match="row-norm bound"):
        project_rows_(model, 0.0)


def test_ibp_init_sets_every_layer_but_the_last_to_the_interval_preserving_scale():
    from hw_dq.nn.ibp import ibp_init_

    model = create_model("cnv", 4, 4, width=0.25)
    last = model.classifier[-1].weight.clone()
    assert ibp_init_(model) == 8  # 6 convolutions, 2 hidden linear layers
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d | torch.nn.Linear) and m is not model.classifier[-1]:
            want = (2 * torch.pi) ** 0.5 / m.weight[0].numel()
            assert abs(float(m.weight.detach().std()) / want - 1) < 0.1
    assert torch.equal(model.classifier[-1].weight, last)


def test_warmup_regularisers_record_each_activation_and_descend(batch):
    from hw_dq.nn.ibp import warmup_reg

    x, y = batch
    torch.manual_seed(0)
    model = create_model("cnv", 4, 4, width=0.25, act_range="fixed")
    model.train()
    rec: list = []
    ibp_margins(model, x, y, 2 / 255, record=rec)
    assert len(rec) == 1 + 8  # the input box, then what enters each of the 8 activations after a layer
    assert rec[0][0].shape == x.shape
    reg0 = float(warmup_reg(rec))
    assert reg0 > 0.5  # at initialisation intervals grow ~sqrt(fan-in) per layer relative to the signal
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(30):
        rec = []
        ibp_margins(model, x, y, 2 / 255, record=rec)
        loss = warmup_reg(rec)
        opt.zero_grad()
        loss.backward()
        opt.step()
    rec = []
    ibp_margins(model, x, y, 2 / 255, record=rec)
    assert float(warmup_reg(rec)) < 0.8 * reg0  # its gradient reaches the weights and lowers it
