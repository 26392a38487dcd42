"""Feature squeezing (Xu, Evans, Qi 2018) as composable input defenses, attacked in the loop.

* ``bits:k``   bit-depth reduction to k bits: ``round(x * (2^k - 1)) / (2^k - 1)``. That is
  exactly a uniform unsigned quantizer on [0, 1] with scale ``1 / (2^k - 1)``, i.e. the
  model's own Brevitas input quantizer at k bits instead of 8. When it is the last squeezer
  of a chain it *replaces* the model's input quantizer, so on a FINN accelerator it costs
  nothing (the input stream is just k bits wide).
* ``median:k`` k x k median smoothing (the window and the upper median of scipy's
  ``median_filter``, ``mode="mirror"`` borders).

Attacks see the whole pipeline. The backward pass of every squeezer is the straight-through
estimator (identity), as in BPDA (Athalye et al. 2018): rounding has a zero gradient
almost everywhere and the median's exact gradient reaches one pixel per window, either of
which would mask gradients and overstate the defense.
"""

from __future__ import annotations

import copy

import brevitas.nn as qnn
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from hw_dq.errors import ConfigError
from hw_dq.nn.quant import FixedRangeActQuant

SQUEEZERS = ("bits", "median")


def bit_depth_quantizer(bits: int) -> nn.Module:
    """A Brevitas k-bit input quantizer on [0, 1] (scale 1/(2^k-1), straight-through)."""
    return qnn.QuantIdentity(act_quant=FixedRangeActQuant, bit_width=bits, max_val=1.0, return_quant_tensor=False)


def bit_depth_reference(x: torch.Tensor, bits: int) -> torch.Tensor:
    """The textbook squeezer ``round(x * (2^k - 1)) / (2^k - 1)`` (for checks)."""
    levels = 2**bits - 1
    return torch.round(x.clamp(0, 1) * levels) / levels


class MedianSmoothing(nn.Module):
    """k x k median filter per channel with a straight-through (identity) gradient."""

    def __init__(self, k: int):
        super().__init__()
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.k
        left, right = k // 2, (k - 1) // 2
        xp = F.pad(x, (left, right, left, right), mode="reflect")
        patches = xp.unfold(2, k, 1).unfold(3, k, 1).reshape(*x.shape, k * k)
        med = patches.sort(dim=-1).values[..., (k * k) // 2]
        return x + (med - x).detach()


class Squeezed(nn.Module):
    """``model(pre(x))``: input squeezers in front of a model (attacks see both)."""

    def __init__(self, pre: nn.Module, model: nn.Module):
        super().__init__()
        self.pre = pre
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.pre(x))


def parse(spec: str) -> list[tuple[str, int]]:
    """``"bits:4+median:2"`` -> ``[("bits", 4), ("median", 2)]`` (applied left to right)."""
    out = []
    for part in spec.split("+"):
        name, _, arg = part.strip().partition(":")
        if name not in SQUEEZERS:
            raise ConfigError(f"unknown squeezer {name!r} in {spec!r}; use bits:K (1..8) and/or median:K (2..5)")
        try:
            k = int(arg)
        except ValueError:
            raise ConfigError(f"squeezer {part!r} needs an integer, e.g. bits:4 or median:2") from None
        if (name == "bits" and not 1 <= k <= 8) or (name == "median" and not 2 <= k <= 5):
            raise ConfigError(f"invalid squeezer {part!r}: bits takes 1..8, median 2..5")
        out.append((name, k))
    return out


def apply_defense(model: nn.Module, spec: str) -> nn.Module:
    """A copy of ``model`` with the squeezers of ``spec`` in front (see module doc)."""
    steps = parse(spec)
    model = copy.deepcopy(model)
    if steps[-1][0] == "bits" and hasattr(model, "input_quant"):
        model.input_quant = bit_depth_quantizer(steps[-1][1])  # exactly the squeezer, free on the FPGA
        steps = steps[:-1]
    if not steps:
        return model.eval()
    pre = nn.Sequential(*(bit_depth_quantizer(k) if n == "bits" else MedianSmoothing(k) for n, k in steps))
    return Squeezed(pre, model).eval()
