"""Fault evaluations of a run's FINN build as results files (``target: "hw-faults"``) and their plots.

One JSON per evaluation under ``RUN_DIR/faults/``, with the top-level fields of the robustness
results family (``hw_dq.robust.results``: model, bits, beta, dataset, ``n_examples``, clean
accuracy...; no adversarial evaluations, so ``evaluations`` is empty) plus:

* ``memories``: stored bits per layer (weights, thresholds) and activation bits per image;
* ``random``: per rate, accuracy over trials (mean, std, 95% CI, every trial), expected and
  observed upsets per trial and per image;
* ``targeted``: accuracy after each Bit-Flip-Attack flip, where each flip landed (layer, node,
  memory, PE, SIMD lane, word, bit, old -> new value), and a random-flip baseline of the same count.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hw_dq.errors import HwDqError
from hw_dq.fpga.faults import FaultError, FaultyBuild, bits_table, check_rates, kinds_for

SCHEMA = "hw-dq/robustness/v1"  # the results family's schema id (kept here: this writer is self-contained)
TARGET = "hw-faults"
MODES = ("random", "targeted")
FOLDER = "faults"


def _check_args(mode: str, rates: Sequence[float], flips: int, trials: int, n: int | None, target: str) -> None:
    if mode not in MODES:
        raise FaultError(f"unknown --mode {mode!r}; choose from {', '.join(MODES)}")
    if n is not None and n < 1:
        raise FaultError(f"invalid --n {n}: must be >= 1")
    if mode == "random":
        check_rates(rates)
        if trials < 1:
            raise FaultError(f"invalid --trials {trials}: must be >= 1")
        kinds_for(target)
    elif flips < 1:
        raise FaultError(f"invalid --flips {flips}: the attack needs at least 1 flip")


def _header(run: Path, cfg: dict[str, Any], name: str, dataset: str, n: int, seed: int, clean: float) -> dict:
    from hw_dq.provenance import provenance
    from hw_dq.robust.results import now
    from hw_dq.version import __version__

    tr, mc = cfg.get("train", {}), cfg.get("model", {})
    adv = tr.get("adv_train", "none")
    return {
        "schema": SCHEMA, "name": name, "created": now(), "hw_dq_version": __version__, "run_dir": str(run),
        "model": mc.get("name", "?"), "width": mc.get("width"), "mode": cfg.get("mode", "FP"),
        "wbits": mc.get("wbits"), "abits": mc.get("abits"), "beta": float(tr.get("beta", 0.0)),
        "lipschitz_target": tr.get("lipschitz_target", "weight"), "adv_train": adv,
        "adv_eps": tr.get("adv_eps") if adv != "none" else None, "defense": None, "dataset": dataset,
        "split": "test", "n_examples": n, "seed": seed, "threat_model": "bit-flips", "eps_units": "none",
        "clean_acc": clean, "evaluations": [], "headline": {"eps": 0.0, "robust_acc": None, "attack": None},
        "sanity": {"verdict": "incomplete", "checks": [{"name": "gradient masking", "status": "skip",
                   "evidence": "fault injection in the accelerator's memories, not an input attack"}]},
        "target": TARGET, "provenance": provenance("cpu", seed),  # the simulator runs on the CPU
    }  # fmt: skip


def evaluate_faults(
    run_dir: str | Path,
    *,
    mode: str = "random",
    board: str | None = None,
    rates: Sequence[float] = (),
    target: str = "weights",
    layers: Sequence[int] | None = None,
    trials: int = 10,
    flips: int = 10,
    n: int | None = 500,
    attack_n: int = 128,
    baseline_trials: int = 3,
    seed: int = 0,
    name: str | None = None,
    data: str | None = None,
    data_dir: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Random upsets or the targeted Bit-Flip Attack on a run's build; writes ``RUN_DIR/faults/NAME.json``."""
    from hw_dq import run as rd
    from hw_dq.data import load_split
    from hw_dq.fpga.hwattack import bare_build, bare_test_set, find_build, uint8_grid

    _check_args(mode, rates, flips, trials, n, target)
    run = Path(run_dir)
    bare = bare_build(run)
    if bare and mode == "targeted":
        raise FaultError(
            f"{run} is a build of a bare QONNX file (build --onnx), with no PyTorch model: the targeted "
            "Bit-Flip Attack needs a run's Brevitas twin for its gradients; use --mode random"
        )
    if not bare and not (run / "config.json").is_file():
        raise HwDqError(f"{run} is not a run directory (no config.json) nor a FINN build folder; "
                        "train one with 'hw-dq train' or build a QONNX file with 'hw-dq build --onnx'")  # fmt: skip
    build = run if bare else find_build(run, board)
    fb = FaultyBuild(build)
    cfg = _bare_config(build, fb) if bare else rd.read_json(run / "config.json")
    mems = fb.select(kinds_for(target), layers) if mode == "random" else fb.select(("weights",), layers)
    tr = cfg.get("train", {})
    # the one definition of the evaluated images (a bare build: the given dataset, default the sample)
    ds = bare_test_set(n, seed, data, data_dir) if bare else rd.Run(run).test_set(n, seed, data, data_dir)
    x, y = (t.numpy() for t in ds.tensors())
    xu = uint8_grid(x)
    from hw_dq.fpga.faults import predict

    clean = float((predict(fb.clean, xu) == y).mean())
    name = name or (f"faults-random-{target}" if mode == "random" else "faults-targeted")
    result = _header(run, cfg, name, ds.name, len(y), seed, clean)
    table = bits_table(fb.memories)
    if bare:
        result["source"] = "a FINN build of a bare QONNX file (hw-dq build --onnx): no hw-dq run, no PyTorch model"
    result.update(build_dir=str(build), simulator="hw_dq.fpga.sim (checked bit-exact against FINN)",
                  fault_mode=mode, memories=table,
                  stored_bits={k: int(sum(r[k] for r in table)) for k in ("weights", "thresholds")},
                  activation_bits_per_image=int(sum(r["activations"] for r in table)))  # fmt: skip
    if progress:
        progress(f"{build}: clean accuracy {100 * clean:.2f}% on {len(y)} images; stored bits "
                 f"{result['stored_bits']}, activation bits/image {result['activation_bits_per_image']}")  # fmt: skip
    if mode == "random":
        from hw_dq.fpga.upsets import random_faults

        res = random_faults(fb, mems, rates, xu, y, trials, seed, progress)
        result["random"] = {"target": target, "layers": list(layers) if layers else None,
                            "bits_targeted": int(sum(m.n_bits for m in mems if m.kind != "activations")),
                            "activation_bits_targeted_per_image": int(sum(m.n_bits for m in mems
                                                                          if m.kind == "activations")),
                            "rates": [r.to_dict() for r in res]}  # fmt: skip
    else:
        from hw_dq.fpga.bfa import bit_flip_attack, random_weight_flips
        from hw_dq.run import load_model

        model, _ = load_model(run)
        att = load_split(data or tr.get("data", "sample"), "train", data_dir or tr.get("data_dir")).take(attack_n, seed)
        xa, ya = (t.numpy() for t in att.tensors())
        xa = uint8_grid(xa) / 255.0
        out = bit_flip_attack(fb, model, xa.astype(np.float32), ya, xu, y, flips, progress, layers)
        base = random_weight_flips(fb, xu, y, flips, baseline_trials, seed) if baseline_trials > 0 else []
        out.update(flips=flips, attack_split="train", baseline_random={
            "trials": len(base), "acc_mean": [float(np.mean(c)) for c in zip(*base, strict=True)] if base else [],
            "accs": base})  # fmt: skip
        out["flips_to_10pct"] = next((r["flip"] for r in out["curve"] if r["acc"] <= 0.10), None)
        result["targeted"] = out
    _check_finite(result)
    rd.write_json(run / FOLDER / f"{name}.json", result)
    rd.write_text(run / FOLDER / f"{name}.md", describe(result))
    return result


