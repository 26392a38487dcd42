"""A user's own QONNX file, with no hw-dq run around it: build --onnx, attack --on hw, certify."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import assert_one_line_error, run_cli, run_cli_here, test_data

N = 24


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny w2a2 network trained and exported outside any run directory, then built from the .onnx alone."""
    from hw_dq.data import load_split
    from hw_dq.fpga.export import export_model
    from hw_dq.nn.models import create_model

    torch.manual_seed(0)
    model = create_model("tiny", 2, 2)
    x, y = load_split("sample", "train").take(2048, 0).tensors()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(3):
        for i in range(0, len(x), 64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[i : i + 64]), y[i : i + 64]).backward()
            opt.step()
    tmp = tmp_path_factory.mktemp("byo")
    exported = export_model(model, tmp / "elsewhere", test_data(16)[0])
    user = tmp / "user"
    user.mkdir()
    onnx_file = user / "mine.onnx"  # only the QONNX file travels: no config, no checkpoint
    onnx_file.write_bytes(exported.qonnx.read_bytes())
    proc = run_cli("build", "--onnx", str(onnx_file), "--board", "Pynq-Z1", "--quiet", timeout=900)
    assert proc.returncode == 0, proc.stderr
    out = user / "build_mine_Pynq-Z1"
    assert (out / "dataflow_model.onnx").is_file() and not (out / "config.json").exists()
    return onnx_file, out


def test_attack_and_certify_a_bare_qonnx_build(build: tuple[Path, Path]) -> None:
    from hw_dq.fpga.build import load_qonnx
    from hw_dq.fpga.export import execute, to_uint8
    from hw_dq.robust.results import certificate_violations

    onnx_file, out = build
    common = ("--n", str(N), "--seed", "1")
    proc = run_cli("attack", str(out), "--on", "hw", "--square-queries", "200", *common, timeout=900)
    assert proc.returncode == 0, proc.stderr
    assert "skipped transfer-autoattack" in proc.stdout and "no PyTorch model" in proc.stdout
    rec = json.loads((out / "attacks" / "robustness-hw.json").read_text())
    assert [e["attack"] for e in rec["evaluations"]] == ["square", "hsj"]
    assert [s["attack"] for s in rec["skipped"]] == ["transfer-autoattack"] and rec["pytorch_model"] is None
    assert rec["agreement"]["clean_acc_sw"] is None and rec["target"] == "hw"
    assert (rec["wbits"], rec["abits"]) == (2, 2)  # read off FINN's layers: the user's network is w2a2

    # the accelerator's clean accuracy is the user's QONNX model's own, on the same sample images
    x, y = test_data(N, seed=1)
    qonnx_pred = execute(load_qonnx(onnx_file), to_uint8(x)).argmax(1)
    assert rec["clean_acc"] == pytest.approx(float((qonnx_pred == y.numpy()).mean()))
    assert rec["clean_acc"] > 0.2  # trained: well above chance, so the subset checks below have content

    proc = run_cli("certify", str(out), "--eps", "2,8", *common, timeout=600)
    assert proc.returncode == 0, proc.stderr
    cert = json.loads((out / "attacks" / "certified-hw.json").read_text())
    assert cert["clean_acc"] == rec["clean_acc"] and cert["sanity"]["verdict"] == "pass"
    assert (cert["wbits"], cert["abits"], cert["model"]) == (2, 2, rec["model"])
    # soundness on the same images: every certified image survives every attack at that eps
    for ev in rec["evaluations"]:
        block = next(b for b in cert["certified"] if b["eps"] == ev["eps"])
        assert block["certified_acc"] <= ev["robust_acc"]
        assert certificate_violations(cert, rec, ev["eps"]) == [], ev["attack"]
    assert cert["certified"][0]["certified_acc"] >= cert["certified"][1]["certified_acc"]


def test_bare_build_errors_are_one_line(build: tuple[Path, Path], tmp_path: Path) -> None:
    _, out = build
    assert_one_line_error(run_cli_here("attack", str(out), "--n", "4"), "without a PyTorch model", "--on hw")
    assert_one_line_error(
        run_cli_here("attack", str(out), "--on", "hw", "--attacks", "transfer-pgd", "--n", "4"), "square or hsj"
    )
    assert_one_line_error(run_cli_here("certify", str(tmp_path), "--n", "4"), "nor a FINN build folder")


def test_board_of_a_bare_build_is_checked(build: tuple[Path, Path]) -> None:
    """--board with a build folder: another board is refused in one line, the folder's own board is accepted."""
    _, out = build
    for verb in (("attack", str(out), "--on", "hw", "--attacks", "square"), ("certify", str(out))):
        assert_one_line_error(
            run_cli_here(*verb, "--board", "ZCU104", "--n", "4"), "is for board Pynq-Z1", "not ZCU104"
        )
    proc = run_cli("certify", str(out), "--board", "pynq-z1", "--eps", "2", "--n", "4", "--name", "board-ok")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "attacks" / "board-ok.json").read_text())["n_examples"] == 4
    proc = run_cli("attack", str(out), "--on", "hw", "--board", "Pynq-Z1", "--attacks", "square", "--square-queries",
                   "10", "--n", "4", "--name", "board-ok-hw", "--quiet")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "attacks" / "board-ok-hw.json").read_text())["build_dir"] == str(out)
