"""Certification of a CNV accelerator vs the simulator's clean inference, side by side in one run.

Same build (CNV w2a2, Pynq-Z1, folded), same real CIFAR-10 sample images, same process and
threads; the two are interleaved ``--reps`` times and the median of each is compared (goal:
interval certification at most 3x the clean simulation). Prints a table and writes
benchmarks/results/certify_speed.{json,md}.

    .venv/bin/python -m benchmarks.certify_speed [--width 1.0] [--n 1000] [--eps 2] [--reps 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from benchmarks.common import machine, machine_line, md_table, write_results

ROOT = Path(__file__).resolve().parents[1]


def prepare(run: Path, bits: int, width: float) -> Path:
    """A short-trained CNV run and its FINN build (reused when present). Speed does not depend on
    accuracy: the same ops run whatever the weights are."""
    from hw_dq.fpga.build import build_run
    from hw_dq.run import DATAFLOW_MODEL, Run
    from hw_dq.train.loop import TrainConfig, train

    if not (run / "model.safetensors").is_file():
        cfg = TrainConfig(model="cnv", width=width, wbits=bits, abits=bits, epochs=1, train_subset=512,
                          test_subset=64, batch_size=64, lr=0.02)  # fmt: skip
        train(cfg, run, progress=False)
    build = Run(run).build_dir("Pynq-Z1")
    if not (build / DATAFLOW_MODEL).is_file():
        build_run(run, "Pynq-Z1", target_fps=1000)
    return build


def main(argv: list[str] | None = None) -> int:
    import torch

    from hw_dq.data import load_split
    from hw_dq.fpga.certify import IntervalCertifier
    from hw_dq.fpga.hwattack import load_simulator, uint8_grid

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--eps", type=float, default=2.0, help="Linf radius in 1/255")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's); 1 is steadier on a shared machine")
    ap.add_argument("--run", default=str(ROOT / "runs" / "bench" / "certify"))
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    run = Path(a.run) / f"cnv_w{a.bits}a{a.bits}_x{a.width:g}"
    build = prepare(run, a.bits, a.width)
    sim = load_simulator(build)
    cert = IntervalCertifier(sim)
    x, y = (t.numpy() for t in load_split("sample", "test").take(a.n, seed=0).tensors())
    xu = uint8_grid(x)
    y = y.astype("int64")
    sim(xu[:64])  # warm-up both paths
    cert.certify(xu[:64], y[:64], a.eps)
    t_sim, t_cert = [], []
    for _ in range(a.reps):
        t0 = time.perf_counter()
        with torch.no_grad():
            sim(xu)
        t_sim.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        batch = cert.certify(xu, y, a.eps)
        t_cert.append(time.perf_counter() - t0)
    ms, mc = statistics.median(t_sim), statistics.median(t_cert)
    res = {
        "machine": machine(),
        "model": f"CNV width {a.width:g}, w{a.bits}a{a.bits}, Pynq-Z1 build (folded, specialised)",
        "n_images": a.n, "eps_255": a.eps, "reps": a.reps,
        "simulator_clean_s": t_sim, "certify_s": t_cert,
        "median_simulator_s": ms, "median_certify_s": mc, "ratio": mc / ms,
        "certified_acc": float(batch.certified.mean()), "goal": "ratio <= 3",
    }  # fmt: skip
    table = md_table(
        ["executor", "images", "median s", "images/s", "all runs s"],
        [["simulator, clean inference (points)", a.n, f"{ms:.2f}", f"{a.n / ms:.0f}",
          ", ".join(f"{t:.2f}" for t in t_sim)],
         [f"certify, interval bounds at {a.eps:g}/255", a.n, f"{mc:.2f}", f"{a.n / mc:.0f}",
          ", ".join(f"{t:.2f}" for t in t_cert)]],
    )  # fmt: skip
    text = (
        f"# Certification speed ({res['model']})\n\nMachine: {machine_line(res['machine'])}.\n\n{table}\n\n"
        f"Certification / clean simulation: **{res['ratio']:.2f}x** (goal <= 3x), interleaved, median of {a.reps}. "
        f"The model is trained one short epoch (speed does not depend on the weights), so its certified "
        f"accuracy ({100 * res['certified_acc']:.1f}% at {a.eps:g}/255) means nothing here.\n"
    )
    print(text)
    write_results("certify_speed", res, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
