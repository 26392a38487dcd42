"""Runs the reproduction's plan step by step into a folder: train, attack, squeeze, hardware, summary.

Every step writes its output before the next starts; a finished step (its output exists and
was made with the same settings) is not redone, so the command can be killed and re-run.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from hw_dq import run as rd
from hw_dq.errors import ConfigError, DataError, HwDqError
from hw_dq.experiments.reproduce.claims import NOTE, claims
from hw_dq.experiments.reproduce.plan import Plan, RunSpec, Scale, load_scale, plan

SHARED_DATA = Path(__file__).resolve().parents[4] / "shared" / "data"
DEFAULT_OUT = "runs/reproduce"  # never the committed results under benchmarks/results/


def _resolve_data_dir(s: Scale, data_dir: str | None) -> str | None:
    if s.data == "sample":
        return None
    d = Path(data_dir) if data_dir else SHARED_DATA
    if not (d / "cifar10_test.npz").is_file():
        raise DataError(f"{d} has no cifar10_test.npz; pass --data-dir with the CIFAR-10 .npz files")
    return str(d)


def _done(path: Path, key: dict[str, Any]) -> bool:
    marker = path.with_suffix(".settings")
    return path.is_file() and marker.is_file() and json.loads(marker.read_text()) == key


def _mark(path: Path, key: dict[str, Any]) -> None:
    rd.write_json(path.with_suffix(".settings"), key)


def describe_plan(p: Plan) -> str:
    """One line per run: what ``--dry-run`` prints (reads no data)."""
    return "\n".join(
        f"{r.name:12s} {r.mode} {r.bits_label} beta={r.beta:g} adv={r.adv_train} epochs={r.train.epochs}" for r in p
    )


def reproduce(
    out: str | Path = DEFAULT_OUT,
    scale: str | Scale = "cpu",
    data_dir: str | None = None,
    only: str | None = None,
    dry_run: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Run (or continue) the reproduction into ``out``; returns the summary."""
    s = load_scale(scale)
    p = plan(s, None)
    keep = set(only.split(",")) if only else set(p.names)
    if unknown := keep - set(p.names):
        raise ConfigError(f"unknown run(s) {', '.join(sorted(unknown))}; the plan has {', '.join(p.names)}")
    if dry_run:
        print(describe_plan(p))
        return {"plan": p.names}
    data_dir = _resolve_data_dir(s, data_dir)
    p = plan(s, data_dir)
    out = Path(out)
    timing_path = out / "timing.json"

    def step(name: str, fn: Any) -> None:
        t0 = time.time()
        fn()
        add_timing(timing_path, name, time.time() - t0)

    def log(msg: str) -> None:
        if progress:
            print(f"[reproduce] {msg}", flush=True)

    from hw_dq.robust.attacks import AttackParams
    from hw_dq.robust.evaluate import evaluate_run
    from hw_dq.robust.sanity import SanityConfig
    from hw_dq.train.loop import train

    if out.is_dir():  # scratch files of a killed earlier run (those of live parallel --only processes stay)
        from hw_dq.lock import remove_dead_scratch

        remove_dead_scratch(out)
    rd.write_json(out / "scale.json", asdict(s))
    # standard: AttackParams' defaults are AutoAttack's own budgets; reduced: the scale's
    params = (
        AttackParams()
        if s.aa_version == "standard"
        else AttackParams(apgd_iters=s.aa_iters, apgd_targets=s.aa_targets, square_queries=s.aa_queries)
    )
    scfg = SanityConfig(n_probe=s.n_probe, square_queries=s.aa_queries)
    for spec in p:
        if spec.name not in keep:
            continue
        run = out / "runs" / spec.name
        cfg = spec.train
        if spec.init_from:
            cfg = replace(cfg, init_from=str(out / "runs" / spec.init_from))
        if not (run / rd.MODEL).is_file():
            log(f"train {spec.name}")
            step(f"train/{spec.name}", lambda cfg=cfg, run=run: train(cfg, run, resume=True, progress=progress))
        res = run / "attacks" / "robustness.json"
        twin = out / "runs" / spec.twin
        attacks = ["fgsm", "pgd", *s.strong_attacks] + (["transfer-pgd"] if spec.mode != "FP" else [])
        key = {"scale": asdict(s), "attacks": attacks}
        if not _done(res, key):
            log(f"attack {spec.name}")
            step(f"attack/{spec.name}", lambda run=run, attacks=attacks, twin=twin: _attack(
                run, attacks, s, params, scfg, twin, evaluate_run))  # fmt: skip
            _mark(res, key)
        for sq in s.squeezers if spec.squeeze else []:
            stem = "squeeze-" + sq.replace(":", "")
            path, key = run / "attacks" / f"{stem}.json", {"scale": asdict(s), "defense": sq}
            if not _done(path, key):
                log(f"attack {spec.name} with {sq}")
                step(f"squeeze/{spec.name}/{sq}", lambda run=run, sq=sq, stem=stem: evaluate_run(
                    run, ["fgsm", "pgd"], [8.0], n=s.n_eval, seed=s.seed, name=stem, params=params,
                    sanity_cfg=scfg, defense=sq))  # fmt: skip
                _mark(path, key)
        if s.hw_board and spec.hardware:
            _hardware_step(out, run, spec, s, step, log)
    amp = out / "amplification.json"
    amp_runs = [out / "runs" / r.name for r in p if r.amplification and r.name in keep]
    # relative to the output folder: the marker must not name the machine that wrote it
    key = {"scale": asdict(s), "runs": [str(Path("runs") / r.name) for r in p if r.amplification and r.name in keep]}
    if amp_runs and not _done(amp, key):
        from hw_dq.robust.analyse import analyse_runs

        log("error amplification")
        step("analyse", lambda: analyse_runs(amp_runs, out, "pgd", 8.0, s.n_amplification, s.seed, data_dir))
        _mark(amp, key)
    summary = summarise(out, p)
    summary["timing_s"] = timing = _json_or_empty(timing_path)
    summary["wall_s_total"] = sum(timing.values())  # summed over steps (parallel --only processes overlap)
    rd.write_json(out / "summary.json", summary)
    return summary


