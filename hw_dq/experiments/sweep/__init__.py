"""``hw-dq sweep``: the robustness x FPGA-cost Pareto front, searched with Optuna on one machine or many.

:func:`sweep` runs (or joins, or resumes) a study into a sweep folder; :func:`report` writes its
front (markdown table, Pareto plots, the best point for a minimum FPS). Layout of SWEEP_DIR::

    spec.json  storage.json  study.db (the default SQLite study)  trials/tNNNN/ (ordinary run
    directories, each with sweep_trial.json)  trials.json  report.md  pareto_robust_{fps,lut}.png
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from hw_dq import run as rd
from hw_dq.errors import ConfigError
from hw_dq.experiments.sweep.spec import SweepSpec, load_spec, parse_spec, spec_from_dict

__all__ = ["SweepSpec", "load_spec", "parse_spec", "report", "sweep"]


def sweep(
    spec: SweepSpec | str | Path,
    out: str | Path,
    *,
    storage: str | None = None,
    progress: bool = True,
) -> dict[str, int]:
    """Run trials until the study holds ``n_trials`` finished ones; returns the trials' state counts.

    Rerunning the same call continues the same study (a killed trial is retried in its run
    directory). With ``storage`` (``postgresql://...``) any number of such calls, on any
    machines, share one study.
    """
    from hw_dq.experiments.sweep.progress import Progress
    from hw_dq.experiments.sweep.study import default_storage, open_study, work, write_state

    spec = spec if isinstance(spec, SweepSpec) else load_spec(spec)
    out = Path(out)
    if (out / "spec.json").is_file() and storage is None:
        old = spec_from_dict(rd.read_json(out / "spec.json"))
        if old.digest != spec.digest:
            raise ConfigError(f"{out} holds a sweep of another SPEC; rerun with that SPEC or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    from hw_dq.lock import remove_dead_scratch

    if storage is None:  # one machine: a killed worker's half-written files (live workers' stay); with a
        remove_dead_scratch(out)  # shared study, a PID on this machine says nothing about another's writers
    url = storage or default_storage(out)
    study = open_study(spec, url, shared=storage is not None)
    write_state(out, spec, url)
    show = Progress(spec, progress)
    show.log(f"study '{spec.name}' in {'SWEEP_DIR/study.db' if storage is None else 'the shared storage'}: "
             + show.status(study))  # fmt: skip
    # a repeated point reuses a finished trial only in a single-machine study: with a shared one, that
    # trial's run directory may live on another machine
    counts = work(study, spec, out, on_trial=show, log=show.log, reuse_points=storage is None)
    show.log("finished: " + show.status(study))
    return counts


def report(
    sweep_dir: str | Path,
    *,
    storage: str | None = None,
    min_fps: float = 0.0,
    final: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Write ``report.md``, ``trials.json`` and the Pareto PNGs of a sweep folder; returns the rows.

    ``final``: re-evaluate the front's points with the SPEC's full evaluation standard on the
    accelerator (``attacks/final-hw.json`` in each run directory) and report those numbers too.
    """
    from hw_dq.experiments.sweep import pareto as rp
    from hw_dq.experiments.sweep.study import default_storage, open_study

    d = Path(sweep_dir)
    if not (d / "spec.json").is_file():
        raise ConfigError(f"{d} is not a sweep folder (no spec.json); run 'hw-dq sweep SPEC --out {d}' first")
    spec = spec_from_dict(rd.read_json(d / "spec.json"))
    if storage is None and not (d / "study.db").is_file():
        raise ConfigError(f"{d} has no study.db; pass --storage with the URL of its shared study")
    study = open_study(spec, storage or default_storage(d), shared=True)
    rows = rp.collect(study)
    if final:
        _final(d, spec, rp.front(rows, spec.objectives), progress)
    for r in rows:
        path = d / str(r["run_dir"]) / "attacks" / "final-hw.json"
        if r["state"] == "COMPLETE" and path.is_file():
            r["final_robust"] = float(rd.read_json(path)["headline"]["robust_acc"])
    starts = [t.datetime_start for t in study.get_trials(deepcopy=False) if t.datetime_start]
    ends = [t.datetime_complete for t in study.get_trials(deepcopy=False) if t.datetime_complete]
    wall = (max(ends) - min(starts)).total_seconds() if starts and ends else None
    rd.write_json(d / rp.TRIALS, {"spec": spec.name, "board": spec.board, "wall_s": wall, "trials": rows})
    rp.plot(rows, spec, d)
    rd.write_text(d / "report.md", rp.markdown(rows, spec, min_fps, wall))
    return {"rows": rows, "front": [r["number"] for r in rp.front(rows, spec.objectives)], "wall_s": wall}


def _final(d: Path, spec: SweepSpec, pts: list[dict[str, Any]], progress: bool) -> None:
    from hw_dq.experiments.sweep.trial import FINAL
    from hw_dq.fpga.hwattack import evaluate_hw

    for r in pts:
        run = d / str(r["run_dir"])
        if (run / "attacks" / f"{FINAL}.json").is_file():
            continue
        t0 = time.time()
        evaluate_hw(run, list(spec.final.attacks), [spec.final.eps], board=spec.board, n=spec.final.n,
                    seed=spec.seed, name=FINAL)  # fmt: skip
        if progress:
            print(f"[sweep {spec.name}] final evaluation of trial {r['number']}: {time.time() - t0:.0f} s", flush=True)
