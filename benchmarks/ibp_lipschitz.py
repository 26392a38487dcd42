"""Does Lipschitz control tighten certified (IBP) bounds? IBP training with and without each Lipschitz form.

Issue 15, item 3. One shared start on the embedded CIFAR-10 sample (tiny model, width 1: a float
run, then w2a2 QAT from it), then from that start (``init_from``) the same fine-tune in the
ordinary training loop (``hw_dq.api.train``: same epochs, SGD, learning rate, batch order, IBP eps
ramp to ``--train-eps``/255 and kappa 1 -> 0.5) for each variant; only the Lipschitz control
differs: none, the DQ penalty on the BN-folded operator (two strengths), the DQ penalty on the raw
weight (the paper's form), the per-step spectral projection, BatchNorm with a bounded gain, and the
cross-entropy-only control. Each is built with FINN for the Pynq-Z1 and certified on the
accelerator's integer graph (``hw_dq.api.certify``) at 1/255 and 2/255; the float IBP certificate
(``hw_dq.nn.ibp.certified_fraction``) on the same images beside it. Resumable: a variant whose run
directory holds a finished model and a certificate for the same images is read back, not redone.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python -m benchmarks.ibp_lipschitz [--epochs 6] [--n 500]
        [--work runs/ibp-lipschitz] [--project-c C]

Writes benchmarks/results/ibp_lipschitz.{json,md}.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, machine, machine_line, md_table

ROOT = Path(__file__).resolve().parents[1]
BOARD = "Pynq-Z1"
EPS = (1.0, 2.0)
CERT = "certified-hw"


def variants(project_c: list[float], bn_gain: list[float], strong_beta: float) -> list[tuple[str, str, dict[str, Any]]]:
    """(name, description, TrainConfig overrides on top of the shared IBP fine-tune) per variant."""
    out = [
        ("ce", "CE only (control, no IBP)", {"adv_train": "none"}),
        ("ibp", "IBP alone", {}),
        ("ibp+dq-bnf-1e-4", "IBP + DQ penalty, BN-folded, beta 1e-4", {"beta": 1e-4, "lipschitz_target": "bn_folded"}),
        (f"ibp+dq-bnf-{strong_beta:g}", f"IBP + DQ penalty, BN-folded, beta {strong_beta:g}",
         {"beta": strong_beta, "lipschitz_target": "bn_folded"}),
        ("ibp+dq-weight-1e-4", "IBP + DQ penalty, raw weight (paper), beta 1e-4",
         {"beta": 1e-4, "lipschitz_target": "weight"}),
    ]  # fmt: skip
    out += [(f"ibp+project-{c:g}", f"IBP + spectral projection, BN-folded, C {c:g}",
             {"lipschitz_project": c, "lipschitz_target": "bn_folded"}) for c in project_c]  # fmt: skip
    out += [(f"ibp+bn-gain-{g:g}", f"IBP + bounded BN gain, G {g:g}", {"bn_gain_max": g}) for g in bn_gain]
    return out


def _seeds(text: str) -> list[int]:
    """A comma-separated list of distinct non-negative integer seeds, 0 first (argparse type)."""
    try:
        vals = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers, e.g. 0,1,2") from None
    if not vals or vals[0] != 0 or min(vals) < 0 or len(set(vals)) != len(vals):
        raise argparse.ArgumentTypeError(f"{text!r}: give distinct seeds >= 0 starting with 0, e.g. 0,1,2")
    return vals


def _one_line(msg: str) -> None:
    """A bad command line: one line saying what is wrong, exit code 2 (no usage block)."""
    print(f"ibp_lipschitz: {msg} (see --help)", file=sys.stderr)
    sys.exit(2)


def _floats(text: str) -> list[float]:
    """A comma-separated list of positive numbers (argparse type)."""
    try:
        vals = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers, e.g. 1,2") from None
    if not vals or not all(math.isfinite(v) and v > 0 for v in vals):
        raise argparse.ArgumentTypeError(f"{text!r}: give positive finite numbers, e.g. 1,2")
    return vals


def _fit(out: Path, **options: Any) -> tuple[float, str | None]:
    """Train into ``out`` (continued when a killed run left a checkpoint); (seconds, divergence message)."""
    from hw_dq import api
    from hw_dq import run as rd
    from hw_dq.errors import ConfigError

    if (out / rd.MODEL).is_file():
        return 0.0, None
    t0 = time.perf_counter()
    try:
        api.train(out, resume=(out / rd.CHECKPOINT).is_file(), progress=True, **options)
    except ConfigError as e:  # the loop stops cleanly on a non-finite loss (checkpoint intact)
        if "diverged" not in str(e):
            raise
        return time.perf_counter() - t0, str(e)
    return time.perf_counter() - t0, None


def _certified(run: Path, n: int) -> dict[str, Any] | None:
    """The run's certificate when it covers ``EPS`` on ``n`` images with seed 0 (else None)."""
    from hw_dq import run as rd

    path = run / rd.ATTACKS_DIR / f"{CERT}.json"
    if not path.is_file():
        return None
    r = rd.read_json(path)
    done = {b["eps"] for b in r.get("certified", [])}
    return r if r.get("n_examples") == n and r.get("seed") == 0 and set(EPS) <= done else None


