"""A full disk, a read-only folder and a writer that fails mid-write: one line (exit 2), and every
file that existed before is intact (byte for byte), with no temporary file left behind."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from hw_dq import run as rd
from hw_dq.cli.main import main
from tests.conftest import FIXTURE_RUN, assert_one_line_error, copy_fixture_run

ATTACK = ["--attacks", "fgsm", "--eps", "8", "--n", "8", "--no-sanity", "--device", "cpu"]


def _main(capsys: pytest.CaptureFixture[str], *argv: str) -> subprocess.CompletedProcess:
    capsys.readouterr()
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(list(argv), rc, out, err)


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.startswith("filler")
    }


def _mount(*args: str) -> None:
    proc = subprocess.run(["mount", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount here ({proc.stderr.strip()[:80]}); the failing-writer test covers this")


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs holding a copy of the v1 run, filled up but for one page (room for the lock only)."""
    mnt = tmp_path / f"fs-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    _mount("-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt))
    try:
        run = Path(shutil.copytree(FIXTURE_RUN, mnt / "run"))
        (run / rd.ATTACKS_DIR).mkdir()
        (run / rd.ATTACKS_DIR / "old.json").write_text('{"kept": true}\n')
        fillers = []
        try:
            for i in range(10_000):
                f = mnt / f"filler{i}"
                f.write_bytes(b"\0" * 4096)
                fillers.append(f)
        except OSError as e:
            assert e.errno == errno.ENOSPC
        fillers[-1].unlink()  # one page free: the lock file fits, a results file does not
        yield run
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_full_disk_is_one_line_and_keeps_every_file(tiny_fs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = _snapshot(tiny_fs)
    proc = _main(capsys, "attack", str(tiny_fs), *ATTACK, "--name", "old", "--force")
    assert_one_line_error(proc, "disk is full", "intact")
    assert _snapshot(tiny_fs) == before
    assert not list(tiny_fs.rglob("*.tmp")) and not (tiny_fs / rd.LOCK_FILE).exists()


def test_read_only_run_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = copy_fixture_run(tmp_path)
    ro = tmp_path / "ro"
    ro.mkdir()
    _mount("--bind", "-o", "ro", str(src), str(ro))
    try:
        before = _snapshot(ro)
        for argv in (("attack", str(ro), *ATTACK), ("export", str(ro)), ("train", "--out", str(ro), "--resume")):
            assert_one_line_error(_main(capsys, *argv), "read-only")
        assert _snapshot(ro) == before
    finally:
        subprocess.run(["umount", str(ro)], check=False)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT])
def test_writer_failing_mid_write(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    """Portable (no mount): the result's bytes are written, then flushing them fails; the previous
    result of that name stays as it was."""
    run = copy_fixture_run(tmp_path)
    (run / rd.ATTACKS_DIR).mkdir()
    (run / rd.ATTACKS_DIR / "old.json").write_text('{"kept": true}\n')
    before = _snapshot(run)
    real_fsync = os.fsync

    def failing_fsync(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".tmp"):
            raise OSError(code, os.strerror(code))
        real_fsync(fd)

    monkeypatch.setattr(rd.os, "fsync", failing_fsync)
    proc = _main(capsys, "attack", str(run), *ATTACK, "--name", "old", "--force")
    assert_one_line_error(proc, "cannot", "old.json", rd.DISK_ERRORS[code], "intact")
    assert _snapshot(run) == before
    assert not list(run.rglob("*.tmp")) and not (run / rd.LOCK_FILE).exists()


def test_other_os_errors_are_not_disguised(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the disk's errors become one line; any other OSError is a bug and keeps its traceback."""
    with pytest.raises(OSError, match="boom"), rd.guard(None):
        raise OSError(errno.EIO, "boom")


def test_checkpoint_read_while_a_writer_replaces_it(tmp_path: Path) -> None:
    """A reader (``--resume``, ``status``, a test watching a run) racing a training process's atomic
    rename must get one whole checkpoint, its metadata and tensors from the same write: never a header
    of one file mapped against the other's size (the CI failure this guards against)."""
    import json
    import threading

    import torch
    from safetensors.torch import save_file

    path, tmp = tmp_path / "checkpoint.safetensors", tmp_path / "next.tmp"
    rd.save_tensors(path, {"w": torch.zeros(4096)}, {"i": 0})
    stop = threading.Event()

    def writer() -> None:
        i = 0
        while not stop.is_set():
            i += 1  # the metadata's length changes with i, so two writes differ in header size
            meta = {"hw_dq": json.dumps({"i": i, "pad": "x" * (i % 97)})}
            save_file({"w": torch.full((4096,), float(i))}, str(tmp), metadata=meta)
            os.replace(tmp, path)  # save_tensors' atomic rename, without its fsyncs: more renames per read

    t = threading.Thread(target=writer)
    t.start()
    try:
        for _ in range(2000):
            tensors, meta = rd.load_tensors(path)
            assert float(tensors["w"][0]) == meta["i"] == float(tensors["w"][-1])
    finally:
        stop.set()
        t.join()
