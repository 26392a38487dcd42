"""Learned activation ranges: levels, initialisation, training signal, checkpoints, scheme stamps."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from hw_dq import run as rd
from hw_dq.errors import CheckpointError, ConfigError, HwDqError
from hw_dq.nn.models import ModelConfig, create_model, model_from_config
from hw_dq.nn.quant import (
    SCHEME_FIXED,
    SCHEME_LEARNED,
    QuantSpec,
    RangeCollapseError,
    check_ranges,
    learned_ranges,
    quant_scheme,
)

FIXTURE = Path(__file__).parent / "fixtures" / "run_v1"


def _calibrate(act: torch.nn.Module, x: torch.Tensor, steps: int = 25) -> None:
    act.train()
    for _ in range(steps):
        act(x)


@pytest.mark.parametrize("abits", [1, 2, 4])
def test_learned_range_levels_and_bit_width_dependent_init(abits):
    torch.manual_seed(0)
    act = QuantSpec(2, abits).act()
    x = torch.randn(64, 8, 12, 12)
    _calibrate(act, x)
    act.eval()
    (r,) = learned_ranges(torch.nn.Sequential(act)).values()
    r = float(r.detach())
    y = act(torch.linspace(-2, 2 * r, 4001))
    levels = torch.unique(torch.round(y / r * 1e5) / 1e5)
    assert torch.allclose(levels, torch.arange(2**abits) / (2**abits - 1), atol=1e-4)
    # initialised near the MSE-optimal clip of ReLU(N(0, 1)) for the bit width: 1.23, 1.95, 2.89
    assert r == pytest.approx({1: 1.23, 2: 1.95, 4: 2.89}[abits], rel=0.1)
    if abits == 1:  # the fixed range [0, 6] leaves ~all 1-bit activations at 0; the learned one does not
        fixed = QuantSpec(2, 1, act_range="fixed").act().eval()
        assert (fixed(x) > 0).float().mean() < 0.01
        assert 0.15 < (act(x) > 0).float().mean() < 0.4


def test_gradient_reaches_the_range():
    torch.manual_seed(0)
    act = QuantSpec(2, 2).act()
    _calibrate(act, torch.randn(16, 4, 8, 8))
    (r,) = learned_ranges(torch.nn.Sequential(act)).values()
    assert r.requires_grad
    x = 3 * torch.randn(16, 4, 8, 8)  # many inputs far above r: the clipping error pulls r up
    ((act(x) - x.relu()) ** 2).sum().backward()
    assert r.grad is not None and float(r.grad) < 0  # gradient descent raises r


def test_checkpoint_round_trip_and_fine_tuning_from_float(tmp_path):
    torch.manual_seed(0)
    m = create_model("tiny", 2, 1)
    x = torch.rand(32, 3, 32, 32)
    for _ in range(25):
        m(x)
    state = m.state_dict()
    assert sum(k.endswith("scaling_impl.value") for k in state) == 2
    m2 = create_model("tiny", 2, 1)
    m2.load_state_dict(state, strict=True)
    m.eval(), m2.eval()
    assert torch.equal(m(x), m2(x))
    # a full-precision checkpoint has no ranges: strict loading still works and they calibrate
    fp = create_model("tiny", None, None).state_dict()
    m3 = create_model("tiny", 2, 1)
    m3.load_state_dict(fp, strict=True)
    for _ in range(25):
        m3(x)
    assert all(float(r.detach()) != 1.0 for r in learned_ranges(m3).values())
    # an unexpected key is still an error
    with pytest.raises(RuntimeError, match="Unexpected"):
        create_model("tiny", 2, 1).load_state_dict({**state, "bogus": torch.zeros(1)}, strict=True)


def test_check_ranges_names_the_collapsed_layer():
    m = create_model("tiny", 2, 2)
    m(torch.rand(4, 3, 32, 32))
    check_ranges(m)  # healthy
    r = learned_ranges(m)["features.6"]
    with torch.no_grad():
        r.fill_(1e-6)
    with pytest.raises(RangeCollapseError, match=r"features\.6 collapsed") as e:
        check_ranges(m)
    assert isinstance(e.value, HwDqError) and "\n" not in str(e.value)
    with torch.no_grad():
        r.fill_(float("nan"))
    with pytest.raises(RangeCollapseError, match="features.6"):
        check_ranges(m)
    check_ranges(create_model("tiny", 2, 2, act_range="fixed"))  # nothing learned, nothing to check


def test_scheme_is_a_function_of_the_act_range():
    assert quant_scheme("fixed") == SCHEME_FIXED and SCHEME_FIXED.startswith("hw-dq-quant/1 ")
    assert quant_scheme("learned") == SCHEME_LEARNED and SCHEME_LEARNED.startswith("hw-dq-quant/2 ")
    assert ModelConfig().quant_scheme == SCHEME_LEARNED
    assert ModelConfig(act_range="fixed").quant_scheme == SCHEME_FIXED
    with pytest.raises(ConfigError, match="choose one of fixed, learned"):
        QuantSpec(2, 2, act_range="pact")


def test_old_run_directory_loads_under_the_fixed_range():
    model, cfg = rd.load_model(FIXTURE)
    assert "act_range" not in cfg["model"] and cfg["quant_scheme"] == SCHEME_FIXED
    assert not learned_ranges(model)
    act = model.features[2]
    y = act(torch.linspace(-1, 7, 801))
    assert torch.allclose(torch.unique(y), torch.tensor([0.0, 2.0, 4.0, 6.0]))


def test_stamps_decide_and_unknown_or_contradicting_stamps_are_refused(tmp_path):
    run = tmp_path / "r"
    shutil.copytree(FIXTURE, run)
    conf = json.loads((run / "config.json").read_text())
    conf["quant_scheme"] = "hw-dq-quant/7 (something else)"
    (run / "config.json").write_text(json.dumps(conf))
    with pytest.raises(CheckpointError, match="trained with quantizers 'hw-dq-quant/7") as e:
        rd.load_model(run)
    assert "\n" not in str(e.value)
    conf["quant_scheme"] = SCHEME_FIXED
    conf["model"]["act_range"] = "learned"
    (run / "config.json").write_text(json.dumps(conf))
    with pytest.raises(CheckpointError, match="contradicts"):
        rd.load_model(run)
    # a stamp-less run predates the stamp: scheme 1
    mcfg = ModelConfig.from_stored({"name": "tiny", "wbits": 2, "abits": 2}, None)
    assert mcfg.act_range == "fixed"
    assert not learned_ranges(model_from_config(mcfg))
