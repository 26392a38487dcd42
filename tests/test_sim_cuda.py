"""The simulator on a GPU: exact or nothing. TF32 and reduced-precision reductions are off while it
simulates (checked on any machine); on CUDA its outputs equal the CPU simulator's bit for bit."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from hw_dq.fpga.sim import HwSimulator

FIXTURE_RUN = Path(__file__).parent / "fixtures" / "run_v1"


def _flags() -> tuple:
    mm = torch.backends.cuda.matmul
    return (
        torch.get_float32_matmul_precision(), torch.backends.cudnn.conv.fp32_precision,
        mm.allow_bf16_reduced_precision_reduction, mm.allow_fp16_reduced_precision_reduction,
    )  # fmt: skip


class _Probe(HwSimulator):
    """A simulator whose Mul op also records the precision switches at the moment it runs
    (the per-op dispatch is the simulator's extension point; nothing is patched)."""

    seen: list[tuple] = []

    def _op_Mul(self, model, node, a):  # noqa: N802
        inner = super()._op_Mul(model, node, a)

        def run(*args):
            _Probe.seen.append(_flags())
            return inner(*args)

        return run


def _mul_graph(path: Path) -> Path:
    w = numpy_helper.from_array(np.full((1, 4), 3.0, dtype=np.float32), name="w")
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "w"], ["y"], name="mul")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], initializer=[w],
    )  # fmt: skip
    onnx.save(helper.make_model(graph), str(path))
    return path


def test_tf32_and_reduced_precision_are_off_while_simulating_and_restored_after(tmp_path):
    mm, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    before = _flags()
    try:
        # a caller that allows every shortcut (cuDNN's own default for convolutions is TF32)
        torch.set_float32_matmul_precision("high")
        conv.fp32_precision = "tf32"
        mm.allow_bf16_reduced_precision_reduction = mm.allow_fp16_reduced_precision_reduction = True
        _Probe.seen.clear()
        out = _Probe(_mul_graph(tmp_path / "m.onnx"))(np.ones((2, 4), dtype=np.float32))
        assert out.device.type == "cpu" and torch.equal(out, torch.full((2, 4), 3.0))
        assert _Probe.seen == [("highest", "ieee", False, False)]
        assert _flags() == ("high", "tf32", True, True)  # the caller's settings come back
    finally:
        torch.set_float32_matmul_precision(before[0])
        conv.fp32_precision = before[1]
        mm.allow_bf16_reduced_precision_reduction, mm.allow_fp16_reduced_precision_reduction = before[2:]


def test_a_device_this_machine_lacks_is_one_line(tmp_path):
    from hw_dq.errors import ConfigError

    with pytest.raises(ConfigError, match="device 'cuda:97' is not usable"):
        HwSimulator(_mul_graph(tmp_path / "m.onnx"), device="cuda:97")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_simulation_is_bit_identical_to_cpu(tmp_path):
    from hw_dq.data import load_split
    from hw_dq.fpga.build import build_run
    from hw_dq.fpga.hwattack import uint8_grid
    from hw_dq.run import Run

    run = tmp_path / "run"
    shutil.copytree(FIXTURE_RUN, run)
    build_run(run, "pynq-z1", target_fps=2000)
    build = Run(run).find_build("PYNQ-Z1")
    x = uint8_grid(load_split("sample", "test").take(256, 3).tensors()[0])
    noisy = np.clip(x + np.random.default_rng(0).integers(-8, 9, x.shape), 0, 255).astype(np.float32)

    def sim(device: str) -> HwSimulator:
        return HwSimulator(build / "dataflow_parent.onnx", device=device, partition=build / "dataflow_model.onnx")

    cpu, cuda = sim("cpu"), sim("cuda")
    for batch in (x, noisy):
        got, ref = cuda(batch), cpu(batch)
        assert got.device.type == "cpu" and got.dtype == ref.dtype
        assert torch.equal(got, ref), f"{int((got != ref).any(1).sum())} of {len(batch)} images differ from the CPU"