def evaluate(run: Path, n: int) -> dict[str, Any]:
    """Build (if needed), certify the accelerator, and the float IBP certificate on the same images."""
    from hw_dq import api
    from hw_dq import run as rd
    from hw_dq.nn.ibp import certified_fraction

    build_s = 0.0
    if not (run / "build" / BOARD / "dataflow_model.onnx").is_file():
        t0 = time.perf_counter()
        api.build(run, BOARD, target_fps=1000)
        build_s = time.perf_counter() - t0
    r = _certified(run, n) or api.certify(run, list(EPS), board=BOARD, n=n, seed=0, name=CERT)
    model, _ = rd.load_model(run)
    x, y = rd.Run(run).test_set(n, 0).tensors()
    sw = {f"{e:g}": certified_fraction(model, x, y, e / 255) for e in EPS}
    metrics = rd.read_jsonl(run / rd.METRICS)
    last = metrics[-1]
    blocks = {f"{b['eps']:g}": b for b in r["certified"]}
    final = {k: b["layers"][-1] for k, b in blocks.items() if b["layers"]}  # the last thresholded layer
    return {
        "clean_acc_hw": r["clean_acc"],
        "certified_hw": {k: b["certified_acc"] for k, b in blocks.items()},
        "n_certified_hw": {k: b["n_certified"] for k, b in blocks.items()},
        "ibp_certified_sw": sw,
        "layers_hw": {k: b["layers"] for k, b in blocks.items()},
        "final_layer_hw": final,
        "test_acc_float_200": last.get("test_acc"),
        "mean_op_norm": last.get("mean_op_norm"),
        "lipschitz_bound": last.get("lipschitz_bound"),
        "op_norms": [row["norm_folded"] for row in rd.read_json(run / "lipschitz.json").get("layers", [])],
        "train_s": sum(float(m.get("time_s", 0.0)) for m in metrics),
        "build_s": build_s,
        "bound_s": r["timing"]["bound_s_total"],
    }


def _variant(run: Path, options: dict[str, Any], n: int) -> dict[str, Any]:
    """Train (or read back) and evaluate one variant at one seed; a diverged run is recorded, not retried."""
    from hw_dq import run as rd

    marker = run / "diverged.json"
    if marker.is_file():
        return rd.read_json(marker)
    secs, err = _fit(run, **options)
    if err is not None:
        rd.write_json(marker, {"diverged": err, "seconds": secs})
        return {"diverged": err, "seconds": secs}
    return evaluate(run, n)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _se2(p: float, n: int) -> float:
    """Two binomial standard errors, 2 sqrt(p(1-p)/n) (floored at about one image, as everywhere in hw-dq)."""
    from hw_dq.robust.sanity import tolerance

    return tolerance(p, n, 0.0)


