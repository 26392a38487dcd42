"""The Defensive Quantization regulariser, Lipschitz constraints, and a diagnostic of what they control.

Regulariser (Lin, Gan, Han 2019): ``(beta / 2) * sum_l ||W_l^T W_l - I||_F^2`` over every
conv and linear layer, conv weights reshaped to ``out x (in * k * k)``. We use the smaller
of the two Gram matrices (``W W^T`` when the layer has fewer outputs than inputs): the two
penalties differ by a constant, so their gradients are equal, and only the smaller one can
reach zero. ``target="bn_folded"`` applies it to ``diag(gamma / sqrt(var + eps)) W``, the
operator the layer and its BatchNorm compute at inference (see the README for why);
``target="act_scaled"`` to ``(r_in / r_out) diag(gamma / sqrt(var + eps)) W``, the same operator
between the integer codes of the quantized activations around it (r = each activation's range,
learned or fixed; 1 for the [0, 1] input span and for the logits), so that a layer cannot
hide its gain in a small output range.

Hard constraints, applied after each optimizer step: :func:`project_` rescales each layer so that
the spectral norm of its BN-folded (optionally range-scaled) operator is at most ``max_norm``, by
warm-started power iteration (like ``torch.nn.utils.spectral_norm``, one iteration per step).
BatchNorm with a bounded gain is a model option (``ModelConfig.bn_gain_max``, see
:class:`hw_dq.nn.quant.BoundedBatchNorm2d`).

(One module past 400 lines: the regulariser, the projection and the diagnostic share the pairing of
layers with their BatchNorm and activations, the folded operator and the power iteration.)

Diagnostic: each layer's spectral norm as an operator on its actual input shape (power
iteration on the convolution, with stride and padding, not on the reshaped matrix), on the
weights the hardware uses (quantized) with BatchNorm's per-channel gain folded in, and the
network's Lipschitz bound composed from them. No library computes the operator norm of a
quantized, BN-folded Brevitas layer, hence the hand-written power iteration.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import asdict, dataclass

import brevitas.nn as qnn
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from hw_dq.errors import ConfigError
from hw_dq.nn.quant import act_range

TARGETS = ("weight", "bn_folded", "act_scaled")


@dataclass(frozen=True)
class LayerRef:
    """A conv/linear layer, the BatchNorm that directly follows it (if any), and the quantized
    activations before and after it (None: the [0, 1] input span, the logits, or full precision)."""

    name: str
    layer: nn.Module
    bn: nn.Module | None
    act_in: nn.Module | None = None
    act_out: nn.Module | None = None


def _is_act(m: nn.Module) -> bool:
    return act_range(m) is not None or isinstance(m, nn.Hardtanh | nn.ReLU | nn.ReLU6)


def lipschitz_layers(model: nn.Module) -> list[LayerRef]:
    """Every conv/linear layer, paired with the BatchNorm registered right after it.

    ``act_in`` / ``act_out``: the nearest activation module before / after the layer in registration
    order, which is the data flow for the chain models (cnv, tiny); models with residual blocks
    (``lipschitz_bound``) get None (their activation scales are not attributed to layers)."""
    atoms: list[tuple[str, nn.Module]] = []
    inside = ()  # names of conv/linear layers and quantized activations whose submodules (proxies) to skip
    for n, m in model.named_modules():
        if inside and n.startswith(inside):
            continue
        if isinstance(m, nn.Conv2d | nn.Linear | qnn.QuantReLU | qnn.QuantIdentity):
            atoms.append((n, m))
            inside = (*inside, n + ".")
        elif isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d) or not list(m.children()):
            atoms.append((n, m))
    leaves = atoms
    chain = not hasattr(model, "lipschitz_bound")
    refs = []
    for i, (name, m) in enumerate(leaves):
        if isinstance(m, nn.Conv2d | nn.Linear):
            bn = None
            nxt = leaves[i + 1][1] if i + 1 < len(leaves) else None
            if isinstance(nxt, nn.BatchNorm1d | nn.BatchNorm2d) and nxt.num_features == m.weight.shape[0]:
                bn = nxt
            before = [a for _, a in leaves[:i] if _is_act(a)]
            after = []
            for _, a in leaves[i + 1 :]:
                if isinstance(a, nn.Conv2d | nn.Linear):
                    break
                if _is_act(a):
                    after.append(a)
                    break
            act_in = before[-1] if chain and before else None
            act_out = after[0] if chain and after else None
            refs.append(LayerRef(name, m, bn, act_in, act_out))
    return refs


def bn_gain(bn: nn.Module | None, like: torch.Tensor) -> torch.Tensor | None:
    """BatchNorm's inference-time per-channel gain ``gamma / sqrt(running_var + eps)`` (bounded when the
    BatchNorm bounds it)."""
    if bn is None:
        return None
    if hasattr(bn, "bounded_weight"):
        gamma = bn.bounded_weight()
    else:
        gamma = bn.weight if bn.affine else torch.ones_like(bn.running_var)
    return gamma / torch.sqrt(bn.running_var + bn.eps).to(like)


def range_ratio(ref: LayerRef) -> torch.Tensor | float:
    """``r_in / r_out`` of a layer (1 where a side has no quantized activation); differentiable in learned
    ranges."""
    r_in = act_range(ref.act_in) if ref.act_in is not None else None
    r_out = act_range(ref.act_out) if ref.act_out is not None else None
    return (1.0 if r_in is None else r_in) / (1.0 if r_out is None else r_out)


def folded_operator(ref: LayerRef, w: torch.Tensor, target: str) -> torch.Tensor:
    """``w`` as the regularised / constrained operator: as is, BN-folded, or BN-folded and range-scaled."""
    if target == "weight":
        return w
    if ref.bn is not None:
        w = w * bn_gain(ref.bn, w).reshape(-1, *([1] * (w.dim() - 1)))
    if target == "act_scaled":
        w = w * range_ratio(ref)
    return w


class _OrthoResidual(torch.autograd.Function):
    """``||G - I||_F^2`` with its exact gradient ``4 (G - I) M`` (or ``4 M (G - I)``).

    Autograd would spend three matrix products per layer (the Gram and two in its backward);
    the closed-form gradient needs one more after the Gram, which keeps DQ's step within a few
    percent of VQ's.
    """

    @staticmethod
    def forward(ctx, m: torch.Tensor) -> torch.Tensor:  # noqa: D102
        wide = m.shape[0] <= m.shape[1]
        gram = m @ m.t() if wide else m.t() @ m
        gram.diagonal().sub_(1.0)  # G - I, in place
        ctx.save_for_backward(m, gram)
        ctx.wide = wide
        return gram.pow(2).sum()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: D102
        m, d = ctx.saved_tensors
        g = d @ m if ctx.wide else m @ d
        return g.mul_(4.0 * grad)


def orthogonality_residual(w: torch.Tensor) -> torch.Tensor:
    """``||G - I||_F^2`` with G the smaller Gram matrix of w reshaped to out x rest."""
    return _OrthoResidual.apply(w.reshape(w.shape[0], -1))


def orthogonality_penalty(
    model: nn.Module, target: str = "weight", layers: list[LayerRef] | None = None
) -> torch.Tensor:
    """``sum_l ||W_l^T W_l - I||_F^2`` on the float weights (differentiable).

    ``layers``: :func:`lipschitz_layers` of the model, computed once by a training loop
    instead of on every step."""
    if target not in TARGETS:
        raise ValueError(f"unknown Lipschitz target {target!r}; choose one of {TARGETS}")
    total = None
    for ref in lipschitz_layers(model) if layers is None else layers:
        r = orthogonality_residual(folded_operator(ref, ref.layer.weight, target))
        total = r if total is None else total + r
    if total is None:
        return torch.zeros(())
    return total


def regulariser(
    model: nn.Module, beta: float, target: str = "weight", layers: list[LayerRef] | None = None
) -> torch.Tensor:
    """``(beta / 2) * orthogonality_penalty`` (zero tensor, no graph, when beta == 0)."""
    if beta == 0:
        return torch.zeros(())
    return 0.5 * beta * orthogonality_penalty(model, target, layers)


def effective_weight(layer: nn.Module, quantized: bool = True) -> torch.Tensor:
    """The weight the layer computes with: Brevitas' quantized value where it has one."""
    proxy = getattr(layer, "weight_quant", None)
    if quantized and proxy is not None and proxy.is_quant_enabled:
        return layer.quant_weight().value.detach()
    return layer.weight.detach()


