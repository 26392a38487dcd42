"""Threshold margin and threshold noise: training terms for the rounding thresholds of quantized activations.

A k-bit activation changes level only where its input crosses one of the 2^k - 1 thresholds (FINN's
MultiThreshold); an input perturbation that moves no pre-activation across one changes nothing
downstream. The straight-through estimator that adversarial training differentiates through treats the
rounding as the identity, so neither the training attack nor the update sees where the thresholds are.
This term does: for each quantized ReLU's input ``u`` in units of its step, it penalises the distance to
the nearest threshold below half a step, ``(1 - 2 d)^2`` (1 on a threshold, 0 at a level's centre or
beyond the range). Written here because no quantization library offers it: it is bin regularisation
(Han et al. 2021) aimed at the thresholds instead of the levels' spread.

Threshold noise asks the opposite of the network: instead of keeping inputs off the thresholds, it
makes it tolerate crossings. In training, each quantized ReLU's input gets uniform noise of up to
``tau`` steps before rounding, so the inputs within ``tau`` of a threshold land on either side at
random, as an attack would push them (noise injection, as in QuantNoise, Fan et al. 2021, aimed here at
level flips rather than at the weights). Evaluation and export are unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from brevitas import nn as qnn
from torch import nn

from hw_dq.nn.quant import act_range


def threshold_distance(u: torch.Tensor, levels: int) -> torch.Tensor:
    """Distance of ``u`` (in steps) to the nearest of the thresholds 0.5, 1.5, ..., levels - 0.5."""
    nearest = (torch.round(u - 0.5) + 0.5).clamp(0.5, levels - 0.5)
    return (u - nearest).abs()


def penalty(u: torch.Tensor, levels: int) -> torch.Tensor:
    """Mean over the elements of ``(1 - 2 d)^2``, d the distance to a threshold capped at half a step (so an
    element half a step or more from every threshold adds 0)."""
    return (1.0 - 2.0 * threshold_distance(u, levels).clamp(max=0.5)).pow(2).mean()


def _levels(act: nn.Module) -> int:
    """The top level 2^k - 1 of a quantized activation (its range is that many steps)."""
    return 2 ** int(act.act_quant.bit_width()) - 1


def _quantized_acts(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, qnn.QuantReLU) and act_range(m) is not None]


@contextmanager
def recording(model: nn.Module, enabled: bool = True) -> Iterator[list[tuple[nn.Module, torch.Tensor]]]:
    """Collect, for the model's last forward pass, each quantized ReLU and its input (for :func:`margin_loss`).

    Every forward of ``model`` starts the list afresh, so after an adversarial loss (attack forwards,
    then the update's) it holds the update forward's terms. Yields an empty list when ``enabled`` is
    False or the model quantizes no activation."""
    terms: list[tuple[nn.Module, torch.Tensor]] = []
    acts = _quantized_acts(model) if enabled else []
    if not acts:
        yield terms
        return

    def restart(_m: nn.Module, _args: tuple) -> None:
        terms.clear()

    def record(m: nn.Module, args: tuple) -> None:
        terms.append((m, args[0]))  # the penalty is computed once, for the forward that is kept

    handles = [model.register_forward_pre_hook(restart)]
    handles += [a.register_forward_pre_hook(record) for a in acts]
    try:
        yield terms
    finally:
        for h in handles:
            h.remove()


@contextmanager
def threshold_noise(model: nn.Module, tau: float, gen: torch.Generator | None) -> Iterator[None]:
    """While active, each quantized ReLU of ``model`` in training mode rounds its input plus uniform noise
    in [-tau, tau] steps (drawn from ``gen``); nothing changes in eval mode or when ``tau`` is 0."""
    acts = _quantized_acts(model) if tau > 0 else []

    def perturb(m: nn.Module, args: tuple) -> tuple | None:
        if not m.training:
            return None
        z = args[0]
        step = torch.as_tensor(act_range(m)).detach() / _levels(m)
        # drawn on the CPU and moved, as the attack engine's starts are: a GPU run draws the same noise
        noise = (torch.rand(z.shape, generator=gen) * 2.0 - 1.0).to(z)
        return (z + noise * (tau * step), *args[1:])

    handles = [a.register_forward_pre_hook(perturb) for a in acts]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def margin_loss(recorded: list[tuple[nn.Module, torch.Tensor]], weight: float) -> torch.Tensor | None:
    """``weight`` times the mean over the recorded activations of their inputs' penalty; None when none is."""
    if not recorded:
        return None
    terms = [penalty(z * (_levels(m) / act_range(m)), _levels(m)) for m, z in recorded]
    return weight * torch.stack(terms).mean()
