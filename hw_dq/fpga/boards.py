"""FPGA boards as data: one JSON file per board; adding a board is adding a file.

Each file (``boards/<Name>.json``) holds::

    {"name": "Pynq-Z1", "finn_board": "Pynq-Z1", "part": "xc7z020clg400-1",
     "resources": {"LUT": 53200, "FF": 106400, "BRAM_18K": 280, "URAM": 0, "DSP": 220},
     "clock_mhz": 100, "shell_flow": "vivado_zynq", "vitis_platform": null, "notes": "..."}

Board folders, later ones overriding earlier ones by name: the shipped catalogue (the
repository's top-level ``boards/`` in a checkout; the same files as ``hw_dq/boards/`` inside an
installed wheel, mapped there by pyproject.toml), then every folder in ``$HW_DQ_BOARDS_DIR``
(``os.pathsep``-separated), then an explicit ``boards_dir`` (``--boards-dir``).

Board names are matched case-insensitively everywhere; :func:`canonical_name` is the one
spelling used for build folders.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["Board", "BoardError", "canonical_name", "get_board", "load_board_file", "load_boards", "boards_table"]

from hw_dq.errors import BoardError

RESOURCES = ("LUT", "FF", "BRAM_18K", "URAM", "DSP")
MAY_BE_ZERO = ("URAM",)  # 7-series and smaller UltraScale+ parts have none; every board has the others
MAX_RESOURCE = 100_000_000  # far above any FPGA; a larger count is a typo
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._ -]{0,63}")
PART = re.compile(r"x[a-z0-9]{2,}[a-z0-9-]*", re.IGNORECASE)
SHELL_FLOWS = ("vivado_zynq", "vitis_alveo")
# FINN's recommended utilisation limits for timing closure (finn.util.platforms.DEFAULT_RES_LIMITS).
UTIL_LIMITS = {"LUT": 0.70, "FF": 0.50, "BRAM_18K": 0.80, "URAM": 0.80, "DSP": 0.80}
ENV_VAR = "HW_DQ_BOARDS_DIR"
REPO_BOARDS = Path(__file__).resolve().parents[2] / "boards"
INSTALLED_BOARDS = Path(__file__).resolve().parents[1] / "boards"  # hw_dq/boards in a wheel


def shipped_boards_dir() -> Path:
    """The catalogue that comes with hw-dq: the installed copy, else the checkout's boards/."""
    return INSTALLED_BOARDS if INSTALLED_BOARDS.is_dir() else REPO_BOARDS


@dataclass(frozen=True)
class Board:
    """One FPGA board as FINN needs it."""

    name: str
    finn_board: str
    part: str
    resources: dict[str, int]
    clock_mhz: float
    shell_flow: str
    vitis_platform: str | None = None
    notes: str = ""
    source: str = ""

    def limits(self) -> dict[str, float]:
        """Resources FINN recommends not to exceed (capacity x utilisation limit)."""
        return {k: self.resources[k] * UTIL_LIMITS[k] for k in RESOURCES}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _fail(path: Path, field: str, why: str) -> BoardError:
    return BoardError(f"board file {path}: field {field!r} {why}")


