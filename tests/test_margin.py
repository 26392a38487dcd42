"""The threshold-margin penalty: its distance, what it records, and that training with it moves
quantized pre-activations away from the rounding thresholds."""

from __future__ import annotations

import torch

from hw_dq import run as rd
from hw_dq.data import load_split
from hw_dq.train import margin
from hw_dq.train.loop import TrainConfig, train


def test_distance_and_penalty_on_known_points() -> None:
    u = torch.tensor([0.5, 1.0, 2.5, -1.0, 4.0, 3.25])
    assert torch.allclose(margin.threshold_distance(u, 3), torch.tensor([0.0, 0.5, 0.0, 1.5, 1.5, 0.75]))
    assert margin.penalty(torch.tensor([0.5]), 3) == 1.0  # on a threshold
    assert margin.penalty(torch.tensor([2.0, -3.0, 7.0]), 3) == 0.0  # a level's centre, below and above the range
    assert margin.penalty(torch.tensor([1.75]), 3) == 0.25
    assert margin.penalty(torch.tensor([3.0]), 3) == 0.0  # the top level: no threshold above it


def _near_and_alive(run, x) -> tuple[float, float]:
    """Fractions of the quantized ReLUs' inputs within a tenth of a step of a threshold, and above the
    first threshold (not level 0)."""
    model, _ = rd.load_model(run)
    near, alive = [], []

    def hook(m, args):
        levels = 2 ** int(m.act_quant.bit_width()) - 1
        u = args[0] * (levels / margin.act_range(m))
        near.append((margin.threshold_distance(u, levels) < 0.1).float().mean())
        alive.append((u > 0.5).float().mean())

    for a in margin._quantized_acts(model):
        a.register_forward_pre_hook(hook)
    with torch.no_grad():
        model(x)
    return float(torch.stack(near).mean()), float(torch.stack(alive).mean())


def test_recording_keeps_the_last_forward_only(tmp_path) -> None:
    cfg = TrainConfig(model="tiny", wbits=2, abits=2, train_subset=128, batch_size=64, epochs=1)
    train(cfg, tmp_path / "r", progress=False)
    model, _ = rd.load_model(tmp_path / "r")
    n_acts = len(margin._quantized_acts(model))
    assert n_acts >= 2
    x = torch.rand(4, 3, 32, 32)
    with margin.recording(model) as terms:
        model(x)
        model(x)
        assert len(terms) == n_acts
    model(x)
    assert len(terms) == n_acts  # hooks removed on exit
    with margin.recording(model, enabled=False) as off:
        model(x)
    assert off == [] and margin.margin_loss(off, 1.0) is None


def test_training_with_the_margin_moves_inputs_off_the_thresholds(tmp_path) -> None:
    """Same seed, same data: the run with the penalty ends with far fewer quantized pre-activations near
    a threshold than the run without, on held-out images, and not by silencing the activations (the
    trivial way to meet it: every input far below the first threshold)."""
    base = dict(model="tiny", wbits=2, abits=2, train_subset=2048, batch_size=64, epochs=3, lr=0.02)
    train(TrainConfig(**base), tmp_path / "off", progress=False)
    train(TrainConfig(**base, act_margin=10.0), tmp_path / "on", progress=False)
    x, _ = load_split("sample", "test").take(256, seed=1).tensors()
    (near_off, alive_off), (near_on, alive_on) = (_near_and_alive(tmp_path / r, x) for r in ("off", "on"))
    assert near_on < 0.6 * near_off, (near_on, near_off)  # measured: 0.035 against 0.083
    assert alive_on > 0.7 * alive_off, (alive_on, alive_off)  # measured: 0.31 against 0.31