def _bare_config(build: Path, fb: FaultyBuild) -> dict[str, Any]:
    """A config-like description of a bare build: the bit widths its memories hold (None when mixed)."""

    def width(kind: str) -> int | None:
        bits = {m.bits for m in fb.memories if m.kind == kind}
        return bits.pop() if len(bits) == 1 else None

    from hw_dq.fpga.hwattack import bare_source

    cfg = bare_source(build)  # the description attack --on hw and certify give the same build
    cfg["model"].update(wbits=width("weights"), abits=width("activations"))
    return cfg


def _check_finite(obj: Any, where: str = "result") -> None:
    if isinstance(obj, float) and not math.isfinite(obj):
        raise FaultError(f"{where} is not finite ({obj})")
    if isinstance(obj, dict):
        for k, v in obj.items():
            _check_finite(v, f"{where}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _check_finite(v, f"{where}[{i}]")


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def describe(r: dict[str, Any]) -> str:
    """Markdown report: stored bits per layer, then the rate or flip curve."""
    lines = [f"# Faults in the accelerator of {r['run_dir']} ({r['name']})", "",
             f"{r['model']} w{r['wbits']}a{r['abits']} {r['mode']}, build {r['build_dir']}; clean accuracy "
             f"{_pct(r['clean_acc'])}% on {r['n_examples']} {r['dataset']} test images.", "",
             "| layer | node | PE | SIMD | weight bits (type, ram_style) | threshold bits (type, ram_style) | "
             "activation bits/image |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for m in r["memories"]:
        lines.append(f"| {m['layer']} | {m['node']} | {m['pe']} | {m['simd']} | {m['weights']} "
                     f"({m.get('weights_dtype', '-')}, {m.get('weights_ram', '-')}) | {m['thresholds']} "
                     f"({m.get('thresholds_dtype', '-')}, {m.get('thresholds_ram', '-')}) | "
                     f"{m['activations']} ({m.get('activations_dtype', '-')}) |")  # fmt: skip
    if "random" in r:
        rr = r["random"]
        lines += ["", f"## Random upsets in {rr['target']} ({rr['rates'][0]['trials']} trials per rate)", "",
                  "| rate | accuracy % | 95% CI | std | memory upsets/trial (expected) | activation upsets/image |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for e in rr["rates"]:
            lines.append(f"| {e['rate']:g} | {_pct(e['acc_mean'])} | +-{_pct(e['ci95'])} | {_pct(e['acc_std'])} | "
                         f"{e['mean_flips_memory']:.1f} ({e['expected_flips_memory']:.2f}) | "
                         f"{e['mean_flips_activation_per_image']:.2f} |")  # fmt: skip
    if "targeted" in r:
        t = r["targeted"]
        base = t["baseline_random"]["acc_mean"]
        lines += ["", f"## Bit-Flip Attack ({t['flips']} flips; gradients on {t['attack_batch']} train images)", "",
                  f"Flips to reach 10% accuracy: {t['flips_to_10pct'] or 'not reached'}.", "",
                  "| flip | accuracy % | random baseline % | layer | node | PE | SIMD lane | word | bit | value |",
                  "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for i, c in enumerate(t["curve"]):
            b = _pct(base[i]) if i < len(base) else "-"
            lines.append(f"| {c['flip']} | {_pct(c['acc'])} | {b} | {c['layer']} | {c['node']} | {c['pe']} | "
                         f"{c['simd_lane']} | {c['word']} | {c['bit']} | {c['old']:g} -> {c['new']:g} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def summary(r: dict[str, Any]) -> tuple[str, str]:
    """(curve summary, sample size) of one fault result, for ``hw-dq results``."""
    if "targeted" in r:
        t = r["targeted"]
        base = t["baseline_random"]["acc_mean"]
        reached = f"{t['flips_to_10pct']}" if t["flips_to_10pct"] else f"> {t['flips']}"
        last = f"{_pct(t['curve'][-1]['acc'])}" if t["curve"] else "-"
        text = f"Bit-Flip Attack: flips to 10% {reached}; after {t['flips']} flips {last}%" + (
            f" (random flips {_pct(base[-1])}%)" if base else ""
        )
        return text, f"{r['n_examples']} images; gradients on {t['attack_batch']}"
    rr = r["random"]
    pts = ", ".join(f"{e['rate']:g}: {_pct(e['acc_mean'])} +-{_pct(e['ci95'])}" for e in rr["rates"])
    trials = sorted({e["trials"] for e in rr["rates"]})
    where = rr["target"] + (f" (layers {', '.join(map(str, rr['layers']))})" if rr.get("layers") else "")
    return f"random upsets in {where}, accuracy % at rate: {pts}", (
        f"{r['n_examples']} images x {'/'.join(map(str, trials))} trials per rate (95% CI over trials)"
    )


def tabulate_faults(results: Sequence[dict[str, Any]]) -> str:
    """Markdown table of fault results (``target: "hw-faults"``): clean accuracy, curve summary, sample size."""
    head = ["model", "mode", "bits", "beta", "adv. train", "target", "clean", "faults", "sample"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        adv = r.get("adv_train") or "none"
        adv = adv if adv == "none" or r.get("adv_eps") is None else f"{adv}@{r['adv_eps']:g}"
        adv = "unknown" if "source" in r else adv  # a bare QONNX build: its training is not recorded
        bits = "fp32" if r.get("wbits") is None and r.get("abits") is None else f"w{r['wbits']}a{r['abits']}"
        curve, sample = summary(r)
        beta = "?" if "source" in r else f"{r.get('beta', 0.0):g}"  # a bare QONNX build: training unknown
        cells = [str(r["model"]), str(r["mode"]), bits, beta, adv,
                 "FPGA sim (bit flips)", _pct(r["clean_acc"]), curve, sample]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Accuracies in % on the bit-exact simulation of the FINN build; rates per stored bit."]
    return "\n".join(lines)


def load_fault_results(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    """Fault results from files or run directories (their ``faults/*.json``)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted((p / FOLDER).glob("*.json")) if (p / FOLDER).is_dir() else []
            if not found:
                raise FaultError(f"{p} has no fault results; run 'hw-dq faults {p} ...' first")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise FaultError(f"{p}: no such results file or run directory")
    out = []
    for f in files:
        try:
            obj = json.loads(f.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise FaultError(f"{f}: not valid JSON ({e})") from None
        if not isinstance(obj, dict) or obj.get("target") != TARGET:
            raise FaultError(f"{f} is not a fault result (target {TARGET!r})")
        out.append(obj)
    return out


def plot_faults(paths: Sequence[str | Path], out: str | Path) -> Path:
    """PNG: accuracy vs flips (targeted, with the random baseline) and vs rate (random), runs side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hw_dq.run import atomic_write

    results = load_fault_results(paths)
    runs = list(dict.fromkeys(r["run_dir"] for r in results))
    cmap = plt.get_cmap("tab10" if len(runs) <= 10 else "tab20")
    color = {d: cmap(i % cmap.N) for i, d in enumerate(runs)}  # one colour per run, in both panels
    fig, (ax_f, ax_r) = plt.subplots(1, 2, figsize=(12, 4.5))
    baseline = False
    for r in results:
        label = f"{Path(r['run_dir']).name} ({r['mode']} w{r['wbits']}a{r['abits']})"
        c = color[r["run_dir"]]
        if "targeted" in r:
            t = r["targeted"]
            ks = [0] + [x["flip"] for x in t["curve"]]
            ax_f.plot(ks, [100 * r["clean_acc"]] + [100 * x["acc"] for x in t["curve"]], "o-", color=c, label=label)
            base = t["baseline_random"]["acc_mean"]
            if base:
                ax_f.plot(ks, [100 * r["clean_acc"]] + [100 * b for b in base], "--", color=c)
                baseline = True
        if "random" in r:
            rr = r["random"]["rates"]
            pos = [e for e in rr if e["rate"] > 0]
            if pos:
                ax_r.errorbar([e["rate"] for e in pos], [100 * e["acc_mean"] for e in pos],
                              yerr=[100 * e["ci95"] for e in pos], marker="o", capsize=3, color=c,
                              label=f"{label}, {r['random']['target']}")  # fmt: skip
    if baseline:
        ax_f.plot([], [], "k--", label="dashed: random flips of the same count")
    ax_f.set(xlabel="bit flips (Bit-Flip Attack)", ylabel="accuracy on the accelerator (%)", title="targeted")
    ax_r.set(xlabel="upset rate per stored bit", ylabel="accuracy (%), 95% CI", title="random upsets")
    ax_r.set_xscale("log")
    many = len(runs) > 4  # legends below the panels, where they cover no curve
    for ax in (ax_f, ax_r):
        ax.axhline(10, color="grey", lw=0.8, ls=":")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            if many:
                ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
            else:
                ax.legend(fontsize=7)
    fig.tight_layout()
    dest = Path(out)
    atomic_write(dest, lambda p: fig.savefig(p, dpi=120, format="png", bbox_inches="tight"))
    plt.close(fig)
    return dest
