"""Attack throughput (images/s) on CNV w2a2: hw-dq's PGD engine and ART's PGD vs a plain PyTorch PGD loop.

    python -m benchmarks.attack_throughput [--run-dir runs/demo/vq] [--n 256] [--threads 2] [--device auto]

Writes benchmarks/results/attack_throughput.json. The plain loop is the reference for the
overhead of a library path: the native engine (:mod:`hw_dq.robust.engine`, goal >= 0.95x)
and ART (numpy round trips per batch and per step). All run the same model, eps, steps,
step size, random start and batch size in the same process, interleaved, on ``--device``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F  # noqa: N812

from hw_dq.data import load_split
from hw_dq.nn.models import create_model
from hw_dq.robust.attacks import robust_accuracy

OUT = Path(__file__).resolve().parent / "results" / "attack_throughput.json"


def plain_pgd(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int, bs: int) -> float:
    """Minimal PGD (random start, signed steps, projection); returns robust accuracy."""
    alpha = 2.5 * eps / steps
    correct = 0
    dev = next(model.parameters()).device
    for i in range(0, len(y), bs):
        xb, yb = x[i : i + bs].to(dev), y[i : i + bs].to(dev)
        delta = (torch.rand_like(xb) * 2 - 1) * eps
        for _ in range(steps):
            delta.requires_grad_(True)
            loss = F.cross_entropy(model((xb + delta).clamp(0, 1)), yb)
            (g,) = torch.autograd.grad(loss, delta)
            delta = (delta.detach() + alpha * g.sign()).clamp(-eps, eps)
        with torch.no_grad():
            correct += int((model((xb + delta).clamp(0, 1)).argmax(1) == yb).sum())
    return correct / len(y)


def engine_pgd(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int, bs: int) -> float:
    """The same PGD through hw_dq.robust.engine (batched on the model's device); returns robust accuracy."""
    from hw_dq.robust import engine

    correct = 0
    dev = next(model.parameters()).device
    g = torch.Generator().manual_seed(0)
    for i in range(0, len(y), bs):
        xb, yb = x[i : i + bs].to(dev), y[i : i + bs].to(dev)
        xa = engine.pgd(model, xb, yb, eps, steps=steps, generator=g)
        with torch.no_grad():
            correct += int((model(xa).argmax(1) == yb).sum())
    return correct / len(y)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", default="runs/demo/vq", help="trained w2a2 run (default: the demo's VQ run)")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda, auto")
    ap.add_argument("--skip-art", action="store_true", help="only the engine vs the plain loop")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if Path(a.run_dir, "model.safetensors").is_file():
        from hw_dq import run as rd

        model, cfg = rd.load_model(a.run_dir, device=rd.resolve_device(a.device))
        desc = f"{a.run_dir}: cnv width {cfg['model']['width']} w{cfg['model']['wbits']}a{cfg['model']['abits']}"
    else:
        torch.manual_seed(0)
        from hw_dq import run as rd

        model, desc = create_model("cnv", 2, 2).eval(), "untrained cnv width 1.0 w2a2"
        model = model.to(rd.resolve_device(a.device))
    x, y = load_split("sample", "test").take(a.n, 0).tensors()
    eps = 8 / 255
    res: dict = {"model": desc, "device": str(next(model.parameters()).device), "n": a.n, "batch_size": a.batch_size,
                 "threads": torch.get_num_threads(),
                 "host": platform.node(), "cpus": os.cpu_count(), "load_avg_before": os.getloadavg()}  # fmt: skip
    plain, eng, art = [], [], []
    plain_pgd(model, x[: a.batch_size], y[: a.batch_size], eps, 2, a.batch_size)  # warm-up (cuDNN, allocator)
    for _ in range(a.repeats):  # interleaved so that load changes hit all alike
        torch.manual_seed(0)
        _sync()
        t0 = time.perf_counter()
        acc_plain = plain_pgd(model, x, y, eps, 10, a.batch_size)
        _sync()
        plain.append(a.n / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        acc_eng = engine_pgd(model, x, y, eps, 10, a.batch_size)
        _sync()
        eng.append(a.n / (time.perf_counter() - t0))
        if not a.skip_art:
            t0 = time.perf_counter()
            r = robust_accuracy(model, x, y, "pgd", 8.0, batch_size=a.batch_size)
            art.append(a.n / (time.perf_counter() - t0))
    res["pgd10_plain_img_s"] = float(np.median(plain))
    res["pgd10_engine_img_s"] = float(np.median(eng))
    res["pgd10_engine_over_plain"] = res["pgd10_engine_img_s"] / res["pgd10_plain_img_s"]
    res["pgd10_robust_acc"] = {"plain": acc_plain, "engine": acc_eng}
    if art:  # the evaluation path: robust_accuracy("pgd"), i.e. the engine plus counting and per-image flags
        res["pgd10_evaluate_path_img_s"] = float(np.median(art))
        res["pgd10_robust_acc"]["evaluate_path"] = r.robust_acc
    res["load_avg_after"] = os.getloadavg()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    md = ["# PGD-10 throughput: native engine vs a plain PyTorch loop", "", f"{desc}, {a.n} images, batch "
          f"{a.batch_size}, device {res['device']}, median of {a.repeats} interleaved repeats.", "",
          "| path | images/s | ratio to plain |", "|---|---|---|",
          f"| plain loop | {res['pgd10_plain_img_s']:.1f} | 1.00 |",
          f"| hw_dq.robust.engine | {res['pgd10_engine_img_s']:.1f} | {res['pgd10_engine_over_plain']:.2f} |",
          ""]  # fmt: skip
    Path(a.out).with_suffix(".md").write_text("\n".join(md) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
