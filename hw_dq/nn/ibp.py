"""Interval bound propagation (IBP) through the Brevitas models, and a certified-training loss.

IBP (Gowal et al. 2018) carries an input box through the network: a conv/linear layer maps the
box's centre through W and its radius through |W|; BatchNorm is a per-channel affine map (its
sign decides which end goes where); every quantizer and clipped ReLU is monotone, so the box's
two ends pass through the module itself: quantized weights and activations keep Brevitas'
straight-through gradients, and the bounds are those of the quantized network. The last linear
layer is applied to the logit differences ``z_y - z_j`` (rows ``w_y - w_j``), tighter than two
logit bounds. ``ibp_loss`` mixes the clean cross-entropy with the worst-case one, with the usual
eps ramp (:func:`eps_schedule`).

Why not a bound library: auto_LiRPA (the maintained one) needs torch < 1.13 on PyPI (0.3), not the
pinned torch 2.x, and it has no rule for Brevitas' quantizers; the models here are plain chains
(input quantizer, ``features``, flatten, ``classifier``), which a short walk covers exactly.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from hw_dq.errors import ConfigError

SLACK = 1e-5  # widening before each quantizer: float rounding of the bounds never flips a level


def _weight(m: nn.Module) -> torch.Tensor:
    """The (quantized, straight-through) weight a Brevitas layer uses in its forward."""
    qw = getattr(m, "quant_weight", None)
    w = qw() if callable(qw) else m.weight
    return w.value if hasattr(w, "value") else w


def _is_quant_act(m: nn.Module) -> bool:
    import brevitas.nn as qnn

    return isinstance(m, qnn.QuantIdentity | qnn.QuantReLU | qnn.QuantHardTanh)


def _affine_bn(m: nn.modules.batchnorm._BatchNorm, pt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) of a BatchNorm: running statistics in eval mode; in training mode the batch
    statistics of the clean point ``pt``, the affine map the clean forward applies (running statistics
    are left to the clean forward).

    Not the statistics of the box centres: once intervals are wide, every centre sits mid-range, their
    variance shrinks, and the division by it widens the next interval further. Measured on a CNV after
    12 epochs of certified training with centre statistics: relative widths of 4e5 from the sixth layer
    in training mode against 5-8 in eval mode (auto_LiRPA also normalises bounds with the clean batch).
    """
    gamma = m.bounded_weight() if hasattr(m, "bounded_weight") else m.weight
    if m.training:
        dims = [0] + list(range(2, pt.dim()))
        mean, var = pt.mean(dims), pt.var(dims, unbiased=False)
    else:
        mean, var = m.running_mean, m.running_var
    scale = gamma / torch.sqrt(var + m.eps)
    return scale, m.bias - mean * scale


