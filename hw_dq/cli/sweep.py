"""CLI verb ``sweep``: bits, width, Lipschitz control and adversarial training against FPGA cost (Optuna)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from hw_dq.errors import ConfigError


def cmd_sweep(a: argparse.Namespace) -> int:
    from hw_dq.experiments.sweep import report, sweep

    if a.min_fps is not None and (not math.isfinite(a.min_fps) or a.min_fps < 0):
        raise ConfigError(f"invalid --min-fps {a.min_fps}: give a throughput >= 0 (images/s)")
    if a.report:
        if a.out is not None:
            raise ConfigError("--report reads the sweep folder given as the argument; drop --out")
        r = report(a.target, storage=a.storage, min_fps=a.min_fps or 0.0, final=a.final, progress=not a.quiet)
        front = ", ".join(str(n) for n in r["front"]) or "-"
        print(f"report: {Path(a.target) / 'report.md'} (front: trials {front}; plots pareto_robust_fps.png, "
              "pareto_robust_lut.png)")  # fmt: skip
        return 0
    if a.final or a.min_fps is not None:
        raise ConfigError("--final and --min-fps go with --report (hw-dq sweep SWEEP_DIR --report)")
    if a.out is None:  # a fresh folder under runs/, named after the study (never the committed results)
        from hw_dq.experiments.sweep import load_spec

        a.out = str(Path("runs") / "sweep" / load_spec(a.target).name)
    counts = sweep(a.target, a.out, storage=a.storage, progress=not a.quiet)
    print(f"done: {a.out} ({', '.join(f'{k.lower()} {v}' for k, v in sorted(counts.items()))}); "
          f"report: hw-dq sweep {a.out} --report")  # fmt: skip
    return 0


def register(sub: Any) -> None:
    """Add the ``sweep`` verb to the ``hw-dq`` sub-parsers."""
    s = sub.add_parser(
        "sweep",
        help="Pareto front of robustness x FPGA cost over bits, width, beta, adversarial training (Optuna)",
        description="hw-dq sweep SPEC --out SWEEP_DIR runs (or resumes, or joins) a study; "
        "hw-dq sweep SWEEP_DIR --report writes its Pareto front. See docs/sweep.md.",
    )
    s.add_argument("target", metavar="SPEC|SWEEP_DIR",
                   help="a SPEC file (JSON/YAML, or a shipped name: sweep_tiny, sweep_pynq_cpu); with --report "
                   "the sweep folder")  # fmt: skip
    s.add_argument(
        "--out",
        metavar="SWEEP_DIR",
        help="sweep folder: run directories, the SQLite study, the report (default: runs/sweep/<the SPEC's name>)",
    )
    s.add_argument("--storage", metavar="URL",
                   help="a shared study (postgresql://USER:PASS@HOST:PORT/DB): every worker given it joins the same "
                   "study (default: SQLite SWEEP_DIR/study.db)")  # fmt: skip
    s.add_argument("--report", action="store_true", help="write SWEEP_DIR/report.md and the Pareto plots")
    s.add_argument("--min-fps", type=float, help="with --report: the best configuration per board at this throughput")
    s.add_argument("--final", action="store_true",
                   help="with --report: re-evaluate the front with the SPEC's full standard ('final')")  # fmt: skip
    s.add_argument("--quiet", action="store_true", help="no progress output")
    s.set_defaults(func=cmd_sweep)
