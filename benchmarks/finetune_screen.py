"""How much quantized fine-tuning a robust FP twin can take: AutoAttack's APGD-CE + APGD-T against
the length, learning rate and training attack of the fine-tune, and distillation from the FP twin
(RSLAD), at CPU scale.

Every variant starts from the same robust FP twin (``robust_gpu --arm cpu``'s ``cpu-fp-at``: half-width
CNV, N-FGSM, 30 epochs on 10,000 CIFAR-10 images) and differs only in the fine-tune, except the width rows:
a 3/4-width FP twin trained here with the same recipe and a w2a2 fine-tuned from it (does 2-bit robustness
need width, as 2-bit accuracy does in WRPN, Mishra et al. 2018?), and a w2a2 trained from scratch with the
FP twin's recipe; and for w2a2, TRADES, a larger training eps and the two threshold terms of
``hw_dq.train.margin`` (``--act-margin``, ``--act-noise``). A screen, not the
standard: the reference AutoAttack's two gradient components (APGD-CE, then APGD-T with 9 targets,
100 iterations each, the standard budgets) on 500 of the 1,000 evaluation images (every second one:
``take`` sorts by class, so a prefix would hold half the classes). The chosen recipe then gets the full
evaluation (AutoAttack standard + adaptive attacks, 1,000 images) in ``robust_gpu``. The FP twin and
the committed fine-tunes are scored on the same 500 images from their saved AutoAttack examples.

    OMP_NUM_THREADS=1 python -m benchmarks.finetune_screen --data ../shared/data --fp runs/robust-cpu \\
        --work runs/scr [--only NAME,...]

Resumable: a variant whose run directory holds a finished model with the same configuration is not
retrained, and a finished screen is not rerun; with ``--only``, the other variants' rows are carried over
from the committed results where their settings are unchanged. Writes
benchmarks/results/finetune_screen.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import machine, machine_line, md_table, write_results
from benchmarks.robust_gpu import SHORT, plan_cpu

CS = {"model": "cnv", "width": 0.5, "data": "cifar10", "train_subset": 10000, "batch_size": 128, "seed": 0,
      "robust_eval_n": 500, "adv_eps": 8.0, "grad_clip": 5.0}  # fmt: skip
PGD3 = {"adv_train": "pgd", "adv_steps": 3}
APGD5 = {"adv_train": "apgd", "adv_steps": 5}
TWIN = "cpu-fp-at"  # --fp's FP twin: the default start, and RSLAD's teacher
RSLAD3 = {"adv_train": "rslad", "adv_steps": 3, "teacher": TWIN}


def _twin_recipe() -> dict[str, Any]:
    """The FP twin's own recipe, read from robust_gpu's plan (its cpu-fp-at step), for the rows trained
    from scratch; the screen's other settings (CS) are the twin's too."""
    from hw_dq.train.config import TrainConfig

    step = next(s for s in plan_cpu() if s.kind == "train" and s.run == TWIN)
    return {k: step.cfg.get(k, getattr(TrainConfig(), k)) for k in ("adv_train", "epochs", "lr", "grad_clip")}


FP_RECIPE = _twin_recipe()
W2A2E8 = {"wbits": 2, "abits": 2, "end_bits": 8}
W075 = {"width": 0.75, "test_subset": 1000}  # per-epoch test accuracy on 1,000 images: the epoch is the cost
# name -> (label, settings). A run starts from init_from: --fp's FP twin when absent, another variant's run
# when it names one, random weights when None; a teacher is named the same way
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "ptq-w4a4": ("w4a4, PGD-3, 2 epochs at lr 0.0005", {"wbits": 4, "abits": 4, **SHORT}),  # robust_cpu
    "calib-w4a4": ("w4a4, PGD-3, 1 epoch at lr 1e-6 (ranges and BatchNorm calibrated, weights as the twin's)",
                   {"wbits": 4, "abits": 4, **PGD3, "epochs": 1, "lr": 1e-6}),
    "ptq-w4a4e8": ("w4a4 + 8-bit ends, PGD-3, 2 epochs at lr 0.0005",
                   {"wbits": 4, "abits": 4, "end_bits": 8, **PGD3, "epochs": 2, "lr": 0.0005}),
    "lr002-w4a4": ("w4a4, PGD-3, 4 epochs at lr 0.002", {"wbits": 4, "abits": 4, **PGD3, "epochs": 4, "lr": 0.002}),
    "pgd10-w4a4": ("w4a4, PGD-10, 6 epochs at lr 0.01",
                   {"wbits": 4, "abits": 4, "adv_train": "pgd", "adv_steps": 10, "epochs": 6, "lr": 0.01}),
    "ptq-w2a2e8": ("w2a2 + 8-bit ends, PGD-3, 2 epochs at lr 0.0005",
                   {"wbits": 2, "abits": 2, "end_bits": 8, **PGD3, "epochs": 2, "lr": 0.0005}),
    "lr005-w2a2e8": ("w2a2 + 8-bit ends, PGD-3, 6 epochs at lr 0.005",
                     {"wbits": 2, "abits": 2, "end_bits": 8, **PGD3, "epochs": 6, "lr": 0.005}),
    # the training attack: APGD-CE (AutoAttack's strongest gradient component) instead of PGD through the STE
    "apgd5-w4a4": ("w4a4, APGD-5, 2 epochs at lr 0.0005", {"wbits": 4, "abits": 4, **APGD5, "epochs": 2, "lr": 0.0005}),
    "apgd5-lr002-w4a4": ("w4a4, APGD-5, 4 epochs at lr 0.002",
                         {"wbits": 4, "abits": 4, **APGD5, "epochs": 4, "lr": 0.002}),
    "apgd5-lr005-w2a2e8": ("w2a2 + 8-bit ends, APGD-5, 6 epochs at lr 0.005",
                           {"wbits": 2, "abits": 2, "end_bits": 8, **APGD5, "epochs": 6, "lr": 0.005}),
    # distillation: the FP twin (the teacher) gives the soft labels the quantized student matches (Zi et al. 2021)
    "rslad3-w4a4": ("w4a4, RSLAD-3 from the FP twin, 2 epochs at lr 0.0005",
                    {"wbits": 4, "abits": 4, **RSLAD3, "epochs": 2, "lr": 0.0005}),
    "rslad3-lr005-w2a2e8": ("w2a2 + 8-bit ends, RSLAD-3 from the FP twin, 6 epochs at lr 0.005",
                            {"wbits": 2, "abits": 2, "end_bits": 8, **RSLAD3, "epochs": 6, "lr": 0.005}),
    # which half of w2a2 costs the robustness, 2-bit weights or 2-bit activations: lr005-w2a2e8's recipe
    "lr005-w2a4e8": ("w2a4 + 8-bit ends, PGD-3, 6 epochs at lr 0.005",
                     {"wbits": 2, "abits": 4, "end_bits": 8, **PGD3, "epochs": 6, "lr": 0.005}),
    "lr005-w4a2e8": ("w4a2 + 8-bit ends, PGD-3, 6 epochs at lr 0.005",
                     {"wbits": 4, "abits": 2, "end_bits": 8, **PGD3, "epochs": 6, "lr": 0.005}),
    "lr005-w2a3e8": ("w2a3 + 8-bit ends, PGD-3, 6 epochs at lr 0.005",
                     {"wbits": 2, "abits": 3, "end_bits": 8, **PGD3, "epochs": 6, "lr": 0.005}),
    # TRADES: the KL between the clean and the attacked output, a smoothness term rather than a worst-case loss
    "trades3-lr005-w2a2e8": ("w2a2 + 8-bit ends, TRADES-3 (beta 6), 6 epochs at lr 0.005",
                             {**W2A2E8, "adv_train": "trades", "adv_steps": 3, "epochs": 6, "lr": 0.005}),
    # a larger training eps: a 3-step attack through the STE finds less than APGD does (held-out PGD-10
    # 27% against APGD 10% for w2a2), so the training attack gets a larger ball to make up for it
    "eps12-lr005-w2a2e8": ("w2a2 + 8-bit ends, PGD-3 at 12/255, 6 epochs at lr 0.005",
                           {**W2A2E8, **PGD3, "adv_eps": 12.0, "epochs": 6, "lr": 0.005}),
    # the threshold margin (hw_dq.train.margin): quantized pre-activations kept off their rounding thresholds,
    # which the STE hides from the training attack and the update alike
    "margin10-lr005-w2a2e8": ("w2a2 + 8-bit ends, PGD-3 + threshold margin (weight 10), 6 epochs at lr 0.005",
                              {**W2A2E8, **PGD3, "act_margin": 10.0, "epochs": 6, "lr": 0.005}),
    "margin3-lr005-w2a2e8": ("w2a2 + 8-bit ends, PGD-3 + threshold margin (weight 3), 6 epochs at lr 0.005",
                             {**W2A2E8, **PGD3, "act_margin": 3.0, "epochs": 6, "lr": 0.005}),
    # threshold noise (hw_dq.train.margin): the opposite request, tolerate the level flips instead of avoiding them
    "noise05-lr005-w2a2e8": ("w2a2 + 8-bit ends, PGD-3 + threshold noise (0.5 steps), 6 epochs at lr 0.005",
                             {**W2A2E8, **PGD3, "act_noise": 0.5, "epochs": 6, "lr": 0.005}),
    # width: the same recipes on a 3/4-width CNV (2.25x the weights; a full-width FP epoch took 158 s on one core)
    "fp-w075": ("FP twin at 3/4 width (N-FGSM, 30 epochs; no fine-tune)",
                {**W075, "wbits": "float", "abits": "float", **FP_RECIPE, "init_from": None}),
    "lr005-w2a2e8-w075": ("w2a2 + 8-bit ends at 3/4 width, from the 3/4-width FP twin, PGD-3, 6 epochs at lr 0.005",
                          {**W075, **W2A2E8, **PGD3, "epochs": 6, "lr": 0.005, "init_from": "fp-w075"}),
    "ptq-w4a4-w075": ("w4a4 at 3/4 width, from the 3/4-width FP twin, PGD-3, 2 epochs at lr 0.0005",
                      {**W075, "wbits": 4, "abits": 4, **SHORT, "init_from": "fp-w075"}),
    "scratch-w2a2e8": ("w2a2 + 8-bit ends from scratch, the FP twin's recipe (N-FGSM, 30 epochs; no fine-tune)",
                       {**W2A2E8, **FP_RECIPE, "init_from": None}),
}  # fmt: skip
# committed models of robust_gpu's cpu arm, scored from their saved AutoAttack examples
REFERENCES = {
    "cpu-fp-at": "FP twin (N-FGSM, 30 epochs)",
    "cpu-vq-w4a4-pgd3-at": "w4a4, PGD-3, 6 epochs at lr 0.02 (robust_cpu before)",
    "cpu-vq-w4a4-at": "w4a4, N-FGSM, 10 epochs at lr 0.02",
    "cpu-vq-w2a2e8-at": "w2a2 + 8-bit ends, N-FGSM, 10 epochs at lr 0.02",
}
N, STRIDE, EPS = 500, 2, 8.0


def _images(data: Path) -> tuple[Any, Any]:
    import torch

    from hw_dq.data import load_split, to_float

    te = load_split("cifar10", "test", data).take(1000, 0)
    return to_float(torch.from_numpy(te.x[::STRIDE][:N])), torch.from_numpy(te.y[::STRIDE][:N]).long()


def _correct(model: Any, x: Any, y: Any) -> Any:
    from hw_dq.robust.attacks import predict

    return predict(model, x, batch_size=250) == y


def _train(name: str, cfg: dict[str, Any], work: Path, fp: Path, data: Path) -> dict[str, Any]:
    """Train a variant unless a finished run with the same configuration exists (a different one is an error)."""
    from hw_dq import run as rd
    from hw_dq.train.config import TrainConfig
    from hw_dq.train.loop import train

    def run_of(v: str | None) -> str | None:  # a variant's run, or --fp's FP twin
        return None if v is None else str(fp / TWIN if v == TWIN else work / v)

    paths = {k: run_of(cfg.get(k, TWIN if k == "init_from" else None)) for k in ("init_from", "teacher")}
    want = TrainConfig(**{**CS, **cfg, **paths, "data_dir": str(data)})
    out = work / name
    if (out / rd.MODEL).is_file():
        have = rd.read_json(out / rd.CONFIG)["train"]
        default = vars(TrainConfig())  # a field added since the run was made has its default there
        diff = [k for k, v in vars(want).items() if k not in (*paths, "data_dir") and have.get(k, default[k]) != v]
        if diff:
            raise SystemExit(f"finetune_screen: {out} was trained with other settings ({', '.join(diff)}); "
                             "move it away or pass another --work")  # fmt: skip
    else:  # the CLI's run lock: a second worker on the same row gets a one-line error, not a shared run
        with rd.run_lock(out, "finetune_screen"):
            train(want, out, resume=(out / rd.CHECKPOINT).is_file(), progress=False)
    rows = rd.read_jsonl(out / rd.METRICS)
    return {"epochs": len(rows), "train_s": sum(r.get("time_s", 0.0) for r in rows),
            "holdout_pgd10": [r.get("holdout_pgd_acc") for r in rows]}  # fmt: skip


def _screen(run: Path, x: Any, y: Any) -> dict[str, Any]:
    from hw_dq import run as rd
    from hw_dq.robust import autoattack as aa

    done = run / f"screen_{N}_{EPS:g}.json"
    if done.is_file():
        return json.loads(done.read_text())
    model, _ = rd.load_model(run, device="cpu")
    t = time.time()
    out = aa.run(model, x, y, EPS / 255, version="standard", seed=0, batch_size=250,
                 state_path=run / f"screen2_state_{N}_{EPS:g}", components=["apgd-ce", "apgd-t"])  # fmt: skip
    clean = _correct(model, x, y)
    res = {"clean": float(clean.float().mean()), "apgd": float((out.robust.bool() & clean).float().mean()),
           "breakdown": out.breakdown, "time_s": time.time() - t}  # fmt: skip
    rd.write_json(done, res)
    return res


def _reference(run: Path, x: Any, y: Any) -> dict[str, Any]:
    """A committed model's clean and AutoAttack-standard flags on the same 500 images (saved examples)."""
    from hw_dq import run as rd

    model, _ = rd.load_model(run, device="cpu")
    adv = rd.load_tensors(run / f"autoattack_x_adv_eps{EPS:g}.safetensors")[0]["x_adv"][::STRIDE][:N]
    clean = _correct(model, x, y)
    return {"clean": float(clean.float().mean()), "autoattack": float((clean & _correct(model, adv, y)).float().mean())}


