"""CLI verbs of the evaluation stage: ``attack``, ``analyse``, ``reproduce``, ``results``."""

from __future__ import annotations

import argparse
from typing import Any

from hw_dq.errors import ConfigError


def _floats(text: str) -> list[float]:
    try:
        vals = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None
    if not vals:
        raise argparse.ArgumentTypeError("empty list")
    return vals


def _names(text: str) -> list[str]:
    return [t.strip().lower() for t in text.split(",") if t.strip()]


def _params(a: argparse.Namespace) -> Any:
    from hw_dq.robust.attacks import AttackParams

    keys = ("pgd_steps", "pgd_restarts", "apgd_iters", "apgd_targets", "square_queries")
    return AttackParams(**{k: getattr(a, k) for k in keys if getattr(a, k) is not None})


# flags of ``attack`` and what ``--on hw`` does with each: honoured, or refused in one line
_HW_REFUSED = {
    "defense": "--defense (input squeezers) is a PyTorch-side defense; the accelerator runs the model as built",
    "transfer_from": "--transfer-from is for --on sw; on the accelerator transfer-pgd/transfer-autoattack are crafted "
    "on the run's own PyTorch model",
    "version": "--version applies to autoattack on the PyTorch model; transfer-autoattack uses the standard version",
}


def cmd_attack_hw(a: argparse.Namespace) -> int:
    """``attack --on hw``: the threat models of a deployed accelerator, on its bit-exact simulation."""
    from hw_dq.fpga.hwattack import DEFAULT_HW_ATTACKS, evaluate_hw
    from hw_dq.robust.evaluate import result_name
    from hw_dq.robust.results import tabulate

    for flag, why in _HW_REFUSED.items():
        if getattr(a, flag) not in (None, "standard"):
            raise ConfigError(f"--on hw does not take {why}")
    name = result_name(a.run_dir, a.name, "robustness-hw", a.force)
    r = evaluate_hw(
        a.run_dir, a.attacks or list(DEFAULT_HW_ATTACKS), a.eps, board=a.board, n=a.n, seed=a.seed,
        params=_params(a), name=name, data=a.data, data_dir=a.data_dir, progress=not a.quiet,
        device=a.device, batch_size=a.batch_size, sanity=not a.no_sanity,
    )  # fmt: skip
    print(tabulate([r]))
    ag = r["agreement"]
    for s in r.get("skipped", []):
        print(f"skipped {s['attack']}: {s['reason']}")
    if ag["clean_acc_sw"] is None:
        versus = f"accelerator (simulated, no PyTorch model) on {ag['n_examples']} clean images: " + (
            f"{100 * ag['clean_acc_hw']:.1f}%"
        )
    else:
        versus = (
            f"accelerator (simulated) vs PyTorch on {ag['n_examples']} clean images: {100 * ag['clean_acc_hw']:.1f}% "
            f"vs {100 * ag['clean_acc_sw']:.1f}%, top-1 disagreement {100 * ag['disagreement_clean']:.2f}%"
        )
    print(f"{versus}; written to {a.run_dir}/attacks/{name}.json")
    return 0


def cmd_attack(a: argparse.Namespace) -> int:
    from hw_dq.robust.autoattack import check_version
    from hw_dq.robust.registry import check

    check_version(a.version or "standard")
    attacks = a.attacks or (None if a.on == "hw" else ["fgsm", "pgd"])
    for name in attacks or []:
        for e in a.eps:
            check(name, e, a.on)
    if a.on == "hw":
        return cmd_attack_hw(a)
    from hw_dq.fpga.hwattack import bare_build

    if bare_build(a.run_dir):
        raise ConfigError(f"{a.run_dir} is a FINN build without a PyTorch model: attack it with --on hw")
    from hw_dq.robust.evaluate import evaluate_run, result_name
    from hw_dq.robust.results import tabulate

    name = result_name(a.run_dir, a.name, "robustness", a.force)
    r = evaluate_run(
        a.run_dir, attacks, a.eps, n=a.n, seed=a.seed, batch_size=a.batch_size, name=name,
        params=_params(a), sanity=not a.no_sanity, transfer_from=a.transfer_from, defense=a.defense,
        data=a.data, data_dir=a.data_dir, progress=not a.quiet, device=a.device, version=a.version or "standard",
        force=True,
    )  # fmt: skip
    print(tabulate([r]))
    print(f"sanity: {r['sanity']['verdict']}; written to {a.run_dir}/attacks/{name}.json")
    return 0


def cmd_analyse(a: argparse.Namespace) -> int:
    from hw_dq.robust.analyse import analyse_runs

    rep = analyse_runs(a.run_dirs, out=a.out, attack=a.attack, eps=a.eps, n=a.n, seed=a.seed, device=a.device,
                       data_dir=a.data_dir)  # fmt: skip
    print(rep["table"])
    print(f"written to {a.out}")
    return 0


