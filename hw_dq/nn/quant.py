"""Brevitas building blocks shared by every model: one code path for FP, VQ and DQ.

A :class:`QuantSpec` with ``wbits``/``abits`` set to ``None`` turns the quantizers off
(full precision); the architecture, initialisation and training code stay the same.

* weights: signed, narrow-range integers with a per-output-channel scale taken from the
  max |w| (so low-bit weights never all round to zero), binary {-s, +s} at 1 bit;
* activations: unsigned uniform quantizer on [0, r] with 2^k levels (step r / (2^k - 1)), a
  straight-through estimator inside the range. ``act_range="learned"`` (scheme 2, the default):
  r is one trainable parameter per activation (PACT-style; Brevitas ``PARAMETER_FROM_STATS``),
  set from a bit-width-dependent percentile of the first training batches, then learned.
  ``act_range="fixed"`` (scheme 1): ReLU6, r = 6 (1-bit levels {0, 6}: most activations die);
* input: unsigned 8-bit with the fixed scale 1/255, so [0, 1] images map exactly onto the
  UINT8 pixels that a FINN accelerator takes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import brevitas.nn as qnn
import torch
from brevitas.core.bit_width import BitWidthImplType
from brevitas.core.quant import QuantType
from brevitas.core.restrict_val import FloatToIntImplType, RestrictValueType
from brevitas.core.scaling import ParameterFromRuntimeStatsScaling, ScalingImplType
from brevitas.core.zero_point import ZeroZeroPoint
from brevitas.inject.enum import StatsOp
from brevitas.quant.solver import ActQuantSolver, WeightQuantSolver
from dependencies import value
from torch import nn
from torch.nn import functional as F  # noqa: N812

from hw_dq.errors import CheckpointError, ConfigError, HwDqError

MIN_BITS, MAX_BITS = 1, 8
ACT_MAX = 6.0  # ReLU6
INPUT_BITS = 8
FLOAT_NAMES = ("float", "fp", "fp32", "32")
ACT_RANGES = ("fixed", "learned")
# Stored in every run directory: a checkpoint is only meaningful under the quantizers that
# trained it. Add a scheme (never edit one) whenever a quantizer's definition (scales, levels,
# rounding, initialisation) changes; SCHEMES maps each stamp to the act_range it implies.
SCHEME_FIXED = "hw-dq-quant/1 (weights: per-channel max|w| scale; acts: ReLU6 [0,6] const; input: uint8 1/255)"
SCHEME_LEARNED = (
    "hw-dq-quant/2 (weights: per-channel max|w| scale; acts: ReLU [0,r] per-tensor learned r, "
    "init bit-width percentile; input: uint8 1/255)"
)
SCHEMES = {SCHEME_FIXED: "fixed", SCHEME_LEARNED: "learned"}
# Percentile of the first batches' activations that initialises a learned range, per bit width:
# the clipping point that minimises the quantization MSE of ReLU(N(0, 1)) (computed numerically:
# r = 1.23, 1.95, 2.48, 2.89 sigma for 1..4 bits), capped at 99.9 for >= 5 bits. At 1 bit the
# threshold r/2 then sits near 0.6 sigma, so about a quarter of the activations fire instead of ~0.
INIT_PERCENTILE = {1: 89.0, 2: 97.5, 3: 99.3, 4: 99.8}
CALIBRATION_STEPS = 20  # training batches whose statistics initialise a learned range
MIN_RANGE = 1e-3  # a learned range below this (or not finite) has collapsed: every activation is 0


def quant_scheme(act_range: str = "learned") -> str:
    """The scheme stamp of a model whose activations use ``act_range``."""
    if act_range not in ACT_RANGES:
        raise ConfigError(f"unknown activation range {act_range!r}; choose one of {', '.join(ACT_RANGES)}")
    return SCHEME_FIXED if act_range == "fixed" else SCHEME_LEARNED


def act_range_of_scheme(stamp: str, where: object = "this run") -> str:
    """The ``act_range`` a stored scheme stamp implies; an unknown stamp is a one-line CheckpointError."""
    if stamp not in SCHEMES:
        raise CheckpointError(
            f"{where} was trained with quantizers '{stamp}' but this hw-dq knows only "
            f"'{SCHEME_FIXED}' and '{SCHEME_LEARNED}'; retrain it, or use the hw-dq version that wrote it"
        )
    return SCHEMES[stamp]


# Deprecated alias: the stamp of a new run with the default (learned) activation range. Stamp a
# run with quant_scheme(model_config.act_range) instead.
QUANT_SCHEME = SCHEME_LEARNED


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


class LearnedRange(ParameterFromRuntimeStatsScaling):
    """Brevitas' stats-initialised parameter scaling; a checkpoint without the range is not an error.

    A full-precision (or fixed-range) checkpoint fine-tuned into a learned-range model has no
    value for the range: it is then calibrated from the first training batches, as for a fresh
    model. Brevitas only offers this through a process-wide switch (IGNORE_MISSING_KEYS), which
    would also silence every other missing key, hence this one-key override.
    """

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errs)
        if prefix + "value" in missing_keys:
            missing_keys.remove(prefix + "value")


class LearnedRangeActQuant(FixedRangeActQuant):
    """Unsigned uniform quantizer on [0, r], r a per-tensor parameter (scale r / (2^k - 1)).

    The gradient reaches r through Brevitas' straight-through rounding (PACT / LSQ style).
    Exported as a Quant node with a constant scale, which FINN's streamlining turns into
    MultiThreshold exactly as for the fixed range.
    """

    scaling_impl_type = ScalingImplType.PARAMETER_FROM_STATS
    scaling_impl = LearnedRange
    scaling_stats_op = StatsOp.PERCENTILE
    collect_stats_steps = CALIBRATION_STEPS
    scaling_min_val = None

    @value
    def high_percentile_q(bit_width):  # noqa: N805 (brevitas injector signature)
        return INIT_PERCENTILE.get(int(bit_width), 99.9)


class RangeCollapseError(HwDqError):
    """A learned activation range collapsed to zero or became non-finite during training."""


def _live_range(impl: LearnedRange) -> torch.Tensor:
    """The learned parameter; during calibration (before r is a parameter) the running statistic."""
    calibrating = impl.counter <= impl.collect_stats_steps
    return impl.buffer if calibrating and impl.counter > 0 else impl.value


def learned_ranges(model: nn.Module) -> dict[str, torch.Tensor]:
    """The clipping max r of every learned-range activation, by module name (live tensors)."""
    return {
        name.split(".act_quant")[0]: _live_range(m) for name, m in model.named_modules() if isinstance(m, LearnedRange)
    }


def act_range(act: nn.Module) -> torch.Tensor | float | None:
    """The span ``scale * (2^k - 1)`` of a quantized activation module (the clipping max r of an unsigned
    one; a live, differentiable tensor when learned); None for anything that does not quantize."""
    if not isinstance(act, qnn.QuantReLU | qnn.QuantIdentity) or not act.act_quant.is_quant_enabled:
        return None
    for m in act.modules():
        if isinstance(m, LearnedRange):
            return _live_range(m).abs()  # Brevitas uses |value|
    with torch.no_grad():  # a constant scale: evaluating it has no side effect
        return float(act.act_quant.scale()) * (2 ** int(act.act_quant.bit_width()) - 1)


def check_ranges(model: nn.Module) -> None:
    """Raise :class:`RangeCollapseError` (one line, naming the layer) when a learned range is ~0 or not finite."""
    for name, r in learned_ranges(model).items():
        v = abs(float(r.detach().reshape(-1)[0]))  # Brevitas uses |value|
        if not math.isfinite(v) or v < MIN_RANGE:
            raise RangeCollapseError(
                f"the learned activation range of {name} collapsed to {v:.3g} (every activation there is 0); "
                "lower --lr or use act_range fixed (the last good checkpoint is intact)"
            )


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
    """Bit widths and activation range of one model; ``None`` means full precision."""

    wbits: int | None
    abits: int | None
    act_range: str = "learned"
    bn_gain_max: float | None = None  # BatchNorm's inference gain bounded to [0, bn_gain_max]

    def __post_init__(self) -> None:
        parse_bits(self.wbits, "weight bit width")
        parse_bits(self.abits, "activation bit width")
        quant_scheme(self.act_range)  # validates
        g = self.bn_gain_max
        if g is not None and not (math.isfinite(g) and g > 0):
            raise ConfigError(f"invalid bn_gain_max {g}: use a positive number (or none for plain BatchNorm)")

    def with_wbits(self, bits: int | None) -> QuantSpec:
        """The same spec with other weight bits (when weights are quantized at all): mixed precision."""
        if self.wbits is None or bits is None:
            return self
        return replace(self, wbits=bits)

    def bn(self, c: int, dims: int = 2) -> nn.Module:
        """BatchNorm over ``c`` channels (2d) or features (1d); gain-bounded when ``bn_gain_max`` is set."""
        if self.bn_gain_max is None:
            return nn.BatchNorm2d(c) if dims == 2 else nn.BatchNorm1d(c)
        return (BoundedBatchNorm2d if dims == 2 else BoundedBatchNorm1d)(c, gain_max=self.bn_gain_max)

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
        """ReLU quantized to ``abits`` on [0, r] (a float ReLU6 at full precision)."""
        if self.abits is None:
            return nn.Hardtanh(0.0, ACT_MAX)
        if self.act_range == "learned":
            return qnn.QuantReLU(act_quant=LearnedRangeActQuant, bit_width=self.abits, return_quant_tensor=False)
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


class _BoundedGain:
    """BatchNorm whose inference gain ``gamma / sqrt(running_var + eps)`` stays within [0, gain_max].

    Training forwards use ``clamp(gamma, 0, gain_max * sqrt(running_var + eps))`` (out of place, so
    several forwards may share one backward); switching to eval writes the clamped gamma into the
    parameter, so that inference, export and FINN see an ordinary BatchNorm with a bounded gain.
    """

    gain_max: float

    def bounded_weight(self) -> torch.Tensor:
        top = self.gain_max * torch.sqrt(self.running_var + self.eps)
        return torch.minimum(self.weight.clamp(min=0.0), top)

    def bound_(self) -> None:
        with torch.no_grad():
            self.weight.copy_(self.bounded_weight())

    def train(self, mode: bool = True):  # noqa: D102
        if not mode:
            self.bound_()
        return super().train(mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if not self.training:
            return super().forward(x)
        self._check_input_dim(x)
        if self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        mom = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.bounded_weight(), self.bias, True, mom, self.eps
        )


class BoundedBatchNorm2d(_BoundedGain, nn.BatchNorm2d):
    """:class:`nn.BatchNorm2d` with a bounded inference gain (see :class:`_BoundedGain`)."""

    def __init__(self, c: int, gain_max: float):
        super().__init__(c)
        self.gain_max = float(gain_max)


class BoundedBatchNorm1d(_BoundedGain, nn.BatchNorm1d):
    """:class:`nn.BatchNorm1d` with a bounded inference gain (see :class:`_BoundedGain`)."""

    def __init__(self, c: int, gain_max: float):
        super().__init__(c)
        self.gain_max = float(gain_max)
