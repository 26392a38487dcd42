"""Reference AutoAttack (pyautoattack, standard) vs the earlier ART composite (art-apgd-square), side by side.

    python -m benchmarks.autoattack_vs_composite [--n 200] [--epochs 8] [--width 0.5] [--device auto]
    python -m benchmarks.autoattack_vs_composite --use-runs runs/robust-sample/sm-vq-w2a2-at,...

Trains two half-width CNV w2a2 models on the embedded CIFAR-10 sample (VQ: beta 0; DQ:
beta 3e-4 on W), or takes trained run directories (``--use-runs``, e.g. the adversarially
trained models of ``benchmarks/robust_gpu.py``), then on the same test images and seed
runs both attack sets at 2/255 and 8/255 and records robust accuracy, the per-image worst
case of the two, wall time, and
whether AutoAttack is at most the composite or within two binomial standard errors
(:func:`hw_dq.robust.sanity.tolerance`). Writes benchmarks/results/autoattack_vs_composite.{json,md}.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from benchmarks.common import machine, machine_line
from hw_dq import run as rd
from hw_dq.data import load_split
from hw_dq.robust.attacks import AttackParams, clean_accuracy, robust_accuracy
from hw_dq.train.loop import TrainConfig, train

OUT = Path(__file__).resolve().parent / "results" / "autoattack_vs_composite"
MODELS = {"VQ": 0.0, "DQ": 3e-4}


def two_se(p: float, n: int) -> float:
    """Two binomial standard errors of an accuracy p on n images (floored at about one image)."""
    from hw_dq.robust.sanity import tolerance

    return tolerance(p, n, 0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--width", type=float, default=0.5)
    ap.add_argument("--eps", default="8,2")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--runs", default="runs/autoattack_vs_composite")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--use-runs", default="", help="comma-separated trained run directories (no training)")
    a = ap.parse_args()
    dev = rd.resolve_device(a.device)
    x, y = load_split("sample", "test").take(a.n, 0).tensors()
    rows, res = [], {"machine": machine(), "device": dev, "n": a.n, "seed": 0, "models": {}}
    given = [Path(r) for r in a.use_runs.split(",") if r]
    models = {r.name: (r, None) for r in given} or {m: (Path(a.runs) / m.lower(), b) for m, b in MODELS.items()}
    for mode, (run, beta) in models.items():
        t0 = time.time()
        if beta is not None and not (run / rd.MODEL).is_file():
            cfg = TrainConfig(model="cnv", width=a.width, wbits=2, abits=2, beta=beta, epochs=a.epochs,
                              batch_size=128, lr=0.05, device=dev)  # fmt: skip
            train(cfg, run, resume=True, progress=False)
        model, run_cfg = rd.load_model(run, device=dev)
        clean = clean_accuracy(model, x, y)
        print(f"{mode}: ready in {time.time() - t0:.0f} s", flush=True)
        mc, tr = run_cfg["model"], run_cfg["train"]
        desc = (
            f"{mc['name']} w{mc.get('width')} w{mc.get('wbits')}a{mc.get('abits')} beta {tr.get('beta', 0):g} "
            f"({tr.get('lipschitz_target', 'weight')}), adversarial training {tr.get('adv_train', 'none')}"
        )
        m = {"train_s": time.time() - t0, "clean_acc": clean, "config": desc, "eps": {}}
        for e in (float(v) for v in a.eps.split(",")):  # listed order (8 first: the headline eps)
            out = {}
            for attack in ("autoattack", "art-apgd-square"):
                t0 = time.time()
                r = robust_accuracy(model, x, y, attack, e, seed=0, batch_size=250, params=AttackParams())
                out[attack] = {"robust_acc": r.robust_acc, "wall_s": time.time() - t0, "breakdown": r.breakdown,
                               "warnings": r.warnings, "robust": r.robust_mask, "params": r.params}  # fmt: skip
                print(
                    f"  {mode} {attack} @ {e:g}/255: {100 * r.robust_acc:.1f}% in {time.time() - t0:.0f} s", flush=True
                )
            aa, comp = out["autoattack"]["robust_acc"], out["art-apgd-square"]["robust_acc"]
            both = sum(p == q == "1" for p, q in zip(out["autoattack"]["robust"], out["art-apgd-square"]["robust"],
                                                      strict=True)) / a.n  # fmt: skip
            tol = two_se(comp, a.n)
            ok = aa <= comp + tol
            out["verdict"] = {"autoattack_le_composite_within_2se": ok, "two_se": tol, "worst_case_of_both": both}
            m["eps"][f"{e:g}"] = out
            rows.append(f"| {mode} | {100 * clean:.1f} | {e:g} | {100 * aa:.1f} | {100 * comp:.1f} | {100 * both:.1f} "
                        f"| {100 * tol:.1f} | {'yes' if ok else 'NO'} | {out['autoattack']['wall_s']:.0f} / "
                        f"{out['art-apgd-square']['wall_s']:.0f} |")  # fmt: skip
            print(rows[-1], flush=True)
            res["models"][mode] = m
            _write(a, res, rows, dev)  # after every row: a run stopped at its time limit keeps what it measured
        res["models"][mode] = m
    _write(a, res, rows, dev)
    print(Path(a.out).with_suffix(".md").read_text())


def _write(a: argparse.Namespace, res: dict, rows: list[str], dev: str) -> None:
    md = [
        "# Reference AutoAttack vs the earlier ART composite", "",
        f"Same models, {a.n} sample test images (seed 0), device {dev}. AutoAttack: pyautoattack, version standard "
        "(APGD-CE, APGD-T 9 targets, FAB-T 9 targets, Square 5,000 queries). Composite: ART APGD-CE, APGD-T, "
        "Square (the earlier `autoattack` of hw-dq, now `art-apgd-square`), with hw-dq's default budgets.", "",
        *[f"- {k}: {v['config']}" for k, v in res["models"].items()], "",
        "| model | clean % | eps (/255) | AutoAttack % | composite % | worst of both % | 2 SE % "
        "| AA <= composite + 2 SE | wall s (AA / composite) |",
        "|---|---|---|---|---|---|---|---|---|", *rows, "",
        "Command: `python -m benchmarks.autoattack_vs_composite "
        + (f"--n {a.n} --use-runs {a.use_runs}`" if a.use_runs
           else f"--n {a.n} --epochs {a.epochs} --width {a.width}`"),
        "", f"Machine: {machine_line(res['machine'])}.",
    ]  # fmt: skip
    rd.write_json(Path(a.out).with_suffix(".json"), res)
    rd.write_text(Path(a.out).with_suffix(".md"), "\n".join(md) + "\n")


if __name__ == "__main__":
    torch.backends.cudnn.benchmark = True
    main()
