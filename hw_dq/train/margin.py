"""Threshold margin: a penalty on quantized pre-activations that lie near a rounding threshold.

A k-bit activation changes level only where its input crosses one of the 2^k - 1 thresholds (FINN's
MultiThreshold); an input perturbation that moves no pre-activation across one changes nothing
downstream. The straight-through estimator that adversarial training differentiates through treats the
rounding as the identity, so neither the training attack nor the update sees where the thresholds are.
This term does: for each quantized ReLU's input ``u`` in units of its step, it penalises the distance to
the nearest threshold below half a step, ``(1 - 2 d)^2`` (1 on a threshold, 0 at a level's centre or
beyond the range). Written here because no quantization library offers it: it is bin regularisation
(Han et al. 2021) aimed at the thresholds instead of the levels' spread.
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
    """Mean of ``(1 - 2 d)^2`` over the elements closer than half a step to a threshold (d: the distance)."""
    return (1.0 - 2.0 * threshold_distance(u, levels).clamp(max=0.5)).pow(2).mean()


def _quantized_acts(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, qnn.QuantReLU) and act_range(m) is not None]


@contextmanager
def recording(model: nn.Module, enabled: bool = True) -> Iterator[list[torch.Tensor]]:
    """Collect, for the model's last forward pass, the penalty of each quantized ReLU's input.

    Every forward of ``model`` starts the list afresh, so after an adversarial loss (attack forwards,
    then the update's) it holds the update forward's terms. Yields an empty list when ``enabled`` is
    False or the model quantizes no activation."""
    terms: list[torch.Tensor] = []
    acts = _quantized_acts(model) if enabled else []
    if not acts:
        yield terms
        return

    def restart(_m: nn.Module, _args: tuple) -> None:
        terms.clear()

    def record(m: nn.Module, args: tuple) -> None:
        r = act_range(m)
        levels = 2 ** int(m.act_quant.bit_width()) - 1
        terms.append(penalty(args[0] * (levels / r), levels))

    handles = [model.register_forward_pre_hook(restart)]
    handles += [a.register_forward_pre_hook(record) for a in acts]
    try:
        yield terms
    finally:
        for h in handles:
            h.remove()


def margin_loss(terms: list[torch.Tensor], weight: float) -> torch.Tensor | None:
    """``weight`` times the mean of the recorded terms; None when there is none."""
    return weight * torch.stack(terms).mean() if terms else None
