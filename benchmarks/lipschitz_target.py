"""Which Lipschitz target should DQ regularise: the raw weight W or the BN-folded operator?

On the embedded CIFAR-10 sample (4,000 train / 1,000 test), CNV width 0.5, w2a2:

* FP: trained from scratch (``--fp-epochs``, cnv_cpu optimiser recipe);
* VQ (beta 0) and DQ with ``lipschitz_target`` 'weight' and 'bn_folded' at several beta:
  each fine-tuned from that FP checkpoint with the same recipe and seed (``--q-epochs``).

For each: clean accuracy (1,000 test images), white-box FGSM and PGD-10 (ART, through the
straight-through estimator) at eps 2, 4, 8 /255 on 500 test images (seed 0), the
BN-folded operator norms and network Lipschitz bound (lipschitz.json), and a transfer
attack: PGD-10 examples crafted on the FP model, evaluated on every model (a gradient
masking check). Run directories live under ``runs/bench/lipschitz_target/`` and are reused.

    .venv/bin/python -m benchmarks.lipschitz_target
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import REPO, machine, machine_line, md_table, write_results

RUNS = REPO / "runs" / "bench" / "lipschitz_target"
EPS = (2.0, 4.0, 8.0)
PGD_STEPS = 10
SEED = 0


def variants(betas: list[float]) -> dict[str, dict[str, Any]]:
    v: dict[str, dict[str, Any]] = {
        "fp": {"wbits": "float", "abits": "float", "beta": 0.0},
        "vq": {"beta": 0.0},
    }
    for target, tag in (("weight", "w"), ("bn_folded", "bn")):
        for b in betas:
            v[f"dq_{tag}_{b:g}"] = {"beta": b, "lipschitz_target": target}
    return v


def diverged_epoch(out: Path) -> int | None:
    """First epoch whose training loss is not finite (hw_dq.train.loop.fit keeps going on NaN)."""
    import math

    from hw_dq import run as rd

    for m in rd.read_jsonl(out / rd.METRICS):
        if not math.isfinite(m["loss"]):
            return int(m["epoch"])
    return None


def train_variant(name: str, overrides: dict[str, Any], fp_epochs: int, q_epochs: int) -> Path:
    from hw_dq.train.config import load_config
    from hw_dq.train.loop import train

    out = RUNS / name
    if diverged_epoch(out) is not None:
        return out  # a diverged run is reported as such, not trained further
    fp = name == "fp"
    extra: dict[str, Any] = {"epochs": fp_epochs} if fp else {"epochs": q_epochs, "init_from": str(RUNS / "fp")}
    cfg = load_config("cnv_cpu", data="sample", data_dir=None, seed=SEED, **extra, **overrides)
    if not (out / "model.safetensors").is_file():
        t0 = time.time()
        train(cfg, out, resume=True, progress=False)
        (out / "bench_wall.json").write_text(json.dumps({"train_wall_s": time.time() - t0}) + "\n")
        print(f"[{name}] trained in {time.time() - t0:.0f}s", flush=True)
    return out


def craft_transfer(fp_model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps_255: float) -> np.ndarray:
    """PGD-10 examples crafted on the FP model: hw_dq.robust.attacks.generate('transfer-pgd', source=fp)."""
    from hw_dq.robust.attacks import AttackParams, generate

    x_adv, _, _ = generate(fp_model, x, y, "transfer-pgd", eps_255, seed=SEED,
                           params=AttackParams(pgd_steps=PGD_STEPS), source=fp_model)  # fmt: skip
    return x_adv


def joint_accuracy(model: torch.nn.Module, x: torch.Tensor, x_adv: np.ndarray, y: torch.Tensor) -> float:
    """hw_dq.robust.attacks's definition: robust = clean input AND adversarial input classified correctly."""
    model.eval()
    with torch.no_grad():
        clean = model(x).argmax(1) == y
        adv = model(torch.from_numpy(x_adv)).argmax(1) == y
    return float((clean & adv).float().mean())


