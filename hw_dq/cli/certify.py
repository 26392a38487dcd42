"""CLI verb ``certify``: certified accuracy of a run's FINN accelerator (integer bounds) or PyTorch model (float)."""

from __future__ import annotations

import argparse
from typing import Any


def _levels(text: str) -> list[float]:
    try:
        vals = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None
    if not vals:
        raise argparse.ArgumentTypeError("empty list")
    return vals


def cmd_certify(a: argparse.Namespace) -> int:
    if a.on == "sw":
        return _certify_sw(a)
    from hw_dq.fpga.certify import certify_run
    from hw_dq.fpga.hwattack import bare_build, check_board

    if bare_build(a.run_dir):  # a build folder: --board, if given, must be the one it was built for
        check_board(a.run_dir, a.board)
    r = certify_run(
        a.run_dir, a.eps, board=a.board, n=a.n, seed=a.seed, name=a.name or "certified-hw", data=a.data,
        data_dir=a.data_dir, progress=not a.quiet,
    )  # fmt: skip
    cells = ", ".join(f"{b['eps']:g}/255 {100 * b['certified_acc']:.1f}%" for b in r["certified"])
    t = r["timing"]
    print(
        f"certified accuracy of the accelerator on {r['n_examples']} images (clean {100 * r['clean_acc']:.1f}%): "
        f"{cells}; bounds {t['bound_s_total']:.2f} s, clean simulation {t['simulator_clean_s']:.2f} s; "
        f"written to {a.run_dir}/attacks/{r['name']}.json"
    )
    return 0


def _certify_sw(a: argparse.Namespace) -> int:
    from hw_dq.api import certify

    r = certify(a.run_dir, a.eps, on="sw", board=a.board, n=a.n, seed=a.seed, name=a.name, data=a.data,
                data_dir=a.data_dir, progress=not a.quiet)  # fmt: skip
    cells = ", ".join(f"{b['eps']:g}/255 {100 * b['certified_acc']:.1f}%" for b in r["certified"])
    print(
        f"certified accuracy of the PyTorch model (float bounds) on {r['n_examples']} images (clean "
        f"{100 * r['clean_acc']:.1f}%): {cells}; bounds {r['timing']['bound_s_total']:.2f} s; "
        f"written to {a.run_dir}/attacks/{r['name']}.json"
    )
    return 0


def register(sub: Any) -> None:
    """Add the ``certify`` verb to the ``hw-dq`` sub-parsers."""
    c = sub.add_parser("certify", help="certified accuracy of the built accelerator (interval bounds, exact "
                       "integers) or, with --on sw, of the PyTorch model (float bounds)")  # fmt: skip
    c.add_argument("run_dir")
    c.add_argument("--on", choices=("hw", "sw"), default="hw",
                   help="hw: the accelerator's FINN build, integer bounds (default); sw: the PyTorch model, float "
                   "bounds (a float run, which has no build)")  # fmt: skip
    c.add_argument("--board", help="with --on hw: which build (RUN_DIR/build/BOARD); needed if the run has "
                   "several; with a build folder, its own board or nothing")  # fmt: skip
    c.add_argument("--eps", type=_levels, default=[1.0, 2.0, 4.0, 8.0], help="Linf radii in 1/255 (default 1,2,4,8)")
    c.add_argument("--n", type=int, help="test images (default all)")
    c.add_argument("--seed", type=int, default=0, help="which test images (default 0)")
    c.add_argument("--name", help="results file stem under RUN_DIR/attacks/ (default certified-hw or certified-sw)")
    c.add_argument("--data", help="dataset (default: the run's)")
    c.add_argument("--data-dir", help="local copy of the dataset")
    c.add_argument("--quiet", action="store_true")
    c.set_defaults(func=cmd_certify)
