from __future__ import annotations

import pytest
import torch

from hw_dq.errors import ConfigError
from hw_dq.nn.models import MODELS, create_model
from hw_dq.nn.quant import parse_bits

MODES = [(None, None), (4, 4), (2, 2), (1, 1), (1, 2)]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("wbits, abits", MODES)
def test_every_model_and_mode_builds_and_runs(name, wbits, abits):
    kw = {"width": 0.25} if name == "cnv" else {"width": 1, "depth": 10} if name == "wrn" else {}
    m = create_model(name, wbits, abits, **kw)
    out = m(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_fp_vq_share_one_architecture():
    fp = create_model("cnv", None, None, width=0.25).state_dict()
    vq = create_model("cnv", 2, 2, width=0.25).state_dict()
    assert list(fp) == list(vq)
    assert all(fp[k].shape == vq[k].shape for k in fp)


@pytest.mark.parametrize("bad", ["0", "9", "-1", "two", "2.5"])
def test_invalid_bits_are_rejected(bad):
    with pytest.raises(ConfigError, match=r"1\.\.8 or 'float'"):
        parse_bits(bad)


def test_float_bits():
    assert parse_bits("float") is None and parse_bits("FP") is None and parse_bits(3) == 3


def test_unknown_model_lists_choices():
    with pytest.raises(ConfigError, match="choose one of cnv, wrn, tiny"):
        create_model("resnet", 2, 2)


def test_bad_wrn_depth():
    with pytest.raises(ConfigError, match="6n\\+4"):
        create_model("wrn", 2, 2, depth=12)


def test_input_quantizer_maps_pixels_exactly():
    m = create_model("tiny", 2, 2)
    x = torch.arange(256, dtype=torch.float32) / 255
    y = m.input_quant(x)
    assert torch.allclose(y * 255, torch.arange(256, dtype=torch.float32), atol=1e-4)
    # an off-grid input lands on the nearest 8-bit level
    assert torch.allclose(m.input_quant(torch.tensor([0.3 / 255 + 10 / 255])) * 255, torch.tensor([10.0]))


@pytest.mark.parametrize("abits", [1, 2, 3, 4])
def test_relu6_activation_levels(abits):
    act = create_model("tiny", 2, abits, act_range="fixed").features[2]
    y = act(torch.linspace(-2, 8, 2001))
    levels = torch.unique(torch.round(y * 1e4) / 1e4)
    step = 6.0 / (2**abits - 1)
    assert len(levels) == 2**abits
    assert torch.allclose(levels, torch.arange(2**abits) * step, atol=1e-4)


@pytest.mark.parametrize("wbits", [1, 2, 4])
def test_weight_quantizer_levels(wbits):
    conv = create_model("tiny", wbits, 2).features[0]
    q = conv.quant_weight()
    ints = torch.unique(q.int())
    if wbits == 1:
        assert ints.tolist() == [-1, 1]
    else:
        assert ints.abs().max() <= 2 ** (wbits - 1) - 1
        assert ints.abs().max() == 2 ** (wbits - 1) - 1  # max |w| per channel maps to the top level
    assert q.scale.shape[0] == conv.weight.shape[0]  # per output channel


@pytest.mark.parametrize("name", MODELS)
def test_end_bits_quantize_only_the_first_and_last_layer_wider(name):
    kw = {"width": 0.25} if name == "cnv" else {"width": 1, "depth": 10} if name == "wrn" else {}
    m = create_model(name, 2, 2, end_bits=8, **kw)
    layers = [x for x in m.modules() if isinstance(x, torch.nn.Conv2d | torch.nn.Linear)]
    bits = [int(x.quant_weight().bit_width) for x in layers]
    assert bits[0] == 8 and bits[-1] == 8 and set(bits[1:-1]) == {2}
    assert m(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    # full-precision weights stay full precision; a bad width is a one-line ConfigError
    assert all(not x.weight_quant.is_quant_enabled for x in create_model("tiny", None, 2, end_bits=8).modules()
               if isinstance(x, torch.nn.Conv2d | torch.nn.Linear))  # fmt: skip
    with pytest.raises(ConfigError, match="end_bits"):
        create_model(name, 2, 2, end_bits=9, **kw)


def test_model_config_round_trips_the_new_fields():
    from hw_dq.nn.models import ModelConfig, model_from_config
    from hw_dq.nn.quant import BoundedBatchNorm1d, BoundedBatchNorm2d

    cfg = ModelConfig(name="cnv", width=0.25, end_bits=8, bn_gain_max=2.0, act_range="fixed")
    assert ModelConfig.from_stored(cfg.to_dict(), cfg.quant_scheme) == cfg
    m = model_from_config(cfg)
    bns = [x for x in m.modules() if isinstance(x, torch.nn.modules.batchnorm._BatchNorm)]
    assert len(bns) == 8 and all(isinstance(b, BoundedBatchNorm2d | BoundedBatchNorm1d) for b in bns)
    assert all(b.gain_max == 2.0 for b in bns)
