"""The sweep's results: the Pareto front (markdown table), Pareto plots (PNG), the best point per board."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hw_dq import run as rd
from hw_dq.experiments.sweep.spec import OBJECTIVES, SweepSpec

TRIALS = "trials.json"  # every trial's summary (relative run directories), the report's source


def collect(study: Any) -> list[dict[str, Any]]:
    """One row per trial of the study (complete, pruned or failed), from what the workers stored."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get("surplus"):
            continue
        row = {"number": t.number, "state": t.state.name, "run_dir": t.user_attrs.get("run_dir"),
               "wall_s": t.user_attrs.get("wall_s"), "curve": t.user_attrs.get("curve", []),
               "error": t.user_attrs.get("error"), "params": dict(t.params),
               "duplicate_of": t.user_attrs.get("duplicate_of")}  # fmt: skip
        if t.state.name == "COMPLETE":
            row["summary"] = t.user_attrs["summary"]
            row["feasible"] = all(c <= 0 for c in t.constraints.values())
        rows.append(row)
    return rows


def dominates(a: dict[str, Any], b: dict[str, Any], objectives: tuple[str, ...]) -> bool:
    """``a`` is at least as good as ``b`` in every objective and better in one."""
    better = False
    for o in objectives:
        sign = 1.0 if OBJECTIVES[o][0] == "maximize" else -1.0
        va, vb = sign * a[o], sign * b[o]
        if va < vb:
            return False
        better |= va > vb
    return better


def front(rows: list[dict[str, Any]], objectives: tuple[str, ...]) -> list[dict[str, Any]]:
    """The feasible complete trials that no other feasible complete trial dominates."""
    # a trial that repeated a finished point stands once on the front (as the trial that ran it)
    pts = [r for r in rows if r["state"] == "COMPLETE" and r.get("feasible") and r.get("duplicate_of") is None]
    return [r for r in pts if not any(dominates(q["summary"], r["summary"], objectives) for q in pts if q is not r)]


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _row(r: dict[str, Any]) -> str:
    s = r["summary"]
    bits = s["tag"] + (" (8-bit ends)" if s.get("end_bits") == 8 else "")
    recipe = s["adv_train"] + (f" {s['adv_eps']:g}/255" if s.get("adv_eps") else "")
    final = r.get("final_robust")
    return (
        f"| {r['number']} | `{r['run_dir']}` | {bits} | {s['width']:g} | {s['beta']:g} {s['lipschitz_target']} | "
        f"{recipe} | {s['epochs']} | {_pct(s['clean'])} | {_pct(s['robust'])} | {_pct(final)} | {s['fps']:,.0f} | "
        f"{s['lut']:,.0f} | {s['bram']:,.0f} |"
    )


