"""The Optuna study of a sweep: storage (SQLite under SWEEP_DIR or a shared server), the trial budget, workers.

Any number of workers (processes, on any machines) share one study through its storage. Each
runs ``ask -> run_trial -> tell`` until the study holds ``n_trials`` finished trials (complete
or pruned). A trial whose worker died (a process of this machine that no longer exists, or a
heartbeat older than the grace period) is marked failed and retried with the same parameters in
the same run directory, which its stages continue. The budget is counted in trial numbers, which
the storage hands out atomically, so two workers never both take the last slot.
"""

from __future__ import annotations

import os
import random
import socket
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hw_dq import run as rd
from hw_dq.errors import ConfigError
from hw_dq.experiments.sweep import trial as tr
from hw_dq.experiments.sweep.spec import SweepSpec

DB = "study.db"
MAX_RETRY = 3  # a trial killed this often is given up (its slot goes to a fresh point)
# this process's time split (benchmarks/sweep_overhead.py): Optuna and its storage (ask, tell,
# attributes, reaping, the pruner's reads) vs the trials' own stages vs the progress display
TIMING: dict[str, float] = {"optuna_s": 0.0, "trial_s": 0.0, "progress_s": 0.0, "trials": 0, "_last_trial_s": 0.0}


def default_storage(out: Path) -> str:
    """The embedded SQLite study under the sweep folder."""
    return f"sqlite:///{(out / DB).resolve()}"


def _redact(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
    return url


def open_storage(url: str, spec: SweepSpec) -> Any:
    """An Optuna RDB storage with heartbeats; one line (exit 2) if it cannot be reached."""
    import optuna
    from optuna.storages import RDBStorage

    scheme = url.split("://", 1)[0] if "://" in url else ""
    if not scheme.startswith(("sqlite", "postgresql", "mysql")):
        raise ConfigError(f"--storage {_redact(url)}: use sqlite:///PATH or postgresql://USER@HOST:PORT/DB")
    if scheme == "postgresql":
        url = "postgresql+psycopg://" + url.split("://", 1)[1]  # the installed driver (psycopg 3)
    kwargs: dict[str, Any] = {}
    if scheme.startswith("postgresql"):
        kwargs = {"connect_args": {"connect_timeout": 10}, "pool_pre_ping": True}
    elif scheme == "sqlite":
        kwargs = {"connect_args": {"timeout": 60}}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # heartbeats, stale-trial failing and retry history are used here on purpose, outside Study.optimize
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
    try:
        storage = RDBStorage(
            url, engine_kwargs=kwargs, heartbeat_interval=spec.heartbeat_s, grace_period=spec.grace_s,
            heartbeat_stale_trial_callback=_retry,
        )  # fmt: skip
    except Exception as e:  # sqlalchemy/psycopg: unreachable server, bad credentials, missing driver
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ConfigError(
            f"cannot open the study storage {_redact(url)} ({first}); check the URL and that the server is running"
        ) from None
    if scheme == "sqlite":
        _sqlite_wal(storage)
    return storage


def _sqlite_wal(storage: Any) -> None:
    """Write-ahead log, synced at checkpoints: a commit no longer waits for an fsync (7x less storage
    time per trial here), and readers no longer block the writer (local disks only; several
    machines share a PostgreSQL study instead). A power cut may lose the last commits, never
    corrupt the file; a resumed sweep then redoes at most the trials whose tell was lost."""
    from sqlalchemy import event

    def pragmas(conn: Any, _record: Any) -> None:
        cur = conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    event.listen(storage.engine, "connect", pragmas)
    storage.engine.dispose()  # connections made before the listener reconnect with it


def _retry(study: Any, frozen: Any) -> None:
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)(study, frozen)


def _sampler(spec: SweepSpec, seed: int) -> Any:
    """Multi-objective NSGA-II or TPE; both read the constraints each trial sets (feasible: all <= 0)."""
    import optuna

    if spec.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True)
    return optuna.samplers.NSGAIISampler(population_size=spec.population_size, seed=seed)


