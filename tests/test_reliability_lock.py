"""Concurrent use of one run directory: the second writer stops with one line naming the holder's PID;
a lock left by a killed process never blocks the next run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hw_dq import run as rd
from hw_dq.cli.main import main
from hw_dq.errors import HwDqError
from hw_dq.lock import _proc_start
from tests.conftest import ROOT, assert_one_line_error, copy_fixture_run

HOLD = "import sys, time\nfrom hw_dq.run import run_lock\nwith run_lock(sys.argv[1], 'attack'):\n    time.sleep(120)\n"


def _holder(run: Path) -> subprocess.Popen:
    """A process holding the run's lock (what a long attack or build does)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], cwd=ROOT)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if json.loads((run / rd.LOCK_FILE).read_text())["pid"] == proc.pid:
                return proc
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("the holder never took the lock")


@pytest.fixture(scope="module")
def held(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, subprocess.Popen]]:
    """A copy of the v1 run whose lock another process holds for the whole module."""
    run = copy_fixture_run(tmp_path_factory.mktemp("held"))
    holder = _holder(run)
    yield run, holder
    holder.kill()
    holder.wait()


@pytest.mark.parametrize(
    "verb",
    [
        ("attack", "{run}", "--attacks", "fgsm", "--n", "8", "--no-sanity"),
        ("attack", "{run}", "--on", "hw", "--board", "Pynq-Z1"),
        ("export", "{run}"),
        ("build", "{run}", "--board", "ZCU104"),
        ("certify", "{run}", "--board", "Pynq-Z1"),
        ("faults", "{run}", "--board", "Pynq-Z1"),
        ("train", "--out", "{run}", "--resume", "--model", "tiny"),
    ],
    ids=["attack", "attack-hw", "export", "build", "certify", "faults", "train-resume"],
)
def test_second_writer_is_refused_naming_the_holder(
    held: tuple[Path, subprocess.Popen], verb: tuple[str, ...], capsys
) -> None:
    run, holder = held
    before = {p.name: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != rd.LOCK_FILE}
    proc = _main(capsys, *(a.format(run=run) for a in verb))
    assert_one_line_error(proc, "is in use by", f"PID {holder.pid}", "attack")
    after = {p.name: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != rd.LOCK_FILE}
    assert after == before, "the refused process changed the run directory"


def _main(capsys, *argv: str) -> subprocess.CompletedProcess:
    """The CLI's own entry point in this process (no interpreter start-up per case)."""
    capsys.readouterr()
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(list(argv), rc, out, err)


def test_train_resume_started_twice(tmp_path: Path, capsys) -> None:
    """Two 'train --resume' on one run: the second stops at once naming the first; the first finishes."""
    out = tmp_path / "run"
    args = ["train", "--model", "tiny", "--wbits", "2", "--abits", "2", "--epochs", "2", "--batch-size", "64",
            "--train-subset", "512", "--test-subset", "32", "--quiet", "--out", str(out), "--resume"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(
        [sys.executable, "-m", "hw_dq.cli", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.time() + 60
    while not (out / rd.LOCK_FILE).is_file() and time.time() < deadline:
        time.sleep(0.02)
    second = _main(capsys, *args)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert_one_line_error(second, "is in use by", f"PID {first.pid}", "(train")
    assert (out / rd.MODEL).is_file() and not (out / rd.LOCK_FILE).exists()


def test_lock_of_a_killed_process_is_stale_and_taken_over(tmp_path: Path) -> None:
    run = tmp_path / "run"
    holder = _holder(run)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    lock = run / rd.LOCK_FILE
    assert lock.is_file() and json.loads(lock.read_text())["pid"] == holder.pid  # left behind by the kill
    assert rd.lock_is_stale(lock)
    with rd.run_lock(run, "test"):  # taken over without waiting
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        assert not rd.lock_is_stale(lock)
        with pytest.raises(HwDqError, match=f"PID {os.getpid()}"), rd.run_lock(run, "again"):
            pass  # a second holder in this very process is refused too
    assert not lock.exists()


def test_reused_pid_is_not_mistaken_for_the_holder(tmp_path: Path) -> None:
    """A lock file naming a live PID with another start time (the PID was reused) is stale."""
    lock = tmp_path / rd.LOCK_FILE
    import socket

    info = {"pid": os.getpid(), "host": socket.gethostname(), "verb": "attack", "proc_start": "1", "started": "x"}
    lock.write_text(json.dumps(info))
    assert rd.lock_is_stale(lock)
    lock.write_text(json.dumps({**info, "proc_start": _proc_start(os.getpid())}))
    assert not rd.lock_is_stale(lock)


def test_scratch_files_of_dead_writers_are_removed_live_ones_kept(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / "attacks" / f".a.json.{int(dead.stdout)}-abc123.tmp"
    live = tmp_path / f".b.json.{os.getpid()}-xyz789.tmp"
    stale.parent.mkdir()
    stale.write_text("{half")
    live.write_text("{half")
    with rd.run_lock(tmp_path):
        pass
    assert not stale.exists() and live.exists()
