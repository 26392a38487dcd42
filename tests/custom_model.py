"""A user's own small Brevitas network (for ``hw-dq train --model tests.custom_model:SmallBrevitasNet``)."""

from __future__ import annotations

import brevitas.nn as qnn
import torch
from torch import nn

from hw_dq.nn.quant import ACT_MAX, INPUT_BITS, FixedRangeActQuant, WeightQuant


class SmallBrevitasNet(nn.Module):
    """uint8 input -> two QuantConv2d (+BN, QuantReLU, max-pool) -> QuantLinear, with hw-dq's quantizers.

    Written as a Brevitas user would write their own network: plain Brevitas layers, no hw-dq model code.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, channels: int = 8, bits: int = 2) -> None:
        super().__init__()
        c1, c2 = channels, 2 * channels

        def relu() -> nn.Module:
            return qnn.QuantReLU(act_quant=FixedRangeActQuant, bit_width=bits, max_val=ACT_MAX)

        self.input_quant = qnn.QuantIdentity(act_quant=FixedRangeActQuant, bit_width=INPUT_BITS, max_val=1.0)
        self.features = nn.Sequential(
            qnn.QuantConv2d(in_channels, c1, 3, bias=False, weight_quant=WeightQuant, weight_bit_width=bits),
            nn.BatchNorm2d(c1),
            relu(),
            nn.MaxPool2d(2),
            qnn.QuantConv2d(c1, c2, 3, bias=False, weight_quant=WeightQuant, weight_bit_width=bits),
            nn.BatchNorm2d(c2),
            relu(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            qnn.QuantLinear(c2 * 6 * 6, num_classes, bias=False, weight_quant=WeightQuant, weight_bit_width=bits)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.input_quant(x))
        return self.classifier(torch.flatten(x, 1))


class NotAModule:
    """Not a torch.nn.Module (``--model tests.custom_model:NotAModule`` must be refused)."""
