"""The loss of one training step: the recipe's adversarial loss, the threshold terms, the Lipschitz penalty.

One function for the training loop and for ``benchmarks/robust_step``, so what the benchmark times is
the step the loop takes.
"""

from __future__ import annotations

import torch
from torch import nn

from hw_dq.data import seeded_generator
from hw_dq.nn import lipschitz
from hw_dq.train import adversarial as adv
from hw_dq.train import margin
from hw_dq.train.config import TrainConfig


def training_loss(
    net: nn.Module,
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: TrainConfig,
    where: tuple[int, int, int],
    step: int,
    total: int,
    teacher: nn.Module | None,
    reg_layers: list,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(the recipe's loss, the regularisers, the logits whose accuracy is reported) for one batch.

    ``net`` is what the forward runs through (``model`` itself, or its DistributedDataParallel wrapper);
    ``where`` = (seed, epoch, step in epoch) seeds the attack's and the threshold noise's draws, so a
    resumed run draws what an uninterrupted one does; ``step`` of ``total`` drives IBP's ramps;
    ``teacher`` is rslad's; ``reg_layers`` are ``lipschitz.lipschitz_layers(model)``, found once. The
    regulariser term is the Lipschitz penalty (``beta``) plus the threshold margin (``act_margin``)."""
    noise_gen = seeded_generator(*where, 37) if cfg.act_noise else None
    with (
        margin.recording(model, cfg.act_margin > 0) as terms,
        margin.threshold_noise(model, cfg.act_noise, noise_gen),
    ):
        ce, logits = adv.adversarial_loss(net, x, y, cfg.adv, seeded_generator(*where, 31), step, total, teacher)
    reg = lipschitz.regulariser(model, cfg.beta, cfg.lipschitz_target, reg_layers).to(ce)
    pen = margin.margin_loss(terms, cfg.act_margin)
    return ce, reg if pen is None else reg + pen, logits