def _apply(layer: nn.Module, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, nn.Conv2d):
        return F.conv2d(x, w, None, layer.stride, layer.padding, layer.dilation, layer.groups)
    return F.linear(x, w)


def operator_norm(
    layer: nn.Module,
    w: torch.Tensor,
    in_shape: tuple[int, ...],
    iters: int = 100,
    tol: float = 1e-6,
    seed: int = 0,
) -> float:
    """Largest singular value of the (bias-free) linear map ``x -> layer(x; w)``.

    ``in_shape`` is one input's shape (C, H, W for a conv, features for a linear layer).
    The transpose is applied through autograd, so stride and padding are exact.
    """
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn((1, *in_shape), generator=gen).to(w)
    v /= v.norm()
    sigma = 0.0
    for _ in range(iters):
        v.requires_grad_(True)
        u = _apply(layer, w, v)
        (vt,) = torch.autograd.grad(u, v, grad_outputs=u)
        new_sigma = math.sqrt(float((u.detach() ** 2).sum()))
        v = vt.detach()
        nv = v.norm()
        if nv == 0:
            return 0.0
        v = v / nv
        if abs(new_sigma - sigma) <= tol * max(new_sigma, 1e-12):
            sigma = new_sigma
            break
        sigma = new_sigma
    return sigma


