from __future__ import annotations

import pytest
import torch
from torch import nn

from hw_dq.errors import ConfigError
from hw_dq.nn import lipschitz, quant
from hw_dq.nn.models import create_model


def test_regulariser_hand_computed():
    lin = nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]))
    # out=3 > in=2: use W^T W (2x2) = [[2, 1], [1, 5]]; minus I -> [[1, 1], [1, 4]] -> 1+1+1+16
    model = nn.Sequential(lin)
    assert float(lipschitz.orthogonality_penalty(model).detach()) == pytest.approx(19.0)
    assert float(lipschitz.regulariser(model, beta=0.5)) == pytest.approx(0.25 * 19.0)
    assert float(lipschitz.regulariser(model, beta=0.0)) == 0.0


def test_regulariser_uses_the_smaller_gram_for_conv():
    conv = nn.Conv2d(3, 4, 3, bias=False)  # 4 x 27: W W^T is 4x4
    w = conv.weight.reshape(4, -1)
    expected = ((w @ w.t() - torch.eye(4)) ** 2).sum()
    assert float(lipschitz.orthogonality_penalty(nn.Sequential(conv))) == pytest.approx(float(expected), rel=1e-5)


def test_zero_for_orthogonal_weights():
    torch.manual_seed(0)
    conv, lin = nn.Conv2d(3, 8, 3, bias=False), nn.Linear(16, 32, bias=False)
    nn.init.orthogonal_(conv.weight)
    nn.init.orthogonal_(lin.weight)
    assert float(lipschitz.orthogonality_penalty(nn.Sequential(conv, lin))) < 1e-9


def test_gradient_reaches_float_weights_of_quantized_layers():
    m = create_model("tiny", 2, 2)
    reg = lipschitz.regulariser(m, beta=1e-2)
    reg.backward()
    convs = [r.layer for r in lipschitz.lipschitz_layers(m)]
    assert len(convs) == 3
    assert all(c.weight.grad is not None and c.weight.grad.abs().sum() > 0 for c in convs)


def test_bn_folded_target_scales_by_bn_gain():
    conv, bn = nn.Conv2d(2, 2, 1, bias=False), nn.BatchNorm2d(2)
    with torch.no_grad():
        conv.weight.copy_(torch.eye(2).reshape(2, 2, 1, 1))
        bn.weight.copy_(torch.tensor([2.0, 1.0]))
        bn.running_var.fill_(1.0 - bn.eps)
    m = nn.Sequential(conv, bn)
    assert float(lipschitz.orthogonality_penalty(m, "weight")) == pytest.approx(0.0, abs=1e-9)
    assert float(lipschitz.orthogonality_penalty(m, "bn_folded")) == pytest.approx(9.0, rel=1e-4)


def _dense(layer: nn.Module, w: torch.Tensor, in_shape) -> torch.Tensor:
    n = int(torch.tensor(in_shape).prod())
    basis = torch.eye(n).reshape(n, *in_shape)
    return lipschitz._apply(layer, w, basis).reshape(n, -1).t()


@pytest.mark.parametrize("stride, padding", [(1, 0), (1, 1), (2, 1)])
def test_operator_norm_matches_svd_of_dense_conv(stride, padding):
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, stride=stride, padding=padding, bias=False)
    in_shape = (2, 6, 6)
    a = _dense(conv, conv.weight.detach(), in_shape)
    expected = torch.linalg.svdvals(a)[0].item()
    got = lipschitz.operator_norm(conv, conv.weight.detach(), in_shape, iters=500, tol=1e-10)
    assert got == pytest.approx(expected, rel=1e-4)


def test_diagnostic_folds_bn_and_uses_quantized_weights():
    torch.manual_seed(0)
    m = create_model("tiny", 2, 2)
    bn = m.features[1]
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.running_var.uniform_(0.5, 2.0)
    rows = {r.name: r for r in lipschitz.diagnose(m)}
    conv = m.features[0]
    wq = conv.quant_weight().value.detach()
    gain = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()
    # the power iteration itself is checked against a dense SVD on a smaller input
    small = _dense(conv, wq * gain.reshape(-1, 1, 1, 1), (3, 10, 10))
    ref_small = lipschitz.operator_norm(conv, wq * gain.reshape(-1, 1, 1, 1), (3, 10, 10), iters=500, tol=1e-10)
    assert ref_small == pytest.approx(torch.linalg.svdvals(small)[0].item(), rel=1e-4)
    r = rows["features.0"]
    assert r.norm_quant != pytest.approx(r.norm_float, rel=1e-6)
    assert r.bn_gain_max == pytest.approx(float(gain.abs().max()), rel=1e-6)
    direct = lipschitz.operator_norm(conv, wq * gain.reshape(-1, 1, 1, 1), (3, 32, 32), iters=300, tol=1e-9)
    assert r.norm_folded == pytest.approx(direct, rel=2e-3)


