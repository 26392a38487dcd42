"""Write a class-balanced CIFAR-10 training subset (and the 1,000 evaluation images) as .npz files.

For running ``hw-dq reproduce`` where the full training set cannot be copied (the GPU run in
benchmarks/results/reproduce-gpu/ used 1,500 images per class, seed 0):

    .venv/bin/python -m benchmarks.cifar_subset ../shared/data OUT_DIR [--per-class 1500] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    from hw_dq.data import load_split

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data_dir")
    ap.add_argument("out")
    ap.add_argument("--per-class", type=int, default=1500)
    ap.add_argument("--n-test", type=int, default=1000, help="the test images hw-dq reproduce evaluates")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    tr = load_split("cifar10", "train", a.data_dir)
    rng = np.random.default_rng(a.seed)
    idx = np.sort(np.concatenate([rng.permutation(np.flatnonzero(tr.y == c))[: a.per_class] for c in range(10)]))
    # the same images (and order) that reproduce's take(n_eval, seed) picks from the full test set
    te = load_split("cifar10", "test", a.data_dir).take(a.n_test, a.seed)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / "cifar10_train_part1.npz", x=tr.x[idx], y=tr.y[idx])
    np.savez_compressed(out / "cifar10_test.npz", x=te.x, y=te.y)
    print(f"{len(idx)} training and {len(te)} test images written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