def _hardware_step(out: Path, run: Path, spec: RunSpec, s: Scale, step: Any, log: Any) -> None:
    path = run / "attacks" / "robustness-hw.json"
    key = {"scale": asdict(s), "hw": True}
    if _done(path, key):
        return
    log(f"FINN build for {s.hw_board} and attacks on the simulated accelerator: {spec.name}")
    try:
        step(f"hw/{spec.name}", lambda: _hardware(run, s))
        _mark(path, key)
        _record_hw_failure(out, spec.name, None)
    except HwDqError as e:  # one run that FINN cannot take must not stop the reproduction
        log(f"hardware columns of {spec.name} failed (retried on the next run): {e}")
        _record_hw_failure(out, spec.name, str(e))


def _json_or_empty(path: Path) -> dict[str, Any]:
    return rd.read_json(path) if path.is_file() else {}


def add_timing(path: Path, name: str, seconds: float) -> None:
    """Add ``seconds`` to step ``name`` in timing.json, re-read first: parallel ``--only``
    processes share the file."""
    timing = _json_or_empty(path)
    timing[name] = timing.get(name, 0.0) + seconds
    rd.write_json(path, timing)


def _record_hw_failure(out: Path, name: str, error: str | None) -> None:
    path = out / "hw_failures.json"
    failures = _json_or_empty(path)
    failures.pop(name, None)
    if error:
        failures[name] = error
    if failures or path.is_file():
        rd.write_json(path, failures)


def _hardware(run: Path, s: Scale) -> None:
    """Hardware-semantics columns: build the run for the board, attack its bit-exact simulation."""
    from hw_dq.fpga.build import build_run
    from hw_dq.fpga.hwattack import evaluate_hw

    if not (rd.Run(run).build_dir(str(s.hw_board)) / rd.DATAFLOW_MODEL).is_file():
        build_run(run, str(s.hw_board), target_fps=s.hw_target_fps)
    evaluate_hw(run, list(s.hw_attacks), list(s.judged_eps), board=s.hw_board, n=min(s.n_eval, s.n_hw),
                seed=s.seed, queries=s.hw_queries, name="robustness-hw")  # fmt: skip
    from hw_dq.fpga.certify import certify_run

    # sound interval bounds through the same build, on the same images: a floor under every attack
    certify_run(run, list(s.judged_eps), board=s.hw_board, n=min(s.n_eval, s.n_hw), seed=s.seed, name="certified-hw")