def test_network_bound_is_product_for_chains_and_composes_for_wrn():
    m = create_model("tiny", None, None)
    rep = lipschitz.report(m)
    prod = 1.0
    for r in rep["layers"]:
        prod *= r["norm_folded"]
    assert rep["network_bound"] == pytest.approx(prod)
    w = create_model("wrn", 2, 2, depth=10, width=1)
    rep_w = lipschitz.report(w)
    assert rep_w["network_bound"] > 0 and len(rep_w["layers"]) == 10
    assert "| layer |" in lipschitz.table(rep_w)


@pytest.mark.parametrize("shape", [(4, 27), (27, 4), (5, 5)])
def test_closed_form_gradient_matches_autograd(shape):
    torch.manual_seed(0)
    w = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lipschitz.orthogonality_residual, (w,))
    m = w.detach().clone().requires_grad_(True)
    gram = m @ m.t() if shape[0] <= shape[1] else m.t() @ m
    ((gram - torch.eye(gram.shape[0], dtype=gram.dtype)) ** 2).sum().backward()
    w.grad = None
    lipschitz.orthogonality_residual(w).backward()
    assert torch.allclose(w.grad, m.grad)


# ------------------------------------------------------------------ Lipschitz-control candidates
def _random_bn(model: nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) * 3 + 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.2)


def _folded_norms(model: nn.Module, target: str = "bn_folded") -> dict[str, float]:
    shapes = lipschitz.input_shapes(model, (3, 32, 32))
    out = {}
    for ref in lipschitz.lipschitz_layers(model):
        op = lipschitz.folded_operator(ref, ref.layer.weight.detach(), target).detach()
        out[ref.name] = lipschitz.operator_norm(ref.layer, op, shapes[ref.name], iters=500, tol=1e-9)
    return out


def test_projection_bounds_every_folded_operator_through_gamma_or_w():
    torch.manual_seed(0)
    m = create_model("tiny", None, None)
    _random_bn(m)
    before = _folded_norms(m)
    c = sorted(before.values())[1]  # some layers above the bound, at least one below
    w_conv = m.features[0].weight.detach().clone()
    w_fc = m.classifier[0].weight.detach().clone()
    g_bn = m.features[1].weight.detach().clone()
    est = lipschitz.project_(m, c, first_iters=300)
    assert est["features.0"] == pytest.approx(before["features.0"], rel=1e-3)
    after = _folded_norms(m)
    for name, n in before.items():
        expected = min(n, c)
        assert after[name] == pytest.approx(expected, rel=2e-3), name
    # a layer with BatchNorm is rescaled through gamma (W itself is untouched: BN would undo it)
    assert torch.equal(m.features[0].weight, w_conv)
    if before["features.0"] > c:
        assert torch.allclose(m.features[1].weight, g_bn * c / est["features.0"])
    # the classifier has no BatchNorm: its W is rescaled
    if before["classifier.0"] > c:
        assert torch.allclose(m.classifier[0].weight, w_fc * c / est["classifier.0"])


def test_projection_one_warm_started_iteration_per_step_converges():
    torch.manual_seed(0)
    m = create_model("tiny", None, None)
    _random_bn(m, 1)
    c = 1.0
    for _ in range(40):  # as after each optimizer step, one power-iteration step each
        lipschitz.project_(m, c, iters=1, first_iters=1)
    assert max(_folded_norms(m).values()) <= c * 1.02
    with pytest.raises(ConfigError, match="spectral bound"):
        lipschitz.project_(m, 0.0)


def test_projection_act_scaled_counts_the_ranges():
    torch.manual_seed(0)
    m = create_model("tiny", 2, 2, act_range="fixed")  # ranges 1 (input), 6, 6, logits 1
    _random_bn(m, 2)
    lipschitz.project_(m, 1.0, target="act_scaled", first_iters=300)
    n = _folded_norms(m, "act_scaled")
    assert max(n.values()) <= 1.0 + 2e-3
    folded = _folded_norms(m, "bn_folded")
    assert folded["features.0"] == pytest.approx(6 * n["features.0"], rel=1e-4)  # r_in / r_out = 1 / 6
    assert folded["classifier.0"] == pytest.approx(n["classifier.0"] / 6, rel=1e-4)  # 6 / 1


