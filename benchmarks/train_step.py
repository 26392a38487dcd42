"""Training-step time and peak memory of the full-width CNV: FP vs VQ vs DQ, w2a2 and w4a4.

One training step = forward, cross-entropy (+ the DQ regulariser), backward, SGD update,
batch 128 of 3x32x32, the step that ``hw_dq.train.loop.fit`` runs. All configurations are
timed side by side in ONE process with interleaved repetitions (so load changes on a
shared machine hit every configuration alike): warm-up steps, then the median of N steps.
Peak memory of each configuration comes from a fresh subprocess (ru_maxrss delta around
its steps). Then the attempts to speed the quantized step up (BREVITAS_JIT=1,
channels_last, torch.compile, thread count), each timed in its own process against the
baseline of that same process, and a torch.profiler breakdown of one VQ step.

    .venv/bin/python -m benchmarks.train_step            # everything (~10 min on 2 cores)
    .venv/bin/python -m benchmarks.train_step --reps 5   # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

from benchmarks.common import REPO, machine, machine_line, md_table, write_results

BATCH = 128
DQ_BETA = 3e-4
# name -> (bits, beta, lipschitz target); FP is the same network with quantizers off
CONFIGS: dict[str, tuple[int | None, float, str]] = {
    "FP": (None, 0.0, "weight"),
    "VQ w2a2": (2, 0.0, "weight"),
    "DQ w2a2 weight": (2, DQ_BETA, "weight"),
    "DQ w2a2 bn_folded": (2, DQ_BETA, "bn_folded"),
    "VQ w4a4": (4, 0.0, "weight"),
    "DQ w4a4 weight": (4, DQ_BETA, "weight"),
    "DQ w4a4 bn_folded": (4, DQ_BETA, "bn_folded"),
}
ATTEMPT_CONFIGS = ["FP", "VQ w2a2"]  # DQ = VQ + the regulariser, which the attempts do not touch


# ----------------------------------------------------------------------------- child side
class Step:
    """One configuration's model, optimiser and fixed batch; ``__call__`` runs one step."""

    def __init__(self, name: str, channels_last: bool = False, compile_: bool = False):
        import torch
        from torch.nn import functional as F  # noqa: N812

        from hw_dq.nn import lipschitz
        from hw_dq.nn.models import create_model

        bits, beta, target = CONFIGS[name]
        torch.manual_seed(0)
        self.model = create_model("cnv", bits, bits, width=1.0).train()
        self.x = torch.rand(BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        self.y = torch.randint(0, 10, (BATCH,), generator=torch.Generator().manual_seed(2))
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
            self.x = self.x.contiguous(memory_format=torch.channels_last)
        self.net = torch.compile(self.model) if compile_ else self.model
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
        self.beta, self.target, self.F, self.lipschitz = beta, target, F, lipschitz

    def __call__(self) -> float:
        t = time.perf_counter()
        logits = self.net(self.x)
        ce = self.F.cross_entropy(logits, self.y)
        loss = ce + self.lipschitz.regulariser(self.model, self.beta, self.target).to(ce)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        float(loss.detach())
        return time.perf_counter() - t


def child_time(names: list[str], reps: int, warmup: int, channels_last: bool, compile_: bool) -> dict[str, Any]:
    """Interleaved timing of several configurations in this process."""
    import torch

    t_build = time.perf_counter()
    steps = {n: Step(n, channels_last, compile_) for n in names}
    out: dict[str, Any] = {"threads": torch.get_num_threads(), "build_s": time.perf_counter() - t_build}
    first = {}
    for n, s in steps.items():
        first[n] = s()  # includes torch.compile's compilation when enabled
        for _ in range(warmup - 1):
            s()
    times: dict[str, list[float]] = {n: [] for n in names}
    order = list(names)
    for r in range(reps):
        for n in order[r % len(order) :] + order[: r % len(order)]:  # rotate the order each repetition
            times[n].append(steps[n]())
    out["first_step_s"] = first
    out["median_s"] = {n: statistics.median(v) for n, v in times.items()}
    out["min_s"] = {n: min(v) for n, v in times.items()}
    out["all_s"] = times
    return out


def child_memory(name: str, steps: int) -> dict[str, Any]:
    """Peak RSS growth while a fresh process builds one configuration and trains ``steps`` steps."""

    def maxrss_mib() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0

    import torch  # noqa: F401  (imports count in the baseline, not in the delta)

    import hw_dq.nn.models  # noqa: F401

    base = maxrss_mib()
    s = Step(name)
    built = maxrss_mib()
    for _ in range(steps):
        s()
    peak = maxrss_mib()
    return {"rss_before_mib": base, "after_build_mib": built, "peak_mib": peak, "step_peak_delta_mib": peak - base}


def child_profile(name: str, steps: int) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile

    s = Step(name)
    s()
    s()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            s()
    ka = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in ka)
    rows = sorted(ka, key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
    return {
        "config": name,
        "steps": steps,
        "total_self_cpu_ms_per_step": total / 1000 / steps,
        "top_ops": [
            {"op": e.key, "calls_per_step": e.count / steps,
             "self_cpu_ms_per_step": e.self_cpu_time_total / 1000 / steps, "share": e.self_cpu_time_total / total}
            for e in rows
        ],
    }  # fmt: skip


def regcost(reps: int, bits: int = 2) -> None:
    """The DQ regulariser alone (fwd + bwd, both targets) interleaved with whole VQ steps.

    The baseline's DQ/VQ ratio is the ratio of two noisy medians; on a loaded machine the
    regulariser's few-percent share drowns in that noise. Here DQ/VQ ~= 1 + t_reg / t_VQ.
    """
    import statistics as st

    from hw_dq.nn import lipschitz

    mach = machine()
    step = Step(f"VQ w{bits}a{bits}")
    model = step.model

    def reg(target: str) -> float:
        t = time.perf_counter()
        model.zero_grad(set_to_none=True)
        lipschitz.regulariser(model, 3e-4, target).backward()
        return time.perf_counter() - t

    fns = {"VQ step": step, "regulariser weight (fwd+bwd)": lambda: reg("weight"),
           "regulariser bn_folded (fwd+bwd)": lambda: reg("bn_folded")}  # fmt: skip
    for f in fns.values():
        f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            times[k].append(f())
    med = {k: st.median(v) for k, v in times.items()}
    rows = [[k, f"{1000 * med[k]:.1f}", f"{1000 * min(times[k]):.1f}",
             "" if k == "VQ step" else f"{1 + med[k] / med['VQ step']:.3f}"] for k in fns]  # fmt: skip
    text = "\n\n".join(
        [
            f"# Cost of the DQ regulariser alone (full-width CNV w{bits}a{bits}, batch 128)",
            f"Machine: {machine_line(mach)}.",
            f"Interleaved in one process, 1 warm-up, median and min of {reps} repetitions (ms). "
            "'implied DQ/VQ' = 1 + median(regulariser) / median(VQ step).",
            md_table(["what", "median ms", "min ms", "implied DQ/VQ"], rows),
        ]
    )
    write_results("train_step_regcost", {"machine": mach, "reps": reps, "bits": bits, "all_s": times,
                                       "median_s": med}, text)  # fmt: skip
    print(text)


# ----------------------------------------------------------------------------- parent side
def spawn(args: list[str], env: dict[str, str] | None = None, timeout: int = 3600) -> dict[str, Any]:
    full_env = {**os.environ, **(env or {})}
    try:
        p = subprocess.run([sys.executable, "-m", "benchmarks.train_step", *args], cwd=REPO, env=full_env,
                           capture_output=True, text=True, timeout=timeout)  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout}s", "returncode": None}
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"error": (p.stderr.strip().splitlines() or ["no output"])[-1], "returncode": p.returncode}


