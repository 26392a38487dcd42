"""hw-dq sweep on a real PostgreSQL server: two worker processes share one study; one is killed mid-trial."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_cli

PG_BIN = Path(os.environ.get("HW_DQ_PG_BIN", "/usr/lib/postgresql/15/bin"))
TINY = ROOT / "hw_dq" / "configs" / "sweep_tiny.yaml"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_pg(cmd: list[str]) -> list[str]:
    """initdb refuses root: run the server as the system's postgres user when we are root."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    """A throwaway PostgreSQL cluster on a free local port; yields its URL."""
    if not (PG_BIN / "initdb").is_file():
        pytest.skip(f"PostgreSQL server binaries not found in {PG_BIN} (set HW_DQ_PG_BIN)")
    if os.geteuid() == 0 and not shutil.which("runuser"):
        pytest.skip("running as root without runuser: cannot start PostgreSQL as another user")
    root = Path(tempfile.mkdtemp(prefix="hwdq-pg-"))
    data, port = root / "data", _free_port()
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    run = lambda cmd: subprocess.run(_as_pg(cmd), check=True, capture_output=True, text=True, timeout=120)  # noqa: E731
    run([str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync"])
    opts = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=50"
    run([str(PG_BIN / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(root / "log"), "-w", "start"])
    try:
        run([str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "sweep"])
        yield f"postgresql://postgres@127.0.0.1:{port}/sweep"
    finally:
        subprocess.run(_as_pg([str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]),
                       capture_output=True, timeout=60)  # fmt: skip
        shutil.rmtree(root, ignore_errors=True)


def _pid(trial: object) -> int:
    """The process id of the worker that holds a trial (its `worker` attribute is host:pid)."""
    return int(trial.user_attrs["worker"].rsplit(":", 1)[1])  # type: ignore[attr-defined]


def test_two_workers_share_one_study_and_survive_a_killed_worker(postgres: str, tmp_path: Path) -> None:
    import optuna
    from optuna.trial import TrialState

    from hw_dq.experiments.sweep.spec import load_spec
    from hw_dq.experiments.sweep.study import open_storage

    spec = load_spec(TINY)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "hw_dq.cli",
                "sweep",
                str(TINY),
                "--out",
                str(tmp_path / f"host{i}"),
                "--storage",
                postgres,
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    storage = None
    both_running, killed = False, None
    deadline = time.time() + 240
    while time.time() < deadline and killed is None:
        time.sleep(0.5)
        try:
            storage = storage or open_storage(postgres, spec)
            trials = optuna.load_study(study_name=spec.name, storage=storage).get_trials()
        except (KeyError, Exception):  # noqa: BLE001 - the first worker is still creating the study
            continue
        running = [t for t in trials if t.state == TrialState.RUNNING and "run_dir" in t.user_attrs]
        pids = {_pid(t) for t in running}
        both_running |= pids == {w.pid for w in workers}
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        if both_running and complete and running:
            victim = next(w for w in workers if w.pid == _pid(running[0]))
            # Freeze the victim, then read again: the trial seen running may have finished since the read above
            # (a race that once failed CI). Kill only while the frozen worker holds a running trial past its
            # suggestions (run_dir is set before them: a trial caught there has no or only some params).
            victim.send_signal(signal.SIGSTOP)
            now = optuna.load_study(study_name=spec.name, storage=storage).get_trials()
            held = [
                t
                for t in now
                if t.state == TrialState.RUNNING and t.params.keys() == spec.space.keys() and _pid(t) == victim.pid
            ]
            if not held:
                victim.send_signal(signal.SIGCONT)
                continue
            victim.send_signal(signal.SIGKILL)
            victim.wait()
            killed = held[0]
    assert killed is not None, [w.communicate(timeout=5)[0] if w.poll() is not None else "running" for w in workers]
    survivor = next(w for w in workers if w.returncode is None)
    out, _ = survivor.communicate(timeout=300)
    assert survivor.returncode == 0, out
    trials = optuna.load_study(study_name=spec.name, storage=storage).get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == spec.n_trials  # none lost ...
    assert len({t.number for t in complete}) == len(complete)  # ... none duplicated
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    dead = next(t for t in trials if t.number == killed.number)
    assert dead.state == TrialState.FAIL and dead.user_attrs["error"] == "worker process died"
    retried = [t for t in complete if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retried) == 1 and retried[0].params == killed.params
    surplus = [t for t in trials if t.state == TrialState.FAIL and t.number != killed.number]
    assert all(t.user_attrs.get("surplus") for t in surplus)  # only slots a worker asked for after the last one
    assert len({t.user_attrs["worker"] for t in complete + [dead]}) == 2  # both workers ran trials
    # the report reads the shared study (summaries live in it, whichever machine ran the trial)
    proc = run_cli("sweep", str(tmp_path / "host0"), "--report", "--storage", postgres, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "## Pareto front" in (tmp_path / "host0" / "report.md").read_text()
