"""Optuna's own overhead per sweep trial vs the trial's own time, in one real sweep.

Runs a real sweep (default: the shipped ``sweep_tiny`` SPEC, SQLite study in a temporary
folder, the tiny model's trials being the worst case: the shortest trials make the same
overhead the largest fraction) and reads the sweep's own time split
(``hw_dq.experiments.sweep.study.TIMING``): Optuna and its storage (study creation excluded;
per trial: reaping dead workers' trials, counting, ask, the budget check, suggestions, user
attributes, constraints, the pruner's reads, tell) against the trials' stages (train, FINN
build, proxy attacks). Prints a table and writes benchmarks/results/sweep_overhead.{json,md}.

    .venv/bin/python -m benchmarks.sweep_overhead [--spec sweep_tiny] [--n-trials 6]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

from benchmarks.common import RESULTS, machine, machine_line, md_table, write_results


def committed_sweep(per_optuna: float) -> dict | None:
    """The committed Pynq-Z1 sweep: its mean trial time, and its workers' own time split."""
    d = RESULTS / "sweep_pynq_cpu"
    if not (d / "trials.json").is_file():
        return None
    rows = [r for r in json.loads((d / "trials.json").read_text())["trials"] if r["state"] == "COMPLETE"]
    mean = sum(sum(r["summary"]["timing_s"].values()) for r in rows) / max(1, len(rows))
    out = {"mean_trial_s": mean, "this_overhead_fraction": per_optuna / mean if mean else None}
    workers = [json.loads(p.read_text()) for p in sorted((d / "timing").glob("*.json"))]
    n = int(sum(w["trials"] for w in workers))
    if n:
        opt, trial = sum(w["optuna_s"] for w in workers) / n, sum(w["trial_s"] for w in workers) / n
        out.update(own_optuna_s_per_trial=opt, own_trial_s_per_trial=trial, own_fraction=opt / trial,
                   own_workers=len(workers), own_trials=n)  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--spec", default="sweep_tiny", help="a SPEC file or shipped name")
    ap.add_argument("--n-trials", type=int, default=6)
    a = ap.parse_args(argv)

    from hw_dq.experiments.sweep import load_spec, sweep
    from hw_dq.experiments.sweep.study import TIMING

    m = machine()
    spec = dataclasses.replace(load_spec(a.spec), n_trials=a.n_trials, name="overhead")
    with tempfile.TemporaryDirectory(prefix="hwdq-sweep-overhead-") as tmp:
        t0 = time.perf_counter()
        sweep(spec, Path(tmp) / "sweep", progress=False)
        wall = time.perf_counter() - t0
    n = int(TIMING["trials"])
    per_optuna, per_trial = TIMING["optuna_s"] / n, TIMING["trial_s"] / n
    ratio = per_optuna / per_trial
    pynq = committed_sweep(per_optuna)
    data = {
        "benchmark": "sweep_overhead",
        "machine": m,
        "spec": a.spec,
        "n_trials": n,
        "storage": "sqlite (SWEEP_DIR/study.db)",
        "wall_s": wall,
        "optuna_s_total": TIMING["optuna_s"],
        "trial_s_total": TIMING["trial_s"],
        "progress_s_total": TIMING["progress_s"],
        "optuna_s_per_trial": per_optuna,
        "trial_s_per_trial": per_trial,
        "optuna_fraction_of_trial": ratio,
        "goal": "optuna overhead per trial <= 1% of a trial's time",
        "meets_goal": ratio <= 0.01,
        "committed_pynq_sweep": pynq,
    }
    rows = [
        ["Optuna + storage per trial (s)", f"{per_optuna:.3f}"],
        ["trial's own stages per trial (s)", f"{per_trial:.1f}"],
        ["overhead / trial time", f"{100 * ratio:.2f}%"],
        ["progress display per trial (s, not counted above)", f"{TIMING['progress_s'] / n:.3f}"],
    ]
    if pynq:
        rows.append(["this overhead / the committed Pynq-Z1 sweep's mean trial "
                     f"({pynq['mean_trial_s']:.0f} s)", f"{100 * pynq['this_overhead_fraction']:.3f}%"])  # fmt: skip
        if pynq.get("own_fraction") is not None:
            rows.append(["the committed sweep's own accounting: Optuna per trial / trial "
                         f"({pynq['own_optuna_s_per_trial']:.2f} s / {pynq['own_trial_s_per_trial']:.0f} s)",
                         f"{100 * pynq['own_fraction']:.3f}%"])  # fmt: skip
    table = md_table(["quantity", "value"], rows)
    verdict = f"{a.spec}'s {per_trial:.0f} s trials: {100 * ratio:.2f}% ({'met' if ratio <= 0.01 else 'NOT met'})"
    if pynq and pynq.get("own_fraction") is not None:
        f = pynq["own_fraction"]
        verdict += (f"; the committed Pynq-Z1 sweep ({pynq['own_workers']} workers, {pynq['own_trials']} trials, "
                    f"its own accounting): {100 * f:.2f}% ({'met' if f <= 0.01 else 'NOT met'})")  # fmt: skip
        data["committed_meets_goal"] = f <= 0.01
    md = (
        f"# Sweep: Optuna's overhead per trial\n\n{a.spec} SPEC, {n} trials, SQLite study; wall {wall:.0f} s. "
        f"Goal, at most 1% of a trial's time: {verdict}.\n\n{table}\n\n"
        f"Machine: {machine_line(m)}.\n\nCommand: `.venv/bin/python -m benchmarks.sweep_overhead "
        f"--spec {a.spec} --n-trials {a.n_trials}`\n"
    )
    print(md)
    write_results("sweep_overhead", data, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