HEADER = (
    "| trial | run directory | bits | width | beta (form) | adversarial training | epochs | clean (acc.) | "
    "robust (proxy) | robust (final) | est. FPS | LUT | BRAM_18K |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def front_table(rows: list[dict[str, Any]], spec: SweepSpec) -> str:
    """The Pareto front as a markdown table, most robust first."""
    pts = sorted(front(rows, spec.objectives), key=lambda r: (-r["summary"]["robust"], -r["summary"]["fps"]))
    return "\n".join([HEADER, *(_row(r) for r in pts)])


def _rank(r: dict[str, Any]) -> tuple[float, float, float]:
    s = r["summary"]
    return (r.get("final_robust", s["robust"]), s["clean"], s["fps"])


def best_for(rows: list[dict[str, Any]], min_fps: float) -> dict[str, dict[str, Any]]:
    """Per board: the most robust feasible point at or above ``min_fps`` (then the most accurate)."""
    best: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r["state"] != "COMPLETE" or not r.get("feasible") or r["summary"]["fps"] < min_fps:
            continue
        board, b = r["summary"]["board"], best.get(r["summary"]["board"])
        if b is None or _rank(r) > _rank(b):
            best[board] = r
    return best


def plot(rows: list[dict[str, Any]], spec: SweepSpec, out: Path) -> list[Path]:
    """robust vs FPS and robust vs LUT; the front solid and labelled, dominated trials faded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    on_front = {r["number"] for r in front(rows, spec.objectives)}
    done = [r for r in rows if r["state"] == "COMPLETE"]
    paths = []
    for key, label, log in (("fps", "estimated throughput (images/s)", True), ("lut", "LUTs (FINN estimate)", False)):
        fig, ax = plt.subplots(figsize=(6, 4.2))
        for r in done:
            s, f = r["summary"], r["number"] in on_front
            ax.scatter(s[key], 100 * s["robust"], c="C0" if f else "0.6", alpha=1.0 if f else 0.35,
                       marker="o" if r.get("feasible") else "x", s=40 if f else 25, zorder=3 if f else 2)  # fmt: skip
            if f:
                ax.annotate(str(r["number"]), (s[key], 100 * s["robust"]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")  # fmt: skip
        if log:
            ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel(f"robust accuracy on the accelerator (%, proxy, {spec.proxy.eps:g}/255)")
        ax.set_title(f"{spec.name}: {spec.board}, front (blue) vs dominated (faded); x = over a limit", fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        p = out / f"pareto_robust_{key}.png"
        rd.atomic_write(p, lambda tmp, fig=fig: fig.savefig(tmp, dpi=110, format="png"))
        plt.close(fig)
        paths.append(p)
    return paths


def markdown(rows: list[dict[str, Any]], spec: SweepSpec, min_fps: float, wall_s: float | None) -> str:
    """The report: what was searched, the front, the best point for ``min_fps``, every trial, the wall time."""
    c: dict[str, int] = {}
    for r in rows:
        c[r["state"]] = c.get(r["state"], 0) + 1
    walls = [r["wall_s"] for r in rows if r["state"] == "COMPLETE" and r.get("wall_s")]
    finals = any("final_robust" in r for r in rows)
    lines = [
        f"# Sweep `{spec.name}`: robustness x FPGA cost on {spec.board}",
        "",
        f"Objectives: {', '.join(f'{o} ({OBJECTIVES[o][0]})' for o in spec.objectives)}. Constraints: FINN's "
        f"recommended utilisation limits of the board{''.join(f', {k} {v:g}' for k, v in spec.constraints.items())}. "
        f"Sampler: {spec.sampler}; {spec.n_trials} trials asked; states: "
        f"{', '.join(f'{k.lower()} {v}' for k, v in sorted(c.items()))}.",
        "",
        f"Robust accuracy is the per-image worst case of {' + '.join(spec.proxy.attacks)} at {spec.proxy.eps:g}/255 on "
        f"the bit-exact simulation of each trial's FINN build, on {spec.proxy.n} test images (the search's proxy). "
        + ("The 'robust (final)' column re-evaluates the front with " + " + ".join(spec.final.attacks)
           + f" on {spec.final.n} images." if finals else
           "**The front's robust numbers are the proxy only** (not re-evaluated with the full standard; run "
           "`hw-dq sweep SWEEP_DIR --report --final`)."),
        "",
        "## Pareto front",
        "",
        front_table(rows, spec),
        "",
        "![robust vs FPS](pareto_robust_fps.png) ![robust vs LUT](pareto_robust_lut.png)",
        "",
        f"## Best configuration per board at >= {min_fps:,.0f} images/s",
        "",
    ]  # fmt: skip
    best = best_for(rows, min_fps)
    lines += [f"* {b}: trial {r['number']} (`{r['run_dir']}`), {r['summary']['tag']}, width "
              f"{r['summary']['width']:g}, beta {r['summary']['beta']:g}, {r['summary']['adv_train']}: robust "
              f"{_pct(_rank(r)[0])}, clean {_pct(r['summary']['clean'])}, {r['summary']['fps']:,.0f} FPS"
              for b, r in best.items()] or ["* no feasible trial reaches it"]  # fmt: skip
    lines += ["", "## Every trial", "", "| trial | state | run directory | params | robust | FPS | wall (s) |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        s = r.get("summary") or {}
        params = ", ".join(f"{k}={v}" for k, v in r["params"].items())
        state = r["state"].lower() + ("" if r.get("feasible", True) else " (over a limit)")
        lines.append(f"| {r['number']} | {state} | `{r['run_dir']}` | {params} | {_pct(s.get('robust'))} | "
                     f"{s.get('fps', 0):,.0f} | {r['wall_s'] or 0:.0f} |")  # fmt: skip
    lines += ["", f"Mean wall time per complete trial: {sum(walls) / max(1, len(walls)):.0f} s."]
    if wall_s is not None:
        lines.append(f"Wall time of the sweep (first trial start to last trial end): {wall_s / 60:.1f} min.")
    return "\n".join(lines) + "\n"
