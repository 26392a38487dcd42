"""Adaptive attacks (BPDA through soft quantizers, temperature-scaled PGD) on a small trained quantized CNN."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hw_dq.data import load_split
from hw_dq.nn.quant import QuantSpec
from hw_dq.robust import adaptive
from hw_dq.robust.attacks import AttackParams, clean_accuracy, robust_accuracy
from hw_dq.robust.evaluate import evaluation, worst_case


def _quant_cnn() -> nn.Module:
    """8-bit input, w4 convolutions, 2-bit learned-range activations: the building blocks of every hw-dq model."""
    q = QuantSpec(wbits=4, abits=2)
    return nn.Sequential(
        q.input_quant(), q.conv(3, 16, 3, padding=1), nn.BatchNorm2d(16), q.act(), nn.MaxPool2d(2),
        q.conv(16, 32, 3, padding=1), nn.BatchNorm2d(32), q.act(), nn.MaxPool2d(2),
        nn.Flatten(), q.linear(32 * 8 * 8, 10),
    )  # fmt: skip


@pytest.fixture(scope="module")
def trained() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    xtr, ytr = load_split("sample", "train").tensors()
    model = _quant_cnn()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(3):
        perm = torch.randperm(len(ytr), generator=g)
        for i in range(0, len(ytr), 100):
            idx = perm[i : i + 100]
            opt.zero_grad()
            nn.functional.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
            opt.step()
    model.eval()
    x, y = load_split("sample", "test").take(150, 1).tensors()
    return model, x, y


def test_soft_quantizers_keep_the_forward_exact_and_change_the_backward(trained):
    model, x, y = trained
    xb = x[:32].clone().requires_grad_(True)
    out = model(xb)
    (g_ste,) = torch.autograd.grad(nn.functional.cross_entropy(out, y[:32]), xb)
    with adaptive.soft_quantizers(model) as k:
        xb2 = x[:32].clone().requires_grad_(True)
        out2 = model(xb2)
        (g_soft,) = torch.autograd.grad(nn.functional.cross_entropy(out2, y[:32]), xb2)
    assert k == 2  # the two 2-bit activation quantizers; the 8-bit input quantizer keeps its STE
    assert torch.equal(out, out2)  # forward bit-identical
    assert not torch.allclose(g_ste, g_soft)  # backward through the surrogate
    with torch.no_grad():
        assert torch.equal(model(x[:32]), out.detach())  # restored on exit
    assert all(type(q.float_to_int_impl).__name__ == "RoundSte" for q in adaptive._act_int_quants(model))


def test_adaptive_attacks_find_at_least_as_much_as_pgd(trained):
    """Per-image worst case of BPDA and temperature-scaled PGD <= PGD-10 (an inequality that can fail)."""
    model, x, y = trained
    assert clean_accuracy(model, x, y) > 0.3
    p = AttackParams(pgd_steps=10)
    res = {a: robust_accuracy(model, x, y, a, 2.0, params=p) for a in ("pgd", "bpda", "pgd-temp")}
    print({a: r.robust_acc for a, r in res.items()})
    evals = [evaluation(a, r.kind, r.norm, 2.0, r.robust_acc, r.n_examples, 0, r.wall_s, r.max_perturbation,
                        r.params, robust_mask=r.robust_mask) for a, r in res.items()]  # fmt: skip
    adaptive_only = worst_case([e for e in evals if e["kind"] == "adaptive"], 2.0)
    assert adaptive_only is not None
    assert adaptive_only["robust_acc"] <= res["pgd"].robust_acc
    assert res["pgd"].robust_acc < clean_accuracy(model, x, y)  # the attack does something at 2/255
    assert res["bpda"].params["quantizers_swapped"] == 2
    everything = worst_case(evals, 2.0)
    assert everything is not None and everything["robust_acc"] <= min(r.robust_acc for r in res.values())
