"""Every field of every user file is checked against what uses it: one line naming the file and the field."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from hw_dq.cli.main import main
from hw_dq.data import load_split
from hw_dq.errors import BoardError, ConfigError, DataError
from hw_dq.fpga.boards import load_board_file
from hw_dq.train.config import TrainConfig, load_config
from tests.conftest import ROOT, assert_one_line_error, copy_fixture_run

VALID_BOARD = json.loads((ROOT / "tests" / "fixtures" / "fuzz" / "valid_board.json").read_text())
X = np.zeros((4, 8, 8, 3), np.uint8)


@pytest.mark.parametrize(
    ("x", "y", "needle"),
    [
        (np.zeros((0, 8, 8, 3), np.uint8), np.zeros(0, np.int64), "field x: need at least one image"),
        (np.zeros((4, 2, 8, 3), np.uint8), np.zeros(4, np.int64), "field x: need at least one image of 4..4096"),
        (X, np.zeros(4, bool), "field y: labels must be N integers"),
        (X, np.array([0, 1, 2, 10**9]), "field y: labels must lie in 0..9999"),
        (X, np.array([0, 1, 2, -1]), "field y: labels must be non-negative"),
        (X.astype(np.float32), np.zeros(4, np.int64), "field x: images must be uint8"),
    ],
    ids=["empty", "too-small", "bool-labels", "huge-label", "negative-label", "float-images"],
)
def test_dataset_fields(tmp_path: Path, x: np.ndarray, y: np.ndarray, needle: str) -> None:
    np.savez(tmp_path / "train.npz", x=x, y=y)
    with pytest.raises(DataError, match=needle.replace("(", r"\(").replace(".", r"\.")) as e:
        load_split("npz", "train", tmp_path)
    assert str(tmp_path) in str(e.value)


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("resources.DSP", 0, "'resources.DSP' must be a positive integer"),
        ("resources.BRAM_18K", -1, "'resources.BRAM_18K'"),
        ("resources.LUT", 10**12, "'resources.LUT'"),
        ("resources.URAM", 1.5, "'resources.URAM' must be a non-negative integer"),
        ("part", "banana", "'part' is not a Xilinx/AMD part number"),
        ("clock_mhz", float("nan"), "'clock_mhz'"),
        ("clock_mhz", 0, "'clock_mhz'"),
        ("notes", ["x"], "'notes' must be a string"),
        ("vitis_platform", "../../etc/passwd", "'vitis_platform' must be a platform name"),
        ("finn_board", "a/b", "'finn_board'"),
    ],
)
def test_board_fields(tmp_path: Path, field: str, value: object, needle: str) -> None:
    data = json.loads(json.dumps(VALID_BOARD))
    node = data
    *parents, leaf = field.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value
    (tmp_path / "B.json").write_text(json.dumps(data))
    with pytest.raises(BoardError, match=needle.replace("(", r"\(").replace(".", r"\.")) as e:
        load_board_file(tmp_path / "B.json")
    assert "B.json" in str(e.value)


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("epochs", "5", "field 'epochs' must be an integer"),
        ("batch_size", True, "field 'batch_size' must be an integer"),
        ("lr", float("inf"), "field 'lr' must be a finite number"),
        ("momentum", 1.5, "field 'momentum' = 1.5 is out of range"),
        ("milestones", [0.5, 2], "field 'milestones' must be a list of fractions"),
        ("data_dir", 3, "field 'data_dir' must be a string"),
        ("seed", -1, "field 'seed' = -1 is out of range"),
        ("model_args", "x", "field 'model_args' must be a JSON object"),
    ],
)
def test_config_fields(tmp_path: Path, field: str, value: object, needle: str) -> None:
    (tmp_path / "c.json").write_text(json.dumps({"model": "tiny", field: value}))
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(".", r"\.")) as e:
        load_config(tmp_path / "c.json")
    assert "c.json" in str(e.value)


def test_config_fields_checked_when_a_run_is_resumed() -> None:
    """A run directory's stored config goes through the same checks (what --resume reads)."""
    with pytest.raises(ConfigError, match="run/config.json: field 'epochs'"):
        TrainConfig.from_dict({"epochs": 0.5}, "run/config.json")


@pytest.mark.parametrize(("labels", "channels", "needle"), [(11, 3, "label 11 is out of range"), (9, 1, "channel")])
def test_evaluation_data_must_fit_the_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], labels: int, channels: int, needle: str
) -> None:
    """Attacking a 10-class RGB model on data with label 11, or on grey images: one line, not an IndexError."""
    run = copy_fixture_run(tmp_path)
    d = tmp_path / "data"
    d.mkdir()
    np.savez(d / "test.npz", x=np.zeros((16, 32, 32, channels), np.uint8), y=np.arange(16) % (labels + 1))
    argv = ["attack", str(run), "--attacks", "fgsm", "--n", "16", "--no-sanity", "--data", "npz", "--data-dir", str(d)]
    capsys.readouterr()
    rc = main(argv)
    assert_one_line_error(subprocess.CompletedProcess(argv, rc, *capsys.readouterr()), needle)
