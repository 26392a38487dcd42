"""The batched simulator is bit-exact with FINN's own execution; altered builds are caught."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from hw_dq.data import load_split
from hw_dq.fpga.build import build_run
from hw_dq.fpga.hwattack import (
    DATAFLOW,
    PARENT,
    craft,
    finn_reference,
    load_simulator,
    locate_disagreement,
    uint8_grid,
)
from hw_dq.fpga.sim import HwSimulator, SimulationError
from hw_dq.run import load_model
from hw_dq.train.loop import TrainConfig, train

N_EXACT = 200


COMMON = dict(model="cnv", width=0.25, train_subset=2048, test_subset=64, batch_size=64)


@pytest.fixture(scope="module")
def fp_run(tmp_path_factory) -> Path:
    """A short full-precision run: low-bit nets fine-tuned from it are alive (QAT from scratch on
    this little data often leaves every activation at zero, which would make the check vacuous)."""
    run = tmp_path_factory.mktemp("hwfp") / "fp"
    train(TrainConfig(**COMMON, wbits=None, abits=None, epochs=2, lr=0.05), run, progress=False)
    return run


@pytest.fixture(scope="module", params=[(1, 1), (2, 2), (4, 4)], ids=["w1a1", "w2a2", "w4a4"])
def cnv_build(request, fp_run, tmp_path_factory) -> Path:
    wbits, abits = request.param
    run = tmp_path_factory.mktemp("hw") / f"cnv_w{wbits}a{abits}"
    cfg = TrainConfig(**COMMON, wbits=wbits, abits=abits, epochs=1, lr=0.01, init_from=str(fp_run))
    train(cfg, run, progress=False)
    build_run(run, "Pynq-Z1", target_fps=2000)
    return run


@pytest.fixture(scope="module")
def images() -> tuple[np.ndarray, np.ndarray]:
    x, y = load_split("sample", "test").take(N_EXACT, seed=1).tensors()
    return x.numpy(), y.numpy()


def test_bit_exact_with_finn_on_real_and_adversarial_images(cnv_build, images):
    x, y = images
    build = cnv_build / "build" / "Pynq-Z1"
    sim = load_simulator(build)  # also checks the build's own sample images
    xin = uint8_grid(x)
    ref = finn_reference(build, xin)
    got = sim(xin).numpy().reshape(ref.shape)
    assert np.array_equal(got, ref), f"{int((got != ref).any(1).sum())} of {len(x)} images differ"
    model, _ = load_model(cnv_build)
    adv, _ = craft("transfer-pgd", model, sim, x[:32], y[:32], 8.0, steps=5)
    xa = uint8_grid(adv)
    assert np.array_equal(sim(xa).numpy().reshape(32, -1), finn_reference(build, xa).reshape(32, -1))
    # not a degenerate comparison: the accelerator's logits differ across images
    assert len(np.unique(got, axis=0)) > 20, "the network is dead: the comparison would be vacuous"


def test_fused_convolutions_and_chunks_change_nothing(cnv_build, images):
    """im2col + MVAU run as one convolution, in chunks of images: every tensor is unchanged."""
    build = cnv_build / "build" / "Pynq-Z1"
    fused = HwSimulator(build / PARENT, partition=build / DATAFLOW)
    plain = HwSimulator(build / PARENT, partition=build / DATAFLOW, fuse=False)
    n_conv = sum("ConvolutionInputGenerator" in s.op for s in plain.steps)
    assert len(plain.steps) - len(fused.steps) >= n_conv - 2, "the convolutions were not fused"
    xin = uint8_grid(images[0][:48])
    a, b = fused.run(xin, keep=True), plain.run(xin, keep=True)
    shared = [k for k in a if k in b]
    assert len(shared) > 10
    for k in shared:
        assert torch.equal(a[k], b[k]), k
    chunked = HwSimulator(build / PARENT, partition=build / DATAFLOW, chunk=7)
    assert torch.equal(chunked(xin), fused(xin))


def test_altered_threshold_is_caught_and_located(cnv_build, tmp_path):
    if "w2a2" not in cnv_build.name:
        pytest.skip("one bit width is enough for this check")
    src = cnv_build / "build" / "Pynq-Z1"
    bad = tmp_path / "altered"
    shutil.copytree(src, bad)
    m = onnx.load(str(bad / DATAFLOW))
    mvaus = [n for n in m.graph.node if n.op_type.startswith("MVAU") and len(n.input) > 2]
    target = mvaus[1]  # the second conv layer's thresholds
    init = next(i for i in m.graph.initializer if i.name == target.input[2])
    thr = numpy_helper.to_array(init).copy()
    thr[:, :] = thr.min() - 1000  # every channel always fires at its top level
    init.CopyFrom(numpy_helper.from_array(thr.astype(thr.dtype), init.name))
    onnx.save(m, str(bad / DATAFLOW))
    with pytest.raises(SimulationError, match="differs from FINN's execution"):
        load_simulator(bad)
    sim = HwSimulator(bad / "dataflow_parent.onnx", partition=bad / DATAFLOW)
    model, _ = load_model(cnv_build)
    x, _ = load_split("sample", "test").take(8).tensors()
    rows = locate_disagreement(model, sim, x.numpy())
    # layer 0 is the input, 1 the first conv's activation, 2 the second conv's
    assert all(r["layer"] == 2 for r in rows), rows
    assert all(r["hw_node"] == target.name for r in rows)
    # the unaltered build agrees with Brevitas at every layer on clean images
    good = load_simulator(src)
    assert all(r["layer"] is None for r in locate_disagreement(model, good, x.numpy()))


def test_simulator_rejects_unknown_nodes(tmp_path):
    from onnx import TensorProto, helper

    node = helper.make_node("Celu", ["x"], ["y"], name="weird")
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )  # fmt: skip
    onnx.save(helper.make_model(graph), str(tmp_path / "m.onnx"))
    with pytest.raises(SimulationError, match="weird .*no bit-exact simulation"):
        HwSimulator(tmp_path / "m.onnx")
    with pytest.raises(SimulationError, match="chunk must be >= 1"):
        HwSimulator(tmp_path / "m.onnx", chunk=0)


def test_uint8_grid_rounding_keeps_eps():
    x = torch.randint(0, 256, (4, 3, 8, 8)).float() / 255
    eps = 3 / 255
    adv = x + (torch.rand_like(x) * 2 - 1) * eps
    q = uint8_grid(adv) / 255.0
    assert np.abs(q - x.numpy()).max() <= eps + 1e-7
    assert np.array_equal(np.rint(q * 255), q * 255)
