"""Attack stage: run one attack of the registry on a PyTorch model and count its robust accuracy.

Inputs are in [0, 1]; ``eps`` is given in units of 1/255 for every attack. For Linf attacks
it is the Linf radius (RobustBench's 8/255 is ``eps=8``); for the L2 attacks (``pgd-l2``,
``cw-l2``, ``autoattack-l2``) ``eps/255`` is the L2 radius (RobustBench's L2 0.5 is ``eps=127.5``).

Which attacks exist and how each is made is :mod:`hw_dq.robust.registry`: the native engine
(:mod:`hw_dq.robust.engine`) for FGSM/R+FGSM/PGD, the authors' AutoAttack
(:mod:`hw_dq.robust.autoattack`), the adaptive attacks (:mod:`hw_dq.robust.adaptive`), and ART
for what only it has (CW-L2, and the earlier ``art-apgd-square`` composition kept for comparison).

Robust accuracy counts an example as robust only when the clean input *and* the
adversarial one are classified correctly (the clean input lies inside every eps-ball); the
per-image flags are kept so that results can take the per-image worst case over attacks.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hw_dq.robust.params import AttackParams
from hw_dq.robust.registry import ATTACKS as REGISTRY
from hw_dq.robust.registry import AttackContext, Crafted, check

# name -> (kind, norm), derived from the registry (kept for callers of the earlier table)
ATTACKS: dict[str, tuple[str, str]] = {k: (a.kind, a.norm) for k, a in REGISTRY.items() if a.sw is not None}
WHITE_BOX = tuple(k for k, (kind, _) in ATTACKS.items() if kind == "white")


@dataclass
class AttackResult:
    """Robust accuracy of one attack at one eps (eps in /255 units)."""

    attack: str
    eps: float
    robust_acc: float
    n_examples: int
    params: dict
    seed: int
    wall_s: float
    norm: str = "Linf"
    max_perturbation: float = 0.0  # largest ||x_adv - x|| in the attack's norm, [0, 1] units
    breakdown: dict = field(default_factory=dict)  # per-component robust accuracy (autoattack)
    kind: str = "white"
    robust: list[bool] = field(default_factory=list)  # per image: survived (clean and adversarial correct)
    warnings: list[str] = field(default_factory=list)  # what the attack library itself warned about

    @property
    def robust_mask(self) -> str:
        """The per-image flags as a string of 0/1 (how result files store them)."""
        return "".join("1" if r else "0" for r in self.robust)


def check_attack(name: str, eps_255: float) -> None:
    """Raise ConfigError for an unknown attack name or a negative/non-finite eps (see the registry)."""
    check(name, eps_255)


def craft(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    attack: str,
    eps_255: float,
    *,
    seed: int = 0,
    batch_size: int = 128,
    params: AttackParams | None = None,
    source: nn.Module | None = None,
    state_dir: Path | None = None,
    state_name: str = "robustness",
    version: str = "standard",
    progress: Any = None,
) -> Crafted:
    """Adversarial examples of ``attack`` (a registry name) against ``model``, on its device."""
    entry = check(attack, eps_255)
    ctx = AttackContext(model, params or AttackParams(), seed, batch_size, source, state_dir, state_name, version,
                        progress)  # fmt: skip
    torch.manual_seed(seed)
    np.random.seed(seed)
    x, y = x.detach().cpu().float(), y.detach().cpu()
    if eps_255 == 0:
        return Crafted(x.clone())
    assert entry.sw is not None
    return entry.sw(ctx, x, y, eps_255 / 255.0)


def generate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    attack: str,
    eps_255: float,
    *,
    seed: int = 0,
    batch_size: int = 128,
    params: AttackParams | None = None,
    source: nn.Module | None = None,
) -> tuple[np.ndarray, dict, dict]:
    """Adversarial examples (numpy, [0, 1]) of ``attack``: (x_adv, attack parameters, breakdown).

    ``transfer-pgd`` crafts PGD examples on ``source`` (e.g. the full-precision twin).
    """
    c = craft(model, x, y, attack, eps_255, seed=seed, batch_size=batch_size, params=params, source=source)
    return c.x_adv.numpy().astype(np.float32), c.params, c.breakdown


def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Top-1 labels (CPU) of ``x`` in batches on the model's device, without gradients."""
    dev = next(model.parameters()).device
    with torch.no_grad():
        out = [model(xb.to(dev)).argmax(1).cpu() for xb in x.split(batch_size)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def robust_accuracy(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    attack: str,
    eps_255: float,
    seed: int = 0,
    batch_size: int = 128,
    steps: int | None = None,
    params: AttackParams | None = None,
    source: nn.Module | None = None,
    return_adv: bool = False,
    state_dir: Path | None = None,
    state_name: str = "robustness",
    version: str = "standard",
    progress: Any = None,
) -> AttackResult | tuple[AttackResult, np.ndarray]:
    """Accuracy on adversarial examples of ``attack`` at ``eps_255``/255 (see module doc)."""
    entry = check(attack, eps_255)
    p = params or AttackParams()
    if steps is not None:
        p = AttackParams(**{**asdict(p), "pgd_steps": steps})
    t0 = time.time()
    c = craft(model, x, y, attack, eps_255, seed=seed, batch_size=batch_size, params=p, source=source,
              state_dir=state_dir, state_name=state_name, version=version, progress=progress)  # fmt: skip
    x, y = x.detach().cpu().float(), y.detach().cpu()
    clean_ok = predict(model, x, batch_size) == y
    ok = clean_ok & (predict(model, c.x_adv, batch_size) == y)
    if c.robust is not None:  # the attack decided per image itself (AutoAttack, resumed runs included)
        ok = clean_ok & c.robust
    delta = (c.x_adv - x).reshape(len(y), -1)
    dist = delta.abs().amax(1) if entry.norm == "Linf" else delta.norm(dim=1)
    if entry.counting == "within-eps":  # minimal-perturbation attack: a success counts only inside the ball
        ok |= (dist > eps_255 / 255.0 + 1e-6) & clean_ok
    r = AttackResult(
        attack=attack, eps=float(eps_255), robust_acc=int(ok.sum()) / len(y) if len(y) else 0.0,
        n_examples=int(len(y)), params={"kind": entry.kind, **c.params}, seed=seed, wall_s=time.time() - t0,
        norm=entry.norm, max_perturbation=float(dist.max()) if len(dist) else 0.0, breakdown=c.breakdown,
        kind=entry.kind, robust=[bool(v) for v in ok], warnings=list(c.warnings),
    )  # fmt: skip
    return (r, c.x_adv.numpy()) if return_adv else r


def clean_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy (fraction) in eval mode."""
    model.eval()
    return int((predict(model, x, batch_size) == y.cpu()).sum()) / len(y) if len(y) else 0.0
