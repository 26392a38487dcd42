"""Progress of the reference AutoAttack: per batch on a terminal, silent with --quiet or without one."""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import run_cli

ARGS = ("attack", "zoo:sm-fp-at", "--attacks", "apgd-ce", "--apgd-iters", "3", "--n", "48", "--batch-size", "6",
        "--no-sanity")  # fmt: skip


def _on_terminal(*args: str, cwd: Path) -> tuple[int, str]:
    """Run the CLI with stderr on a pseudo-terminal (as in an interactive shell); returns (status, stderr)."""
    master, slave = pty.openpty()
    with open(cwd / "stdout.txt", "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "hw_dq.cli", *args], stdout=out, stderr=slave, cwd=cwd,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
        os.close(slave)
        chunks = []
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # the child closed the terminal (EIO on Linux)
                break
            if not data:
                break
            chunks.append(data)
        os.close(master)
        code = proc.wait(timeout=600)
    return code, b"".join(chunks).decode(errors="replace")


def _result(cwd: Path, name: str) -> dict:
    return json.loads((cwd / "runs" / "zoo" / "sm-fp-at" / "attacks" / f"{name}.json").read_text())


def test_autoattack_progress_on_a_terminal_only(tmp_path: Path) -> None:
    code, err = _on_terminal(*ARGS, "--name", "tty", cwd=tmp_path)
    assert code == 0, err
    lines = [s.strip() for s in re.split(r"[\r\n]", err) if "apgd-ce: batch" in s]
    assert lines, err
    last = lines[-1]
    batches = re.search(r"batch (\d+)/(\d+)", last)
    assert batches is not None and batches.group(1) == batches.group(2) and int(batches.group(2)) >= 2, last
    assert "ETA" in last
    rec = _result(tmp_path, "tty")
    # the last line's running robust accuracy is the result's
    assert f"running robust acc {100 * rec['evaluations'][0]['robust_acc']:.1f}%" in last, (last, rec["evaluations"])

    code, err = _on_terminal(*ARGS, "--name", "quiet", "--quiet", cwd=tmp_path)
    assert code == 0, err
    assert "batch" not in err and "ETA" not in err, err
    piped = run_cli(*ARGS, "--name", "piped", cwd=tmp_path)  # stderr is a pipe: no progress either
    assert piped.returncode == 0, piped.stderr
    assert "batch" not in piped.stderr and "ETA" not in piped.stderr, piped.stderr

    # progress changes nothing: the same images survive in all three runs
    masks = {n: _result(tmp_path, n)["evaluations"][0]["robust_mask"] for n in ("tty", "quiet", "piped")}
    assert len(set(masks.values())) == 1, masks