def evaluate(
    name: str, out: Path, x: torch.Tensor, y: torch.Tensor, xt: torch.Tensor, yt: torch.Tensor
) -> dict[str, Any]:
    from hw_dq import run as rd
    from hw_dq.robust.attacks import clean_accuracy, robust_accuracy

    cache = out / "bench_eval.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    bad = diverged_epoch(out)
    if bad is not None:
        m = rd.read_jsonl(out / rd.METRICS)
        return {"diverged_at_epoch": bad, "epochs_run": len(m), "last_test_acc": m[-1]["test_acc"]}
    model, cfg = rd.load_model(out)
    t0 = time.time()
    res: dict[str, Any] = {
        "clean_acc_1000": clean_accuracy(model, xt, yt),
        "clean_acc_500": clean_accuracy(model, x, y),
        "white_box": [],
    }
    for atk in ("fgsm", "pgd"):
        for eps in EPS:
            r = robust_accuracy(model, x, y, atk, eps, seed=SEED, steps=PGD_STEPS)
            res["white_box"].append(asdict(r))
    lip = json.loads((out / "lipschitz.json").read_text())
    metrics = rd.read_jsonl(out / rd.METRICS)
    layers = lip["layers"]
    res["lipschitz"] = {
        "mean_norm_folded": lip["mean_norm_folded"],
        "max_norm_folded": max(r["norm_folded"] for r in layers),
        "network_bound": lip["network_bound"],
        "mean_norm_float_weight": sum(r["norm_float"] for r in layers) / len(layers),
        "mean_norm_quant_weight": sum(r["norm_quant"] for r in layers) / len(layers),
        "max_bn_gain": max(r["bn_gain_max"] for r in layers),
        "ortho_residual_weight_sum": sum(r["ortho_residual"] for r in layers),
        "per_layer_norm_folded": {r["name"]: round(r["norm_folded"], 4) for r in layers},
    }
    res["train"] = {
        "epochs": len(metrics),
        "first_epoch": {k: metrics[0][k] for k in ("ce", "reg", "train_acc", "test_acc")},
        "last_epoch": {k: metrics[-1][k] for k in ("ce", "reg", "train_acc", "test_acc")},
        "reg_over_ce_last": metrics[-1]["reg"] / max(1e-12, metrics[-1]["ce"]),
        "init_from": cfg["train"]["init_from"],
    }
    # the reloaded model must reproduce the accuracy fit() measured on the same 1,000 images
    res["reload_check"] = {"fit_last_test_acc": metrics[-1]["test_acc"],
                           "matches": abs(metrics[-1]["test_acc"] - res["clean_acc_1000"]) < 1e-9}  # fmt: skip
    if not res["reload_check"]["matches"]:
        raise SystemExit(f"{name}: reloaded model gives {res['clean_acc_1000']} but fit() measured "
                         f"{metrics[-1]['test_acc']}: the quantizers changed since training?")  # fmt: skip
    res["eval_wall_s"] = time.time() - t0
    cache.write_text(json.dumps(res, indent=2) + "\n")
    print(f"[{name}] evaluated in {res['eval_wall_s']:.0f}s", flush=True)
    return res


def render(rows: dict[str, Any], meta: dict[str, Any]) -> str:
    def wb(r: dict, atk: str, eps: float) -> float:
        return next(a["robust_acc"] for a in r["white_box"] if a["attack"] == atk and a["eps"] == eps)

    def tr(r: dict, eps: float) -> float:
        return next(a["robust_acc"] for a in r["transfer_from_fp"] if a["eps"] == eps)

    pct = lambda v: f"{100 * v:.1f}"  # noqa: E731
    ok = {n: r for n, r in rows.items() if "diverged_at_epoch" not in r}
    diverged = [f"* **{n}** (target {r['target']}, beta {r['beta']:g}): training loss NaN from epoch "
                f"{r['diverged_at_epoch'] + 1} on (training stopped after {r['epochs_run']} epochs; not evaluated)."
                for n, r in rows.items() if "diverged_at_epoch" in r]  # fmt: skip
    main = md_table(
        ["variant", "target", "beta", "clean (1000)", "clean (500)",
         *[f"FGSM {e:g}" for e in EPS], *[f"PGD-10 {e:g}" for e in EPS], *[f"transfer {e:g}" for e in EPS]],
        [[n, r["target"], f"{r['beta']:g}", pct(r["clean_acc_1000"]), pct(r["clean_acc_500"]),
          *[pct(wb(r, "fgsm", e)) for e in EPS], *[pct(wb(r, "pgd", e)) for e in EPS],
          *[pct(tr(r, e)) for e in EPS]] for n, r in ok.items()],
    )  # fmt: skip
    lip = md_table(
        ["variant", "mean ||BN(W_q)||", "max ||BN(W_q)||", "network bound", "mean ||W|| float",
         "max BN gain", "sum ||WW^T-I||^2 (W)", "CE last", "reg last", "reg/CE last", "reg first epoch"],
        [[n, f"{r['lipschitz']['mean_norm_folded']:.3f}", f"{r['lipschitz']['max_norm_folded']:.3f}",
          f"{r['lipschitz']['network_bound']:.3g}", f"{r['lipschitz']['mean_norm_float_weight']:.3f}",
          f"{r['lipschitz']['max_bn_gain']:.3f}", f"{r['lipschitz']['ortho_residual_weight_sum']:.3g}",
          f"{r['train']['last_epoch']['ce']:.3f}", f"{r['train']['last_epoch']['reg']:.3g}",
          f"{r['train']['reg_over_ce_last']:.3g}", f"{r['train']['first_epoch']['reg']:.3g}"]
         for n, r in ok.items()],
    )  # fmt: skip
    return "\n\n".join(
        [
            "# Lipschitz target for DQ: raw weight vs BN-folded operator",
            f"Machine: {machine_line(meta['machine'])}.",
            f"Setup: {meta['setup']}",
            "## Accuracy (%) under attack",
            f"Linf eps in /255. White-box FGSM and PGD-{PGD_STEPS} (ART; step 2.5*eps/{PGD_STEPS}, 1 random start) "
            f"through each model's straight-through estimator, on {meta['n_attack']} test images "
            f"(embedded sample, take({meta['n_attack']}, seed={SEED})), seed {SEED}. 'transfer' = the same "
            f"PGD-{PGD_STEPS} examples crafted once on the FP model and fed to each model (black-box transfer).",
            main,
            *(["Diverged runs:\n\n" + "\n".join(diverged)] if diverged else []),
            "## Lipschitz diagnostic (final weights, BN folded in, quantized weights) and training loss terms",
            lip,
        ]
    )


