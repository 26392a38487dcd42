"""What robust training costs: one training step of each adversarial recipe against a clean QAT step,
and what the Lipschitz control and the threshold terms add on top of the adversarial step, timed side by
side in one process.

Every configuration runs the step ``hw_dq.train.loop`` runs (the recipe's crafted batch through
``hw_dq.train.adversarial.adversarial_loss``, the regulariser, backward, SGD, and the per-step
projection where configured), on the same model shape and batch, with repetitions interleaved
(the order rotates every round) so load changes on a shared machine hit every configuration alike.
The median per configuration and the ratios to the clean step are what to read.

    .venv/bin/python -m benchmarks.robust_step [--reps 6] [--width 0.5] [--bits 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import torch

from benchmarks.common import machine, machine_line, write_results

# name -> TrainConfig overrides (bits and width come from the command line)
CONFIGS: dict[str, dict[str, Any]] = {
    "clean QAT": {},
    "N-FGSM": {"adv_train": "nfgsm"},
    "FGSM-RS": {"adv_train": "fgsm"},
    "PGD-7": {"adv_train": "pgd", "adv_steps": 7},
    "TRADES-7": {"adv_train": "trades", "adv_steps": 7},
    "N-FGSM + DQ penalty (bn_folded)": {"adv_train": "nfgsm", "beta": 1e-4, "lipschitz_target": "bn_folded"},
    "N-FGSM + DQ penalty (weight)": {"adv_train": "nfgsm", "beta": 1e-4, "lipschitz_target": "weight"},
    "N-FGSM + spectral projection": {"adv_train": "nfgsm", "lipschitz_project": 2.0, "lipschitz_target": "bn_folded"},
    # the threshold terms on the screen's w2a2 recipe (PGD-3), against PGD-3 alone
    "PGD-3": {"adv_train": "pgd", "adv_steps": 3},
    "PGD-3 + threshold margin": {"adv_train": "pgd", "adv_steps": 3, "act_margin": 10.0},
    "PGD-3 + threshold noise": {"adv_train": "pgd", "adv_steps": 3, "act_noise": 0.5},
    # certified training at the end of its ramp (eps 2.2/255): the clean logits from the bound pass, and
    # the same loss with a separate clean forward first (the step before the single pass)
    "IBP": {"adv_train": "ibp", "adv_eps": 2.2, "ibp_warmup": 0.0, "ibp_ramp": 1.0},
    "IBP, separate clean forward": {"adv_train": "ibp", "adv_eps": 2.2, "ibp_warmup": 0.0, "ibp_ramp": 1.0},
}
TWO_PASS = "IBP, separate clean forward"


class Stepper:
    """One configuration's model, optimizer and batch; calling it runs and times one training step."""

    def __init__(self, overrides: dict[str, Any], width: float, bits: int, batch: int, two_pass: bool = False) -> None:
        from hw_dq.data import load_split
        from hw_dq.nn import lipschitz
        from hw_dq.nn.models import model_from_config
        from hw_dq.train.config import TrainConfig

        self.cfg = TrainConfig(model="cnv", width=width, wbits=bits, abits=bits, **overrides)
        torch.manual_seed(0)
        self.model = model_from_config(self.cfg.model_config())
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        x, y = load_split("sample", "train").take(batch, 0).tensors()
        self.x, self.y = x, y
        self.layers = lipschitz.lipschitz_layers(self.model)
        self.step_no = 0
        self.two_pass = two_pass

    def __call__(self) -> float:
        from hw_dq.nn import lipschitz
        from hw_dq.train.step import training_loss

        cfg = self.cfg
        self.model.train()
        t0 = time.perf_counter()
        if self.two_pass:
            ce = self._two_pass_ibp()
            loss = ce + lipschitz.regulariser(self.model, cfg.beta, cfg.lipschitz_target, self.layers).to(ce)
        else:  # the loop's own step loss; step = total: IBP at the end of its ramp (the others ignore it)
            ce, reg, _ = training_loss(self.model, self.model, self.x, self.y, cfg, (0, 0, self.step_no), 1, 1,
                                       None, self.layers)  # fmt: skip
            loss = ce + reg
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if cfg.lipschitz_project:
            lipschitz.project_(self.model, cfg.lipschitz_project, target=cfg.lipschitz_target)
        self.step_no += 1
        return time.perf_counter() - t0

    def _two_pass_ibp(self) -> torch.Tensor:
        """The IBP loss with the clean forward run on its own before the bound pass."""
        from torch.nn import functional as F  # noqa: N812

        from hw_dq.nn import ibp

        kappa, eps = self.cfg.ibp_kappa, self.cfg.adv_eps / 255.0
        clean = F.cross_entropy(self.model(self.x), self.y)
        return kappa * clean + (1 - kappa) * F.cross_entropy(-ibp.ibp_margins(self.model, self.x, self.y, eps), self.y)


def render(res: dict[str, Any]) -> str:
    med = res["median_s"]
    base = med["clean QAT"]
    nfgsm = med["N-FGSM"]
    lines = [
        f"# Robust training step cost (CNV width {res['width']}, w{res['bits']}a{res['bits']}, batch {res['batch']})",
        "",
        machine_line(res["machine"]),
        "",
        f"Median of {res['reps']} interleaved steps after {res['warmup']} warm-up steps per configuration.",
        "",
        "| configuration | median step (s) | vs clean QAT | vs N-FGSM | vs PGD-3 |",
        "|---|---:|---:|---:|---:|",
    ]
    pgd3 = med.get("PGD-3")  # absent from results made before the threshold rows
    for name, t in med.items():
        third = f"{t / pgd3:.2f}x" if pgd3 and name.startswith("PGD-3") else "-"
        lines.append(f"| {name} | {t:.3f} | {t / base:.2f}x | {t / nfgsm:.2f}x | {third} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--width", type=float, default=0.5)
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--batch", type=int, default=128)
    a = ap.parse_args(argv)
    m = machine()
    steppers = {name: Stepper(o, a.width, a.bits, a.batch, name == TWO_PASS) for name, o in CONFIGS.items()}
    for s in steppers.values():
        for _ in range(a.warmup):
            s()
    times: dict[str, list[float]] = {n: [] for n in steppers}
    names = list(steppers)
    for r in range(a.reps):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            times[n].append(steppers[n]())
    res = {
        "machine": m, "width": a.width, "bits": a.bits, "batch": a.batch, "reps": a.reps, "warmup": a.warmup,
        "times_s": times, "median_s": {n: statistics.median(v) for n, v in times.items()},
    }  # fmt: skip
    md = render(res)
    write_results("robust_step", res, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