def _carried(names: set[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The committed references, and the committed rows of the variants not rerun whose label and settings
    are still VARIANTS'."""
    from benchmarks.common import RESULTS

    path = RESULTS / "finetune_screen.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    refs = {k: r for k, r in old.get("references", {}).items() if r.get("label") == REFERENCES.get(k)}
    rows = {k: r for k, r in old.get("variants", {}).items()
            if k in names and [r.get("label"), r.get("config")] == list(VARIANTS[k])}  # fmt: skip
    return refs, rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, type=Path, help="folder with the CIFAR-10 .npz files")
    ap.add_argument("--fp", required=True, type=Path, help="robust_gpu --arm cpu's WORK folder (holds cpu-fp-at)")
    ap.add_argument("--work", required=True, type=Path, help="run directories of the variants")
    ap.add_argument("--only", default="", help="comma list of variants (default: all)")
    a = ap.parse_args(argv)
    only = [v for v in a.only.split(",") if v] or list(VARIANTS)
    bad = [v for v in only if v not in VARIANTS]
    if bad or not (a.fp / "cpu-fp-at" / "model.safetensors").is_file():
        what = f"unknown variant(s) {', '.join(bad)}" if bad else f"no finished cpu-fp-at under {a.fp}"
        print(f"finetune_screen: {what} (see --help)", file=sys.stderr)
        return 2
    import torch

    from hw_dq.robust.sanity import tolerance

    torch.set_num_threads(1)
    x, y = _images(a.data)
    refs, rows = _carried(set(VARIANTS) - set(only))
    examples = f"autoattack_x_adv_eps{EPS:g}.safetensors"  # refs carried over where the examples are not here
    here = [k for k in REFERENCES if (a.fp / k / examples).is_file()]
    refs |= {k: {"label": REFERENCES[k], **_reference(a.fp / k, x, y)} for k in here}
    for name in only:
        label, cfg = VARIANTS[name]
        rows[name] = {"label": label, "config": cfg, **_train(name, cfg, a.work, a.fp, a.data),
                      **_screen(a.work / name, x, y)}  # fmt: skip
        print(f"{name}: clean {rows[name]['clean']:.3f} APGD-CE+APGD-T {rows[name]['apgd']:.3f}", flush=True)
    rows = {k: rows[k] for k in VARIANTS if k in rows}  # the table in VARIANTS' order
    fp = refs.get("cpu-fp-at", {}).get("autoattack")
    table = [[f"{r['label']} (committed; AutoAttack standard)", f"{100 * r['clean']:.1f}%",
               f"{100 * r['autoattack']:.1f}%", "-"] for r in refs.values()]  # fmt: skip
    table += [[r["label"], f"{100 * r['clean']:.1f}%", f"{100 * r['apgd']:.1f}%",
               ", ".join(f"{v:.3f}" for v in r["holdout_pgd10"])] for r in rows.values()]  # fmt: skip
    m = machine()
    md = (
        f"# Quantized fine-tuning of a robust FP twin: how much it can take\n\nCommand: `python -m "
        f"benchmarks.finetune_screen --data DATA --fp runs/robust-cpu --work runs/scr`. {machine_line(m)}.\n\n"
        f"A screen: AutoAttack's APGD-CE + APGD-T (standard budgets) at 8/255 on {N} of the 1,000 evaluation "
        f"images (every second), seed 0; committed models from their saved AutoAttack-standard examples on the "
        f"same images. Rows not rerun by the last command are carried over from the committed results (their "
        f"training times are in the JSON). Two standard errors at the FP twin's accuracy: "
        f"{100 * tolerance(fp, N, 0.0) if fp is not None else float('nan'):.1f} points.\n\n"
        + md_table(
            ["fine-tune from the FP twin", "clean", "robust 8/255", "held-out PGD-10 per epoch (training eps)"], table
        )
    )
    write_results("finetune_screen", {"machine": m, "n": N, "stride": STRIDE, "eps": EPS, "seed": 0,
                                      "references": refs, "variants": rows}, md)  # fmt: skip
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
