"""The attack registry: one entry per attack (kind, norm, counting rule, PyTorch and accelerator factories).

Adding an attack is one :class:`Attack` entry in :data:`ATTACKS`. A software factory takes
an :class:`AttackContext` (the model, budgets, seed, ...), the images, labels and the radius
in input units, and returns a :class:`Crafted`. Accelerator factories live in
:mod:`hw_dq.fpga.hwattack` (a stage above this one), so an entry names them by
``"module:function"`` and :func:`hw_factory` imports them when asked.

Eps is validated here and only here (:func:`check_eps`): in units of 1/255 for every
attack (the Linf radius, or the L2 radius x 255), never negative or non-finite; an Linf eps
below 1 gets a one-line note, since 0.031 (the habit of other libraries for 8/255) would
mean 0.031/255 here.
"""

from __future__ import annotations

import importlib
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hw_dq.errors import ConfigError

KINDS = ("white", "black", "transfer", "ensemble", "adaptive")
# counting rules: "misclassified" - robust iff the adversarial image is classified correctly;
# "within-eps" - a minimal-perturbation attack (CW, HopSkipJump): a success beyond eps does not count
COUNTING = ("misclassified", "within-eps")


@dataclass
class AttackContext:
    """What a factory may use besides the images: the model, budgets, seed and where to keep state."""

    model: nn.Module
    params: Any  # hw_dq.robust.attacks.AttackParams
    seed: int = 0
    batch_size: int = 128
    source: nn.Module | None = None  # transfer attacks: the model the examples are crafted on
    state_dir: Path | None = None  # resumable state (AutoAttack) lives here
    state_name: str = "robustness"
    version: str = "standard"  # AutoAttack version
    progress: Callable[[int, int, int], None] | None = None  # (images done, total, still classified right)


@dataclass
class Crafted:
    """Adversarial images (CPU, [0, 1]) and what the attack reports about them."""

    x_adv: torch.Tensor
    params: dict = field(default_factory=dict)
    breakdown: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    robust: torch.Tensor | None = None  # per-image flags when the attack decides them itself (AutoAttack)


SwFactory = Callable[[AttackContext, torch.Tensor, torch.Tensor, float], Crafted]


@dataclass(frozen=True)
class Attack:
    """One attack: its kind, norm, counting rule and factories."""

    name: str
    kind: str
    norm: str
    counting: str = "misclassified"
    sw: SwFactory | None = None
    hw: str | None = None  # "module:function" of the accelerator factory
    doc: str = ""

    def __post_init__(self) -> None:
        assert self.kind in KINDS and self.norm in ("Linf", "L2") and self.counting in COUNTING, self


def _batched(ctx: AttackContext, x: torch.Tensor, y: torch.Tensor, fn: Callable[..., torch.Tensor]) -> torch.Tensor:
    """Run ``fn(model, xb, yb)`` per batch on the model's device; the result on the CPU."""
    dev = next(ctx.model.parameters()).device
    out = [
        fn(xb.to(dev), yb.to(dev)).cpu()
        for xb, yb in zip(x.split(ctx.batch_size), y.split(ctx.batch_size), strict=True)
    ]
    return torch.cat(out) if out else x.clone()


def _gen(ctx: AttackContext) -> torch.Generator:
    return torch.Generator().manual_seed(ctx.seed)


def _fgsm(ctx: AttackContext, x: torch.Tensor, y: torch.Tensor, eps: float) -> Crafted:
    from hw_dq.robust import engine

    return Crafted(_batched(ctx, x, y, lambda a, b: engine.fgsm(ctx.model, a, b, eps)), {"engine": "hw_dq"})


def _rfgsm(ctx: AttackContext, x: torch.Tensor, y: torch.Tensor, eps: float) -> Crafted:
    """R+FGSM as ART writes it: a uniform start in the eps-ball, one signed step of (1 - alpha) eps, projected."""
    from hw_dq.robust import engine

    step, g = (1.0 - ctx.params.rfgsm_alpha) * eps, _gen(ctx)
    adv = _batched(ctx, x, y, lambda a, b: engine.pgd(ctx.model, a, b, eps, steps=1, alpha=step, generator=g))
    return Crafted(adv, {"random_start": "uniform", "step_size": step, "engine": "hw_dq"})


