"""Certified training (IBP) of a small w2a2 model, and the certified accuracy its *accelerator* gets.

Runs from the same float start on the embedded CIFAR-10 sample: ordinary QAT (cross-entropy), then
from it two fine-tunes with the same epochs and optimizer: plain cross-entropy (the control) and
:func:`hw_dq.nn.ibp.ibp_loss` (eps ramp to ``--train-eps``, kappa 1 -> 0.5). All are exported
and built through FINN for the Pynq-Z1, then certified on the accelerator's
integer graph (:func:`hw_dq.fpga.certify.certify_run`) at 1/255 and 2/255. Prints a table and
writes benchmarks/results/certified_training_<model>_x<width>.{json,md}.

    .venv/bin/python -m benchmarks.certified_training [--model tiny] [--width 1] [--epochs 6] [--n 500]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from benchmarks.common import machine, machine_line, md_table, write_results

ROOT = Path(__file__).resolve().parents[1]


def ibp_finetune(run: Path, epochs: int, train_eps: float, lr: float, seed: int = 0) -> dict:
    """Fine-tune a run's model in place with the IBP loss; returns the training log."""
    import torch

    from hw_dq import run as rd
    from hw_dq.data import load_split
    from hw_dq.nn.ibp import eps_schedule, ibp_loss, kappa_schedule

    model, _ = rd.load_model(run)
    tensors, meta = rd.load_tensors(run / rd.MODEL)
    x, y = load_split("sample", "train").tensors()
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    bs = 64
    steps_per = (len(x) + bs - 1) // bs
    total, step, log = epochs * steps_per, 0, []
    t0 = time.perf_counter()
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        losses = []
        for i in range(0, len(x), bs):
            idx = perm[i : i + bs]
            # ramp over the first 60% of the steps, then hold (Gowal et al.): eps in input units
            eps = eps_schedule(step, total, train_eps, warmup=0.05, ramp=0.55)
            loss = ibp_loss(model, x[idx], y[idx], eps, kappa_schedule(step, total, 0.5, 0.05, 0.55))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            step += 1
        log.append({"epoch": epoch, "loss": sum(losses) / len(losses), "eps_255": eps * 255})
    model.eval()
    state = {"model." + k: v for k, v in model.state_dict().items()}
    tensors.update(state)
    rd.save_tensors(run / rd.MODEL, tensors, meta)
    for stale in ("export", "build", "attacks"):
        shutil.rmtree(run / stale, ignore_errors=True)
    return {"epochs": log, "seconds": time.perf_counter() - t0, "train_eps_255": train_eps * 255, "lr": lr}


def _baseline_seconds(path: Path, seconds: float) -> float:
    """The baseline runs' training time: measured when they were trained, read back when reused."""
    import json

    if path.is_file():
        return float(json.loads(path.read_text()))
    path.write_text(json.dumps(seconds))
    return seconds


