"""Adversarial training inside QAT: PGD-k, APGD-k, FGSM with random start, N-FGSM, TRADES and RSLAD steps.

Every recipe crafts its examples with the project's one attack engine (:mod:`hw_dq.robust.engine`;
APGD with the AutoAttack authors' own implementation) through the same quantized forward pass the
update uses, at the deployed bit widths, with BatchNorm in batch-statistics mode and its running
statistics left untouched. The held-out robust accuracy tracked every epoch uses the same engine
in eval mode.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from hw_dq.nn import ibp
from hw_dq.nn.quant import LearnedRange
from hw_dq.robust import engine

# name -> one-line description (shown by --help and the README)
RECIPES: dict[str, str] = {
    "none": "clean QAT",
    "pgd": "PGD-k with random start (Madry et al. 2018)",
    "fgsm": "FGSM with random start, step 1.25 eps (Wong et al. 2020); prone to catastrophic overfitting",
    "nfgsm": "N-FGSM: noise 2 eps, step eps, no projection (de Jorge et al. 2022); resists catastrophic overfitting",
    "apgd": "APGD-CE with k iterations, its highest-loss point (Croce & Hein 2020, the authors' code): the "
    "evaluation's strongest gradient attack as the training attack",
    "trades": "TRADES: CE(clean) + beta * KL(adv || clean), PGD-k on the KL (Zhang et al. 2019)",
    "rslad": "robust soft-label distillation from a robust teacher run (--teacher): 5/6 KL(teacher(x) || "
    "student(x_adv)) + 1/6 KL(teacher(x) || student(x)), PGD-k on the first KL (Zi et al. 2021)",
    "ibp": "certified training: kappa CE(clean) + (1 - kappa) CE(interval worst case), eps and kappa ramped "
    "(Gowal et al. 2018; bounds through the quantizers, hw_dq.nn.ibp)",
}


@dataclass(frozen=True)
class AdvRecipe:
    """One adversarial-training recipe; eps and alpha in units of 1/255."""

    kind: str = "none"
    eps: float = 8.0
    steps: int = 7
    alpha: float | None = None
    trades_beta: float = 6.0
    ibp_kappa: float = 0.5  # the clean-loss weight IBP's ramp ends at
    ibp_reg: float = 0.0  # weight of the warm-up regularisers (hw_dq.nn.ibp.warmup_reg) at the ramp's start
    ibp_schedule: str = "linear"  # the eps ramp's shape (hw_dq.nn.ibp.eps_schedule)
    ibp_warmup: float = 0.1  # fraction of the steps before the ramp
    ibp_ramp: float = 0.5  # fraction of the steps the ramp takes
    ibp_relax_input: bool = False  # train the bounds on the box before the input quantizer's rounding
    ibp_relu_grad: bool = False  # the bounds get a ReLU's gradient through clipped activations

    @property
    def active(self) -> bool:
        return self.kind != "none"


@contextlib.contextmanager
def frozen_bn_stats(model: nn.Module) -> Iterator[None]:
    """Use batch statistics but leave BatchNorm's running statistics untouched.

    Learned activation ranges still calibrating from batch statistics are frozen too: the attack's
    forward passes must not count as calibration batches.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in bns]
    ranges = [m for m in model.modules() if isinstance(m, LearnedRange)]
    calib = [(m.counter, m.buffer.detach().clone(), m.value.detach().clone()) for m in ranges]
    for m in bns:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (mom, nbt) in zip(bns, saved, strict=True):
            m.momentum = mom
            m.num_batches_tracked.copy_(nbt)
        with torch.no_grad():
            for m, (counter, buf, value) in zip(ranges, calib, strict=True):
                if m.counter != counter:  # calibration moved on (or ended, which sets the value in place)
                    m.counter = counter
                    m.buffer.copy_(buf)
                    m.value.copy_(value)


def _kl(logits: torch.Tensor, p_clean: torch.Tensor) -> torch.Tensor:
    """Per-example KL(p_clean || softmax(logits)) as TRADES maximises and penalises it."""
    return F.kl_div(F.log_softmax(logits, 1), p_clean, reduction="none").sum(1)


def _apgd(
    net: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int, gen: torch.Generator
) -> torch.Tensor:
    """APGD-CE's highest-loss point for every image (``best_loss``: a training point even where the
    attack fails), with the reference implementation's step-size schedule and momentum.

    Why not the engine's PGD: at CPU scale, PGD through the straight-through estimator stays at
    29-31% held-out robust accuracy while AutoAttack's APGD-CE takes the same models to 15-22%
    (benchmarks/results/robust_cpu.json); training against the weaker attack does not buy
    robustness to the stronger one. The library draws its random start from torch's global
    generator: it is seeded from ``gen`` inside a forked RNG, so a run stays a function of its seed."""
    from pyautoattack.autopgd_base import APGDAttack

    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        atk = APGDAttack(net, n_iter=steps, norm="Linf", eps=eps, loss="ce", n_restarts=1, seed=seed, device=x.device)
        return atk.perturb(x, y, best_loss=True).detach()