def _per_seed(v: dict[str, Any], key: str) -> dict[str, float]:
    """A metric per fine-tune seed: accelerator-certified accuracy at 2/255 or clean accuracy (diverged left out)."""
    reps = v.get("replicates", {})
    return {s: (r["certified_hw"]["2"] if key == "cert2" else r[key]) for s, r in reps.items() if "certified_hw" in r}


def verdict(res: dict[str, Any], n: int) -> str:
    """Whether any Lipschitz form raised accelerator-certified accuracy at 2/255 over IBP alone by > 2 SE:
    on every fine-tune seed (the headline), and on seed 0 alone (the single-run rule)."""
    base = res["variants"].get("ibp", {})
    b2, bclean = _per_seed(base, "cert2"), _per_seed(base, "clean_acc_hw")
    if "0" not in b2:
        return "**Verdict:** none: the IBP-alone run did not finish."
    forms = {k: v for k, v in res["variants"].items() if k not in ("ce", "ibp")}
    every, seed0, counts = [], {"above": [], "within": [], "below": []}, []
    for name, v in forms.items():
        mine, clean = _per_seed(v, "cert2"), _per_seed(v, "clean_acc_hw")
        seeds = [s for s in b2 if s in mine]
        d = {s: mine[s] - b2[s] for s in seeds}
        wins = [s for s in seeds if d[s] > _se2(b2[s], n)]
        counts.append(
            f"{name} {len(wins)}/{len(b2)}" + (f" (mean {100 * sum(d.values()) / len(d):+.1f} pt)" if d else "")
        )
        if seeds and len(wins) == len(b2):
            dc = sum(clean[s] - bclean[s] for s in seeds) / len(seeds)
            gains = ", ".join(f"{100 * d[s]:+.1f}" for s in seeds)
            every.append(f"{name} ({gains} pt; clean {100 * dc:+.1f} pt on average)")
        if "0" not in mine:
            seed0["below"].append(f"{name} (diverged)")
            continue
        band = "above" if d["0"] > _se2(b2["0"], n) else "below" if d["0"] < -_se2(b2["0"], n) else "within"
        seed0[band].append(f"{name} ({100 * d['0']:+.1f} pt)")
    k = len(b2)
    head = (
        f"**Verdict:** {'YES' if every else 'NO'}: "
        + (f"{'; '.join(every)} raised" if every else "no Lipschitz form raised")
        + f" certified accuracy at 2/255 on the accelerator over IBP alone by more than two binomial standard "
        f"errors (2 sqrt(p(1-p)/n), p = IBP alone's at that seed, n = {n}) on every one of the {k} fine-tune "
        f"seed(s) ({', '.join(b2)}; IBP alone {' / '.join(f'{100 * x:.1f}' for x in b2.values())}%)."
    )
    single = (
        f"Seed 0 alone (IBP alone {100 * b2['0']:.1f}%, 2 SE = {100 * _se2(b2['0'], n):.1f} pt): "
        + "; ".join(f"{band} 2 SE: {', '.join(v)}" for band, v in seed0.items() if v)
        + "."
    )
    per = f"Seeds won, per form: {'; '.join(counts)}." if k > 1 else ""
    return " ".join(x for x in (head, single, per) if x)


def _spread(per_seed: dict[str, float]) -> str:
    """``a / b / c (mean m)`` in percent over seeds; '-' without replicates."""
    if len(per_seed) < 2:
        return "-"
    vals = list(per_seed.values())
    return " / ".join(f"{100 * x:.1f}" for x in vals) + f" (mean {100 * sum(vals) / len(vals):.1f})"