def main(argv: list[str] | None = None) -> int:
    from hw_dq.data import load_split
    from hw_dq.fpga.build import build_run
    from hw_dq.fpga.certify import certify_run
    from hw_dq.nn.ibp import certified_fraction
    from hw_dq.run import load_model
    from hw_dq.train.loop import TrainConfig, train

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="tiny", choices=("tiny", "cnv"))
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--fp-epochs", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=6, help="QAT epochs (both runs); the IBP run adds --ibp-epochs")
    ap.add_argument("--ibp-epochs", type=int, default=6)
    ap.add_argument("--train-eps", type=float, default=2.2, help="IBP training radius in 1/255")
    ap.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate of the IBP fine-tune")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--no-control", action="store_true", help="skip the CE fine-tune control")
    ap.add_argument("--tag", default="", help="suffix of the IBP run and of the results file")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench" / "certified_training"))
    a = ap.parse_args(argv)
    out = Path(a.out) / f"{a.model}_x{a.width:g}"
    common = dict(model=a.model, width=a.width, train_subset=4000, test_subset=200, batch_size=64)
    t0 = time.perf_counter()
    if not (out / "fp" / "model.safetensors").is_file():
        train(TrainConfig(**common, wbits=None, abits=None, epochs=a.fp_epochs, lr=0.05), out / "fp", progress=False)
    if not (out / "qat" / "model.safetensors").is_file():
        cfg = TrainConfig(**common, wbits=2, abits=2, epochs=a.epochs, lr=0.01, init_from=str(out / "fp"))
        train(cfg, out / "qat", progress=False)
    base_s = time.perf_counter() - t0
    timing = _baseline_seconds(out / "baseline_training_s.json", base_s)
    logs = {}
    # control: the same fine-tune at eps 0 (the IBP loss is then the plain cross-entropy), same epochs and optimizer
    ibp = "ibp" + a.tag
    names = (("ce", 0.0),) * (not a.no_control) + ((ibp, a.train_eps / 255),)
    for name, eps in names:
        shutil.rmtree(out / name, ignore_errors=True)
        shutil.copytree(out / "qat", out / name, ignore=shutil.ignore_patterns("build", "export", "attacks"))
        logs[name] = ibp_finetune(out / name, a.ibp_epochs, eps, a.lr)
    ibp_log = logs[ibp]
    x, y = load_split("sample", "test").take(a.n, seed=0).tensors()
    rows, res_runs = [], {}
    for name in ("qat", *(n for n, _ in names)):
        run = out / name
        if not (run / "build" / "Pynq-Z1" / "dataflow_model.onnx").is_file():
            build_run(run, "Pynq-Z1", target_fps=1000)
        r = certify_run(run, [0, 1, 2], board="Pynq-Z1", n=a.n, seed=0)
        model, _ = load_model(run)
        sw = {e: certified_fraction(model, x, y, e / 255) for e in (1, 2)}
        cert = {b["eps"]: b["certified_acc"] for b in r["certified"]}
        res_runs[name] = {"clean_acc_hw": r["clean_acc"], "certified_hw": cert, "ibp_certified_sw": sw,
                          "bound_s": r["timing"]["bound_s_total"]}  # fmt: skip
        rows.append([name.upper(), f"{100 * r['clean_acc']:.1f}%", f"{100 * cert[1.0]:.1f}%", f"{100 * cert[2.0]:.1f}%",
                     f"{100 * sw[1]:.1f}%", f"{100 * sw[2]:.1f}%"])  # fmt: skip
    res = {
        "machine": machine(), "model": f"{a.model} width {a.width:g} w2a2 (Pynq-Z1 build)", "n_test": a.n,
        "baseline_training_s": timing, "finetune": logs, "runs": res_runs, "args": vars(a),
    }  # fmt: skip
    table = md_table(
        ["training", "clean (accelerator)", "certified 1/255 (accelerator)", "certified 2/255 (accelerator)",
         "IBP-certified 1/255 (float bounds)", "IBP-certified 2/255 (float bounds)"], rows)  # fmt: skip
    text = (
        f"# Certified training: {res['model']}\n\nMachine: {machine_line(res['machine'])}.\n\n{table}\n\n"
        f"{a.n} embedded-sample test images. QAT: {a.epochs} epochs from a {a.fp_epochs}-epoch float start "
        f"({timing:.0f} s for both). Then, from QAT, {a.ibp_epochs} further epochs with Adam {a.lr:g}: "
        + (
            f"CE (the control: `ibp_loss` at eps 0, i.e. plain cross-entropy, {logs['ce']['seconds']:.0f} s) and "
            if "ce" in logs
            else ""
        )
        + "IBP "
        f"(`ibp_loss`, eps ramp to {a.train_eps:g}/255, kappa 1 -> 0.5, {ibp_log['seconds']:.0f} s). "
        f"Accelerator certificates: `hw_dq.fpga.certify` on the FINN build's integer "
        f"graph; float bounds: `hw_dq.nn.ibp.certified_fraction` on the Brevitas model.\n"
    )
    print(text)
    write_results(f"certified_training_{a.model}_x{a.width:g}{a.tag}", res, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
