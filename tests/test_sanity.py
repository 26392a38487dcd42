"""Gradient-masking checks: they warn on a deliberately masked model and pass on a normal one."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hw_dq import run as rd
from hw_dq.robust.attacks import AttackParams, clean_accuracy, robust_accuracy
from hw_dq.robust.sanity import SanityConfig, run_checks
from tests.conftest import test_data, tiny_run

PARAMS = AttackParams(square_queries=300)
CFG = SanityConfig(n_probe=64, square_queries=300, strong_steps_factor=3, strong_restarts=2)


class HardRound(nn.Module):
    """Rounds the input to k + 1 levels with torch.round: its gradient is exactly zero (no STE)."""

    def __init__(self, k: int = 3) -> None:
        super().__init__()
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x * self.k) / self.k


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    evals = []
    for a in ("fgsm", "pgd"):
        for e in (2.0, 8.0):
            r = robust_accuracy(model, x, y, a, e, params=PARAMS)
            evals.append({"attack": a, "norm": r.norm, "eps": e, "robust_acc": r.robust_acc,
                          "n_examples": r.n_examples})  # fmt: skip
    return run_checks(model, x, y, evals, clean_accuracy(model, x, y), params=PARAMS, cfg=CFG)


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> nn.Module:
    return rd.load_model(tiny_run(tmp_path_factory.getbasetemp()))[0]


def test_checks_pass_on_a_normal_model(net):
    x, y = test_data(64)
    rep = evaluate(net, x, y)
    status = {c["name"]: c["status"] for c in rep["checks"]}
    assert rep["verdict"] == "pass", rep["checks"]
    assert set(status) == {"monotone_in_eps", "zero_at_large_eps", "iterative_beats_single_step",
                           "white_box_beats_black_box", "more_steps_restarts", "worst_case_near_white_box",
                           "adaptive_not_stronger", "attack_library_warnings"}  # fmt: skip


def test_checks_warn_on_a_gradient_masked_model(net):
    masked = nn.Sequential(HardRound(), net).eval()
    x, y = test_data(64)
    assert clean_accuracy(masked, x, y) > 0.2  # still a working classifier
    rep = evaluate(masked, x, y)
    status = {c["name"]: c["status"] for c in rep["checks"]}
    assert rep["verdict"] == "warn"
    # zero gradients: white-box attacks cannot move the input, Square (scores only) can
    assert status["white_box_beats_black_box"] == "warn", rep["checks"]
    assert status["zero_at_large_eps"] == "warn", rep["checks"]
    assert all(c["evidence"] for c in rep["checks"])


def test_per_image_worst_case_exposes_a_masked_model(net):
    """Rounding to the UINT8 grid with torch.round: the same classifier, zero gradients.

    White-box PGD alone rates it high; the per-image worst case over PGD, Square and PGD
    transferred from the unmasked network rates it near 0%, and the masking checks say so.
    """
    from hw_dq.robust.evaluate import evaluation, worst_case
    from hw_dq.robust.sanity import masking_checks

    masked = nn.Sequential(HardRound(255), net).eval()
    x, y = test_data(64)
    clean = clean_accuracy(masked, x, y)
    assert clean == clean_accuracy(net, x, y) > 0.3  # the inputs are on the grid already: same predictions
    evals = []
    for a in ("pgd", "square", "transfer-pgd"):
        r = robust_accuracy(masked, x, y, a, 8.0, params=PARAMS, source=net)
        evals.append(evaluation(a, r.kind, r.norm, 8.0, r.robust_acc, r.n_examples, 0, r.wall_s, r.max_perturbation,
                                r.params, robust_mask=r.robust_mask))  # fmt: skip
    pgd = evals[0]["robust_acc"]
    w = worst_case(evals, 8.0)
    assert pgd >= 0.6 * clean  # PGD alone: gradients are zero, only the random start moves the input
    assert w is not None and w["robust_acc"] <= 0.05
    checks = {c["name"]: c for c in masking_checks(evals, CFG)}
    assert checks["worst_case_near_white_box"]["status"] == "warn", checks
    assert "masked" in checks["worst_case_near_white_box"]["evidence"]
