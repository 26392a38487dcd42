"""The attacks hw-dq takes from the Adversarial Robustness Toolbox: CW-L2 and the APGD + Square composition.

Everything else runs on the native engine or the AutoAttack authors' code (see the registry).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import nn

from hw_dq.errors import ConfigError
from hw_dq.robust.params import AttackParams

ART_ATTACKS = ("apgd-ce", "apgd-t", "square", "cw-l2")


def art_classifier(model: nn.Module, input_shape: tuple[int, ...] = (3, 32, 32), num_classes: int = 10) -> Any:
    """Wrap a model (eval mode) as an ART PyTorchClassifier with inputs clipped to [0, 1]."""
    from art.estimators.classification import PyTorchClassifier

    model.eval()
    device = "gpu" if next(model.parameters()).is_cuda else "cpu"
    return PyTorchClassifier(
        model=model,
        loss=nn.CrossEntropyLoss(),
        input_shape=input_shape,
        nb_classes=num_classes,
        clip_values=(0.0, 1.0),
        device_type=device,
    )


def _norm(norm: str) -> float:
    return np.inf if norm == "Linf" else 2.0


def _predict(clf: Any, x: np.ndarray, batch_size: int) -> np.ndarray:
    return clf.predict(x.astype(np.float32), batch_size=batch_size).argmax(1)


def make_attack(
    name: str, clf: Any, eps: float, batch_size: int = 128, p: AttackParams | int | None = None
) -> tuple[Any, dict]:
    """One ART attack object and its parameters (``eps`` in [0, 1] units): what only ART provides
    here (CW-L2) and the components of the earlier ``art-apgd-square`` composition.

    ``p`` is the budgets; an int is read as the PGD step count (the earlier signature).
    """
    if not isinstance(p, AttackParams):
        p = AttackParams() if p is None else AttackParams(pgd_steps=int(p))
    from art.attacks.evasion import AutoProjectedGradientDescent, CarliniL2Method, SquareAttack

    if name in ("apgd-ce", "apgd-t"):
        loss = "cross_entropy" if name == "apgd-ce" else "difference_logits_ratio"
        atk = AutoProjectedGradientDescent(
            clf, norm=np.inf, eps=eps, eps_step=2 * eps, max_iter=p.apgd_iters, targeted=name == "apgd-t",
            nb_random_init=1, batch_size=batch_size, loss_type=loss, verbose=False,
        )  # fmt: skip
        extra = {"targets": p.apgd_targets} if name == "apgd-t" else {}
        return atk, {"iters": p.apgd_iters, "loss": loss, "restarts": 1, **extra}
    if name == "square":
        atk = SquareAttack(
            clf, norm=np.inf, eps=eps, max_iter=p.square_queries, p_init=0.8,
            nb_restarts=p.square_restarts, batch_size=batch_size, verbose=False,
        )  # fmt: skip
        return atk, {"queries": p.square_queries, "restarts": p.square_restarts, "p_init": 0.8}
    if name == "cw-l2":
        atk = CarliniL2Method(
            clf, confidence=0.0, max_iter=p.cw_iters, binary_search_steps=p.cw_search_steps,
            batch_size=batch_size, verbose=False,
        )  # fmt: skip
        return atk, {"iters": p.cw_iters, "binary_search_steps": p.cw_search_steps, "counted_within": "L2 <= eps"}
    raise ConfigError(f"unknown ART attack {name!r}; this module makes {', '.join(ART_ATTACKS)}")


def _targeted_apgd(clf: Any, atk: Any, x: np.ndarray, y: np.ndarray, robust: np.ndarray, k: int, bs: int) -> np.ndarray:
    """APGD-T as AutoAttack runs it: the top-k non-true classes by logit, one target at a time.

    ART's AutoAttack class loops over targets in class-index order and re-runs every attack
    (APGD-CE included) targeted, so the per-target loop is written here.
    """
    x_adv = x.copy()
    logits = clf.predict(x.astype(np.float32), batch_size=bs)
    logits[np.arange(len(y)), y] = -np.inf
    order = np.argsort(-logits, axis=1)
    for t in range(min(k, logits.shape[1] - 1)):
        idx = np.flatnonzero(robust)
        if idx.size == 0:
            break
        cand = atk.generate(x[idx], y=order[idx, t])
        fooled = _predict(clf, cand, bs) != y[idx]
        x_adv[idx[fooled]] = cand[fooled]
        robust[idx[fooled]] = False
    return x_adv


def art_apgd_square(
    clf: Any, x: np.ndarray, y: np.ndarray, eps: float, bs: int, p: AttackParams
) -> tuple[np.ndarray, dict, dict]:
    """The earlier composition of ART attacks (APGD-CE, APGD-T, Square); *not* AutoAttack.

    Kept under the name ``art-apgd-square`` so that its numbers can be compared with the
    reference AutoAttack (benchmarks/autoattack_vs_composite.py). Each attack runs only on
    the examples still robust and the per-example worst case is kept; it has no FAB-T.
    """
    robust = _predict(clf, x, bs) == y
    x_adv = x.copy()
    breakdown: dict[str, float] = {"clean": float(robust.mean())}
    params: dict[str, Any] = {}
    for name in ("apgd-ce", "apgd-t", "square"):
        idx = np.flatnonzero(robust)
        atk, par = make_attack(name, clf, eps, bs, p)
        params[name] = par
        if idx.size:
            if name == "apgd-t":
                sub_rob = robust[idx].copy()
                cand = _targeted_apgd(clf, atk, x[idx], y[idx], sub_rob, p.apgd_targets, bs)
            else:
                cand = atk.generate(x[idx], y=y[idx])
            fooled = _predict(clf, cand, bs) != y[idx]
            x_adv[idx[fooled]] = cand[fooled]
            robust[idx[fooled]] = False
        breakdown[f"after_{name}"] = float(robust.mean())
    return x_adv, params, breakdown