def craft(
    net: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    r: AdvRecipe,
    gen: torch.Generator,
    soft: torch.Tensor | None = None,
) -> torch.Tensor:
    """Adversarial examples for one training batch (the model stays in train mode, BN frozen).

    ``soft``: rslad's target, the teacher's probabilities on the clean batch."""
    eps = r.eps / 255.0
    alpha = None if r.alpha is None else r.alpha / 255.0
    with frozen_bn_stats(net):
        if r.kind == "pgd":
            return engine.pgd(net, x, y, eps, steps=r.steps, alpha=alpha, generator=gen, keep_best=False)
        if r.kind == "fgsm":
            return engine.pgd(net, x, y, eps, steps=1, alpha=alpha or 1.25 * eps, generator=gen, keep_best=False)
        if r.kind == "nfgsm":
            return engine.pgd(
                net, x, y, eps, steps=1, alpha=alpha or eps, init_radius=2 * eps, project=False,
                generator=gen, keep_best=False,
            )  # fmt: skip
        if r.kind == "apgd":
            return _apgd(net, x, y, eps, r.steps, gen)
        if r.kind == "trades":
            with torch.no_grad():
                p_clean = F.softmax(net(x), 1)
            return engine.pgd(
                net, x, p_clean, eps, steps=r.steps, alpha=alpha or eps / 4, init_radius=0.001,
                loss_fn=_kl, generator=gen, keep_best=False,
            )  # fmt: skip
        if r.kind == "rslad":
            if soft is None:
                raise ValueError("rslad crafts against the teacher's probabilities: pass soft")
            return engine.pgd(
                net, x, soft, eps, steps=r.steps, alpha=alpha, init_radius=0.001, loss_fn=_kl,
                generator=gen, keep_best=False,
            )  # fmt: skip
    raise ValueError(f"unknown adversarial recipe {r.kind!r}")


def adversarial_loss(
    net: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    r: AdvRecipe,
    gen: torch.Generator,
    step: int = 0,
    total: int = 1,
    teacher: nn.Module | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(training loss, logits whose accuracy is reported) for one batch under recipe ``r``.

    ``step`` of ``total`` training steps drives IBP's eps and kappa ramps; ``teacher`` (eval mode,
    frozen) is rslad's robust teacher.
    """
    if not r.active:
        logits = net(x)
        return F.cross_entropy(logits, y), logits
    if r.kind == "ibp":
        ramp = (r.ibp_warmup, r.ibp_ramp, r.ibp_schedule)
        eps = ibp.eps_schedule(step, total, r.eps / 255.0, *ramp)
        kappa = ibp.kappa_schedule(step, total, r.ibp_kappa, *ramp)
        if eps <= 0:
            logits = net(x)
            return F.cross_entropy(logits, y), logits
        rec: list | None = [] if r.ibp_reg > 0 else None
        if getattr(net, "module", None) is None:
            # one pass: the clean point rides along the bounds and is the clean forward (BatchNorm's
            # running statistics are updated by it, and by nothing else)
            margins, logits = ibp.ibp_margins_and_logits(net, x, y, eps, rec, r.ibp_relax_input, r.ibp_relu_grad)
        else:  # DistributedDataParallel: the clean forward goes through the wrapper, which syncs gradients
            logits = net(x)
            margins = ibp.ibp_margins(net.module, x, y, eps, rec, r.ibp_relax_input, r.ibp_relu_grad)
        loss = kappa * F.cross_entropy(logits, y) + (1.0 - kappa) * F.cross_entropy(-margins, y)
        if rec:  # Shi et al. 2021: the regularisers fade out as eps reaches its maximum
            loss = loss + r.ibp_reg * (1.0 - eps * 255.0 / r.eps) * ibp.warmup_reg(rec)
        return loss, logits
    if r.kind == "rslad":
        # Zi et al. 2021: the robust teacher's clean probabilities are the soft label of both terms
        if teacher is None:
            raise ValueError("the rslad recipe needs its teacher model")
        with torch.no_grad():
            soft = F.softmax(teacher(x), 1)
        x_adv = craft(net, x, y, r, gen, soft=soft)
        logits_adv = net(x_adv)
        loss = _kl(logits_adv, soft).mean() * (5 / 6) + _kl(net(x), soft).mean() * (1 / 6)
        return loss, logits_adv
    x_adv = craft(net, x, y, r, gen)
    if r.kind == "trades":
        logits = net(x)
        logits_adv = net(x_adv)
        robust = _kl(logits_adv, F.softmax(logits, 1)).mean()
        return F.cross_entropy(logits, y) + r.trades_beta * robust, logits_adv
    logits = net(x_adv)
    return F.cross_entropy(logits, y), logits


def robust_accuracy(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps_255: float,
    steps: int = 10,
    batch_size: int = 256,
    seed: int = 0,
) -> float:
    """Held-out PGD-``steps`` robust accuracy (eval mode, one random start): the early-stopping signal."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    correct = 0
    try:
        for i in range(0, len(y), batch_size):
            xb, yb = x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)
            xa = engine.pgd(model, xb, yb, eps_255 / 255.0, steps=steps, generator=gen)
            with torch.no_grad():
                correct += int(((model(xa).argmax(1) == yb) & (model(xb).argmax(1) == yb)).sum())
    finally:
        model.train(was)
    return correct / max(1, len(y))


def collapsed(history: list[float], current: float, drop: float = 0.5, floor: float = 0.05) -> bool:
    """Catastrophic overfitting: held-out robust accuracy fell below ``drop`` x its best so far.

    ``floor`` keeps noise at near-zero accuracies (the first epochs) from counting as a collapse.
    """
    best = max(history, default=0.0)
    return best >= floor and current < drop * best
