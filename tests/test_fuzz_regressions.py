"""Every crashing input the fuzzers found (tests/fixtures/fuzz/<loader>/), replayed: each is now a one-line
error. And untrusted files stay inert: no pickle is loaded, an ONNX file's references never leave its
folder, a board file cannot send a build outside build/."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from hw_dq import run as rd
from hw_dq.data import load_split
from hw_dq.errors import HwDqError
from hw_dq.fpga import boards, sim
from hw_dq.robust import results
from hw_dq.train.config import load_config
from tests.conftest import ROOT, assert_one_line_error

FUZZ = ROOT / "tests" / "fixtures" / "fuzz"


def _npz(path: Path) -> object:
    folder = path.parent / f"npz-{path.stem}"
    folder.mkdir(exist_ok=True)
    (folder / "train.npz").write_bytes(path.read_bytes())
    return load_split("npz", "train", folder)


LOADERS = {
    "board": boards.load_board_file,
    "config": load_config,
    "results": lambda p: results.load([p]),
    "safetensors": rd.load_tensors,
    "onnx": sim.load,
    "npz": _npz,
}
CASES = sorted(p for d in FUZZ.iterdir() if d.is_dir() for p in d.iterdir() if p.is_file())


@pytest.mark.parametrize("path", CASES, ids=[f"{p.parent.name}/{p.name}" for p in CASES])
def test_fuzz_regression_is_one_line(path: Path) -> None:
    with pytest.raises(HwDqError) as e:
        LOADERS[path.parent.name](path)
    assert "\n" not in str(e.value) and str(e.value)


def test_regression_inputs_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The CLI prints them in one line (a key with a line break in it used to break the line)."""
    from hw_dq.cli.main import main

    for argv, needle in (
        (["results", str(FUZZ / "results" / "headline-without-attack.json")], "headline.attack"),
        (["train", "--config", str(FUZZ / "config" / "newline-in-key.json"), "--out", str(tmp_path / "r")],
         "unknown config key"),
        (["boards", "--boards-dir", str(FUZZ / "board")], "is not a board field"),
    ):  # fmt: skip
        capsys.readouterr()
        rc = main(argv)
        assert_one_line_error(subprocess.CompletedProcess(argv, rc, *capsys.readouterr()), needle)


def test_pickled_arrays_are_never_loaded(tmp_path: Path) -> None:
    """An object array in a dataset would unpickle on load: refused without running its payload."""
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self) -> tuple:
            return (os.system, (f"touch {marker}",))

    x = np.empty(2, dtype=object)
    x[0], x[1] = Payload(), Payload()
    d = tmp_path / "data"
    d.mkdir()
    np.savez(d / "train.npz", x=x, y=np.array([0, 1]))  # numpy pickles object arrays when saving
    with pytest.raises(HwDqError, match="not a readable .npz"):
        load_split("npz", "train", d)
    assert not marker.exists()
    # a results or board file is JSON, a checkpoint safetensors: a pickle in their place is refused as such
    (tmp_path / "m.safetensors").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(HwDqError, match="not a safetensors file"):
        rd.load_tensors(tmp_path / "m.safetensors")
    assert not marker.exists()


def _external(folder: Path, location: str) -> Path:
    t = numpy_helper.from_array(np.zeros(4, np.float32), "s")
    t.data_location = TensorProto.EXTERNAL
    t.ClearField("raw_data")
    entry = t.external_data.add()
    entry.key, entry.value = "location", location
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    g = helper.make_graph([helper.make_node("Mul", ["x", "s"], ["y"])], "g", [x], [y], [t])
    path = folder / "g.onnx"
    path.write_bytes(helper.make_model(g).SerializeToString())
    return path


@pytest.mark.parametrize("where", ["parent", "absolute", "symlink"])
def test_onnx_external_data_never_read_outside_its_folder(tmp_path: Path, where: str) -> None:
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.arange(4, dtype=np.float32).tobytes())
    folder = tmp_path / "model"
    folder.mkdir()
    if where == "symlink":
        (folder / "w.bin").symlink_to(secret)
    location = {"parent": "../secret.bin", "absolute": str(secret), "symlink": "w.bin"}[where]
    path = _external(folder, location)
    with pytest.raises(HwDqError, match="not a readable FINN/ONNX model"):
        sim.load(path)
    from hw_dq.fpga.build import load_qonnx

    with pytest.raises(HwDqError):
        load_qonnx(path)


def test_onnx_partition_reference_outside_its_folder_is_refused(tmp_path: Path) -> None:
    """A StreamingDataflowPartition whose 'model' names a file elsewhere is not followed."""
    elsewhere = tmp_path / "elsewhere.onnx"
    elsewhere.write_bytes(b"not read")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    node = helper.make_node("StreamingDataflowPartition", ["x"], ["y"], model=str(elsewhere))
    folder = tmp_path / "build"
    folder.mkdir()
    path = folder / "parent.onnx"
    path.write_bytes(helper.make_model(helper.make_graph([node], "g", [x], [y])).SerializeToString())
    with pytest.raises(sim.SimulationError, match="outside its own folder"):
        sim.load(path)


@pytest.mark.parametrize("name", ["../../outside", "/etc", "..", "a/b", "x\\..\\y", ""])
def test_board_name_cannot_leave_the_build_folder(tmp_path: Path, name: str) -> None:
    data = json.loads((FUZZ / "valid_board.json").read_text())
    data["name"] = name
    (tmp_path / "B.json").write_text(json.dumps(data))
    with pytest.raises(boards.BoardError, match="'name'"):
        boards.load_board_file(tmp_path / "B.json")
