"""Rewrite absolute paths of the producing machine in committed results as repository-relative ones.

Results under ``benchmarks/results/`` were written with the absolute paths of the machine that
produced them (``run_dir``, ``init_from``, ``data_dir``, settings markers). This rewrites them
relative to the repository root (``benchmarks/results/reproduce/runs/fp``, ``../shared/data``);
:meth:`hw_dq.run.Run.resolve` finds such paths from the repository or from the run directory.
Idempotent; ``--check`` only lists what is left (exit 1 if anything).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# (absolute prefix on the producing machine, its repository-relative equivalent)
PREFIXES = [
    ("/work/repro-wt/", ""),  # the working copy the CPU-scale reproduction ran in
    ("/work/main/", ""),
    ("/tmp/gpu_repro/", "benchmarks/results/reproduce-gpu/"),  # the GPU reproduction's output folder
    ("/work/shared/data", "../shared/data"),  # the data folder next to the repository
]
ABSOLUTE = re.compile(r"(?<![\w.])/(?:work|tmp|home|root)/[^\s\"'`)]*")
SUFFIXES = (".json", ".md", ".settings")


def rewrite(text: str, path: Path) -> str:
    for old, new in PREFIXES:
        text = text.replace(old, new)
    if path.name == "amplification.settings":  # the runner keys these relative to its output folder
        text = re.sub(r'"benchmarks/results/reproduce(?:-gpu)?/runs/', '"runs/', text)
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="list absolute paths left; change nothing")
    a = p.parse_args(argv)
    files = [f for f in sorted((ROOT / "benchmarks" / "results").rglob("*")) if f.suffix in SUFFIXES]
    files.append(ROOT / "benchmarks" / "README.md")
    left = 0
    for f in files:
        text = f.read_text()
        new = text if a.check else rewrite(text, f)
        if new != text:
            f.write_text(new)
        for m in ABSOLUTE.findall(new):
            left += 1
            print(f"{f.relative_to(ROOT)}: {m}")
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(main())
