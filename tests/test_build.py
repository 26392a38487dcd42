"""FINN build: --fit within the board's limits (real FINN estimates), artifacts, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from benchmarks.fpga_fit import lively  # one helper for the benchmark and the test
from hw_dq.fpga.boards import load_board_file
from hw_dq.nn.quant import QuantSpec
from tests.conftest import assert_one_line_error, run_cli, run_cli_here, train_tiny

ESTIMATED = ("LUT", "BRAM_18K", "URAM", "DSP")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("build")
    run = train_tiny(root / "run")
    boards = root / "boards"
    boards.mkdir()
    small = {  # a made-up small board, so that the limits bind for the tiny model
        "name": "Small", "finn_board": "Pynq-Z1", "part": "xc7z020clg400-1",
        "resources": {"LUT": 12000, "FF": 24000, "BRAM_18K": 40, "URAM": 0, "DSP": 20},
        "clock_mhz": 100, "shell_flow": "vivado_zynq",
    }  # fmt: skip
    (boards / "Small.json").write_text(json.dumps(small))
    proc = run_cli("build", str(run), "--board", "Small", "--fit", "--boards-dir", str(boards), "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "fits FINN's recommended limits" in proc.stdout
    return run, boards


def test_fit_respects_limits_with_real_finn_estimates(built: tuple[Path, Path]) -> None:
    run, boards = built
    rep = json.loads((run / "build" / "Small" / "report.json").read_text())
    board = load_board_file(boards / "Small.json")
    limits = board.limits()
    assert rep["fits"] and rep["folding"] == "fit"
    for k in ESTIMATED:
        assert rep["total"][k] <= limits[k], (k, rep["total"][k], limits[k])
    search = rep["fit_search"]
    assert any(not s["fits"] for s in search), "the limits should bind on this small board"
    # nothing that fits in the search was faster than the chosen folding
    assert rep["max_cycles"] <= min(s["max_cycles"] for s in search if s["fits"])
    for s in search:
        assert s["fits"] == all(s[k] <= limits[k] for k in ESTIMATED)
    assert all(v.startswith("SUCCESS") for v in rep["verification"].values()), rep["verification"]


def test_build_folder_has_its_artifacts(built: tuple[Path, Path]) -> None:
    run, _ = built
    out = run / "build" / "Small"
    for f in ("report.json", "report.md", "dataflow_model.onnx", "dataflow_parent.onnx", "folding_config.json",
              "build_config.json", "sample_input.npy", "sample_output.npy"):  # fmt: skip
        assert (out / f).is_file(), f
    cfg = json.loads((out / "build_config.json").read_text())
    assert "step_synthesize_bitfile" in cfg["steps"] and "deployment_package" in cfg["generate_outputs"]
    assert cfg["fpga_part"] == "xc7z020clg400-1"
    fold = json.loads((out / "folding_config.json").read_text())
    assert any(k.startswith("MVAU") and "PE" in v for k, v in fold.items())
    md = (out / "report.md").read_text()
    assert "finn build build_config.json dataflow_model.onnx" in md and "bottleneck" in md
    rep = json.loads((out / "report.json").read_text())
    assert rep["layers"] and rep["bottleneck"] and rep["fps"] > 0 and rep["latency_us"] > 0


def test_target_fps_and_clock_override(built: tuple[Path, Path], tmp_path: Path) -> None:
    from hw_dq.fpga.build import build_run

    run, _ = built
    rep = build_run(run, "Pynq-Z1", target_fps=5000, clock_mhz=200, out=tmp_path / "b")
    assert rep["clock_mhz"] == 200 and rep["folding"] == "target_fps"
    assert rep["fps"] >= 5000 * 0.95


def test_truncated_and_non_qonnx_files_are_one_line_errors(built: tuple[Path, Path], tmp_path: Path) -> None:
    run, _ = built
    data = (run / "export" / "qonnx.onnx").read_bytes()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[: len(data) // 2])
    assert_one_line_error(run_cli_here("build", str(cut), "--board", "Pynq-Z1"), "not a valid ONNX file")
    node = helper.make_node("Relu", ["x"], ["y"])
    g = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 32, 32])],
    )  # fmt: skip
    plain = tmp_path / "plain.onnx"
    onnx.save(helper.make_model(g), str(plain))
    assert_one_line_error(run_cli_here("build", str(plain), "--board", "Pynq-Z1"), "not a QONNX model")


class _Unmappable(torch.nn.Module):
    """A quantized CNN with a sine between two layers: an op that FINN has no hardware layer for."""

    def __init__(self) -> None:
        super().__init__()
        spec = QuantSpec(2, 2)
        self.input_quant, self.act, self.act2 = spec.input_quant(), spec.act(), spec.act()
        self.conv, self.conv2 = spec.conv(3, 8, 3, 1, 1), spec.conv(8, 8, 3, 1, 1)
        self.head = spec.linear(8 * 32 * 32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.conv(self.input_quant(x)))
        return self.head(torch.flatten(self.act2(torch.sin(self.conv2(x))), 1))


def test_unmappable_model_is_one_line_error(tmp_path: Path) -> None:
    """An op with no FINN hardware layer is a one-line error naming the layer."""
    from hw_dq.fpga.export import export_model, sample_images

    torch.manual_seed(0)
    export_model(_Unmappable().eval(), tmp_path, sample_images(None, 2))
    proc = run_cli("build", str(tmp_path / "qonnx.onnx"), "--board", "ZCU104", "--target-fps", "100", "--quiet")
    assert_one_line_error(proc, "cannot be mapped to FINN hardware", "Sin")


@pytest.mark.parametrize("bits", [2, pytest.param(4, marks=pytest.mark.slow)])  # ~30 s each here
def test_small_wrn_builds_with_finn_verification(tmp_path: Path, bits: int) -> None:
    """WRN-10-1: convex-combination residuals (one shared quantizer) map to FINN layers, verified."""
    from hw_dq.fpga.boards import get_board
    from hw_dq.fpga.build import build_model
    from hw_dq.fpga.export import export_model, sample_images
    from hw_dq.nn.models import create_model

    torch.manual_seed(0)
    exp = export_model(lively(create_model("wrn", bits, bits, width=1, depth=10)), tmp_path, sample_images(None, 4))
    out = np.load(exp.sample_output)
    assert np.ptp(out, axis=0).max() > 0, "trivial (constant) outputs would make the verification vacuous"
    rep = build_model(exp.qonnx, get_board("ZCU104"), tmp_path / "b", target_fps=1000,
                      sample_input=exp.sample_input, sample_output=exp.sample_output)  # fmt: skip
    assert set(rep["verification"]) >= {"streamlined_python", "hw_layers_python"}
    assert all(v.startswith("SUCCESS") for v in rep["verification"].values()), rep["verification"]
    names = [layer["layer"] for layer in rep["layers"]]
    assert any(n.startswith("ElementwiseAdd") for n in names) and any(n.startswith("DuplicateStreams") for n in names)
    assert rep["fits"] and rep["fps"] >= 950


def test_a_hand_edited_folding_config_is_what_gets_built(built: tuple[Path, Path], tmp_path: Path) -> None:
    """FINN users edit folding_config.json and build again: the edit is applied, and a bad edit is one line."""
    from hw_dq.errors import BuildError
    from hw_dq.fpga.build import build_run

    run, boards = built
    fit = json.loads((run / "build" / "Small" / "report.json").read_text())
    fold = json.loads((run / "build" / "Small" / "folding_config.json").read_text())
    mvaus = sorted(k for k in fold if k.startswith("MVAU"))
    for k in mvaus:  # fully folded: one PE, one SIMD lane everywhere (always legal, slowest)
        fold[k].update(PE=1, SIMD=1)
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(fold))
    rep = build_run(run, "small", boards_dir=boards, folding_config=edited, out=tmp_path / "b")
    assert rep["folding"] == "folding_config" and rep["board"]["name"] == "Small"
    got = json.loads((tmp_path / "b" / "folding_config.json").read_text())
    assert all(got[k]["PE"] == 1 and got[k]["SIMD"] == 1 for k in mvaus)
    was_parallel = any(fold_v.get("PE", 1) > 1 or fold_v.get("SIMD", 1) > 1 for fold_v in
                       json.loads((run / "build" / "Small" / "folding_config.json").read_text()).values())  # fmt: skip
    assert rep["max_cycles"] > fit["max_cycles"] if was_parallel else rep["max_cycles"] >= fit["max_cycles"]
    fold[mvaus[0]]["PE"] = 7  # divides none of the tiny model's output widths
    edited.write_text(json.dumps(fold))
    with pytest.raises(BuildError, match=f"{mvaus[0]} needs PE dividing"):
        build_run(run, "Small", boards_dir=boards, folding_config=edited, out=tmp_path / "c")
    edited.write_text(json.dumps({"NoSuchNode": {"PE": 1}}))
    with pytest.raises(BuildError, match="no node 'NoSuchNode'"):
        build_run(run, "Small", boards_dir=boards, folding_config=edited, out=tmp_path / "d")