def test_act_scaled_ratios_telescope_and_enter_the_diagnostic():
    torch.manual_seed(0)
    m = create_model("tiny", 2, 2)
    m.train()
    for _ in range(25):  # calibrate the learned ranges
        m(torch.rand(16, 3, 32, 32))
    rep = lipschitz.report(m, iters=100)
    ratios = [r["range_ratio"] for r in rep["layers"]]
    assert all(r != pytest.approx(1.0) for r in ratios)
    assert float(torch.tensor(ratios).prod()) == pytest.approx(1.0, rel=1e-5)  # 1 (input) ... 1 (logits)
    for r in rep["layers"]:
        assert r["norm_scaled"] == pytest.approx(r["range_ratio"] * r["norm_folded"])
    assert "r_in/r_out" in lipschitz.table(rep)
    # WRN: residual blocks are not a chain, so no activation scale is attributed
    assert all(ref.act_in is None for ref in lipschitz.lipschitz_layers(create_model("wrn", 2, 2, depth=10, width=1)))


def test_act_scaled_penalty_value_and_gradient_reach_gamma_and_ranges():
    torch.manual_seed(0)
    m = create_model("tiny", 2, 2).double()
    m.train()
    for _ in range(25):
        m(torch.rand(8, 3, 32, 32, dtype=torch.float64))
    _random_bn(m, 3)
    refs = lipschitz.lipschitz_layers(m)
    ranges = quant.learned_ranges(m)
    r1, r2 = ranges["features.2"], ranges["features.6"]
    conv, bn = m.features[4], m.features[5]
    g = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    manual = lipschitz.orthogonality_residual(conv.weight * g.reshape(-1, 1, 1, 1) * r1 / r2)
    assert float(lipschitz.orthogonality_residual(lipschitz.folded_operator(refs[1], conv.weight, "act_scaled"))) == (
        pytest.approx(float(manual))
    )
    pen = lipschitz.orthogonality_penalty(m, "act_scaled")
    pen.backward()
    # central differences on a range, a gamma and a weight (gradcheck on the live parameters)
    for p, idx in ((r1, ()), (bn.weight, (3,)), (conv.weight, (1, 2, 0, 1))):
        h = 1e-6
        with torch.no_grad():
            p[idx] += h
            up = float(lipschitz.orthogonality_penalty(m, "act_scaled"))
            p[idx] -= 2 * h
            down = float(lipschitz.orthogonality_penalty(m, "act_scaled"))
            p[idx] += h
        assert float(p.grad[idx]) == pytest.approx((up - down) / (2 * h), rel=1e-5, abs=1e-8)


def test_bounded_batchnorm_gain_stays_within_its_bound():
    torch.manual_seed(0)
    m = create_model("tiny", 2, 2, bn_gain_max=1.5)
    plain = create_model("tiny", 2, 2)
    assert list(m.state_dict()) == list(plain.state_dict())  # same checkpoints and export as plain BN
    bn = m.features[1]
    assert isinstance(bn, quant.BoundedBatchNorm2d) and isinstance(m.features[5], quant.BoundedBatchNorm2d)
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(-1, 5, bn.num_features))
    x = torch.rand(8, 3, 32, 32)
    m(x).sum().backward()
    g = bn.weight.grad
    top = 1.5 * torch.sqrt(bn.running_var + bn.eps)
    inside = (bn.weight > 0) & (bn.weight < top)
    assert (g[~inside] == 0).all() and (g[inside] != 0).any()  # clamped: no gradient outside [0, top]
    m.eval()  # writes the bounded gamma into the parameter: inference, export and FINN see a plain BN
    gain = lipschitz.bn_gain(bn, bn.weight)
    assert float(gain.max()) == pytest.approx(1.5, rel=1e-5) and float(gain.min()) >= 0
    ref = nn.BatchNorm2d(bn.num_features).eval()
    ref.load_state_dict(bn.state_dict())
    z = torch.randn(2, bn.num_features, 4, 4)
    assert torch.equal(bn(z), ref(z))
    with pytest.raises(ConfigError, match="bn_gain_max"):
        create_model("tiny", 2, 2, bn_gain_max=0.0)
