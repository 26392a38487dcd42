"""The native attack engine: batched FGSM and PGD (Linf, L2) in plain PyTorch on the model's device.

Shared by evaluation (the ``fgsm``/``rfgsm``/``pgd``/``pgd-l2`` attacks) and by adversarial
training. Written here rather than taken from ART or torchattacks because both round-trip
through numpy (ART) or switch the model to eval mode (torchattacks' default), and training
needs neither: the caller decides the model's mode (e.g. BatchNorm statistics frozen), and
the tensors never leave the device.

Conventions: inputs in [0, 1]; ``eps``/``alpha`` in input units (8/255 = 0.0314); random
numbers are drawn on the CPU from ``generator`` and then moved, so a CPU and a GPU run with
the same generator start from the same points.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, target) -> per-example loss (B,)
NORMS = ("Linf", "L2")
_TINY = 1e-12


def cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-example cross-entropy; ``target`` is class indices or class probabilities."""
    return F.cross_entropy(logits, target, reduction="none")


def _check(eps: float, norm: str) -> None:
    if not (eps >= 0 and eps < float("inf")):
        raise ValueError(f"eps must be finite and >= 0, got {eps}")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def _flat_norm(t: torch.Tensor) -> torch.Tensor:
    """Per-example L2 norm, shaped to broadcast against ``t``."""
    n = t.flatten(1).norm(p=2, dim=1)
    return n.view(-1, *([1] * (t.dim() - 1)))


def _project(delta: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    if norm == "Linf":
        return delta.clamp(-eps, eps)
    return delta * torch.clamp(eps / (_flat_norm(delta) + _TINY), max=1.0)


def _step(grad: torch.Tensor, alpha: float, norm: str) -> torch.Tensor:
    if norm == "Linf":
        return alpha * grad.sign()
    return alpha * grad / (_flat_norm(grad) + _TINY)


def _random_start(x: torch.Tensor, radius: float, norm: str, generator: torch.Generator | None) -> torch.Tensor:
    """A random offset: uniform in [-r, r] per pixel (Linf) or uniform in the L2 ball of radius r."""
    shape = tuple(x.shape)
    if norm == "Linf":
        u = torch.rand(shape, generator=generator, dtype=torch.float32)
        return ((2 * u - 1) * radius).to(device=x.device, dtype=x.dtype)
    d = torch.randn(shape, generator=generator, dtype=torch.float32)
    r = torch.rand((shape[0],), generator=generator, dtype=torch.float32) ** (1.0 / max(1, d[0].numel()))
    d = d / (_flat_norm(d) + _TINY) * (r * radius).view(-1, *([1] * (len(shape) - 1)))
    return d.to(device=x.device, dtype=x.dtype)


def _grad(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor, loss_fn: LossFn) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient of the summed per-example loss w.r.t. the input, and the logits (detached).

    ``torch.autograd.grad`` with only the input as target leaves the parameters' ``.grad``
    untouched, so training can call this between its own backward passes.
    """
    x_adv = x_adv.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x_adv)
        loss = loss_fn(logits, y)
        (g,) = torch.autograd.grad(loss.sum(), x_adv)
    return g.detach(), logits.detach()


def fgsm(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *, loss_fn: LossFn | None = None
) -> torch.Tensor:
    """One signed-gradient step of size ``eps`` (Goodfellow et al. 2015), clipped to [0, 1]."""
    _check(eps, "Linf")
    x = x.detach()
    if eps == 0:
        return x.clone()
    g, _ = _grad(model, x, y, loss_fn or cross_entropy)
    return (x + eps * g.sign()).clamp(0.0, 1.0).detach()


def _score(
    model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor, loss_fn: LossFn
) -> tuple[torch.Tensor, torch.Tensor]:
    """(fooled, loss) per example; ``fooled`` is all-False when the target is not class indices."""
    with torch.no_grad():
        logits = model(x_adv)
        loss = loss_fn(logits, y).detach()
    if y.dim() == 1 and not torch.is_floating_point(y):
        fooled = logits.argmax(1) != y
    else:
        fooled = torch.zeros(len(x_adv), dtype=torch.bool, device=x_adv.device)
    return fooled, loss


def _run_once(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    steps: int,
    alpha: float,
    norm: str,
    start: torch.Tensor | None,
    project: bool,
    loss_fn: LossFn,
) -> torch.Tensor:
    x_adv = x if start is None else x + start
    if project and start is not None:
        x_adv = x + _project(x_adv - x, eps, norm)
    x_adv = x_adv.clamp(0.0, 1.0)
    for _ in range(steps):
        g, _ = _grad(model, x_adv, y, loss_fn)
        x_adv = x_adv + _step(g, alpha, norm)
        if project:
            x_adv = x + _project(x_adv - x, eps, norm)
        x_adv = x_adv.clamp(0.0, 1.0)
    return x_adv.detach()


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    *,
    steps: int = 10,
    alpha: float | None = None,
    restarts: int = 1,
    norm: str = "Linf",
    random_start: bool = True,
    init_radius: float | None = None,
    project: bool = True,
    loss_fn: LossFn | None = None,
    generator: torch.Generator | None = None,
    keep_best: bool = True,
) -> torch.Tensor:
    """Projected gradient descent (Madry et al. 2018) with random starts and restarts.

    ``alpha`` defaults to ``2.5 * eps / steps``; the start is uniform in ``[-r, r]`` (Linf)
    or in the L2 ball of radius ``r`` (``init_radius``, default ``eps``). With ``project``
    False the iterate is only clipped to [0, 1] (N-FGSM's unprojected step). Each restart
    draws one random start from ``generator``, in order, for the whole batch; with
    ``keep_best`` a later restart runs only on the examples not yet misclassified and
    replaces an example's result when it misclassifies it or, failing that, raises its loss.
    Returns the detached adversarial batch; the model's train/eval mode is left as it is.
    """
    _check(eps, norm)
    if steps < 0 or restarts < 1:
        raise ValueError(f"steps must be >= 0 and restarts >= 1, got steps={steps}, restarts={restarts}")
    loss_fn = loss_fn or cross_entropy
    x = x.detach()
    if eps == 0 and project:
        return x.clone()
    step = 2.5 * eps / max(1, steps) if alpha is None else float(alpha)
    radius = eps if init_radius is None else float(init_radius)
    best: torch.Tensor | None = None
    best_fooled = best_loss = None
    for _ in range(restarts):
        start = _random_start(x, radius, norm, generator) if random_start else None
        if best is None:
            best = _run_once(model, x, y, eps, steps, step, norm, start, project, loss_fn)
            if restarts == 1 or not keep_best:
                continue
            best_fooled, best_loss = _score(model, best, y, loss_fn)
            continue
        if not keep_best:  # the last restart wins
            best = _run_once(model, x, y, eps, steps, step, norm, start, project, loss_fn)
            continue
        assert best_fooled is not None and best_loss is not None
        idx = torch.nonzero(~best_fooled).flatten()
        if idx.numel() == 0:
            break
        y_i = y[idx]
        cand = _run_once(
            model, x[idx], y_i, eps, steps, step, norm, None if start is None else start[idx], project, loss_fn
        )
        fooled, loss = _score(model, cand, y_i, loss_fn)
        better = fooled | (loss > best_loss[idx])
        sel = idx[better]
        best[sel] = cand[better]
        best_fooled[sel] = fooled[better]
        best_loss[sel] = loss[better]
    assert best is not None
    return best.detach()