def main(argv: list[str] | None = None) -> None:
    from hw_dq.data import load_split

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--betas", type=float, nargs="+", default=[3e-4, 3e-3, 3e-2])
    ap.add_argument("--fp-epochs", type=int, default=15)
    ap.add_argument("--q-epochs", type=int, default=10)
    ap.add_argument("--n-attack", type=int, default=500)
    ap.add_argument("--only", nargs="*", default=None, help="subset of variants")
    ap.add_argument("--craft-only", action="store_true", help="only craft the FP transfer examples")
    ap.add_argument("--eval-only", action="store_true", help="only train/evaluate --only (no transfer, no report)")
    args = ap.parse_args(argv)
    mach = machine()
    vs = variants(args.betas)
    names = args.only or list(vs)
    train_names = names if "fp" in names else ["fp", *names]  # every quantized run starts from fp
    test = load_split("sample", "test")
    xt, yt = test.tensors()
    x, y = test.take(args.n_attack, SEED).tensors()
    outs = {n: train_variant(n, vs[n], args.fp_epochs, args.q_epochs) for n in train_names}
    from hw_dq import run as rd

    if args.eval_only:
        for n in names:
            evaluate(n, outs[n], x, y, xt, yt)
        return
    # written by hw_dq.robust.attacks.generate("transfer-pgd", source=fp): true labels, seed 0
    cache = RUNS / f"transfer_fp_pgd{PGD_STEPS}_n{args.n_attack}_v2.npz"
    if cache.is_file():
        with np.load(cache) as z:
            transfer = {eps: z[f"eps{eps:g}"] for eps in EPS}
    else:
        fp_model, _ = rd.load_model(outs["fp"])
        t0 = time.time()
        transfer = {eps: craft_transfer(fp_model, x, y, eps) for eps in EPS}
        tmp = cache.with_suffix(".tmp.npz")
        np.savez(tmp, **{f"eps{eps:g}": a for eps, a in transfer.items()})
        tmp.replace(cache)
        print(f"transfer examples crafted on fp in {time.time() - t0:.0f}s", flush=True)
    if args.craft_only:
        return
    rows = {}
    for n in names:
        r = evaluate(n, outs[n], x, y, xt, yt)
        cfg = json.loads((outs[n] / "config.json").read_text())
        if "diverged_at_epoch" not in r:
            model, _ = rd.load_model(outs[n])
            r["transfer_from_fp"] = [
                {"attack": "transfer-pgd (crafted on fp)", "eps": eps, "steps": PGD_STEPS,
                 "robust_acc": joint_accuracy(model, x, transfer[eps], y), "n_examples": len(y), "seed": SEED}
                for eps in EPS
            ]  # fmt: skip
        rows[n] = {"mode": cfg["mode"], "beta": cfg["train"]["beta"],
                   "target": cfg["train"]["lipschitz_target"] if cfg["train"]["beta"] else "-",
                   "run_dir": str(outs[n].relative_to(REPO)), **r}  # fmt: skip
    setup = (
        f"embedded CIFAR-10 sample (4,000 train / 1,000 test), CNV width 0.5, w2a2 (FP: float); "
        f"cnv_cpu optimiser recipe (SGD 0.9 Nesterov, lr 0.05 cosine, wd 5e-4, batch 128, crop+flip), seed {SEED}; "
        f"FP from scratch for {args.fp_epochs} epochs; VQ and every DQ fine-tuned from that FP checkpoint "
        f"for {args.q_epochs} epochs (init_from)."
    )
    meta = {"machine": mach, "setup": setup, "n_attack": args.n_attack, "eps_units": "1/255",
            "pgd_steps": PGD_STEPS, "seed": SEED}  # fmt: skip
    text = render(rows, meta)
    js, md = write_results("lipschitz_target", {**meta, "runs": rows}, text)
    print(text)
    print(f"wrote {js} and {md}")


if __name__ == "__main__":
    main()