@dataclass
class LayerLipschitz:
    """One row of the diagnostic table."""

    name: str
    kind: str
    shape: list[int]
    norm_float: float  # ||W|| as an operator, float weights, no BN
    norm_quant: float  # same, quantized weights
    bn_gain_max: float  # max |gamma / sqrt(var + eps)| (1 without BN)
    norm_folded: float  # quantized weights with BN folded in: what inference computes
    ortho_residual: float  # ||G - I||_F^2 of the float weights (the regularised quantity)
    range_ratio: float = 1.0  # r_in / r_out of the quantized activations around the layer
    norm_scaled: float = 0.0  # range_ratio * norm_folded: the gain between integer activation codes


def input_shapes(model: nn.Module, sample_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """Per-layer input shape (without batch), recorded by one forward pass."""
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = []
    for ref in lipschitz_layers(model):

        def hook(_m, inp, _out, name=ref.name):
            shapes[name] = tuple(inp[0].shape[1:])

        hooks.append(ref.layer.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            p = next(model.parameters())
            model(torch.full((1, *sample_shape), 0.5, dtype=p.dtype, device=p.device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return shapes


def diagnose(model: nn.Module, sample_shape: tuple[int, ...] = (3, 32, 32), iters: int = 300) -> list[LayerLipschitz]:
    """Operator norms of every conv/linear layer, float, quantized and BN-folded."""
    shapes = input_shapes(model, sample_shape)
    rows = []
    with torch.no_grad():
        for ref in lipschitz_layers(model):
            layer = ref.layer
            shape = shapes[ref.name]
            wf = layer.weight.detach()
            wq = effective_weight(layer)
            g = bn_gain(ref.bn, wq)
            wfold = wq if g is None else wq * g.detach().reshape(-1, *([1] * (wq.dim() - 1)))
            with torch.enable_grad():
                nf = operator_norm(layer, wf, shape, iters, tol=1e-7)
                nq = operator_norm(layer, wq, shape, iters, tol=1e-7) if wq is not wf else nf
                nfold = operator_norm(layer, wfold, shape, iters, tol=1e-7) if g is not None else nq
            rows.append(
                LayerLipschitz(
                    name=ref.name,
                    kind="conv" if isinstance(layer, nn.Conv2d) else "linear",
                    shape=list(wf.shape),
                    norm_float=nf,
                    norm_quant=nq,
                    bn_gain_max=1.0 if g is None else float(g.abs().max()),
                    norm_folded=nfold,
                    ortho_residual=float(orthogonality_residual(wf)),
                    range_ratio=float(range_ratio(ref)),
                    norm_scaled=float(range_ratio(ref)) * nfold,
                )
            )
    return rows


def network_bound(model: nn.Module, rows: list[LayerLipschitz]) -> float:
    """Upper bound on the network's Lipschitz constant from the BN-folded layer norms.

    Activations (ReLU6), max- and average-pooling are 1-Lipschitz; a model may provide
    ``lipschitz_bound(norms)`` for non-chain topologies (residual blocks).
    """
    norms = {r.name: r.norm_folded for r in rows}
    if hasattr(model, "lipschitz_bound"):
        return float(model.lipschitz_bound(norms))
    return float(math.prod(norms.values()))


def mean_norm(rows: list[LayerLipschitz]) -> float:
    return sum(r.norm_folded for r in rows) / max(1, len(rows))


def report(model: nn.Module, sample_shape: tuple[int, ...] = (3, 32, 32), iters: int = 300) -> dict:
    """The diagnostic as a JSON-serialisable dict (layers, bound, mean norm)."""
    rows = diagnose(model, sample_shape, iters)
    return {
        "layers": [asdict(r) for r in rows],
        "network_bound": network_bound(model, rows),
        "mean_norm_folded": mean_norm(rows),
        "mean_norm_scaled": sum(r.norm_scaled for r in rows) / max(1, len(rows)),
        "note": "norm_folded = spectral norm of the quantized conv/linear operator on its "
        "input shape with BatchNorm's inference gain folded in",
    }


def table(rep: dict) -> str:
    """Markdown table of :func:`report`'s output."""
    lines = [
        "| layer | kind | weight shape | ||W|| float | ||W|| quant | max BN gain | ||BN(W)|| quant | r_in/r_out "
        "| r_in/r_out ||BN(W)|| | ||G-I||^2 |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rep["layers"]:
        lines.append(
            f"| {r['name']} | {r['kind']} | {'x'.join(map(str, r['shape']))} | {r['norm_float']:.3f} "
            f"| {r['norm_quant']:.3f} | {r['bn_gain_max']:.3f} | {r['norm_folded']:.3f} "
            f"| {r.get('range_ratio', 1.0):.3g} | {r.get('norm_scaled', r['norm_folded']):.3f} "
            f"| {r['ortho_residual']:.3g} |"
        )
    lines.append("")
    lines.append(f"Network Lipschitz bound (product / composition of BN-folded norms): {rep['network_bound']:.4g}")
    return "\n".join(lines)


# ------------------------------------------------------------------ hard constraint: spectral projection
# Per model: its layers, their input shapes and the warm-start vectors of the power iteration. Kept
# outside the model so that neither its state_dict nor its checkpoints change.
_PROJ: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _power_step(layer: nn.Module, w: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, float]:
    """One power-iteration step on ``A^T A`` (A = the layer's map with weight w); returns (v', ||A v||)."""
    v = v.detach().requires_grad_(True)
    with torch.enable_grad():
        u = _apply(layer, w, v)
        (vt,) = torch.autograd.grad(u, v, grad_outputs=u)
    sigma = float(u.detach().norm())
    n = vt.norm()
    return (vt / n if n > 0 else vt).detach(), sigma


@torch.no_grad()
def project_(
    model: nn.Module,
    max_norm: float,
    *,
    target: str = "bn_folded",
    sample_shape: tuple[int, ...] = (3, 32, 32),
    iters: int = 1,
    first_iters: int = 30,
) -> dict[str, float]:
    """Rescale every layer whose operator norm exceeds ``max_norm`` down to ``max_norm`` (in place).

    The operator is the layer's float weight, BN-folded (``target="bn_folded"``), also range-scaled
    (``"act_scaled"``) or alone (``"weight"``). A layer with a BatchNorm is rescaled through gamma
    (rescaling W would be undone by the normalisation); one without, through W (the quantized weights
    follow: their per-channel scale is max |w|). The norm comes from ``iters`` warm-started
    power-iteration steps (``first_iters`` on the first call), a lower estimate that converges over
    the steps of training. Call after each optimizer step; returns each layer's estimate before
    projection.
    """
    if not (math.isfinite(max_norm) and max_norm > 0):
        raise ConfigError(f"invalid spectral bound {max_norm}: use a positive number")
    if target not in TARGETS:
        raise ConfigError(f"unknown Lipschitz target {target!r}; choose one of {', '.join(TARGETS)}")
    state = _PROJ.get(model)
    if state is None or state["sample_shape"] != tuple(sample_shape):
        with torch.enable_grad():
            shapes = input_shapes(model, tuple(sample_shape))
        state = {"sample_shape": tuple(sample_shape), "layers": lipschitz_layers(model), "shapes": shapes, "v": {}}
        _PROJ[model] = state
    sigmas = {}
    for ref in state["layers"]:
        w = ref.layer.weight
        op = folded_operator(ref, w, target)
        v = state["v"].get(ref.name)
        steps = iters
        if v is None:
            gen = torch.Generator().manual_seed(0)
            v = torch.randn((1, *state["shapes"][ref.name]), generator=gen).to(w)
            v /= v.norm()
            steps = max(iters, first_iters)
        for _ in range(steps):
            v, sigma = _power_step(ref.layer, op, v)
        state["v"][ref.name] = v
        sigmas[ref.name] = sigma
        if sigma > max_norm:
            factor = max_norm / sigma
            (ref.bn.weight if ref.bn is not None and target != "weight" else w).mul_(factor)
    return sigmas