def main(argv: list[str] | None = None) -> int:
    from hw_dq import run as rd

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=6, help="fine-tune epochs of every variant (default 6)")
    ap.add_argument("--start-epochs", type=int, default=6, help="QAT epochs of the shared start (after 3 float)")
    ap.add_argument("--work", default="runs/ibp-lipschitz", help="run directories (default runs/ibp-lipschitz)")
    ap.add_argument("--n", type=int, default=500, help="test images certified (default 500)")
    ap.add_argument("--train-eps", type=float, default=2.2, help="IBP training radius in 1/255 (default 2.2)")
    ap.add_argument("--lr", type=float, default=0.01, help="fine-tune SGD peak learning rate, cosine (default 0.01)")
    ap.add_argument("--project-c", type=_floats, default=[1.0, 2.0], help="spectral projection bounds C (default 1,2)")
    ap.add_argument("--bn-gain", type=_floats, default=[1.0, 2.0], help="bounded BN gains G (default 1,2)")
    ap.add_argument("--strong-beta", type=float, default=1e-3, help="the stronger BN-folded beta (default 1e-3)")
    ap.add_argument(
        "--seeds",
        type=_seeds,
        default=[0, 1, 2],
        help="fine-tune seeds (batch order) from the one seed-0 start; 0 first (default 0,1,2)",
    )
    ap.add_argument("--only", default="", help="comma-separated variant names to run (default all)")
    ap.error = _one_line  # type: ignore[method-assign]
    a = ap.parse_args(argv)
    if a.epochs < 1 or a.n < 1 or not (math.isfinite(a.train_eps) and a.train_eps > 0):
        print("ibp_lipschitz: --epochs and --n must be >= 1 and --train-eps a positive number", file=sys.stderr)
        return 2
    work = Path(a.work) if Path(a.work).is_absolute() else ROOT / a.work
    common = dict(model="tiny", width=1.0, wbits=2, abits=2, data="sample", seed=0, train_subset=4000,
                  test_subset=200, batch_size=64)  # fmt: skip
    t_start = time.perf_counter()
    _fit(work / "fp", **{**common, "wbits": "float", "abits": "float"}, epochs=3, lr=0.05)
    _fit(work / "start", **common, epochs=a.start_epochs, lr=0.01, init_from=str(work / "fp"))
    start_s = sum(float(m.get("time_s", 0.0)) for r in ("fp", "start") for m in rd.read_jsonl(work / r / rd.METRICS))
    # every variant: the same start, epochs, SGD schedule, batch order and IBP ramp; robust_eval_n 0 keeps
    # all 4,000 images in training and ends with the last epoch's weights (no PGD-based early stopping)
    tune = dict(common, epochs=a.epochs, lr=a.lr, init_from=str(work / "start"), adv_train="ibp",
                adv_eps=a.train_eps, ibp_kappa=0.5, robust_eval_n=0)  # fmt: skip
    chosen = {s for s in a.only.split(",") if s}
    res: dict[str, Any] = {
        "machine": machine(), "model": "tiny width 1 w2a2, embedded CIFAR-10 sample (4,000 train images)",
        "board": BOARD, "n_test": a.n, "seed": 0, "seeds": a.seeds, "eps_255": list(EPS), "args": vars(a),
        "command": "OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python -m benchmarks.ibp_lipschitz "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "start": {"fp_epochs": 3, "qat_epochs": a.start_epochs, "train_s": start_s},
        "finetune": {k: v for k, v in tune.items() if k != "init_from"}, "variants": {},
    }  # fmt: skip
    res["start"]["eval"] = evaluate(work / "start", a.n)
    for name, desc, over in variants(a.project_c, a.bn_gain, a.strong_beta):
        if chosen and name not in chosen:
            continue
        reps = {}
        for seed in a.seeds:  # seed 0 in <work>/<name>, the others in <work>/<name>-seed<k>
            run = work / (name if seed == 0 else f"{name}-seed{seed}")
            reps[str(seed)] = _variant(run, {**tune, **over, "seed": seed}, a.n)
            print(f"[{name} seed {seed}] {reps[str(seed)].get('certified_hw', 'diverged')}", flush=True)
        res["variants"][name] = {"description": desc, "overrides": over, **reps["0"], "replicates": reps}
    res["total_s"] = time.perf_counter() - t_start
    text = report(res, a)
    print(text)
    rd.write_json(RESULTS / "ibp_lipschitz.json", res)
    rd.write_text(RESULTS / "ibp_lipschitz.md", text.rstrip() + "\n")
    return 0