def ratios(med: dict[str, float]) -> dict[str, float]:
    out = {}
    for bits in ("w2a2", "w4a4"):
        vq = med.get(f"VQ {bits}")
        for tgt in ("weight", "bn_folded"):
            dq = med.get(f"DQ {bits} {tgt}")
            if dq and "FP" in med:
                out[f"DQ {bits} {tgt} / FP"] = dq / med["FP"]
            if dq and vq:
                out[f"DQ {bits} {tgt} / VQ {bits}"] = dq / vq
        if vq and "FP" in med:
            out[f"VQ {bits} / FP"] = vq / med["FP"]
    return out


def render(res: dict[str, Any]) -> str:
    base = res["baseline"]
    mem = res.get("memory", {})
    rows = []
    for n in CONFIGS:
        m = mem.get(n, {})
        nan = float("nan")
        rows.append([n, f"{1000 * base['median_s'][n]:.0f}", f"{1000 * base['min_s'][n]:.0f}",
                     f"{base['median_s'][n] / base['median_s']['FP']:.2f}",
                     f"{m.get('step_peak_delta_mib', nan):.0f}", f"{m.get('peak_mib', nan):.0f}"])  # fmt: skip
    goal = {k: v for k, v in ratios(base["median_s"]).items() if k.startswith("DQ")}
    lim = {k: 1.5 if k.endswith("/ FP") else 1.05 for k in goal}
    goal_rows = [[k, f"{v:.3f}", f"<= {lim[k]}", "met" if v <= lim[k] else "NOT met"] for k, v in goal.items()]
    att_rows = []
    for a in res.get("attempts", []):
        if "error" in a["result"]:
            att_rows.append([a["name"], a["how"], "failed: " + a["result"]["error"][:150], "", "", ""])
            continue
        med = a["result"]["median_s"]
        ref = a["reference"]
        for n in ATTEMPT_CONFIGS:
            if n in med and n in ref:
                att_rows.append([a["name"], a["how"], n, f"{1000 * ref[n]:.0f}", f"{1000 * med[n]:.0f}",
                                 f"{med[n] / ref[n]:.2f}"])  # fmt: skip
    prof = res.get("profile", {})
    prof_rows = [[o["op"], f"{o['calls_per_step']:.0f}", f"{o['self_cpu_ms_per_step']:.1f}", f"{100 * o['share']:.1f}%"]
                 for o in prof.get("top_ops", [])]  # fmt: skip
    return "\n\n".join(
        [
            "# Training step: FP vs VQ vs DQ (full-width CNV, batch 128, 3x32x32)",
            f"Machine: {machine_line(res['machine'])}.",
            f"Baseline: all {len(CONFIGS)} configurations in one process, interleaved (order rotated every "
            f"repetition), {res['warmup']} warm-up steps each, then {res['reps']} timed steps each; median and "
            f"min in ms. DQ beta = {DQ_BETA}. Peak memory: a fresh subprocess per configuration, "
            f"ru_maxrss growth over model build + {res['mem_steps']} steps (MiB; 'peak' includes the "
            "interpreter, torch and Brevitas).",
            md_table(["config", "median ms", "min ms", "x FP", "peak RSS delta MiB", "peak RSS MiB"], rows),
            "## Goals",
            md_table(["ratio (median step time)", "value", "goal", ""], goal_rows),
            "## What was tried to speed up the quantized step",
            f"Each attempt times FP and VQ w2a2 ({res.get('attempt_reps')} interleaved steps after "
            f"{res['warmup']} warm-up) in a fresh process; 'ref ms' is the same configurations in a "
            "baseline-settings process run right before it; 'ratio' < 1 is faster. DQ is VQ plus the "
            "regulariser, which none of the attempts touches.",
            md_table(["attempt", "how", "config", "ref ms", "ms", "ratio"], att_rows)
            if att_rows
            else "Not run in this invocation (--skip-attempts); see train_step_attempts.md.",
            f"## Where the time goes: torch.profiler, one {prof.get('config')} step (self CPU time)",
            f"Total self CPU time per step: {prof.get('total_self_cpu_ms_per_step', float('nan')):.0f} ms.",
            md_table(["op", "calls/step", "self ms/step", "share"], prof_rows),
        ]
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--mem-steps", type=int, default=2)
    ap.add_argument("--attempt-reps", type=int, default=4)
    ap.add_argument("--skip-attempts", action="store_true")
    ap.add_argument("--regcost", action="store_true", help="only time the regulariser alone vs a VQ step")
    ap.add_argument("--child", choices=("time", "memory", "profile"))
    ap.add_argument("--names", nargs="*", default=list(CONFIGS))
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)

    if args.regcost:
        regcost(args.reps)
        return
    if args.child:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        if args.child == "time":
            r = child_time(args.names, args.reps, args.warmup, args.channels_last, args.compile)
        elif args.child == "memory":
            r = child_memory(args.names[0], args.mem_steps)
        else:
            r = child_profile(args.names[0], 2)
        print("RESULT " + json.dumps(r), flush=True)
        return

    res: dict[str, Any] = {"machine": machine(), "reps": args.reps, "warmup": args.warmup, "mem_steps": args.mem_steps,
                           "batch": BATCH, "dq_beta": DQ_BETA}  # fmt: skip
    common = ["--reps", str(args.reps), "--warmup", str(args.warmup)]
    acommon = ["--reps", str(args.attempt_reps), "--warmup", str(args.warmup)]
    res["attempt_reps"] = args.attempt_reps
    print("baseline (all configurations, one process) ...", flush=True)
    res["baseline"] = spawn(["--child", "time", *common])
    if "error" in res["baseline"]:
        raise SystemExit(f"baseline failed: {res['baseline']['error']}")
    res["ratios"] = ratios(res["baseline"]["median_s"])
    print(json.dumps(res["ratios"], indent=2), flush=True)
    write_results("train_step", res, render(res))
    res["memory"] = {}
    for n in CONFIGS:
        res["memory"][n] = spawn(["--child", "memory", "--names", n, "--mem-steps", str(args.mem_steps)])
        print(f"memory {n}: {res['memory'][n]}", flush=True)
    write_results("train_step", res, render(res))
    res["profile"] = spawn(["--child", "profile", "--names", "VQ w2a2"])
    write_results("train_step", res, render(res))
    res["attempts"] = []
    if not args.skip_attempts:
        attempts = [
            ("BREVITAS_JIT=1", "environment variable set before brevitas is imported", [], {"BREVITAS_JIT": "1"}),
            ("channels_last", "model and input in torch.channels_last", ["--channels-last"], {}),
            ("1 thread", "torch.set_num_threads(1) (default here: all usable cores)", ["--threads", "1"], {}),
            ("torch.compile", "torch.compile(model) (inductor, default mode); ms after compilation", ["--compile"], {}),
        ]
        for name, how, flags, env in attempts:
            print(f"attempt {name} ...", flush=True)
            ref = spawn(["--child", "time", "--names", *ATTEMPT_CONFIGS, *acommon])
            r = spawn(["--child", "time", "--names", *ATTEMPT_CONFIGS, *acommon, *flags], env=env,
                      timeout=900 if "--compile" in flags else 3600)  # fmt: skip
            res["attempts"].append({"name": name, "how": how, "reference": ref.get("median_s", {}), "result": r})
            write_results("train_step", res, render(res))
            print(f"  reference {ref.get('median_s')}\n  attempt   {r.get('median_s', r)}", flush=True)
    text = render(res)
    js, md = write_results("train_step", res, text)
    print(text)
    print(f"wrote {js} and {md}")


if __name__ == "__main__":
    main()
