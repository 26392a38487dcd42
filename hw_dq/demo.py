"""``hw-dq demo``: VQ vs DQ on the embedded CIFAR-10 sample, in a few minutes on a CPU.

Trains the same small CNV twice (beta = 0 and beta > 0), then measures clean accuracy,
white-box FGSM and PGD-10 (ART), the gradient-masking sanity checks (:mod:`hw_dq.sanity`:
pass/warn per model, with the evidence in summary.json) and the Lipschitz diagnostic, and
prints them side by side. The run
directories stay in ``--out`` for the later stages.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from hw_dq import rundir as rd
from hw_dq.attack import clean_accuracy, robust_accuracy
from hw_dq.config import load_config
from hw_dq.data import load_split
from hw_dq.errors import ConfigError
from hw_dq.sanity import SanityConfig, run_checks
from hw_dq.train import TrainConfig, train

DEMO_BETA = 3e-3
DEMO_EPS = (2.0, 4.0, 8.0)
DEMO_SANITY = SanityConfig(n_probe=100, square_queries=500, strong_steps_factor=3, strong_restarts=2)


def run_demo(
    out: str | Path = "runs/demo",
    epochs: int | None = None,
    n_eval: int = 500,
    beta: float = DEMO_BETA,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Train VQ and DQ, evaluate, print a table; returns the summary (also in summary.json)."""
    base: TrainConfig = load_config("demo")
    base = replace(base, seed=seed, epochs=epochs or base.epochs)
    out = Path(out)
    variants = {"VQ": replace(base, beta=0.0), "DQ": replace(base, beta=beta)}
    test = load_split(base.data, "test").take(n_eval, seed)
    x, y = test.tensors()
    rows = []
    for name, cfg in variants.items():
        run = out / name.lower()
        if (run / rd.CONFIG).is_file() and rd.read_json(run / rd.CONFIG).get("train") != asdict(cfg):
            raise ConfigError(f"{run} holds a run with other settings; delete it or pass another --out")
        train(cfg, run, resume=True, progress=progress)
        model, _ = rd.load_model(run)
        lip = rd.read_json(run / "lipschitz.json")
        row: dict[str, Any] = {
            "variant": name,
            "run_dir": str(run),
            "wbits": cfg.wbits,
            "abits": cfg.abits,
            "beta": cfg.beta,
            "clean_acc": clean_accuracy(model, x, y),
            "lipschitz_bound": lip["network_bound"],
            "mean_op_norm": lip["mean_norm_folded"],
        }
        evals = []
        for attack in ("fgsm", "pgd"):
            for eps in DEMO_EPS:
                r = robust_accuracy(model, x, y, attack, eps, seed=seed)
                row[f"{attack}@{eps:g}"] = r.robust_acc
                evals.append({"attack": attack, "norm": r.norm, "eps": eps, "robust_acc": r.robust_acc,
                              "n_examples": r.n_examples})  # fmt: skip
        san = run_checks(model, x, y, evals, row["clean_acc"], cfg=DEMO_SANITY, seed=seed)
        row["sanity"] = san["verdict"]
        row["sanity_checks"] = [{k: c[k] for k in ("name", "status", "evidence")} for c in san["checks"]]
        rows.append(row)
    summary = {
        "dataset": f"embedded CIFAR-10 sample ({len(y)} test images, seed {seed})",
        "attack": "FGSM and PGD-10 (ART), Linf, white-box through the straight-through estimator",
        "eps_units": "1/255",
        "rows": rows,
    }
    rd.write_json(out / "summary.json", summary)
    text = format_table(summary)
    rd.write_text(out / "summary.md", text + "\n")
    print(text)
    return summary


def format_table(summary: dict[str, Any]) -> str:
    rows = summary["rows"]
    eps_cols = [k for k in rows[0] if k.startswith(("fgsm@", "pgd@"))]
    head = (
        ["variant", "bits", "beta", "clean"]
        + [f"{k.split('@')[0].upper()} {k.split('@')[1]}/255" for k in eps_cols]
        + ["mean ||BN(W)||", "Lip. bound", "masking checks"]
    )
    lines = [
        f"Dataset: {summary['dataset']}; attack: {summary['attack']}",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        cells = [r["variant"], f"w{r['wbits']}a{r['abits']}", f"{r['beta']:g}", f"{100 * r['clean_acc']:.1f}%"]
        cells += [f"{100 * r[k]:.1f}%" for k in eps_cols]
        cells += [f"{r['mean_op_norm']:.3f}", f"{r['lipschitz_bound']:.3g}", r.get("sanity", "-")]
        lines.append("| " + " | ".join(cells) + " |")
    for r in rows:
        warned = [c for c in r.get("sanity_checks", []) if c["status"] == "warn"]
        for c in warned:
            lines.append(f"{r['variant']} WARN {c['name']}: {c['evidence']}")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    print(json.dumps(run_demo(), indent=2))
