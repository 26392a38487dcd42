"""Brevitas building blocks shared by every model: one code path for FP, VQ and DQ.

A :class:`QuantSpec` with ``wbits``/``abits`` set to ``None`` turns the quantizers off
(full precision); the architecture, initialisation and training code stay the same.

* weights: signed, narrow-range integers with a per-output-channel scale taken from the
  max |w| (so low-bit weights never all round to zero), binary {-s, +s} at 1 bit;
* activations: ReLU6-clipped uniform quantizer on [0, 6] with 2^k - 1 levels (step
  6 / (2^k - 1)), a straight-through estimator inside the range;
* input: unsigned 8-bit with the fixed scale 1/255, so [0, 1] images map exactly onto the
  UINT8 pixels that a FINN accelerator takes.
"""

from __future__ import annotations

from dataclasses import dataclass

import brevitas.nn as qnn
from brevitas.core.bit_width import BitWidthImplType
from brevitas.core.quant import QuantType
from brevitas.core.restrict_val import FloatToIntImplType, RestrictValueType
from brevitas.core.scaling import ScalingImplType
from brevitas.core.zero_point import ZeroZeroPoint
from brevitas.inject.enum import StatsOp
from brevitas.quant.solver import ActQuantSolver, WeightQuantSolver
from dependencies import value
from torch import nn

from hw_dq.errors import ConfigError

MIN_BITS, MAX_BITS = 1, 8
ACT_MAX = 6.0  # ReLU6
INPUT_BITS = 8
FLOAT_NAMES = ("float", "fp", "fp32", "32")
# Stored in every run directory: a checkpoint is only meaningful under the quantizers that
# trained it. Bump this whenever a quantizer's definition (scales, levels, rounding) changes.
QUANT_SCHEME = "hw-dq-quant/1 (weights: per-channel max|w| scale; acts: ReLU6 [0,6] const; input: uint8 1/255)"


class WeightQuant(WeightQuantSolver):
    """Signed narrow-range integer weights, per-output-channel scale = max |w| / (2^(k-1)-1)."""

    bit_width_impl_type = BitWidthImplType.CONST
    scaling_impl_type = ScalingImplType.STATS
    scaling_stats_op = StatsOp.MAX
    scaling_per_output_channel = True
    restrict_scaling_type = RestrictValueType.FP
    zero_point_impl = ZeroZeroPoint
    float_to_int_impl_type = FloatToIntImplType.ROUND
    narrow_range = True
    signed = True

    @value
    def quant_type(bit_width):  # noqa: N805 (brevitas injector signature)
        return QuantType.BINARY if bit_width == 1 else QuantType.INT


class FixedRangeActQuant(ActQuantSolver):
    """Unsigned uniform quantizer on [0, max_val] with a constant scale max_val / (2^k - 1)."""

    bit_width_impl_type = BitWidthImplType.CONST
    scaling_impl_type = ScalingImplType.CONST
    scaling_per_output_channel = False
    restrict_scaling_type = RestrictValueType.FP
    zero_point_impl = ZeroZeroPoint
    float_to_int_impl_type = FloatToIntImplType.ROUND
    quant_type = QuantType.INT
    narrow_range = False
    signed = False
    min_val = 0.0


def parse_bits(value: str | int | None, what: str = "bit width") -> int | None:
    """``'float'`` (or None) -> None; ``'1'``..``'8'`` -> int. Anything else is a ConfigError."""
    if value is None:
        return None
    text = str(value).strip().lower()
    if text in FLOAT_NAMES:
        return None
    try:
        bits = int(text)
    except ValueError:
        bits = -1
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ConfigError(f"invalid {what} {value!r}: use an integer {MIN_BITS}..{MAX_BITS} or 'float'")
    return bits


def bits_label(bits: int | None) -> str:
    return "float" if bits is None else str(bits)


@dataclass(frozen=True)
class QuantSpec:
    """Bit widths of one model; ``None`` means full precision."""

    wbits: int | None
    abits: int | None

    def __post_init__(self) -> None:
        parse_bits(self.wbits, "weight bit width")
        parse_bits(self.abits, "activation bit width")

    @property
    def is_float(self) -> bool:
        return self.wbits is None and self.abits is None

    @property
    def tag(self) -> str:
        if self.is_float:
            return "fp"
        return f"w{bits_label(self.wbits)}a{bits_label(self.abits)}"

    def conv(self, cin: int, cout: int, k: int, stride: int = 1, padding: int = 0) -> qnn.QuantConv2d:
        return qnn.QuantConv2d(
            cin, cout, k, stride=stride, padding=padding, bias=False,
            weight_quant=WeightQuant if self.wbits else None,
            weight_bit_width=self.wbits,
        )  # fmt: skip

    def linear(self, cin: int, cout: int) -> qnn.QuantLinear:
        return qnn.QuantLinear(
            cin, cout, bias=False,
            weight_quant=WeightQuant if self.wbits else None,
            weight_bit_width=self.wbits,
        )  # fmt: skip

    def act(self) -> nn.Module:
        """ReLU6, quantized to ``abits`` (a float ReLU6 at full precision)."""
        if self.abits is None:
            return nn.Hardtanh(0.0, ACT_MAX)
        return qnn.QuantReLU(
            act_quant=FixedRangeActQuant, bit_width=self.abits, max_val=ACT_MAX,
            return_quant_tensor=False,
        )  # fmt: skip

    def input_quant(self) -> nn.Module:
        """8-bit input quantizer with scale 1/255 (identity at full precision)."""
        if self.is_float:
            return nn.Identity()
        return qnn.QuantIdentity(
            act_quant=FixedRangeActQuant, bit_width=INPUT_BITS, max_val=1.0,
            return_quant_tensor=False,
        )  # fmt: skip