def cmd_reproduce(a: argparse.Namespace) -> int:
    from hw_dq.experiments.reproduce import reproduce

    reproduce(a.out, scale=a.scale, data_dir=a.data_dir, only=a.only, dry_run=a.dry_run, progress=not a.quiet)
    return 0


def cmd_results(a: argparse.Namespace) -> int:
    from hw_dq.fpga.faults_results import TARGET as FAULTS
    from hw_dq.fpga.faults_results import tabulate_faults
    from hw_dq.robust.results import load, tabulate

    results = load(a.paths)
    faults = [r for r in results if r.get("target") == FAULTS]  # bit flips in the accelerator: their own table
    attacks = [r for r in results if r.get("target") != FAULTS]
    if attacks or not faults:
        print(tabulate(attacks))
    if faults:
        print(("\n" if attacks else "") + tabulate_faults(faults))
    return 0


def register(sub: Any) -> None:
    """Add the evaluation verbs to the ``hw-dq`` sub-parsers."""
    from hw_dq.robust.registry import HW_ATTACKS, SW_ATTACKS

    p = sub.add_parser("attack", help="attack a trained run (PGD, AutoAttack, adaptive, Square, ...)")
    p.add_argument("run_dir")
    p.add_argument("--on", choices=("sw", "hw"), default="sw",
                   help="sw: the PyTorch model (default); hw: the bit-exact simulation of its FINN build")  # fmt: skip
    p.add_argument("--board", help="with --on hw: which build of the run (default: its only one); "
                   "with a build folder, its own board or nothing")  # fmt: skip
    p.add_argument("--attacks", type=_names, default=None, help="comma list (default fgsm,pgd; with --on hw "
                   "square,transfer-autoattack,hsj); " + ", ".join(SW_ATTACKS)
                   + "; on hw: " + ", ".join(HW_ATTACKS))  # fmt: skip
    p.add_argument("--version", default=None, help="AutoAttack version: standard (default), plus, rand")
    p.add_argument("--force", action="store_true", help="overwrite an existing result of the same --name")
    p.add_argument("--eps", type=_floats, default=[8.0], help="comma list in units of 1/255 (default 8)")
    p.add_argument("--n", type=int, help="test examples (default: the whole test set)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--name", default=None, help="results file stem under RUN_DIR/attacks/ (default: robustness, "
                   "or robustness-2, -3, ... if taken; robustness-hw with --on hw)")  # fmt: skip
    p.add_argument("--transfer-from", metavar="RUN_DIR", help="source model for transfer-pgd (e.g. the FP twin)")
    p.add_argument("--defense", help="input squeezers in the loop, e.g. bits:4, median:2, bits:5+median:2")
    p.add_argument("--data", help="dataset (default: the run's)")
    p.add_argument("--data-dir")
    p.add_argument("--no-sanity", action="store_true", help="skip the gradient-masking checks")
    p.add_argument("--device", default="auto", help="auto (the GPU if PyTorch sees one), cpu, cuda, cuda:1 ...")
    g = p.add_argument_group("attack budgets")
    g.add_argument("--pgd-steps", type=int)
    g.add_argument("--pgd-restarts", type=int)
    g.add_argument("--apgd-iters", type=int)
    g.add_argument("--apgd-targets", type=int)
    g.add_argument("--square-queries", type=int)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_attack)

    p = sub.add_parser("analyse", help="layer-wise error amplification of FP/VQ/DQ runs (table + PNG)")
    p.add_argument("run_dirs", nargs="+")
    p.add_argument("--out", default="runs/analyse", help="directory for amplification.json/.md/.png")
    p.add_argument("--attack", default="pgd", help="attack crafting x' (default pgd)")
    p.add_argument("--eps", type=float, default=8.0, help="Linf eps in 1/255 (default 8)")
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (the GPU if PyTorch sees one), cpu, cuda ...")
    p.add_argument("--data-dir", help="directory of the runs' dataset (default: each run's own)")
    p.set_defaults(func=cmd_analyse)

    p = sub.add_parser("reproduce", help="the paper's experiment at CPU scale (resumable)")
    p.add_argument("--out", default="runs/reproduce", help="a fresh folder under runs/ (never the committed results)")
    p.add_argument("--scale", default="cpu", help="cpu (the CPU-scale plan, hours), smoke (minutes), or a JSON file")
    p.add_argument("--data-dir", help="CIFAR-10 .npz directory (default ../shared/data when present)")
    p.add_argument("--only", help="comma list of run names to do (default all)")
    p.add_argument("--dry-run", action="store_true", help="print the plan only")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_reproduce)

    p = sub.add_parser("results", help="tabulate results JSON files (files or directories)")
    p.add_argument("paths", nargs="+")
    p.set_defaults(func=cmd_results)