def parse_board(data: Any, path: Path) -> Board:
    """Validate one board file's content; errors name the file and the bad field."""
    if not isinstance(data, dict):
        raise BoardError(f"board file {path}: expected a JSON object")
    for key in ("name", "finn_board", "part"):
        if not isinstance(data.get(key), str) or not data[key].strip():
            raise _fail(path, key, "is missing or not a non-empty string")
    for key in ("name", "finn_board"):  # the name becomes the build folder: one plain path component
        if not SAFE_NAME.fullmatch(data[key]) or data[key] in (".", ".."):
            raise _fail(path, key, f"must be letters, digits, '.', '_', '-' or ' ' (a folder name), got {data[key]!r}")
    if not PART.fullmatch(data["part"]):
        raise _fail(path, "part", f"is not a Xilinx/AMD part number like xc7z020clg400-1 (got {data['part']!r})")
    res = data.get("resources")
    if not isinstance(res, dict):
        raise _fail(path, "resources", f"is missing or not an object with {', '.join(RESOURCES)}")
    for k in RESOURCES:
        v = res.get(k)
        low = 0 if k in MAY_BE_ZERO else 1
        if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= MAX_RESOURCE:
            what = "a non-negative" if low == 0 else "a positive"
            raise _fail(path, f"resources.{k}", f"must be {what} integer up to {MAX_RESOURCE:,} (got {v!r})")
    extra = set(res) - set(RESOURCES)
    if extra:
        raise _fail(path, f"resources.{sorted(extra)[0]}", f"is not a known resource ({', '.join(RESOURCES)})")
    clk = data.get("clock_mhz")
    if isinstance(clk, bool) or not isinstance(clk, int | float) or not 1 <= clk <= 1000:
        raise _fail(path, "clock_mhz", f"must be a number of MHz in 1..1000 (got {clk!r})")
    flow = data.get("shell_flow")
    if flow not in SHELL_FLOWS:
        raise _fail(path, "shell_flow", f"must be one of {', '.join(SHELL_FLOWS)} (got {flow!r})")
    plat = data.get("vitis_platform")
    if plat is not None and not isinstance(plat, str):
        raise _fail(path, "vitis_platform", "must be a string or null")
    if flow == "vitis_alveo" and not plat:
        raise _fail(path, "vitis_platform", "is required for the vitis_alveo shell flow")
    if plat is not None and not SAFE_NAME.fullmatch(plat):
        raise _fail(path, "vitis_platform", f"must be a platform name, not a path (got {plat!r})")
    if not isinstance(data.get("notes", ""), str):
        raise _fail(path, "notes", "must be a string")
    known = {"name", "finn_board", "part", "resources", "clock_mhz", "shell_flow", "vitis_platform", "notes"}
    unknown = set(data) - known
    if unknown:
        raise _fail(path, sorted(unknown)[0], f"is not a board field ({', '.join(sorted(known))})")
    return Board(
        name=data["name"], finn_board=data["finn_board"], part=data["part"],
        resources={k: int(res[k]) for k in RESOURCES}, clock_mhz=float(clk), shell_flow=flow,
        vitis_platform=plat, notes=str(data.get("notes", "")), source=str(path),
    )  # fmt: skip


def load_board_file(path: str | Path) -> Board:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise BoardError(f"board file {path} cannot be read ({e})") from None
    except json.JSONDecodeError as e:
        raise BoardError(f"board file {path} is not valid JSON (line {e.lineno}: {e.msg})") from None
    return parse_board(data, path)


def board_dirs(boards_dir: str | Path | None = None) -> list[Path]:
    """Folders searched for board files, lowest priority first."""
    dirs = [shipped_boards_dir()]
    dirs += [Path(p) for p in os.environ.get(ENV_VAR, "").split(os.pathsep) if p]
    if boards_dir is not None:
        if not Path(boards_dir).is_dir():
            raise BoardError(f"boards folder {boards_dir} does not exist")
        dirs.append(Path(boards_dir))
    return [d for d in dirs if d.is_dir()]


def load_boards(boards_dir: str | Path | None = None) -> dict[str, Board]:
    """All boards by name (every file validated)."""
    boards: dict[str, Board] = {}
    for d in board_dirs(boards_dir):
        for f in sorted(d.glob("*.json")):
            b = load_board_file(f)
            boards[b.name] = b
    if not boards:
        raise BoardError(f"no board files found (looked in {shipped_boards_dir()} and ${ENV_VAR})")
    return boards


def _key(name: str) -> str:
    return name.strip().lower().replace("alveo ", "").replace("alveo-", "")


def get_board(name: str, boards_dir: str | Path | None = None) -> Board:
    """Look a board up by name or FINN board name (case-insensitive)."""
    boards = load_boards(boards_dir)
    key = _key(name)
    for b in boards.values():
        if key in (_key(b.name), _key(b.finn_board)):
            return b
    raise BoardError(f"unknown board {name!r}; known boards: {', '.join(boards)} (add one as a JSON file in boards/)")


def canonical_name(name: str, boards_dir: str | Path | None = None) -> str:
    """The catalogue's spelling of a board name (``zcu104`` -> ``ZCU104``): the build folder's name.

    A name the catalogue does not know (a board file since removed) is returned as given, so
    that an existing build folder of that name can still be found."""
    try:
        return get_board(name, boards_dir).name
    except BoardError:
        return name.strip()


def boards_table(boards: dict[str, Board]) -> str:
    """A plain-text table of boards and their resources."""
    head = f"{'board':12s} {'FINN name':11s} {'part':22s} " + " ".join(f"{k:>9s}" for k in RESOURCES)
    rows = [head + "  clock  shell"]
    for b in boards.values():
        res = " ".join(f"{b.resources[k]:9d}" for k in RESOURCES)
        rows.append(f"{b.name:12s} {b.finn_board:11s} {b.part:22s} {res}  {b.clock_mhz:4.0f}M  {b.shell_flow}")
    return "\n".join(rows)