def _attack(run: Path, attacks: list[str], s: Scale, params: Any, scfg: Any, twin: Path, evaluate_run: Any) -> None:
    evaluate_run(run, attacks[:2], s.eps, n=s.n_eval, seed=s.seed, params=params, sanity=False, name="_wb")
    wb = rd.read_json(run / "attacks" / "_wb.json")["evaluations"]
    extra = evaluate_run(run, attacks[2:], list(s.judged_eps), n=s.n_eval, seed=s.seed, params=params, sanity_cfg=scfg,
                         transfer_from=twin if "transfer-pgd" in attacks else None, name="_aa")  # fmt: skip
    # one file with every evaluation; the sanity checks see all of them
    from hw_dq.robust.evaluate import headline
    from hw_dq.robust.results import describe, validate, worst_cases
    from hw_dq.robust.sanity import run_checks

    model = rd.Run(run).model(device="auto")
    x, y = rd.Run(run).test_set(s.n_eval, s.seed).tensors()
    evals = wb + extra["evaluations"]
    src = rd.Run(twin).model(device="auto") if "transfer-pgd" in attacks else None
    san = run_checks(model, x, y, evals, extra["clean_acc"], params=params, cfg=scfg, seed=s.seed, source=src)
    result = {
        **extra,
        "name": "robustness",
        "evaluations": evals,
        "headline": headline(evals),
        "worst_case": worst_cases(evals),
        "sanity": san,
    }
    validate(json.loads(json.dumps(result)))
    rd.write_json(run / "attacks" / "robustness.json", result)
    rd.write_text(run / "attacks" / "robustness.md", describe(result))
    for tmp in ("_wb", "_aa"):
        for ext in (".json", ".md"):
            (run / "attacks" / f"{tmp}{ext}").unlink(missing_ok=True)


def summarise(out: str | Path, p: Plan | None = None) -> dict[str, Any]:
    """The results table and the claim verdicts; writes summary.md. The plan comes from
    ``out/scale.json`` when not given."""
    from hw_dq.robust.results import load, tabulate

    out = Path(out)
    results = load(sorted((out / "runs").glob("*/attacks/*.json")))
    results = [r for r in results if not r["name"].startswith("_")]
    scale_path = out / "scale.json"
    if p is None:
        p = plan(Scale(**rd.read_json(scale_path)) if scale_path.is_file() else Scale())
    verdicts = claims(results, p)
    lines = ["# Defensive Quantization reproduction", ""]
    if scale_path.is_file():
        lines += ["Scale: `" + json.dumps(rd.read_json(scale_path)) + "`", ""]
    lines += ["## Per model: clean, empirical worst case and certified accuracy", "", side_by_side(results, p), ""]
    lines += ["## Every result", "", tabulate(results), "", "## Claims", ""]
    lines += [f"- **{v['verdict']}** - {v['claim']}: {v['evidence']}" for v in verdicts]
    lines += ["", NOTE]
    failures = _json_or_empty(out / "hw_failures.json")
    if failures:
        lines += ["", "## Hardware columns that failed", ""]
        lines += [f"- `{name}`: {err}" for name, err in sorted(failures.items())]
    if (out / "amplification.md").is_file():
        lines += ["", "## Error amplification", "", (out / "amplification.md").read_text(), "",
                  "![error amplification](amplification.png)"]  # fmt: skip
    rd.write_text(out / "summary.md", "\n".join(lines) + "\n")
    return {"n_results": len(results), "claims": verdicts}


def side_by_side(results: list[dict[str, Any]], p: Plan) -> str:
    """One row per model: clean accuracy, the per-image worst case on the PyTorch model and on the
    accelerator, and the accelerator's certified accuracy, at each judged eps (a blank: not run)."""
    from hw_dq.experiments.reproduce.claims import robust_at

    by = {(Path(r["run_dir"]).name, r["name"]): r for r in results}
    eps = list(p.scale.judged_eps)

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.1f}"

    head = ["model", "clean %"] + [f"{what} @{e:g} %" for what in ("worst case", "accelerator", "certified")
                                   for e in eps]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for spec in p:
        sw = by.get((spec.name, "robustness"))
        if sw is None:
            continue
        hw, cert = by.get((spec.name, "robustness-hw")), by.get((spec.name, "certified-hw"))
        cells = [spec.name, pct(sw["clean_acc"])]
        cells += [pct(robust_at(sw, e)[0]) for e in eps]
        cells += [pct(robust_at(hw, e)[0]) if hw else "-" for e in eps]
        cells += [pct(next((c["robust_acc"] for c in cert["evaluations"] if float(c["eps"]) == e), None))
                  if cert else "-" for e in eps]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    n = ", ".join(str(v) for v in sorted({r["n_examples"] for r in results}))
    sw_set, hw_set = ", ".join(p.scale.strong_attacks), ", ".join(p.scale.hw_attacks)
    lines += ["", f"Per-image worst case over every attack run at that eps (PyTorch model: {sw_set} and FGSM, "
              f"PGD-10, transfer; accelerator: {hw_set}); certified: interval bounds through the build's "
              f"integer arithmetic. Images per result: {n}; seed {p.scale.seed}."]  # fmt: skip
    return "\n".join(lines)