def _pgd_factory(norm: str, on_source: bool = False) -> SwFactory:
    def craft(ctx: AttackContext, x: torch.Tensor, y: torch.Tensor, eps: float) -> Crafted:
        from hw_dq.robust import engine

        p, g = ctx.params, _gen(ctx)
        net = ctx.source if on_source else ctx.model
        if net is None:
            raise ConfigError("transfer-pgd needs a source model (--transfer-from RUN_DIR, e.g. the FP twin)")
        step = p.pgd_step_factor * eps / p.pgd_steps

        def one(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return engine.pgd(net, a, b, eps, steps=p.pgd_steps, alpha=step, restarts=p.pgd_restarts, norm=norm,
                              generator=g)  # fmt: skip

        adv = _batched(AttackContext(net, p, ctx.seed, ctx.batch_size), x, y, one)
        par = {"steps": p.pgd_steps, "step_size": step, "restarts": p.pgd_restarts, "engine": "hw_dq"}
        return Crafted(adv, par | ({"source": "transfer-from model"} if on_source else {}))

    return craft


def _adaptive_factory(which: str) -> SwFactory:
    def craft(ctx: AttackContext, x: torch.Tensor, y: torch.Tensor, eps: float) -> Crafted:
        from hw_dq.robust import adaptive

        p, g = ctx.params, _gen(ctx)
        steps = p.pgd_steps * p.adaptive_steps_factor
        kw = {"steps": steps, "restarts": p.pgd_restarts, "generator": g}

        def one(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            if which == "bpda":
                return adaptive.bpda_pgd(ctx.model, a, b, eps, **kw)  # type: ignore[arg-type]
            return adaptive.temperature_pgd(ctx.model, a, b, eps, **kw)  # type: ignore[arg-type]

        if which == "bpda":
            par = {"surrogate": f"soft staircase, T={adaptive.SOFT_TEMPERATURE:g}",
                   "quantizers_swapped": len(adaptive._act_int_quants(ctx.model))}  # fmt: skip
        else:
            par = {"loss": "cross-entropy of logits / std(logits)"}
        return Crafted(_batched(ctx, x, y, one), {"steps": steps, "restarts": p.pgd_restarts, **par})

    return craft


def _autoattack_factory(norm: str, version: str | None = None, components: list[str] | None = None) -> SwFactory:
    def craft(ctx: AttackContext, x: torch.Tensor, y: torch.Tensor, eps: float) -> Crafted:
        from hw_dq.robust import autoattack

        p = ctx.params
        ver = version or ctx.version
        tag = "-".join(components) if components else f"autoattack-{ver}"
        state = None
        if ctx.state_dir is not None:
            state = ctx.state_dir / f"{ctx.state_name}.{tag}.{norm}.eps{eps * 255:g}.state.json"
        budgets = {"apgd_iters": p.apgd_iters, "apgd_targets": p.apgd_targets, "square_queries": p.square_queries}
        out = autoattack.run(
            ctx.model, x, y, eps, norm=norm, version=ver, seed=ctx.seed, batch_size=ctx.batch_size,
            state_path=state, components=components, budgets=budgets if components else None,
            progress=ctx.progress,
        )  # fmt: skip
        params = out.params | ({"resumed": True} if out.resumed else {})
        return Crafted(out.x_adv, params, out.breakdown, out.warnings, out.robust)

    return craft


def _cw(ctx: AttackContext, x: torch.Tensor, y: torch.Tensor, eps: float) -> Crafted:
    from hw_dq.robust.art import art_classifier, make_attack

    atk, par = make_attack("cw-l2", art_classifier(ctx.model, tuple(x.shape[1:])), eps, ctx.batch_size, ctx.params)
    return Crafted(torch.from_numpy(atk.generate(x.numpy()).astype("float32")), par)


def _art_composite(ctx: AttackContext, x: torch.Tensor, y: torch.Tensor, eps: float) -> Crafted:
    from hw_dq.robust.art import art_apgd_square, art_classifier

    clf = art_classifier(ctx.model, tuple(x.shape[1:]))
    adv, par, breakdown = art_apgd_square(clf, x.numpy(), y.numpy(), eps, ctx.batch_size, ctx.params)
    return Crafted(torch.from_numpy(adv.astype("float32")), par, breakdown)


HW = "hw_dq.fpga.hwattack"
ATTACKS: dict[str, Attack] = {a.name: a for a in (
    Attack("fgsm", "white", "Linf", sw=_fgsm, doc="FGSM, one signed step of eps"),
    Attack("rfgsm", "white", "Linf", sw=_rfgsm, doc="R+FGSM (random start, one step)"),
    Attack("pgd", "white", "Linf", sw=_pgd_factory("Linf"), doc="PGD (Madry), random start, restarts"),
    Attack("pgd-l2", "white", "L2", sw=_pgd_factory("L2"), doc="PGD in the L2 ball"),
    Attack("cw-l2", "white", "L2", "within-eps", sw=_cw, doc="Carlini-Wagner L2 (ART), counted within eps"),
    Attack("apgd-ce", "white", "Linf", sw=_autoattack_factory("Linf", components=["apgd-ce"]),
           doc="APGD-CE (pyautoattack)"),
    Attack("apgd-t", "white", "Linf", sw=_autoattack_factory("Linf", components=["apgd-t"]),
           doc="APGD-T, top-k targets (pyautoattack)"),
    Attack("square", "black", "Linf", sw=_autoattack_factory("Linf", components=["square"]), hw=f"{HW}:hw_square",
           doc="Square, score-based black box (pyautoattack; on the accelerator: its logits)"),
    Attack("autoattack", "ensemble", "Linf", sw=_autoattack_factory("Linf"),
           doc="AutoAttack (Croce & Hein), the authors' code; --version standard|plus|rand"),
    Attack("autoattack-l2", "ensemble", "L2", sw=_autoattack_factory("L2"), doc="AutoAttack in the L2 ball"),
    Attack("autoattack-rand", "ensemble", "Linf", sw=_autoattack_factory("Linf", "rand"),
           doc="AutoAttack's EOT version for randomised models"),
    Attack("art-apgd-square", "ensemble", "Linf", sw=_art_composite,
           doc="the earlier ART composition APGD-CE, APGD-T, Square (not AutoAttack)"),
    Attack("transfer-pgd", "transfer", "Linf", sw=_pgd_factory("Linf", on_source=True), hw=f"{HW}:hw_transfer_pgd",
           doc="PGD crafted on another model (--transfer-from; on the accelerator: the PyTorch model)"),
    Attack("transfer-autoattack", "transfer", "Linf", hw=f"{HW}:hw_transfer_autoattack",
           doc="accelerator only: AutoAttack examples crafted on the PyTorch model"),
    Attack("hsj", "black", "Linf", "within-eps", hw=f"{HW}:hw_hsj",
           doc="accelerator only: HopSkipJump (ART) on its top-1 labels"),
    Attack("bpda", "adaptive", "Linf", sw=_adaptive_factory("bpda"),
           doc="BPDA: PGD through soft quantizers (exact forward)"),
    Attack("pgd-temp", "adaptive", "Linf", sw=_adaptive_factory("temp"),
           doc="PGD on temperature-scaled logits (Gupta & Ajanthan)"),
)}  # fmt: skip
SW_ATTACKS = tuple(k for k, a in ATTACKS.items() if a.sw is not None)
HW_ATTACKS = tuple(k for k, a in ATTACKS.items() if a.hw is not None)
ADAPTIVE = tuple(k for k, a in ATTACKS.items() if a.kind == "adaptive")
SINGLE_STEP = ("fgsm", "rfgsm")


def get(name: str, target: str = "sw") -> Attack:
    """The entry of ``name`` for ``target`` (``sw``: the PyTorch model, ``hw``: the accelerator)."""
    names = SW_ATTACKS if target == "sw" else HW_ATTACKS
    if name not in names:
        where = "" if target == "sw" else " on the accelerator (--on hw)"
        raise ConfigError(f"unknown attack {name!r}{where}; choose from {', '.join(names)}")
    return ATTACKS[name]


_noted: set[float] = set()


def check_eps(eps_255: float, norm: str = "Linf") -> float:
    """Validate one eps in units of 1/255 (the one place eps is checked); returns it as a float."""
    try:
        e = float(eps_255)
    except (TypeError, ValueError):
        raise ConfigError(f"invalid eps {eps_255!r}: must be a number >= 0 (units of 1/255)") from None
    if not math.isfinite(e) or e < 0:
        raise ConfigError(f"invalid eps {eps_255}: must be finite and >= 0 (units of 1/255, e.g. 8 for 8/255)")
    if norm == "Linf" and 0 < e < 1 and e not in _noted:
        _noted.add(e)
        print(f"note: eps is in units of 1/255; --eps {e:g} means {e:g}/255 (for 8/255 give 8)", file=sys.stderr)
    return e


def check(name: str, eps_255: float, target: str = "sw") -> Attack:
    """The entry of ``name``, with ``eps_255`` validated for its norm."""
    a = get(name, target)
    check_eps(eps_255, a.norm)
    return a


def hw_factory(a: Attack) -> Callable[..., Any]:
    """The accelerator factory of ``a`` (imported on first use: it lives in a higher stage)."""
    if a.hw is None:
        raise ConfigError(f"attack {a.name!r} has no accelerator form; choose from {', '.join(HW_ATTACKS)}")
    mod, fn = a.hw.split(":")
    return getattr(importlib.import_module(mod), fn)
