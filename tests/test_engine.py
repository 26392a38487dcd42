"""The native attack engine (hw_dq.robust.engine) on a small CNN trained on the embedded sample."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hw_dq.data import load_split
from hw_dq.robust import engine


def _tiny_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 8 * 8, 10),
    )  # fmt: skip


@pytest.fixture(scope="module")
def trained() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A tiny CNN trained 3 epochs on the 4,000-image sample (~45% test accuracy), and 200 test images."""
    torch.manual_seed(0)
    xtr, ytr = load_split("sample", "train").tensors()
    xte, yte = load_split("sample", "test").take(200, seed=1).tensors()
    model = _tiny_cnn()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        perm = torch.randperm(len(ytr), generator=g)
        for i in range(0, len(ytr), 100):
            idx = perm[i : i + 100]
            opt.zero_grad()
            nn.functional.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
            opt.step()
    model.eval()
    return model, xte, yte


def _acc(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def test_deterministic_given_generator(trained):
    model, x, y = trained
    a = engine.pgd(model, x[:64], y[:64], 8 / 255, steps=3, restarts=2, generator=torch.Generator().manual_seed(7))
    b = engine.pgd(model, x[:64], y[:64], 8 / 255, steps=3, restarts=2, generator=torch.Generator().manual_seed(7))
    c = engine.pgd(model, x[:64], y[:64], 8 / 255, steps=3, restarts=2, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("norm,eps", [("Linf", 8 / 255), ("L2", 0.5)])
def test_projection_onto_ball_and_box(trained, norm, eps):
    model, x, y = trained
    xa = engine.pgd(model, x[:32], y[:32], eps, steps=5, norm=norm, generator=torch.Generator().manual_seed(0))
    d = (xa - x[:32]).flatten(1)
    dist = d.abs().amax(1) if norm == "Linf" else d.norm(dim=1)
    assert float(dist.max()) <= eps + 1e-5
    assert float(dist.max()) > 0.5 * eps  # it moved
    assert float(xa.min()) >= 0.0 and float(xa.max()) <= 1.0
    # without projection (N-FGSM style) the iterate leaves the eps-ball but stays in [0, 1]
    xu = engine.pgd(model, x[:32], y[:32], eps, steps=5, norm=norm, project=False, init_radius=2 * eps,
                    generator=torch.Generator().manual_seed(0))  # fmt: skip
    du = (xu - x[:32]).flatten(1)
    distu = du.abs().amax(1) if norm == "Linf" else du.norm(dim=1)
    assert float(distu.max()) > eps * 1.2
    assert float(xu.min()) >= 0.0 and float(xu.max()) <= 1.0


def test_pgd_damages_at_least_as_much_as_fgsm(trained):
    model, x, y = trained
    eps = 2 / 255
    clean = _acc(model, x, y)
    acc_fgsm = _acc(model, engine.fgsm(model, x, y, eps), y)
    acc_pgd = _acc(model, engine.pgd(model, x, y, eps, steps=10, generator=torch.Generator().manual_seed(0)), y)
    assert clean > 0.3  # the model learned something, so the comparison means something
    assert acc_fgsm < clean
    # per image PGD need not beat FGSM (its random start can miss a point FGSM's one step hits): one image
    # in 200 went the other way on another CPU's model; a broken PGD would sit near clean accuracy
    assert acc_pgd <= acc_fgsm + 0.01


def test_restarts_keep_per_example_best(trained):
    """Three restarts equal, per example, the best of three single runs drawing the same starts in order."""
    model, x, y = trained
    x, y = x[:100], y[:100]
    eps, kw = 4 / 255, {"steps": 2, "alpha": 1 / 255}
    multi = engine.pgd(model, x, y, eps, restarts=3, generator=torch.Generator().manual_seed(3), **kw)
    g = torch.Generator().manual_seed(3)
    singles = [engine.pgd(model, x, y, eps, restarts=1, generator=g, **kw) for _ in range(3)]
    with torch.no_grad():
        fooled = torch.stack([model(s).argmax(1) != y for s in singles])
        loss = torch.stack([nn.functional.cross_entropy(model(s), y, reduction="none") for s in singles])
        m_fooled = model(multi).argmax(1) != y
        m_loss = nn.functional.cross_entropy(model(multi), y, reduction="none")
    assert torch.equal(m_fooled, fooled.any(0))  # misclassified iff some restart misclassifies it
    robust = ~fooled.any(0)
    assert bool(robust.any())
    assert torch.all(m_loss[robust] >= loss.max(0).values[robust] - 1e-4)
    # and it is strictly better than the first restart alone on some example
    assert int(m_fooled.sum()) > int(fooled[0].sum()) or bool((m_loss[robust] > loss[0][robust] + 1e-4).any())


def test_mode_and_parameter_grads_untouched(trained):
    model, x, y = trained
    model.zero_grad(set_to_none=True)
    model.train()
    try:
        engine.pgd(model, x[:8], y[:8], 8 / 255, steps=2)
        engine.fgsm(model, x[:8], y[:8], 8 / 255)
        assert model.training
        assert all(p.grad is None for p in model.parameters())
    finally:
        model.eval()


def test_custom_loss_and_soft_targets(trained):
    """TRADES-style: the target is a probability vector and the loss is a per-example KL."""
    model, x, y = trained
    with torch.no_grad():
        p = torch.softmax(model(x[:16]), 1)

    def kl(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return nn.functional.kl_div(torch.log_softmax(logits, 1), target, reduction="none").sum(1)

    xa = engine.pgd(model, x[:16], p, 8 / 255, steps=3, loss_fn=kl, restarts=2, generator=torch.Generator())
    with torch.no_grad():
        assert float(kl(model(xa), p).mean()) > float(kl(model(x[:16]), p).mean())


def test_rejects_bad_arguments(trained):
    model, x, y = trained
    with pytest.raises(ValueError):
        engine.pgd(model, x[:2], y[:2], float("nan"))
    with pytest.raises(ValueError):
        engine.pgd(model, x[:2], y[:2], 0.1, norm="L1")
    assert torch.equal(engine.pgd(model, x[:2], y[:2], 0.0), x[:2])
