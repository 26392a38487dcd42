"""Error amplification equals a hand computation; the verb writes table, JSON and PNG."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from hw_dq.robust.analyse import amplification, analyse_runs, taps
from tests.conftest import tiny_run


def test_amplification_equals_hand_computation_on_two_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Hardtanh(0.0, 6.0), nn.Linear(3, 2)).eval()
    with torch.no_grad():
        model[0].bias.copy_(torch.tensor([0.5, -0.2, 0.1]))  # one unit often clipped, others live
    x = torch.rand(5, 4)
    x_adv = x + 0.05 * torch.randn(5, 4)
    assert [n for n, _ in taps(model)] == ["1", "2"]
    rows = amplification(model, x, x_adv)

    w1, b1 = model[0].weight.detach().numpy(), model[0].bias.detach().numpy()
    w2, b2 = model[2].weight.detach().numpy(), model[2].bias.detach().numpy()

    def f(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        h = np.clip(v @ w1.T + b1, 0.0, 6.0)
        return h, h @ w2.T + b2

    (h, o), (ha, oa) = f(x.numpy()), f(x_adv.numpy())
    expect = []
    for clean, adv in ((h, ha), (o, oa)):
        n = np.linalg.norm(clean, axis=1)
        keep = n > 0
        expect.append(float(np.mean(np.linalg.norm(adv - clean, axis=1)[keep] / n[keep])))
    assert [r["rel_dist"] for r in rows] == pytest.approx(expect, rel=1e-5)
    assert [r["layer"] for r in rows] == ["1", "2"]


def test_analyse_runs_writes_table_json_png(tmp_path_factory, tmp_path):
    run = tiny_run(tmp_path_factory.getbasetemp())
    rep = analyse_runs([run], tmp_path / "amp", attack="fgsm", eps=8.0, n=32)
    (r,) = rep["runs"]
    assert len(r["rows"]) == len(r["op_norms"]) == 3  # two conv blocks and the logits
    assert all(row["rel_dist"] > 0 for row in r["rows"])
    assert (tmp_path / "amp" / "amplification.png").stat().st_size > 1000
    assert json.loads((tmp_path / "amp" / "amplification.json").read_text())["eps"] == 8.0
    assert "||BN(W)||" in (tmp_path / "amp" / "amplification.md").read_text()
