"""Attack throughput (images/s) on CNV w2a2: ART PGD-10 and AutoAttack vs a plain PyTorch PGD loop.

    python -m benchmarks.attack_throughput [--run-dir runs/demo/vq] [--n 256] [--threads 2]

Writes benchmarks/results/attack_throughput.json. The plain loop is the reference for the
library path's overhead (ART's numpy round trips per batch and per step); both run the same
model, eps, steps, step size, random start and batch size in the same process.
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
from hw_dq.robust.attacks import AttackParams, robust_accuracy

OUT = Path(__file__).resolve().parent / "results" / "attack_throughput.json"


def plain_pgd(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int, bs: int) -> float:
    """Minimal PGD (random start, signed steps, projection); returns robust accuracy."""
    alpha = 2.5 * eps / steps
    correct = 0
    for i in range(0, len(y), bs):
        xb, yb = x[i : i + bs], y[i : i + bs]
        delta = (torch.rand_like(xb) * 2 - 1) * eps
        for _ in range(steps):
            delta.requires_grad_(True)
            loss = F.cross_entropy(model((xb + delta).clamp(0, 1)), yb)
            (g,) = torch.autograd.grad(loss, delta)
            delta = (delta.detach() + alpha * g.sign()).clamp(-eps, eps)
        with torch.no_grad():
            correct += int((model((xb + delta).clamp(0, 1)).argmax(1) == yb).sum())
    return correct / len(y)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", default="runs/demo/vq", help="trained w2a2 run (default: the demo's VQ run)")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(OUT))
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if Path(a.run_dir, "model.safetensors").is_file():
        from hw_dq import run as rd

        model, cfg = rd.load_model(a.run_dir)
        desc = f"{a.run_dir}: cnv width {cfg['model']['width']} w{cfg['model']['wbits']}a{cfg['model']['abits']}"
    else:
        torch.manual_seed(0)
        model, desc = create_model("cnv", 2, 2).eval(), "untrained cnv width 1.0 w2a2"
    x, y = load_split("sample", "test").take(a.n, 0).tensors()
    eps = 8 / 255
    res: dict = {"model": desc, "n": a.n, "batch_size": a.batch_size, "threads": torch.get_num_threads(),
                 "host": platform.node(), "cpus": os.cpu_count(), "load_avg_before": os.getloadavg()}  # fmt: skip
    plain, art = [], []
    for _ in range(a.repeats):  # interleaved so that load changes hit both alike
        torch.manual_seed(0)
        t0 = time.perf_counter()
        acc_plain = plain_pgd(model, x, y, eps, 10, a.batch_size)
        plain.append(a.n / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        r = robust_accuracy(model, x, y, "pgd", 8.0, batch_size=a.batch_size)
        art.append(a.n / (time.perf_counter() - t0))
    res["pgd10_plain_img_s"] = float(np.median(plain))
    res["pgd10_art_img_s"] = float(np.median(art))
    res["pgd10_art_over_plain"] = res["pgd10_art_img_s"] / res["pgd10_plain_img_s"]
    res["pgd10_robust_acc"] = {"plain": acc_plain, "art": r.robust_acc}
    for name, p in {"autoattack_standard": AttackParams(),
                    "autoattack_reproduce_cpu": AttackParams(apgd_iters=50, apgd_targets=3, square_queries=1000)
                    }.items():  # fmt: skip
        t0 = time.perf_counter()
        r = robust_accuracy(model, x, y, "autoattack", 8.0, batch_size=a.batch_size, params=p)
        wall = time.perf_counter() - t0
        res[name] = {"img_s": a.n / wall, "wall_s": wall, "robust_acc": r.robust_acc, "breakdown": r.breakdown,
                     "params": r.params}  # fmt: skip
    res["load_avg_after"] = os.getloadavg()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
