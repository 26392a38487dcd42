"""Board files: every shipped board validates; malformed files name the field; users add boards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hw_dq.fpga.boards import REPO_BOARDS, RESOURCES, BoardError, get_board, load_board_file, load_boards
from tests.conftest import assert_one_line_error, run_cli, run_cli_here

REQUIRED = {"Pynq-Z1", "Pynq-Z2", "Ultra96-V2", "ZCU102", "ZCU104", "KV260", "U50", "U250", "U280"}


def test_every_board_file_loads_and_validates() -> None:
    files = sorted(REPO_BOARDS.glob("*.json"))
    names = {load_board_file(f).name for f in files}
    assert names >= REQUIRED
    for f in files:
        b = load_board_file(f)
        assert b.part and b.finn_board and b.clock_mhz > 0
        assert set(b.resources) == set(RESOURCES) and b.resources["LUT"] > 0
    assert get_board("Pynq-Z1").resources == {"LUT": 53200, "FF": 106400, "BRAM_18K": 280, "URAM": 0, "DSP": 220}
    assert get_board("zcu104").part == "xczu7ev-ffvc1156-2-e"
    assert get_board("Alveo U50").shell_flow == "vitis_alveo"


def _write(d: Path, name: str, **over: object) -> Path:
    data = json.loads((REPO_BOARDS / "Pynq-Z1.json").read_text())
    data.update(name=name, **over)
    p = d / f"{name}.json"
    p.write_text(json.dumps(data))
    return p


@pytest.mark.parametrize(
    ("over", "field"),
    [
        ({"resources": {"LUT": 1, "FF": 1, "BRAM_18K": 1, "URAM": 0}}, "resources.DSP"),
        ({"resources": {"LUT": "many", "FF": 1, "BRAM_18K": 1, "URAM": 0, "DSP": 1}}, "resources.LUT"),
        ({"clock_mhz": 0}, "clock_mhz"),
        ({"shell_flow": "magic"}, "shell_flow"),
        ({"part": ""}, "part"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_malformed_board_rejected_naming_field(tmp_path: Path, over: dict, field: str) -> None:
    p = _write(tmp_path, "Bad", **over)
    with pytest.raises(BoardError, match=f"field '{field}'"):
        load_board_file(p)


def test_malformed_board_cli_one_line(tmp_path: Path) -> None:
    _write(tmp_path, "Bad", clock_mhz=-5)
    assert_one_line_error(run_cli_here("boards", "--boards-dir", str(tmp_path)), "clock_mhz", "Bad.json")
    (tmp_path / "Bad.json").write_text('{"name": "Bad", ')
    assert_one_line_error(run_cli_here("boards", "--boards-dir", str(tmp_path)), "not valid JSON")


def test_user_adds_a_board_by_adding_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write(tmp_path, "MyBoard", resources={"LUT": 1000, "FF": 2000, "BRAM_18K": 10, "URAM": 0, "DSP": 5})
    assert load_boards(tmp_path)["MyBoard"].resources["LUT"] == 1000
    monkeypatch.setenv("HW_DQ_BOARDS_DIR", str(tmp_path))
    assert get_board("myboard").name == "MyBoard"
    proc = run_cli("boards", "--boards-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "MyBoard" in proc.stdout and "Pynq-Z1" in proc.stdout and "53200" in proc.stdout


def test_unknown_board_one_line_listing_known(tmp_path: Path) -> None:
    proc = run_cli("build", str(tmp_path), "--board", "NoSuchBoard")
    assert_one_line_error(proc, "unknown board 'NoSuchBoard'", "Pynq-Z1", "ZCU104")


def test_board_names_are_case_insensitive_and_build_folders_canonical(tmp_path: Path) -> None:
    """`build --board zcu104` writes build/ZCU104; `attack --on hw --board zcu104` (or ZCU104) finds it."""
    from hw_dq.errors import HwDqError
    from hw_dq.fpga.boards import canonical_name
    from hw_dq.run import DATAFLOW_MODEL, Run

    assert canonical_name("zcu104") == "ZCU104" and canonical_name("PYNQ-z1") == "Pynq-Z1"
    assert canonical_name("alveo-u250") == "U250" and canonical_name("gone-board") == "gone-board"
    run = Run(tmp_path)
    assert run.build_dir("zcu104") == tmp_path / "build" / "ZCU104" == run.build_dir(" Zcu104 ")
    (run.build_dir("zcu104")).mkdir(parents=True)
    (run.build_dir("zcu104") / DATAFLOW_MODEL).write_bytes(b"")
    assert run.find_build("zcu104") == run.find_build("ZCU104") == run.find_build() == tmp_path / "build" / "ZCU104"
    with pytest.raises(HwDqError, match="no FINN build .* for board pynq-z1 \\(builds: ZCU104\\)"):
        run.find_build("pynq-z1")
    legacy = tmp_path / "build" / "my-old-board"  # a board file since removed: the folder is still found
    legacy.mkdir()
    (legacy / DATAFLOW_MODEL).write_bytes(b"")
    assert run.find_build("MY-OLD-BOARD") == legacy
    with pytest.raises(HwDqError, match="choose one with --board"):
        run.find_build()


def test_shipped_catalogue_is_the_installed_copy_when_there_is_one(tmp_path: Path, monkeypatch) -> None:
    import hw_dq.fpga.boards as boards

    assert boards.shipped_boards_dir() == REPO_BOARDS  # a checkout: the top-level boards/ users edit
    installed = tmp_path / "hw_dq" / "boards"
    installed.mkdir(parents=True)
    _write(installed, "OnlyInWheel")
    monkeypatch.setattr(boards, "INSTALLED_BOARDS", installed)
    assert set(load_boards()) == {"OnlyInWheel"}
