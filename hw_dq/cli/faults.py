"""CLI verb ``faults``: bit flips in a build's memories (random upsets, Bit-Flip Attack) and their plot."""

from __future__ import annotations

import argparse
import math
from typing import Any

from hw_dq.errors import HwDqError


def _rates(text: str) -> list[float]:
    out = []
    for part in text.split(","):
        try:
            r = float(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid rate {part!r}: give numbers like 1e-5,1e-4") from None
        if not (math.isfinite(r) and 0.0 <= r <= 1.0):
            raise argparse.ArgumentTypeError(f"invalid rate {part!r}: a bit-flip rate is a probability in [0, 1]")
        out.append(r)
    return out


def _layers(text: str) -> list[int]:
    try:
        return [int(p) for p in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid layer list {text!r}: give layer indices like 0,2") from None


def cmd_faults(a: argparse.Namespace) -> int:
    from hw_dq.fpga.faults_results import evaluate_faults, plot_faults

    if a.plot:
        if not a.runs or not a.out:
            raise HwDqError("--plot needs run directories (or fault result files) and --out FILE.png")
        print(f"plot: {plot_faults(a.runs, a.out)}")
        return 0
    if len(a.runs) != 1:
        raise HwDqError(f"give one run directory or build folder (got {len(a.runs)}); several only with --plot")
    if a.mode == "random" and not a.rate:
        raise HwDqError("--mode random needs --rate R[,R...] (upset probability per stored bit)")
    say = None if a.quiet else (lambda s: print(s, flush=True))
    r = evaluate_faults(
        a.runs[0], mode=a.mode, board=a.board, rates=a.rate or (), target=a.target, layers=a.layer,
        trials=a.trials, flips=a.flips, n=a.n, attack_n=a.attack_n, baseline_trials=a.baseline_trials,
        seed=a.seed, name=a.name, data=a.data, data_dir=a.data_dir, progress=say,
    )  # fmt: skip
    if "targeted" in r:
        t = r["targeted"]
        reached = t["flips_to_10pct"] or f"more than {a.flips}"
        print(f"Bit-Flip Attack: {100 * r['clean_acc']:.2f}% -> {100 * t['curve'][-1]['acc']:.2f}% after "
              f"{len(t['curve'])} flips (10% reached after {reached} flips)")  # fmt: skip
    print(f"results: {r['run_dir']}/faults/{r['name']}.json")
    return 0


def register(sub: Any) -> None:
    """Add the ``faults`` verb to the ``hw-dq`` sub-parsers."""
    f = sub.add_parser(
        "faults", help="bit flips in the accelerator's weights, thresholds and activations (random or targeted)"
    )
    f.add_argument("runs", nargs="*", metavar="RUN", help="run directory with a FINN build, or the build folder of "
                   "'hw-dq build --onnx FILE' (random mode only: no PyTorch model); several with --plot")  # fmt: skip
    f.add_argument("--board", help="which build of the run (default: its only one)")
    f.add_argument("--mode", choices=("random", "targeted"), default="random")
    f.add_argument("--rate", type=_rates, help="random: upset probability per stored bit, e.g. 1e-5,1e-4,1e-3")
    f.add_argument("--target", choices=("weights", "thresholds", "activations", "all"), default="weights",
                   help="random: which memories to upset (activations: transient, per image)")  # fmt: skip
    f.add_argument("--layer", type=_layers, help="only these layers (indices in the report's table), e.g. 0,2")
    f.add_argument("--trials", type=int, default=10, help="random: Monte Carlo fault patterns per rate")
    f.add_argument("--flips", type=int, default=10, help="targeted: number of progressive bit flips")
    f.add_argument("--n", type=int, default=500, help="test images to evaluate on")
    f.add_argument("--attack-n", type=int, default=128, help="targeted: attacker's train images for gradients")
    f.add_argument("--baseline-trials", type=int, default=3, help="targeted: random-flip baseline curves")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--name", help="results file stem under RUN/faults/")
    f.add_argument("--data", help="dataset (default: the run's)")
    f.add_argument("--data-dir")
    f.add_argument("--plot", action="store_true", help="plot the fault results of the RUNs (needs --out)")
    f.add_argument("--out", help="--plot: PNG file to write")
    f.add_argument("--quiet", action="store_true")
    f.set_defaults(func=cmd_faults)