def _shape(v: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return v.reshape(1, -1, *([1] * (c.dim() - 2)))


Bounds = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # lower, upper, the clean point


def _clipped_relu(m: nn.Module) -> bool:
    """An activation that is a ReLU clipped at a maximum: a quantized ReLU, or the float ReLU6 (Hardtanh(0, r))."""
    import brevitas.nn as qnn

    return isinstance(m, qnn.QuantReLU) or (isinstance(m, nn.Hardtanh) and m.min_val == 0.0)


def _relu_grad(v: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out``'s value with a ReLU's gradient in ``v``: 1 above 0, also above the clipping range."""
    r = F.relu(v)
    return r + (out - r).detach()


def _layer(
    m: nn.Module,
    lo: torch.Tensor,
    hi: torch.Tensor,
    pt: torch.Tensor,
    update_stats: bool = False,
    relu_grad: bool = False,
) -> Bounds:
    """Bounds through one module, and the clean point ``pt`` (whose batch statistics BatchNorm uses in
    training mode) through the same module; ``update_stats``: the point is the clean forward, and
    BatchNorm's running statistics take its batch statistics as the module's own forward would;
    ``relu_grad``: the bounds (not the point) get a ReLU's gradient through a clipped activation."""
    if isinstance(m, nn.Conv2d | nn.Linear):
        w = _weight(m)
        c, r = (hi + lo) / 2, (hi - lo) / 2
        n = c.shape[0]
        if isinstance(m, nn.Conv2d):
            kw = dict(stride=m.stride, padding=m.padding, dilation=m.dilation, groups=m.groups)
            both, rr = F.conv2d(torch.cat([c, pt]), w, m.bias, **kw), F.conv2d(r, w.abs(), None, **kw)
        else:
            both, rr = F.linear(torch.cat([c, pt]), w, m.bias), F.linear(r, w.abs())
        cc, pt = both[:n], both[n:]
        return cc - rr, cc + rr, pt
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        c, r = (hi + lo) / 2, (hi - lo) / 2
        scale, shift = _affine_bn(m, pt)
        cc, rr = c * _shape(scale, c) + _shape(shift, c), r * _shape(scale.abs(), c)
        pt = m(pt) if update_stats and m.training else pt * _shape(scale, pt) + _shape(shift, pt)
        return cc - rr, cc + rr, pt
    if _is_quant_act(m):
        n = lo.shape[0]
        lo, hi = lo - SLACK * (1 + lo.abs()), hi + SLACK * (1 + hi.abs())
        out = m(torch.cat([lo, hi, pt]))  # monotone: the ends map to the ends
        out = out.value if hasattr(out, "value") else out
    elif isinstance(m, nn.Hardtanh | nn.ReLU | nn.ReLU6 | nn.MaxPool2d | nn.Identity | nn.Flatten):
        n = lo.shape[0]
        out = m(torch.cat([lo, hi, pt]))
    else:
        raise ConfigError(f"IBP has no rule for {type(m).__name__}; supported models: cnv, tiny")
    if relu_grad and _clipped_relu(m):
        return _relu_grad(lo, out[:n]), _relu_grad(hi, out[n : 2 * n]), out[2 * n :]
    return out[:n], out[n : 2 * n], out[2 * n :]
    raise ConfigError(f"IBP has no rule for {type(m).__name__}; supported models: cnv, tiny")


def _chain(model: nn.Module) -> tuple[list[nn.Module], nn.Module]:
    """The modules of a cnv/tiny model in forward order (flatten included), and its last linear layer."""
    parts = [getattr(model, k, None) for k in ("input_quant", "features", "classifier")]
    if any(p is None for p in parts) or not isinstance(parts[2], nn.Sequential):
        raise ConfigError(f"IBP supports the chain models (cnv, tiny), not {type(model).__name__}")
    mods = [parts[0], *parts[1], nn.Flatten(), *parts[2]]
    last = mods[-1]
    if not isinstance(last, nn.Linear):
        raise ConfigError("IBP needs the classifier to end with a linear layer")
    return mods[:-1], last


def ibp_bounds(model: nn.Module, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower and upper bounds of the logits for inputs in the box ``[lo, hi]``."""
    mods, last = _chain(model)
    pt = (lo + hi) / 2
    for m in mods:
        lo, hi, pt = _layer(m, lo, hi, pt)
    return _layer(last, lo, hi, pt)[:2]


def _box(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    if not (math.isfinite(eps) and eps >= 0):
        raise ConfigError(f"invalid IBP eps {eps}: must be a finite number >= 0 (input units, [0, 1] images)")
    return (x - eps).clamp(0.0, 1.0), (x + eps).clamp(0.0, 1.0)


def ibp_margins_and_logits(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    record: list | None = None,
    relax_input: bool = False,
    relu_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`ibp_margins` and the clean logits ``model(x)`` from one pass: the clean point rides along
    the bounds (BatchNorm needs it anyway in training mode), and in training mode it is the clean
    forward, updating BatchNorm's running statistics once as ``model(x)`` would. Certified training's
    step; it saves the separate clean forward (13% of the step's time on the half-width CNV at batch 128,
    ``benchmarks/results/robust_step.md``)."""
    return _margins(model, x, y, eps, record, update_stats=True, relax_input=relax_input, relu_grad=relu_grad)


def ibp_margins(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    record: list | None = None,
    relax_input: bool = False,
    relu_grad: bool = False,
) -> torch.Tensor:
    """Lower bounds of ``z_y - z_j`` (N x C, zero at j = y) over the Linf box of radius ``eps``
    (in input units, e.g. 2/255) around ``x``: the last linear layer on the differences. No side
    effect on the model (BatchNorm's running statistics stay as they are).

    ``record``: a list that gets the input box and then the bounds entering every activation
    quantizer after the first layer (the pre-activations :func:`warmup_reg` looks at).

    ``relax_input``: the box enters the first layer as it is, not rounded by the input quantizer to
    whole 1/255 levels. A bound for training only: the rounded box is what the accelerator sees,
    and with it a radius below half a level is no box at all (every pixel rounds back to itself), so
    an eps ramp is a staircase of whole levels: nothing is trained while eps < 0.5/255, then the
    box jumps to +-1 level. The relaxed box grows with eps, and it contains the rounded one's
    centre and all but the last half level of its reach (``eps`` 2.2/255 covers 2 levels).

    ``relu_grad``: a training surrogate with the same values. Through a clipped activation (ReLU6, or
    a quantized ReLU on [0, r]) a bound above r has zero gradient, so once an interval covers the whole
    range nothing can shrink it; with ``relu_grad`` the bounds get a ReLU's gradient there (as in the
    unclipped ReLU networks IBP was designed for), the clean point keeps the module's own."""
    return _margins(model, x, y, eps, record, update_stats=False, relax_input=relax_input, relu_grad=relu_grad)[0]


def _margins(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    record: list | None,
    update_stats: bool,
    relax_input: bool = False,
    relu_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    mods, last = _chain(model)
    lo, hi = _box(x, eps)
    if record is not None:
        record.append((lo, hi))
    seen_layer, pt = False, x
    for i, m in enumerate(mods):
        seen_layer = seen_layer or isinstance(m, nn.Conv2d | nn.Linear)
        if record is not None and seen_layer and _is_quant_act(m):
            record.append((lo, hi))
        if relax_input and i == 0:  # the input quantizer: the point is rounded, the box passes as it is
            pt = m(pt)
            pt = pt.value if hasattr(pt, "value") else pt
            continue
        lo, hi, pt = _layer(m, lo, hi, pt, update_stats, relu_grad)
    w = _weight(last)  # C x K
    d = w[y].unsqueeze(1) - w.unsqueeze(0)  # N x C x K: w_y - w_j
    c, r = (hi + lo) / 2, (hi - lo) / 2
    lb = torch.einsum("nck,nk->nc", d, c) - torch.einsum("nck,nk->nc", d.abs(), r)
    if last.bias is not None:
        lb = lb + (last.bias[y].unsqueeze(1) - last.bias.unsqueeze(0))
    return lb, F.linear(pt, w, last.bias)


def certified_fraction(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> float:
    """Fraction of images whose IBP margins are all positive (certified for the float model)."""
    with torch.no_grad():
        lb = ibp_margins(model, x, y, eps)
        lb[torch.arange(len(y)), y] = 1.0
        return float((lb > 0).all(1).float().mean())


def ibp_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, kappa: float = 0.5) -> torch.Tensor:
    """``kappa * CE(clean) + (1 - kappa) * CE(worst case)`` (Gowal et al. 2018): the worst-case
    logits are ``-margins`` (the lower bounds of ``z_y - z_j``, 0 for the true class).

    ``eps`` in input units (a [0, 1] image's Linf radius, e.g. 2/255); at eps 0 the worst case
    is the clean CE of the logit differences. Call it in training mode; BatchNorm's running statistics
    see only clean images, once."""
    if not 0.0 <= kappa <= 1.0:
        raise ConfigError(f"invalid kappa {kappa}: must lie in [0, 1]")
    if kappa >= 1.0:
        return F.cross_entropy(model(x), y)
    margins, logits = ibp_margins_and_logits(model, x, y, eps)
    return kappa * F.cross_entropy(logits, y) + (1.0 - kappa) * F.cross_entropy(-margins, y)


@torch.no_grad()
def ibp_init_(model: nn.Module) -> int:
    """IBP initialisation (Shi et al. 2021): every conv/linear weight but the last ~ N(0, 2 pi / fan_in^2),
    so that an interval's radius keeps its size through each layer at the start instead of growing
    by about sqrt(fan_in). In place; returns how many layers it set."""
    mods, _ = _chain(model)
    n = 0
    for m in mods:
        if isinstance(m, nn.Conv2d | nn.Linear):
            fan_in = m.weight[0].numel()
            nn.init.normal_(m.weight, 0.0, math.sqrt(2 * math.pi) / fan_in)
            n += 1
    return n


def warmup_reg(record: list, tol: float = 0.5) -> torch.Tensor:
    """Shi et al. 2021's two warm-up regularisers over :func:`ibp_margins`' recorded bounds, averaged
    over the activation layers (0 when they hold).

    * tightness: ``relu(tol - t0 / t) / tol`` with ``t`` a layer's mean radius over the standard
      deviation of its centres and ``t0`` the same for the input box: an interval may grow at most
      1/tol times relative to the signal. (The original compares absolute radii with normalised
      inputs; here inputs are [0, 1] pixels, so both sides are relative.)
    * balance: for the neurons an interval proves active (lower > 0) and inactive (upper < 0), the
      ratios of their centres' mean magnitudes and of their spreads around the layer mean, each at
      least ``tol`` either way: IBP otherwise prefers dead activations."""
    (lo0, hi0), rest = record[0], record[1:]
    t0 = ((hi0 - lo0) / 2).mean() / ((hi0 + lo0) / 2).std().clamp_min(1e-12)
    total = torch.zeros((), device=lo0.device)
    for lo, hi in rest:
        c, r = (hi + lo) / 2, (hi - lo) / 2
        t = r.mean() / c.std().clamp_min(1e-12)
        total = total + F.relu(tol - t0 / t.clamp_min(1e-12)) / tol
        act, inact = (lo > 0).float(), (hi < 0).float()
        delta = (c - c.mean()) ** 2
        mean_ratio = (c * act).mean() / -(c * inact).mean()
        var_ratio = (delta * act).sum() / (delta * inact).sum()
        mean_ratio = torch.minimum(mean_ratio, 1 / mean_ratio.clamp_min(1e-12))
        var_ratio = torch.minimum(var_ratio, 1 / var_ratio.clamp_min(1e-12))
        bal = (F.relu(tol - mean_ratio) + F.relu(tol - var_ratio)) / tol
        if bool(torch.isfinite(bal)):  # a layer with no proven-inactive (or active) neuron has no ratio
            total = total + bal
    return total / max(1, len(rest))


@torch.no_grad()
def project_rows_(
    model: nn.Module, max_norm: float, *, target: str = "bn_folded", layers: list | None = None
) -> dict[str, float]:
    """Rescale every output channel whose row of the layer's operator has an l1 norm above ``max_norm``
    (in place; call after each optimizer step). Returns each layer's largest row norm before.

    The largest row l1 norm is a conv/linear layer's exact Linf-to-Linf operator norm: the factor by
    which an input box's radius can grow through it, which is what interval bounds pay per layer
    (the spectral norm of :func:`hw_dq.nn.lipschitz.project_` bounds it only up to sqrt(fan-in)).
    The operator is ``target``'s (:func:`hw_dq.nn.lipschitz.folded_operator`: the float weight,
    BN-folded, or also range-scaled, in which case it is the growth in integer codes). A layer with
    a BatchNorm is rescaled through that channel's gamma, one without through the channel's weights.
    ``layers``: the model's :func:`hw_dq.nn.lipschitz.lipschitz_layers`, when the caller has them.
    """
    from hw_dq.nn import lipschitz

    if not (math.isfinite(max_norm) and max_norm > 0):
        raise ConfigError(f"invalid row-norm bound {max_norm}: use a positive number")
    if target not in lipschitz.TARGETS:
        raise ConfigError(f"unknown Lipschitz target {target!r}; choose one of {', '.join(lipschitz.TARGETS)}")
    norms = {}
    for ref in lipschitz.lipschitz_layers(model) if layers is None else layers:
        w = ref.layer.weight
        rows = lipschitz.folded_operator(ref, w, target).abs().reshape(w.shape[0], -1).sum(1)
        norms[ref.name] = float(rows.max())
        factor = (max_norm / rows.clamp_min(1e-12)).clamp(max=1.0)
        if bool((factor < 1).any()):
            if ref.bn is not None and target != "weight":
                ref.bn.weight.mul_(factor.to(ref.bn.weight))
            else:
                w.mul_(factor.reshape(-1, *([1] * (w.dim() - 1))))
    return norms


SCHEDULES = ("linear", "smooth")


def eps_schedule(
    step: int, total: int, eps_max: float, warmup: float = 0.1, ramp: float = 0.5, shape: str = "linear"
) -> float:
    """IBP's eps ramp: 0 for the first ``warmup`` fraction of ``total`` steps, then a rise to ``eps_max``
    over the next ``ramp`` fraction, then ``eps_max``.

    ``linear``: a straight rise (Gowal et al. 2018). ``smooth``: the first quarter of the ramp rises as
    t^4 and joins the linear rest with the same slope, the schedule of Shi et al. 2021 and CROWN-IBP
    (eps is 7.7% of its maximum a quarter of the way in, 0.2% a tenth of the way in): the tiny radii at
    which the bounds are first trained grow slowly enough for the network to shrink its intervals.
    """
    if total <= 0 or eps_max < 0 or shape not in SCHEDULES:
        raise ConfigError(f"invalid eps schedule: total steps {total}, eps_max {eps_max}, shape {shape!r}")
    start, length = warmup * total, max(1.0, ramp * total)
    t = min(1.0, max(0.0, (step - start) / length))
    if shape == "smooth":
        # t^4 up to m, then linear; the factor a makes the two pieces meet with equal value and slope
        m, power = 0.25, 4
        a = 1.0 / (m**power + power * m ** (power - 1) * (1.0 - m))
        t = a * t**power if t < m else a * m**power + (1.0 - a * m**power) * (t - m) / (1.0 - m)
    return float(eps_max * t)


def kappa_schedule(
    step: int, total: int, kappa_end: float = 0.5, warmup: float = 0.1, ramp: float = 0.5, shape: str = "linear"
) -> float:
    """The clean-loss weight: 1 during the warm-up, then down to ``kappa_end`` with the eps ramp."""
    frac = eps_schedule(step, total, 1.0, warmup, ramp, shape)
    return 1.0 - (1.0 - kappa_end) * frac
