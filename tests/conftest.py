"""Shared test helpers: the CLI as a user runs it (or in process), the one-line error check, tiny runs, fixtures."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

# `make test` runs one pytest-xdist worker per core: one thread each (torch reads this when it is first
# imported, after this file), inherited by every process a test starts. A user's own setting wins.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
FIXTURE_RUN = ROOT / "tests" / "fixtures" / "run_v1"  # written by the pre-refactor code; read-only


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files holding a slow test run first (in-file order kept): pytest-xdist hands out whole files in this
    order, so the longest start early and the workers finish together instead of one waiting on the last."""
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "cifar10_test.npz").is_file():
        pytest.skip("../shared/data (full CIFAR-10 as .npz) is not present")
    return SHARED_DATA


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run the installed CLI exactly as a user would (python -m hw_dq.cli)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "hw_dq.cli", *args],
        capture_output=True, text=True, timeout=timeout, cwd=cwd or ROOT, env=env,
    )  # fmt: skip


def run_cli_here(*args: str, tty: bool = False) -> subprocess.CompletedProcess:
    """The CLI's ``main`` in this process, for the long tables of bad-input cases: its one-line errors and
    exit code 2 come from ``main`` itself (argparse's errors and HwDqError), so stderr and the code are what
    the process would give, without the ~8 s interpreter and import start of :func:`run_cli` per case.
    Each command keeps :func:`run_cli` tests for the real process. An unexpected exception propagates
    (a traceback a user would see fails the test either way). ``tty``: stderr says it is a terminal."""
    import io
    from contextlib import redirect_stderr, redirect_stdout

    from hw_dq.cli.main import main

    class _Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    out, err = io.StringIO(), (_Terminal() if tty else io.StringIO())
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as e:  # argparse's usage errors
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return subprocess.CompletedProcess(["hw-dq", *args], code, out.getvalue(), err.getvalue())


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit code 2, exactly one line on stderr, no traceback, mentioning the needles."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert lines[0].startswith("hw-dq: error: "), lines[0]
    for n in needles:
        assert n in lines[0], (n, lines[0])


def copy_fixture_run(tmp_path: Path) -> Path:
    """A writable copy of the committed v1 run directory (tests must never write into the fixture)."""
    return Path(shutil.copytree(FIXTURE_RUN, tmp_path / "run_v1"))


def train_tiny(out: Path, wbits: int | str = 2, abits: int | str = 2, n: int = 256) -> Path:
    """A tiny model trained for one epoch on ``n`` sample images (about 10 s on 2 cores)."""
    from hw_dq.train.loop import TrainConfig, train

    cfg = TrainConfig(model="tiny", wbits=wbits, abits=abits, epochs=1, batch_size=64, train_subset=n, test_subset=32)
    train(cfg, out, progress=False)
    return out


def tiny_run(root: Path) -> Path:
    """A small full-precision CNN trained for 3 epochs on the embedded CIFAR-10 sample (~48%)."""
    from hw_dq.train.loop import TrainConfig, train

    run = root / "tiny_fp"
    cfg = TrainConfig(model="tiny", wbits=None, abits=None, epochs=3, batch_size=32, lr=0.02, weight_decay=0.0)
    train(cfg, run, resume=True, progress=False)
    return run


def test_data(n: int, seed: int = 0) -> tuple[Any, Any]:
    """``n`` images and labels of the embedded sample's test split (float NCHW in [0, 1], int64)."""
    from hw_dq.data import load_split

    return load_split("sample", "test").take(n, seed).tensors()


test_data.__test__ = False  # type: ignore[attr-defined]
