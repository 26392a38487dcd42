"""Non-finite numbers: NaN or Inf in weights, BatchNorm statistics, checkpoints, graph constants, inputs
or logits is refused in one line by every stage that reads them, and no agreement check passes on one."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from hw_dq import run as rd
from hw_dq.cli.main import main
from hw_dq.errors import CheckpointError
from hw_dq.fpga import sim
from hw_dq.fpga.export import ExportError, export_model
from hw_dq.robust.results import SchemaError, validate
from tests.conftest import ROOT, assert_one_line_error, copy_fixture_run, test_data

VALID_RESULT = ROOT / "tests" / "fixtures" / "fuzz" / "valid_result.json"


def _main(capsys: pytest.CaptureFixture[str], *argv: str) -> subprocess.CompletedProcess:
    capsys.readouterr()
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(list(argv), rc, out, err)


def _poison(path: Path, name: str, value: float) -> None:
    """Write a non-finite tensor straight through safetensors (what a diverged run would have written)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = value
    save_file(tensors, str(path), metadata=meta)


@pytest.mark.parametrize(
    ("tensor", "value"),
    [("model.features.0.weight", float("nan")), ("model.features.1.running_var", float("inf")),
     ("model.features.5.running_mean", float("-inf"))],
    ids=["nan-weight", "inf-bn-var", "inf-bn-mean"],
)  # fmt: skip
def test_every_stage_refuses_a_non_finite_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tensor: str, value: float
) -> None:
    run = copy_fixture_run(tmp_path)
    _poison(run / rd.MODEL, tensor, value)
    with pytest.raises(CheckpointError, match=tensor):
        rd.load_tensors(run / rd.MODEL)
    for argv in (
        ("attack", str(run), "--attacks", "fgsm", "--n", "4", "--no-sanity"),
        ("export", str(run)),
        ("build", str(run), "--board", "Pynq-Z1"),
        ("lipschitz", str(run)),
        ("certify", str(run), "--board", "Pynq-Z1"),
    ):
        proc = _main(capsys, *argv)
        if argv[0] in ("build", "certify") and "no FINN build" in proc.stderr:
            continue  # certify reads a build, which a poisoned run can never get (export refuses it)
        assert_one_line_error(proc, tensor, "NaN or Inf")
    assert not (run / rd.EXPORT_DIR / rd.QONNX_FILE).exists()


def test_train_resume_refuses_a_non_finite_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = copy_fixture_run(tmp_path)
    tensors, _ = rd.load_tensors(run / rd.MODEL)
    tensors["model.classifier.0.weight"] = torch.full_like(tensors["model.classifier.0.weight"], float("nan"))
    from safetensors.torch import save_file

    meta = {"hw_dq": json.dumps({"epoch": 1, "step": 0, "sums": {}, "done": False})}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(run / rd.CHECKPOINT), metadata=meta)
    before = (run / rd.CHECKPOINT).read_bytes()
    proc = _main(capsys, "train", "--out", str(run), "--resume")
    assert_one_line_error(proc, "checkpoint.safetensors", "model.classifier.0.weight", "NaN or Inf")
    assert (run / rd.CHECKPOINT).read_bytes() == before


def test_export_equivalence_fails_on_nan_logits(tmp_path: Path) -> None:
    """The reported bug: a model with NaN BatchNorm statistics exported with 'max |logit diff| nan,
    top-1 agreement 100%' and passed. Now the check fails and no model is written."""
    model = rd.Run(copy_fixture_run(tmp_path)).model()
    bn = model.features[1]
    bn.running_mean[0] = float("nan")
    images = test_data(8)[0]
    with pytest.raises(ExportError, match="NaN/Inf outputs"):
        export_model(model, tmp_path / "export", images)
    eq = json.loads((tmp_path / "export" / "equivalence.json").read_text())
    assert eq["ok"] is False and eq["non_finite_images"] == 8 and eq["top1_agreement"] == 0.0
    assert not (tmp_path / "export" / rd.QONNX_FILE).exists()
    bad = images.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ExportError, match="NaN or Inf"):
        export_model(rd.Run(tmp_path / "run_v1").model(), tmp_path / "export2", bad)


