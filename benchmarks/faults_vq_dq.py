"""VQ vs DQ under faults: flips to reach 10% accuracy (Bit-Flip Attack) and accuracy under random upsets.

The demo's two models (half-width CNV, w2a2, the embedded 4,000-image CIFAR-10 sample; beta = 0
and beta = the demo's DQ beta; everything else equal), built for the Pynq-Z1, then on each build:

* the targeted Bit-Flip Attack (``--flips`` progressive flips, gradients on 128 train images), with
  a random-flip baseline of the same count;
* random upsets in all weight and threshold memories at rates 1e-6..1e-3, ``--trials`` fault
  patterns per rate (95% confidence intervals over trials).

Accuracy on ``--n`` test images of the sample, on the bit-exact simulation. Writes
benchmarks/results/faults_vq_dq.{json,md,png}; the run directories are kept under --runs.

    .venv/bin/python -m benchmarks.faults_vq_dq [--flips 20] [--trials 10] [--n 500]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

from benchmarks.common import RESULTS, machine, machine_line, md_table, write_results

ROOT = Path(__file__).resolve().parents[1]
RATES = (1e-6, 1e-5, 1e-4, 1e-3)


def prepare(runs: Path, variant: str, beta: float, epochs: int | None) -> Path:
    """Train (once) and build one demo variant."""
    from hw_dq.fpga.build import build_run
    from hw_dq.train.config import load_config
    from hw_dq.train.loop import train

    run = runs / variant.lower()
    if not (run / "model.safetensors").is_file():
        cfg = replace(load_config("demo"), beta=beta)
        if epochs:
            cfg = replace(cfg, epochs=epochs)
        train(cfg, run, progress=False)
    if not (run / "build" / "Pynq-Z1" / "dataflow_model.onnx").is_file():
        build_run(run, "Pynq-Z1", target_fps=1000)
    return run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--flips", type=int, default=20)
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--epochs", type=int, help="override the demo's epochs")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", default=str(ROOT / "runs" / "bench" / "faults_vq_dq"))
    a = ap.parse_args(argv)
    import torch

    from hw_dq.experiments.demo import DEMO_BETA
    from hw_dq.fpga.faults_results import evaluate_faults, plot_faults

    torch.set_num_threads(a.threads)
    runs = Path(a.runs)
    rows, out = [], {}
    for variant, beta in (("VQ", 0.0), ("DQ", DEMO_BETA)):
        t0 = time.time()
        run = prepare(runs, variant, beta, a.epochs)
        tgt = evaluate_faults(run, mode="targeted", flips=a.flips, n=a.n, attack_n=128, baseline_trials=3)
        rnd = evaluate_faults(run, mode="random", rates=RATES, target="all", trials=a.trials, n=a.n)
        t = tgt["targeted"]
        r = {e["rate"]: e for e in rnd["random"]["rates"]}
        out[variant] = {"run_dir": str(run), "beta": beta, "clean_acc": tgt["clean_acc"],
                        "flips_to_10pct": t["flips_to_10pct"], "targeted_curve": [c["acc"] for c in t["curve"]],
                        "random_flip_baseline": t["baseline_random"]["acc_mean"],
                        "random": rnd["random"]["rates"], "wall_s": time.time() - t0}  # fmt: skip
        rows.append([variant, f"{beta:g}", f"{100 * tgt['clean_acc']:.1f}",
                     t["flips_to_10pct"] or f"> {a.flips}",
                     f"{100 * t['curve'][-1]['acc']:.1f} / {100 * t['baseline_random']['acc_mean'][-1]:.1f}"]
                    + [f"{100 * r[q]['acc_mean']:.1f} +- {100 * r[q]['ci95']:.1f}" for q in RATES])  # fmt: skip
    png = plot_faults([runs / "vq", runs / "dq"], runs / "faults_vq_dq.png")
    RESULTS.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(png, RESULTS / "faults_vq_dq.png")
    res = {"machine": machine(), "model": "CNV width 0.5, w2a2, demo recipe, Pynq-Z1 build", "n_examples": a.n,
           "trials": a.trials, "flips": a.flips, "rates": list(RATES), "variants": out}  # fmt: skip
    table = md_table(
        ["variant", "beta", "clean %", "flips to 10%", f"acc after {a.flips} flips: BFA / random %"]
        + [f"rate {q:g} (all memories) %" for q in RATES],
        rows,
    )
    text = (
        f"# Faults in the accelerator: VQ vs DQ ({res['model']})\n\nMachine: {machine_line(res['machine'])}.\n\n"
        f"Accuracy on {a.n} test images of the embedded sample, on the bit-exact simulation of each build. "
        f"Random upsets: independent flips at the rate per stored bit in every weight and threshold memory and "
        f"(transient, per image) in every activation stream; {a.trials} trials per rate, mean +- 95% CI half-width. "
        f"Targeted: the Bit-Flip Attack's progressive bit search (gradients through the Brevitas twin on 128 "
        f"train images), next to the mean of 3 random-flip curves of the same length.\n\n{table}\n\n"
        f"![accuracy vs flips and vs rate](faults_vq_dq.png)\n"
    )
    print(text)
    write_results("faults_vq_dq", res, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
