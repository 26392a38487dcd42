"""Bring your own model: a user's Brevitas network (tests/custom_model.py) trains, is attacked and exported."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hw_dq.errors import ConfigError
from hw_dq.nn.models import create_model
from hw_dq.train.config import TrainConfig
from tests.conftest import assert_one_line_error, run_cli, run_cli_here

MODEL = "tests.custom_model:SmallBrevitasNet"


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The user's network trained (1 epoch, DQ), attacked and exported through the CLI; the run directory."""
    tmp_path = tmp_path_factory.mktemp("custom")
    cfg = tmp_path / "mine.json"
    cfg.write_text(json.dumps({"model": MODEL, "model_args": {"channels": 6, "bits": 2}, "beta": 1e-4}))
    run = tmp_path / "run"
    proc = run_cli("train", "--config", str(cfg), "--epochs", "1", "--train-subset", "512", "--test-subset", "64",
                   "--batch-size", "64", "--out", str(run), "--quiet")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    for args in (("attack", str(run), "--attacks", "fgsm", "--n", "16", "--no-sanity"), ("export", str(run))):
        proc = run_cli(*args)
        assert proc.returncode == 0, proc.stderr
    return run


def test_custom_model_through_train_attack_export(exported: Path) -> None:
    run = exported
    stored = json.loads((run / "config.json").read_text())
    assert stored["model"]["name"] == MODEL and stored["model"]["model_args"] == {"channels": 6, "bits": 2}

    # later stages rebuild the user's class from the stored import path, with its arguments
    from hw_dq.run import load_model
    from tests.custom_model import SmallBrevitasNet

    model, _ = load_model(run)
    assert type(model) is SmallBrevitasNet
    assert model.features[0].out_channels == 6 and model.classifier[0].out_features == 10
    # the DQ regulariser saw the user's layers: the Lipschitz report lists both convolutions and the classifier
    names = [row["name"] for row in json.loads((run / "lipschitz.json").read_text())["layers"]]
    assert {"features.0", "features.4", "classifier.0"} <= set(names), names

    rec = json.loads((run / "attacks" / "robustness.json").read_text())
    text = json.dumps(rec)
    assert MODEL in text and "fgsm" in text

    eq = json.loads((run / "export" / "equivalence.json").read_text())
    assert eq["ok"] and eq["max_abs_logit_diff"] <= eq["tolerance"] and eq["top1_agreement"] >= eq["min_agreement"]


def test_own_qonnx_file_builds(exported: Path, tmp_path: Path) -> None:
    """``build --onnx FILE``: a QONNX file on its own (here the user's network exported elsewhere) builds with FINN."""
    onnx_file = tmp_path / "mine.onnx"
    onnx_file.write_bytes((exported / "export" / "qonnx.onnx").read_bytes())
    out = tmp_path / "b"
    proc = run_cli("build", "--onnx", str(onnx_file), "--board", "Pynq-Z1", "--out", str(out), "--quiet", timeout=900)
    assert proc.returncode == 0, proc.stderr
    rep = json.loads((out / "report.json").read_text())
    assert (out / "dataflow_model.onnx").is_file() and rep["fps"] > 0 and rep["board"]["name"] == "Pynq-Z1"
    assert_one_line_error(run_cli_here("build", "--onnx", str(tmp_path / "none.onnx"), "--board", "Pynq-Z1"), "--onnx")
    assert_one_line_error(
        run_cli_here("build", str(exported), "--onnx", str(onnx_file), "--board", "Pynq-Z1"), "one of"
    )


@pytest.mark.parametrize(
    ("model", "needle"),
    [("no_such_pkg_hwdq.models:Net", "cannot import model module"), ("tests.custom_model:NotAModule", "nn.Module")],
)
def test_bad_custom_model_is_one_line(tmp_path: Path, model: str, needle: str) -> None:
    proc = run_cli("train", "--model", model, "--epochs", "1", "--out", str(tmp_path / "r"), "--quiet")
    assert_one_line_error(proc, needle)


def test_custom_model_errors_in_process() -> None:
    with pytest.raises(ConfigError, match="has no class 'Missing'"):
        create_model("tests.custom_model:Missing", 2, 2)
    with pytest.raises(ConfigError, match="cannot construct"):
        create_model(MODEL, 2, 2, model_args={"no_such_arg": 1})
    with pytest.raises(ConfigError, match="invalid model"):
        create_model("a/b.py:Net", 2, 2)
    with pytest.raises(ConfigError, match="model_args is for"):
        TrainConfig(model="tiny", model_args={"channels": 4})
    m = create_model(MODEL, 2, 2, num_classes=7, in_channels=1, model_args={"channels": 4})
    assert m.features[0].in_channels == 1 and m.features[0].out_channels == 4 and m.classifier[0].out_features == 7
