"""The run directory's lock, the CLI's frame for disk errors, and the tests' kill points.

A stage that writes into a run directory holds :func:`run_lock` (``RUN_DIR/.lock``: PID, host, verb,
start time; the exclusion is a kernel ``flock``, so a killed holder never blocks the next run), and
:func:`guard` turns a full disk or a read-only folder into a one-line error. :func:`kill_point` lets
the tests SIGKILL a process at a chosen write. Imports nothing heavy (the CLI takes the lock first).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hw_dq.errors import HwDqError

LOCK_FILE = ".lock"
KILL_ENV = "HW_DQ_TEST_KILL_AT"  # tests only: "<file name>[:<n>]" SIGKILLs before the n-th rename onto it
_kill_counts: dict[str, int] = {}


def kill_point(name: str) -> None:
    """Tests' deterministic kill: SIGKILL this process when ``$HW_DQ_TEST_KILL_AT`` names
    ``name`` (``name:n``: at its n-th occurrence). One environment lookup in normal use."""
    spec = os.environ.get(KILL_ENV)
    if not spec:
        return
    target, _, nth = spec.partition(":")
    if target == name:
        _kill_counts[name] = _kill_counts.get(name, 0) + 1
        if _kill_counts[name] >= int(nth or 1):
            os.kill(os.getpid(), signal.SIGKILL)


def _proc_start(pid: int) -> str:
    """The kernel's start time of process ``pid`` ('' if unknown): a reused PID has another."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
        return f"PID {info['pid']} on {info['host']} ({info['verb']}, since {info['started']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


@contextlib.contextmanager
def run_lock(run_dir: str | Path, verb: str = "hw-dq") -> Iterator[Path]:
    """Hold ``RUN_DIR/.lock`` (exclusive) while a stage writes into the run directory.

    The file holds the holder's PID, host, verb and start time; the exclusion itself is a kernel
    ``flock``, released when the holder exits or is killed, so a lock left by a dead process is
    stale by construction and the next run takes it over. A second process gets a one-line
    error naming the holder."""
    path = Path(run_dir) / LOCK_FILE
    created = not path.parent.exists()  # train --out: the lock may be the first thing in a new run
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise HwDqError(
                f"run directory {run_dir} is in use by {_holder(path)}; wait for it to finish "
                "or use another run directory"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False  # the previous holder removed the file between our open and flock
        if same:
            break
        os.close(fd)
    try:
        pid = os.getpid()
        info = {"pid": pid, "host": socket.gethostname(), "verb": verb, "proc_start": _proc_start(pid),
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}  # fmt: skip
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        remove_dead_scratch(Path(run_dir))
        yield path
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)
        if created:  # a command refused before it wrote anything leaves no empty run directory behind
            with contextlib.suppress(OSError):
                path.parent.rmdir()  # only if empty


_SCRATCH = re.compile(r"\.(\d+)-[^.]*\.tmp$")  # what atomic_write names its temporary file


def remove_dead_scratch(folder: Path) -> list[Path]:
    """Delete the temporary files (``.NAME.PID-XXXX.tmp``) that killed writers left under ``folder``;
    a living process's are kept. Returns what was removed."""
    removed = []
    for tmp in folder.rglob(".*.tmp"):
        m = _SCRATCH.search(tmp.name)
        if m and _alive(int(m.group(1))):
            continue
        with contextlib.suppress(OSError):
            tmp.unlink()
            removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock_is_stale(path: Path) -> bool:
    """True when the lock file's holder is not running (dead, or its PID now names another process)."""
    try:
        info = json.loads(Path(path).read_text())
        pid, start = int(info["pid"]), str(info.get("proc_start", ""))
    except (OSError, ValueError, KeyError, TypeError):
        return True
    if info.get("host") != socket.gethostname():
        return False  # another machine's process: only its own kernel lock says
    return not _alive(pid) or (bool(start) and _proc_start(pid) != start)


DISK_ERRORS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
               errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
               errno.EPERM: "permission denied"}  # fmt: skip


@contextlib.contextmanager
def guard(run_dir: str | Path | None = None, verb: str = "hw-dq") -> Iterator[None]:
    """A CLI verb's frame: hold :func:`run_lock` on ``run_dir`` (when it names a folder that
    exists or will be created) and turn a full disk, a read-only folder or a denied write into
    a one-line :class:`HwDqError` (every file written before is intact: writes are atomic)."""
    try:
        with run_lock(run_dir, verb) if run_dir is not None else contextlib.nullcontext():
            yield
    except OSError as e:
        if e.errno not in DISK_ERRORS:
            raise
        where = f" ({e.filename})" if e.filename else ""
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            what, fix = "write", "free space or choose another folder"
        elif e.errno == errno.EROFS:
            what, fix = "write", "choose a writable folder"
        else:
            what, fix = "access", "fix its permissions or choose another folder"
        raise HwDqError(
            f"cannot {what}{where}: {DISK_ERRORS[e.errno]}; {fix} (every file written before is intact)"
        ) from None


# the verbs that write into one run directory, and the argument that names it (train creates it)
LOCKED_VERBS = {"train": "out", "attack": "run_dir", "export": "run_dir", "build": "run_dir",
                "certify": "run_dir", "faults": "runs"}  # fmt: skip


def guard_verb(args: Any) -> contextlib.AbstractContextManager[None]:
    """:func:`guard` for a parsed ``hw-dq`` command line: the lock on the run directory its verb
    writes into (an existing folder; ``train --out`` may create it), else only the disk errors."""
    verb = str(getattr(args, "cmd", "hw-dq"))
    folder = getattr(args, LOCKED_VERBS[verb], None) if verb in LOCKED_VERBS else None
    if isinstance(folder, list):  # faults RUN (one run written); faults --plot RUN... only reads them
        folder = folder[0] if len(folder) == 1 and not getattr(args, "plot", False) else None
    if folder is not None and not (Path(folder).is_dir() or verb == "train"):
        folder = None  # a missing run directory: the verb itself says so
    return guard(folder, verb)
