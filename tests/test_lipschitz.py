from __future__ import annotations

import pytest
import torch
from torch import nn

from hw_dq.nn import lipschitz
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
