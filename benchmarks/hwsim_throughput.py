"""Throughput of the bit-exact accelerator simulator vs FINN's execution vs the Brevitas forward.

Same model (CNV, full width, trained one short epoch so activations are not all zero), same
real CIFAR-10 test images, one run, each measurement in its own subprocess for its peak
memory. Prints a table and writes benchmarks/results/hwsim_throughput.{json,md}.

    .venv/bin/python -m benchmarks.hwsim_throughput [--bits 2] [--n 512] [--n-finn 16]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import machine, machine_line, md_table, write_results
from hw_dq.run import DATAFLOW_MODEL, Run

ROOT = Path(__file__).resolve().parents[1]


def prepare(run: Path, bits: int) -> Path:
    """A trained full-width CNV run and its FINN build (reused when present)."""
    from hw_dq.fpga.build import build_run
    from hw_dq.train.loop import TrainConfig, train

    if not (run / "model.safetensors").is_file():
        cfg = TrainConfig(model="cnv", width=1.0, wbits=bits, abits=bits, epochs=1, train_subset=512,
                          test_subset=64, batch_size=64, lr=0.02)  # fmt: skip
        train(cfg, run, progress=False)
    build = Run(run).build_dir("Pynq-Z1")
    if not (build / DATAFLOW_MODEL).is_file():
        build_run(run, "Pynq-Z1", target_fps=1000)
    return build


def _vm(key: str) -> float:
    """A /proc/self/status memory field in MB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def child(kind: str, run: Path, n: int) -> dict:
    """One measurement (runs in a subprocess): images/s and peak memory above the warmed-up baseline.

    The peak is the kernel's high-water mark (VmHWM), reset after warm-up through
    /proc/self/clear_refs, so it counts what the timed batches allocate and nothing before.
    """
    import torch

    from hw_dq.data import load_split
    from hw_dq.fpga.hwattack import finn_reference, load_simulator, uint8_grid
    from hw_dq.run import load_model

    x, _ = load_split("sample", "test").take(n, seed=0).tensors()
    build = Run(run).build_dir("Pynq-Z1")
    xin = uint8_grid(x)
    if kind == "sim":
        sim = load_simulator(build, verify=0)
        inputs, batch, fn = xin, 256, sim
    elif kind == "brevitas":
        model, _ = load_model(run)
        inputs, batch, fn = x, 256, model
    else:
        inputs, batch, fn = xin, n, lambda b: finn_reference(build, b)  # FINN runs one image at a time
    with torch.no_grad():
        fn(inputs[:1])  # warm-up: lazy initialisation is not timed
        Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark
        base = _vm("VmRSS")
        t = time.perf_counter()
        for i in range(0, n, batch):
            fn(inputs[i : i + batch])
        dt = time.perf_counter() - t
    peak = _vm("VmHWM")
    return {"kind": kind, "n": n, "seconds": dt, "images_per_s": n / dt, "peak_mem_above_baseline_mb": peak - base}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--n", type=int, default=512, help="images for the simulator and Brevitas")
    ap.add_argument("--n-finn", type=int, default=16, help="images for FINN's (slow) execution")
    ap.add_argument("--run", default=str(ROOT / "runs" / "bench" / "hwsim"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    run = Path(a.run) / f"cnv_w{a.bits}a{a.bits}"
    if a.child:
        print(json.dumps(child(a.child, run, a.n)))
        return 0
    prepare(run, a.bits)
    rows = []
    for kind, n in (("finn", a.n_finn), ("sim", a.n), ("brevitas", a.n)):
        cmd = [sys.executable, "-m", "benchmarks.hwsim_throughput", "--child", kind, "--n", str(n),
               "--bits", str(a.bits), "--run", a.run]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    by = {r["kind"]: r for r in rows}
    res = {
        "machine": machine(),
        "model": f"CNV full width, w{a.bits}a{a.bits}, Pynq-Z1 build (folded, specialised)",
        "rows": rows,
        "sim_vs_finn": by["sim"]["images_per_s"] / by["finn"]["images_per_s"],
        "sim_vs_brevitas": by["sim"]["images_per_s"] / by["brevitas"]["images_per_s"],
        "goals": {"sim_vs_finn": ">= 100", "sim_vs_brevitas": ">= 0.5"},
    }
    names = {"finn": "FINN execute_onnx (node by node)", "sim": "hw_dq.fpga.sim (batched, bit-exact)",
             "brevitas": "Brevitas eval forward"}  # fmt: skip
    table = md_table(
        ["executor", "images", "s", "images/s", "peak memory above baseline (MB)"],
        [[names[r["kind"]], r["n"], f"{r['seconds']:.2f}", f"{r['images_per_s']:.1f}",
          f"{r['peak_mem_above_baseline_mb']:.0f}"] for r in rows],
    )  # fmt: skip
    text = (
        f"# Accelerator simulation throughput ({res['model']})\n\nMachine: {machine_line(res['machine'])}.\n\n"
        f"{table}\n\nSimulator / FINN: **{res['sim_vs_finn']:.0f}x** (goal >= 100x); "
        f"simulator / Brevitas: **{res['sim_vs_brevitas']:.2f}** (goal >= 0.5).\n"
    )
    print(text)
    write_results("hwsim_throughput", res, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
