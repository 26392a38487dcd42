"""Adaptive attacks for quantized networks: BPDA through soft quantizers, PGD on temperature-scaled logits.

* **BPDA** (Athalye et al. 2018; Tramer et al. 2020): the forward pass stays exact (the
  hard rounding of every activation quantizer), only the backward pass differentiates a
  smooth surrogate, a soft staircase ``floor(v) + sigmoid(T (frac(v) - 1/2))`` rescaled to
  rise by exactly one per step, whose derivative averages 1 over a step like the
  straight-through estimator but follows where the rounding actually switches. It is put
  in by :func:`soft_quantizers`, a context manager that swaps the rounding module of each
  Brevitas activation quantizer below 8 bits and restores it on exit (the 8-bit input
  quantizer keeps its straight-through gradient: clean pixels sit exactly on its grid,
  where a soft staircase's slope is smallest; weight quantizers do not depend on the input).
* **Temperature-scaled PGD** (Gupta & Ajanthan 2020): low-bit networks saturate their
  softmax, so cross-entropy gradients vanish on confidently classified images; the logits
  are divided by their own standard deviation (detached, per example) before the loss.

Both run on :mod:`hw_dq.robust.engine`'s PGD.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from hw_dq.robust import engine

SOFT_TEMPERATURE = 4.0  # slope of the soft staircase; its derivative ranges 0.55..1.31 (mean 1) over a step
MAX_SOFT_BITS = 7  # quantizers of more bits keep the straight-through gradient


class _SoftRoundFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v: torch.Tensor, temperature: float) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(v)
        ctx.temperature = temperature
        return torch.round(v)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        (v,) = ctx.saved_tensors
        t = ctx.temperature
        s = torch.sigmoid(t * (v - torch.floor(v) - 0.5))
        span = torch.sigmoid(torch.tensor(t / 2)) - torch.sigmoid(torch.tensor(-t / 2))
        return grad * (t * s * (1 - s) / span.to(v.device)), None


class SoftRound(nn.Module):
    """Exact rounding forward; the derivative of a soft staircase backward (BPDA)."""

    def __init__(self, temperature: float = SOFT_TEMPERATURE) -> None:
        super().__init__()
        self.temperature = float(temperature)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return _SoftRoundFn.apply(v, self.temperature)


def _act_int_quants(model: nn.Module) -> list[nn.Module]:
    """The ``IntQuant`` modules of every activation quantizer below :data:`MAX_SOFT_BITS` + 1 bits."""
    from brevitas.core.quant import IntQuant
    from brevitas.nn.quant_layer import QuantNonLinearActLayer

    found = []
    for m in model.modules():
        if not isinstance(m, QuantNonLinearActLayer) or not m.act_quant.is_quant_enabled:
            continue
        bits = m.act_quant.bit_width()
        if bits is None or float(bits) > MAX_SOFT_BITS:
            continue
        found += [q for q in m.act_quant.modules() if isinstance(q, IntQuant)]
    return found


@contextmanager
def soft_quantizers(model: nn.Module, temperature: float = SOFT_TEMPERATURE) -> Iterator[int]:
    """Within the block, every low-bit activation quantizer rounds with :class:`SoftRound`.

    Yields how many quantizers were swapped (0 for a full-precision model). The forward
    output is unchanged (tested bit-identical); the original modules come back on exit.
    """
    swapped = [(q, q.float_to_int_impl) for q in _act_int_quants(model)]
    try:
        for q, _ in swapped:
            q.float_to_int_impl = SoftRound(temperature)
        yield len(swapped)
    finally:
        for q, old in swapped:
            q.float_to_int_impl = old


def temperature_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the logits divided by their per-example standard deviation (detached)."""
    scale = logits.detach().std(dim=1, keepdim=True).clamp_min(1e-6)
    return F.cross_entropy(logits / scale, target, reduction="none")


def bpda_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *, norm: str = "Linf",
             steps: int = 20, restarts: int = 1, generator: torch.Generator | None = None,
             temperature: float = SOFT_TEMPERATURE) -> torch.Tensor:  # fmt: skip
    """PGD whose gradients pass through soft quantizers (exact forward): BPDA."""
    with soft_quantizers(model, temperature):
        return engine.pgd(model, x, y, eps, steps=steps, restarts=restarts, norm=norm, generator=generator)


def temperature_pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    *,
    norm: str = "Linf",
    steps: int = 20,
    restarts: int = 1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """PGD on temperature-scaled logits (Gupta & Ajanthan 2020), straight-through gradients."""
    return engine.pgd(model, x, y, eps, steps=steps, restarts=restarts, norm=norm, generator=generator,
                      loss_fn=temperature_ce)  # fmt: skip
