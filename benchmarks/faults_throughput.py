"""Fault trials per second: the simulator vs FINN's own execution, the same trials side by side.

One trial = one random fault pattern (independent upsets at ``--rate`` per stored bit in every
weight and threshold memory of the build) evaluated on ``--images`` real CIFAR-10 test images.
The simulator path applies the edited values to the loaded simulator in place and recompiles only
the steps that read them (:meth:`hw_dq.fpga.faults.FaultyBuild.edited`, what ``hw-dq faults``
runs), then runs the images batched; the FINN path writes the same edited initializers into the
build's python-executable partition and runs ``finn.core.onnx_exec.execute_onnx`` image by image.
The first FINN trials double as a check: their outputs must equal the simulator's exactly. The
earlier simulator path (re-load an edited copy of the model per trial) is timed too, for reference.
Prints a table and writes benchmarks/results/faults_throughput.{json,md}.

    .venv/bin/python -m benchmarks.faults_throughput [--width 0.5] [--images 256] [--trials 20] [--finn-trials 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import machine, machine_line, md_table, write_results

ROOT = Path(__file__).resolve().parents[1]


def prepare(run: Path, width: float, bits: int) -> Path:
    """A briefly trained CNV run and its Pynq-Z1 build (reused when present)."""
    from hw_dq.fpga.build import build_run
    from hw_dq.train.loop import TrainConfig, train

    if not (run / "model.safetensors").is_file():
        cfg = TrainConfig(model="cnv", width=width, wbits=bits, abits=bits, epochs=1, train_subset=512,
                          test_subset=64, batch_size=64, lr=0.02)  # fmt: skip
        train(cfg, run, progress=False)
    build = run / "build" / "Pynq-Z1"
    if not (build / "dataflow_model.onnx").is_file():
        build_run(run, "Pynq-Z1", target_fps=1000)
    return build


def patterns(fb, rate: float, trials: int, seed: int) -> list[dict[str, np.ndarray]]:
    """The fault patterns both executors run (edited weight and threshold arrays per trial)."""
    from qonnx.core.datatype import DataType

    from hw_dq.fpga.faults import flip_values
    from hw_dq.fpga.upsets import sample_flips

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(trials):
        edits = {}
        for m in fb.memories:
            if m.kind == "activations":
                continue
            idx, bit = sample_flips(rng, m.n_bits, m.bits, rate)
            if len(idx):
                edits[m.tensor] = flip_values(fb.values(m), idx, bit, DataType[m.dtype])
        out.append(edits)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--width", type=float, default=0.5)
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--rate", type=float, default=1e-3)
    ap.add_argument("--images", type=int, default=256, help="test images per trial")
    ap.add_argument("--chunk", type=int, default=64, help="images per pass through the simulator (its default: 64)")
    ap.add_argument("--trials", type=int, default=20, help="trials on the simulator")
    ap.add_argument("--finn-trials", type=int, default=2, help="trials through FINN's (slow) execution (<= --trials)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: FINN's execution is single-threaded)")
    ap.add_argument("--run", default=str(ROOT / "runs" / "bench" / "faults"))
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    from hw_dq.data import load_split
    from hw_dq.fpga.faults import FaultyBuild, finn_execute
    from hw_dq.fpga.hwattack import uint8_grid

    run = Path(a.run) / f"cnv{a.width:g}_w{a.bits}a{a.bits}"
    build = prepare(run, a.width, a.bits)
    fb = FaultyBuild(build)
    x, _ = load_split("sample", "test").take(a.images, seed=0).tensors()
    xin = uint8_grid(x.numpy())
    pats = patterns(fb, a.rate, max(a.trials, a.finn_trials), seed=0)
    fb.clean.chunk = a.chunk

    def fast(p: dict[str, np.ndarray]) -> np.ndarray:
        with fb.edited(p) as sim:
            return sim(xin).numpy().reshape(len(xin), -1)

    def reload(p: dict[str, np.ndarray]) -> np.ndarray:
        s = fb.simulator(p)
        s.chunk = a.chunk
        return s(xin).numpy().reshape(len(xin), -1)

    # the executors take turns (one FINN trial, then its share of simulator trials on each path), so
    # that the load of a shared machine weighs on all of them alike
    sim_out: list[np.ndarray] = []
    reload_out: list[np.ndarray] = []
    finn_out: list[np.ndarray] = []
    sim_s = reload_s = finn_s = 0.0
    blocks = np.array_split(np.arange(a.trials), max(1, a.finn_trials))
    with torch.no_grad():
        fast(pats[0])  # warm-up: lazy initialisation is not timed
        finn_execute(build, pats[0], xin[:1])
        for i, block in enumerate(blocks):
            if i < a.finn_trials:
                t = time.perf_counter()
                finn_out.append(finn_execute(build, pats[i], xin).reshape(len(xin), -1))
                finn_s += time.perf_counter() - t
            t = time.perf_counter()
            sim_out += [fast(pats[j]) for j in block]
            sim_s += time.perf_counter() - t
            t = time.perf_counter()
            reload_out += [reload(pats[j]) for j in block]
            reload_s += time.perf_counter() - t
        t = time.perf_counter()
        for p in pats[: a.trials]:
            with fb.edited(p):
                pass
        patch_s = (time.perf_counter() - t) / a.trials
        t = time.perf_counter()
        for p in pats[: a.trials]:
            fb.simulator(p)
        rebuild_s = (time.perf_counter() - t) / a.trials
    same_paths = all(np.array_equal(f, r) for f, r in zip(sim_out, reload_out, strict=True))
    exact = all(np.array_equal(s, f) for s, f in zip(sim_out, finn_out, strict=False))
    flips = [sum(int((p[k] != fb.values(m)).sum()) for m in fb.memories for k in p if k == m.tensor) for p in pats]
    rows = [
        {"executor": "finn", "trials": a.finn_trials, "seconds": finn_s, "trials_per_s": a.finn_trials / finn_s},
        {"executor": "sim", "trials": a.trials, "seconds": sim_s, "trials_per_s": a.trials / sim_s},
        {"executor": "sim-reload", "trials": a.trials, "seconds": reload_s, "trials_per_s": a.trials / reload_s},
    ]
    ratio = rows[1]["trials_per_s"] / rows[0]["trials_per_s"]
    mem_bits = sum(m.n_bits for m in fb.memories if m.kind != "activations")
    res = {
        "machine": machine(), "model": f"CNV width {a.width:g}, w{a.bits}a{a.bits}, Pynq-Z1 build (folded)",
        "rate": a.rate, "images_per_trial": a.images, "stored_bits_weights_thresholds": mem_bits,
        "mean_values_changed_per_trial": float(np.mean(flips)), "rows": rows, "sim_vs_finn": ratio,
        "finn_trials_bit_exact_with_sim": exact,
        "sim_rebuild_s_per_trial": rebuild_s, "sim_patch_s_per_trial": patch_s, "chunk": a.chunk,
        "sim_in_place_equals_reload": same_paths, "goal": "sim_vs_finn >= 100",
    }  # fmt: skip
    names = {"finn": "FINN execute_onnx (edited partition, image by image)",
             "sim": "hw_dq.fpga.faults on hw_dq.fpga.sim (edited in place, batched)",
             "sim-reload": "same, re-loading an edited copy of the model per trial (the earlier path)"}  # fmt: skip
    table = md_table(
        ["executor", "trials", "s", "trials/s"],
        [[names[r["executor"]], r["trials"], f"{r['seconds']:.2f}", f"{r['trials_per_s']:.3f}"] for r in rows],
    )
    text = (
        f"# Fault-injection trials per second ({res['model']})\n\nMachine: {machine_line(res['machine'])}.\n\n"
        f"One trial: upsets at rate {a.rate:g} per stored bit in all weight and threshold memories "
        f"({mem_bits:,} bits; {res['mean_values_changed_per_trial']:.0f} stored values changed per trial on "
        f"average), evaluated on {a.images} CIFAR-10 test images. The executors take turns (one FINN trial, "
        f"then a share of the simulator's trials), so that a shared machine's load weighs on both alike.\n\n"
        f"{table}\n\n"
        f"Simulator / FINN: **{ratio:.0f}x** (goal >= 100x). FINN's outputs on the {a.finn_trials} shared "
        f"trials {'equal' if exact else 'DIFFER FROM'} the simulator's bit for bit; the in-place and re-loading "
        f"simulator paths {'agree' if same_paths else 'DISAGREE'} on all {a.trials} trials. Applying one trial's "
        f"edits in place (and undoing them) takes {1000 * patch_s:.1f} ms; re-loading an edited model "
        f"{1000 * rebuild_s:.1f} ms. Simulator chunk: {a.chunk} images per pass.\n"
    )
    print(text)
    write_results("faults_throughput", res, text)
    return 0 if exact and same_paths else 1


if __name__ == "__main__":
    sys.exit(main())
