"""Attack stage: white-box attacks from the Adversarial Robustness Toolbox (ART).

Inputs are in [0, 1]; eps is given in units of 1/255 (Linf), as RobustBench reports it.
The model sees the whole pipeline (its 8-bit input quantizer included); gradients through
Brevitas' quantizers are straight-through estimates, which is exactly why quantized models
need black-box and transfer checks before a robustness number is trusted.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from hw_dq.errors import ConfigError

WHITE_BOX = ("fgsm", "pgd")


def art_classifier(model: nn.Module, input_shape: tuple[int, ...] = (3, 32, 32), num_classes: int = 10):
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


def make_attack(name: str, clf, eps: float, batch_size: int = 128, steps: int = 10):
    """An ART evasion attack; ``eps`` in [0, 1] units."""
    from art.attacks.evasion import FastGradientMethod, ProjectedGradientDescent

    if name == "fgsm":
        return FastGradientMethod(clf, norm=np.inf, eps=eps, batch_size=batch_size), {"norm": "Linf"}
    if name == "pgd":
        step = 2.5 * eps / steps
        atk = ProjectedGradientDescent(
            clf, norm=np.inf, eps=eps, eps_step=step, max_iter=steps,
            num_random_init=1, batch_size=batch_size, verbose=False,
        )  # fmt: skip
        return atk, {"norm": "Linf", "steps": steps, "step_size": step, "restarts": 1}
    raise ConfigError(f"unknown attack {name!r}; choose one of {', '.join(WHITE_BOX)}")


def robust_accuracy(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    attack: str,
    eps_255: float,
    seed: int = 0,
    batch_size: int = 128,
    steps: int = 10,
) -> AttackResult:
    """Accuracy on adversarial examples of ``attack`` at Linf ``eps_255``/255."""
    if eps_255 < 0:
        raise ConfigError(f"invalid eps {eps_255}: must be >= 0 (units of 1/255)")
    torch.manual_seed(seed)
    np.random.seed(seed)
    clf = art_classifier(model, tuple(x.shape[1:]))
    atk, params = make_attack(attack, clf, eps_255 / 255.0, batch_size, steps)
    t0 = time.time()
    xn = x.numpy()
    x_adv = atk.generate(xn) if eps_255 > 0 else xn
    pred = clf.predict(x_adv, batch_size=batch_size).argmax(1)
    acc = float((pred == y.numpy()).mean())
    return AttackResult(attack, eps_255, acc, int(len(y)), params, seed, time.time() - t0)


def clean_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(y), batch_size):
            correct += int((model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum())
    return correct / max(1, len(y))


def as_dict(r: AttackResult) -> dict:
    return asdict(r)