def _graph(tmp_path: Path, const: np.ndarray, name: str = "scale") -> Path:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    g = helper.make_graph([helper.make_node("Mul", ["x", name], ["y"])], "g", [x], [y],
                          [numpy_helper.from_array(const.astype(np.float32), name)])  # fmt: skip
    path = tmp_path / f"g{len(list(tmp_path.iterdir()))}.onnx"
    path.write_bytes(helper.make_model(g).SerializeToString())
    return path


def test_simulator_refuses_non_finite_constants_inputs_and_outputs(tmp_path: Path) -> None:
    with pytest.raises(sim.SimulationError, match="scale holds NaN"):
        sim.load(_graph(tmp_path, np.array([1, np.nan, 1, 1])))
    with pytest.raises(sim.SimulationError, match="scale holds Inf"):
        sim.load(_graph(tmp_path, np.array([1, np.inf, 1, 1])))
    s = sim.load(_graph(tmp_path, np.full(4, 2.0)))
    assert s(np.arange(4, dtype=np.float32)[None]).tolist() == [[0.0, 2.0, 4.0, 6.0]]
    for bad in (np.nan, np.inf, -np.inf):
        with pytest.raises(sim.SimulationError, match="NaN or Inf"):
            s(np.array([[0, bad, 0, 0]], np.float32))
    big = sim.load(_graph(tmp_path, np.full(4, 3e38)))
    with pytest.raises(sim.SimulationError, match="produced NaN or Inf"):
        big(np.full((1, 4), 255.0, np.float32))  # overflows float32: the simulation fails, not agrees
    # an infinite threshold is a level never reached (FINN pads threshold tables so), not an error
    sim.load(_graph(tmp_path, np.array([1, np.inf, 1, 1]), name="thresholds_0"))


def test_results_with_non_finite_numbers_are_refused() -> None:
    cases = (("clean_acc", float("nan")), ("beta", float("inf")), ("evaluations.0.eps", float("nan")),
             ("evaluations.0.robust_acc", float("nan")), ("evaluations.0.wall_s", float("inf")))  # fmt: skip
    for path, value in cases:
        rec = json.loads(VALID_RESULT.read_text())
        *parents, leaf = path.split(".")
        node = rec
        for p in parents:
            node = node[int(p)] if p.isdigit() else node[p]
        node[leaf] = value
        with pytest.raises(SchemaError, match=leaf):
            validate(rec, "r.json")


def test_a_qonnx_file_with_a_nan_initializer_is_refused_by_name(tmp_path: Path) -> None:
    """build --onnx on a model whose weights hold NaN: one line naming the initializer, not a mismatch later."""
    from hw_dq.errors import BuildError
    from hw_dq.fpga.build import load_qonnx

    w = np.ones((4, 2), np.float32)
    w[1, 0] = np.nan
    inits = [numpy_helper.from_array(w, "W")] + [
        numpy_helper.from_array(np.array(v, np.float32), n) for n, v in (("s", 1.0), ("z", 0.0), ("b", 4.0))
    ]
    quant = helper.make_node("Quant", ["x", "s", "z", "b"], ["q"], domain="qonnx.custom_op.general",
                             signed=1, narrow=0, rounding_mode="ROUND")  # fmt: skip
    graph = helper.make_graph(
        [quant, helper.make_node("MatMul", ["q", "W"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13),
                                                    helper.make_opsetid("qonnx.custom_op.general", 1)])  # fmt: skip
    path = tmp_path / "nan.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(BuildError, match="initializer 'W' holds NaN or Inf"):
        load_qonnx(path)
    w[1, 0] = 0.5  # the same graph, finite: gets past the check (to the float-weights refusal)
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "W"))
    path.write_bytes(model.SerializeToString())
    with pytest.raises(BuildError, match="float weights"):
        load_qonnx(path)
