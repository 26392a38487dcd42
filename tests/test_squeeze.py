"""Feature squeezing: bit depth is exactly the input quantizer, median matches scipy, STE gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from hw_dq import run as rd
from hw_dq.errors import ConfigError
from hw_dq.nn.models import create_model
from hw_dq.robust.attacks import robust_accuracy
from hw_dq.robust.squeeze import MedianSmoothing, Squeezed, apply_defense, bit_depth_reference
from tests.conftest import test_data, tiny_run


@pytest.mark.parametrize("bits", [1, 3, 5])
def test_bit_depth_is_exactly_the_input_quantizer(bits):
    model = apply_defense(create_model("tiny", 2, 2), f"bits:{bits}")
    assert not isinstance(model, Squeezed)  # it replaced the model's own input quantizer
    x = torch.cat([torch.arange(256).float().div(255).repeat(3, 1).reshape(1, 3, 16, 16), torch.rand(4, 3, 16, 16)])
    q = model.input_quant(x)
    levels = 2**bits - 1
    assert torch.equal(torch.round(q * levels), torch.round(bit_depth_reference(x, bits) * levels))
    assert torch.allclose(q, bit_depth_reference(x, bits), atol=1e-6)


@pytest.mark.parametrize("k", [2, 3])
def test_median_matches_scipy(k):
    x = torch.rand(2, 3, 9, 11)
    expect = ndimage.median_filter(x.numpy(), size=(1, 1, k, k), mode="mirror")
    assert np.array_equal(MedianSmoothing(k)(x).numpy(), expect)


def test_squeezers_pass_straight_through_gradients():
    model = apply_defense(create_model("tiny", None, None), "median:2+bits:4")
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    model(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_bad_spec():
    for spec in ("blur:2", "bits:9", "median:x"):
        with pytest.raises(ConfigError):
            apply_defense(create_model("tiny", None, None), spec)


def test_attack_with_defense_in_the_loop(tmp_path_factory):
    model = rd.load_model(tiny_run(tmp_path_factory.getbasetemp()))[0]
    x, y = test_data(48)
    squeezed = apply_defense(model, "bits:4")
    r = robust_accuracy(squeezed, x, y, "pgd", 64.0)
    assert r.robust_acc <= 0.05  # the straight-through gradient still finds the way through