def open_study(spec: SweepSpec, storage_url: str, shared: bool) -> Any:
    """Create or load the study named by the SPEC; refuses a study that another SPEC created."""
    import optuna

    storage = open_storage(storage_url, spec)
    seed = spec.seed
    try:
        existing = {s.study_name: s.n_trials for s in optuna.get_all_study_summaries(storage)}
    except Exception as e:
        raise ConfigError(f"cannot read the study storage {_redact(storage_url)} ({str(e)[:200]})") from None
    if shared or existing.get(spec.name):
        # workers must not replay each other's (or a killed run's) random draws
        seed = random.Random(f"{spec.seed}/{socket.gethostname()}/{os.getpid()}/{time.time()}").randrange(2**31)
    study = optuna.create_study(storage=storage, study_name=spec.name, directions=spec.directions,
                                sampler=_sampler(spec, seed), load_if_exists=True)  # fmt: skip
    digest = study.user_attrs.get("spec_digest")
    if digest is None:
        study.set_user_attr("spec_digest", spec.digest)
        study.set_user_attr("spec", spec.to_dict())
    elif digest != spec.digest:
        raise ConfigError(
            f"study '{spec.name}' in {_redact(storage_url)} was created by another SPEC; "
            "rerun with that SPEC, or give this one another 'name' (or another --out)"
        )
    return study


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _dead_here(worker: str | None) -> bool:
    """A worker of this machine whose process is gone."""
    if not worker or worker.rsplit(":", 1)[0] != socket.gethostname():
        return False
    try:
        os.kill(int(worker.rsplit(":", 1)[1]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError):
        return False
    return False


def reap(study: Any) -> list[int]:
    """Fail (and retry) the running trials whose worker is gone: a dead process of this machine at
    once, any other after its heartbeat's grace period. Returns the trial numbers failed here."""
    import optuna
    from optuna.storages import fail_stale_trials
    from optuna.trial import TrialState

    failed = []
    storage = study._storage
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if _dead_here(t.user_attrs.get("worker")):
            try:
                storage.set_trial_user_attr(t._trial_id, "error", "worker process died")
                if storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                    _retry(study, storage.get_trial(t._trial_id))
                    failed.append(t.number)
            except optuna.exceptions.UpdateFinishedTrialError:
                pass  # another worker got there first
    fail_stale_trials(study)
    return failed


def run_dir_name(frozen: Any) -> str:
    """``trials/tNNNN`` of the trial first run with these parameters (a retry continues it)."""
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    history = RetryHeartbeatStaleTrialCallback.retry_history(frozen)
    return f"trials/t{(history[0] if history else frozen.number):04d}"


def _in_budget(study: Any, trial: Any, n_trials: int) -> bool:
    from optuna.trial import TrialState

    frozen = study._storage.get_trial(trial._trial_id)
    if "failed_trial" in frozen.system_attrs or "fixed_params" in frozen.system_attrs:
        return True  # a retry (or a point the user enqueued) replaces a failed trial
    before = [t for t in study.get_trials(deepcopy=False) if t.number < trial.number and t.state != TrialState.FAIL]
    return len(before) < n_trials


def counts(study: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        out[t.state.name] = out.get(t.state.name, 0) + 1
    return out


def work(
    study: Any,
    spec: SweepSpec,
    out: Path,
    on_trial: Callable[[Any], None] | None = None,
    log: Callable[[str], None] | None = None,
    poll_s: float = 2.0,
    reuse_points: bool = True,
) -> dict[str, int]:
    """Run trials of ``study`` until it holds ``spec.n_trials`` finished ones; returns the state counts."""
    from optuna.trial import TrialState

    say = log or (lambda _m: None)
    max_failures = spec.max_failures if spec.max_failures is not None else spec.n_trials
    errors = 0
    TIMING.update({k: 0.0 for k in TIMING})
    while True:
        t_iter = time.perf_counter()
        for n in reap(study):
            say(f"trial {n}: its worker died; marked failed and queued for a retry")
        c = counts(study)
        if c.get("COMPLETE", 0) + c.get("PRUNED", 0) >= spec.n_trials:
            return c
        live = sum(v for k, v in c.items() if k != "FAIL")
        if c.get("WAITING", 0) == 0 and live >= spec.n_trials:
            TIMING["optuna_s"] += time.perf_counter() - t_iter
            time.sleep(poll_s)  # every slot is taken by a running trial: wait for it (or its retry)
            continue
        trial = study.ask()
        if not _in_budget(study, trial, spec.n_trials):
            trial.set_user_attr("surplus", True)
            study.tell(trial, state=TrialState.FAIL)
            TIMING["optuna_s"] += time.perf_counter() - t_iter
            continue
        state, msg = _run_one(study, trial, spec, out, say, reuse_points)
        TIMING["optuna_s"] += time.perf_counter() - t_iter - TIMING["_last_trial_s"]
        TIMING["trials"] += 1
        t_show = time.perf_counter()
        _notify(on_trial, study, trial)
        TIMING["progress_s"] += time.perf_counter() - t_show
        _write_timing(out)
        if state == "FAIL":
            errors += 1
            if errors > max_failures:
                raise ConfigError(f"{errors} trials failed (max_failures {max_failures}); last: {msg}")


def _run_one(study: Any, trial: Any, spec: SweepSpec, out: Path, say: Callable[[str], None],
             reuse_points: bool = True) -> tuple[str, str]:  # fmt: skip
    """One asked trial from its suggestions to its tell; returns its final state and a message."""
    import optuna
    from optuna.storages._heartbeat import get_heartbeat_thread
    from optuna.trial import TrialState

    TIMING["_last_trial_s"] = 0.0
    trial.set_user_attr("worker", worker_id())
    rel = run_dir_name(study._storage.get_trial(trial._trial_id))
    trial.set_user_attr("run_dir", rel)
    t0, curve, hook_s = time.time(), [], [0.0]  # hook_s: time the pruner spends in the storage

    def on_epoch(row: dict[str, Any]) -> None:
        th = time.time()
        curve.append(tr.held_out_acc(row))
        trial.set_user_attr("curve", curve)
        done = [t.user_attrs.get("curve", []) for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
        hook_s[0] += time.time() - th
        if tr.should_prune(spec, len(curve), curve[-1], done):
            raise optuna.TrialPruned(f"held-out accuracy {curve[-1]:.3f} after epoch {len(curve)}")

    with get_heartbeat_thread(trial._trial_id, study._storage):
        try:
            params = tr.suggest(trial, spec.space)
            twin = _same_point(study, trial) if reuse_points else None
            if twin is not None:  # the sampler proposed a finished point again: its results, not a rerun
                trial.set_user_attr("duplicate_of", twin.number)
                trial.set_user_attr("run_dir", twin.user_attrs["run_dir"])
                summary = twin.user_attrs["summary"]
                say(f"trial {trial.number}: the same point as trial {twin.number}; its results are reused")
            else:
                say(f"trial {trial.number} ({rel}): {params}")
            t_run = time.perf_counter()
            try:
                if twin is None:
                    summary = tr.run_trial(spec, out / rel, params, on_epoch, say)
            finally:  # the trial's own time: its stages, less the pruner's storage calls
                TIMING["_last_trial_s"] = time.perf_counter() - t_run - hook_s[0]
                TIMING["trial_s"] += TIMING["_last_trial_s"]
        except optuna.TrialPruned as e:
            trial.set_user_attr("wall_s", time.time() - t0)
            study.tell(trial, state=TrialState.PRUNED)
            say(f"trial {trial.number} pruned: {e}")
            return "PRUNED", str(e)
        except KeyboardInterrupt:
            study.tell(trial, state=TrialState.FAIL)
            _retry(study, study._storage.get_trial(trial._trial_id))
            raise
        except Exception as e:  # noqa: BLE001 - one failing point must not stop the sweep
            msg = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
            trial.set_user_attr("error", msg)
            study.tell(trial, state=TrialState.FAIL)
            say(f"trial {trial.number} failed: {msg}")
            return "FAIL", msg
    trial.set_user_attr("summary", {**summary, "pruner_s": round(hook_s[0], 4)})
    for key, value in tr.constraint_values(spec, summary).items():
        trial.set_constraint(key, value)
    trial.set_user_attr("wall_s", time.time() - t0)
    study.tell(trial, tr.objective_values(spec, summary))
    return "COMPLETE", ""


def _same_point(study: Any, trial: Any) -> Any:
    """A complete trial (not itself a copy) with exactly ``trial``'s parameters, or None."""
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if t.number != trial.number and t.params == trial.params and "duplicate_of" not in t.user_attrs:
            return t
    return None


def _write_timing(out: Path) -> None:
    """This worker's time split so far (``SWEEP_DIR/timing/<host>_<pid>.json``; the overhead benchmark reads it)."""
    host, pid = worker_id().rsplit(":", 1)
    rd.write_json(out / "timing" / f"{host}_{pid}.json", {k: v for k, v in TIMING.items() if not k.startswith("_")})


def _notify(on_trial: Callable[[Any], None] | None, study: Any, trial: Any) -> None:
    if on_trial is not None:
        on_trial(study)


def write_state(out: Path, spec: SweepSpec, storage_url: str) -> None:
    """The sweep folder's own record: the SPEC and where its study lives (never a password)."""
    rd.write_json(out / "spec.json", spec.to_dict())
    local = storage_url == default_storage(out)
    rd.write_json(out / "storage.json", {"storage": "sqlite:///study.db" if local else _redact(storage_url),
                                         "study_name": spec.name})  # fmt: skip