def report(res: dict[str, Any], a: argparse.Namespace) -> str:
    """The markdown page: table, set-up, verdict."""
    rows = []
    for name, v in [("start (QAT, no fine-tune)", res["start"]["eval"]), *res["variants"].items()]:
        if "diverged" in v:
            rows.append([name, "diverged", *["-"] * 12])
            continue
        fl = v["final_layer_hw"].get("2", {})
        growth = " / ".join("-" if r["growth"] is None else f"{r['growth']:.2f}x" for r in v["layers_hw"]["2"])
        rows.append([
            name, _pct(v["clean_acc_hw"]), _pct(v["certified_hw"]["1"]), _pct(v["certified_hw"]["2"]),
            _pct(v["ibp_certified_sw"]["1"]), _pct(v["ibp_certified_sw"]["2"]),
            f"{fl.get('mean_width', float('nan')):.3f}", growth, f"{v['mean_op_norm']:.2f}",
            f"{v['lipschitz_bound']:.3g}", f"{v['train_s']:.0f}", _spread(_per_seed(v, "cert2")),
            _spread(_per_seed(v, "clean_acc_hw")),
        ])  # fmt: skip
    table = md_table(
        ["variant", "clean (accel.)", "certified 1/255 (accel.)", "certified 2/255 (accel.)",
         "IBP-certified 1/255 (float)", "IBP-certified 2/255 (float)",
         "last thresholded layer @2/255: mean width (levels)", "width growth per thresholded layer @2/255",
         "mean BN-folded op norm", "network bound",
         "train s", "certified 2/255 (accel.) per seed, %", "clean (accel.) per seed, %"], rows)  # fmt: skip
    ft = res["finetune"]
    return (
        f"# Does Lipschitz control tighten certified bounds? ({res['model']})\n\n"
        f"Machine: {machine_line(res['machine'])}.\n\nCommand: `{res['command']}` "
        f"(total {res['total_s']:.0f} s this invocation; finished variants are read back, not redone).\n\n"
        f"All columns but the last two: fine-tune seed 0.\n\n{table}\n\n{verdict(res, res['n_test'])}\n\n"
        f"Set-up: shared start = 3 float epochs, then {res['start']['qat_epochs']} w2a2 QAT epochs from it "
        f"({res['start']['train_s']:.0f} s). Every variant starts from it (`init_from`) and trains {ft['epochs']} "
        f"epochs in the ordinary loop (`hw_dq.api.train`): SGD lr {ft['lr']:g} cosine, batch {ft['batch_size']}, "
        f"seeds {', '.join(map(str, res['seeds']))} (batch order; the start is seed 0's), "
        f"all 4,000 sample training images (`robust_eval_n` 0: no PGD hold-out, last epoch's weights), "
        f"`adv_train ibp` with eps ramped to {ft['adv_eps']:g}/255 and kappa 1 -> {ft['ibp_kappa']:g} "
        f"(the loop's default ramp), the CE control with `adv_train none`; only the Lipschitz control differs. "
        f"Evaluation: FINN build for the {res['board']}, `hw_dq.api.certify` (sound integer interval bounds "
        f"on the accelerator's graph) at 1/255 and 2/255 on {res['n_test']} embedded-sample test images, seed 0; "
        f"float IBP (`hw_dq.nn.ibp.certified_fraction`) on the same images. Interval widths: the accelerator's "
        f"thresholded layers (the tiny model has two; the classifier's logit differences follow), mean interval "
        f"width in output levels at 2/255, and each layer's relative width over the input box's relative width "
        f"(the certify result's 'growth'; all values in the JSON). Op norm and bound: the train "
        f"loop's last metrics row (BN-folded quantized operators). Train s: the loop's epoch times.\n"
    )


if __name__ == "__main__":
    sys.exit(main())
