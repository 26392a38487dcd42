"""How fast an input box's interval grows through a freshly built CNV, relative to the signal.

Interval bound propagation certifies nothing once an interval is wider than the signal it brackets.
For every activation quantizer after a layer, this prints the mean radius of the interval entering it
over the standard deviation of the interval centres (BatchNorm in training mode with the clean
batch's statistics, as certified training sees it), for the half-width CNV at w4a4 with learned and
with fixed activation ranges, each with the default initialisation and with the IBP initialisation of Shi et al. 2021
(``hw_dq.nn.ibp.ibp_init_``). The first column is the input box.

    OMP_NUM_THREADS=1 python -m benchmarks.ibp_growth [--eps 2.2] [--n 128]

Writes benchmarks/results/ibp_growth.{json,md}; about 10 s on one core.

With ``--runs RUN ...`` it measures trained runs instead (an unfinished one from its last checkpoint), in
eval mode on embedded-sample test images, at several radii, with the box before the input quantizer's
rounding (``relax_input``, as ``--ibp-relax-input`` trains it) and the fraction of images its bounds
certify there: ``benchmarks/results/ibp_growth_trained.{json,md}``.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any

from benchmarks.common import machine, machine_line, md_table, write_results


def relative_widths(act_range: str, init: str, eps: float, n: int, seed: int = 0) -> list[float]:
    """Mean radius over the centres' standard deviation: the input box, then each activation's input."""
    import torch

    from hw_dq.data import load_split
    from hw_dq.nn import ibp
    from hw_dq.nn.models import create_model

    x, y = load_split("sample", "train").take(n, seed=seed).tensors()
    torch.manual_seed(seed)
    model = create_model("cnv", 4, 4, width=0.5, act_range=act_range)
    if init == "ibp":
        ibp.ibp_init_(model)
    model.train()
    return widths(model, x, y, eps)[0]


def widths(model: Any, x: Any, y: Any, eps: float, relax_input: bool = False) -> tuple[list[float], float, float]:
    """(relative widths: the input box, then each activation's input; the fraction of images certified;
    the cross-entropy of the worst-case logits) for the box of radius ``eps``/255 around ``x``."""
    import torch
    from torch.nn import functional as F  # noqa: N812

    from hw_dq.nn import ibp

    rec: list = []
    with torch.no_grad():
        lb = ibp.ibp_margins(model, x, y, eps / 255, record=rec, relax_input=relax_input)
        ce = float(F.cross_entropy(-lb, y))
        lb[torch.arange(len(y)), y] = 1.0
        cert = float((lb > 0).all(1).float().mean())
    return [float(((hi - lo) / 2).mean() / ((hi + lo) / 2).std()) for lo, hi in rec], cert, ce


def trained(runs: list[str], radii: list[float], n: int) -> int:
    """The relative widths of trained runs (eval mode, relaxed box), with certified fraction and worst-case CE."""

    from hw_dq import run as rd
    from hw_dq.data import load_split

    x, y = load_split("sample", "test").take(n, seed=0).tensors()
    out: dict[str, Any] = {}
    table = []
    for r in runs:
        model, cfg = rd.load_model(r)
        done = rd.read_jsonl(f"{r}/metrics.jsonl")
        out[r] = {"epochs_done": len(done), "epochs": cfg["train"]["epochs"], "radii": {}}
        for eps in radii:
            w, cert, ce = widths(model, x, y, eps, relax_input=True)
            w = [v if math.isfinite(v) else None for v in w]
            out[r]["radii"][str(eps)] = {"relative_width": w, "certified": cert, "worst_case_ce": ce}
            table.append([f"{r} (epoch {len(done)} of {cfg['train']['epochs']})", f"{eps:g}", f"{100 * cert:.1f}%",
                          f"{ce:.2f}"] + ["all same" if v is None else f"{v:.3g}" for v in w])  # fmt: skip
    m = machine()
    head = ["run", "eps (1/255)", "certified", "worst-case CE", "input box"] + [f"act {i}" for i in range(1, 9)]
    md = (f"# Interval growth through trained CNVs\n\nCommand: `python -m benchmarks.ibp_growth --runs "
          f"{' '.join(runs)} --radii {','.join(f'{e:g}' for e in radii)} --n {n}`. {machine_line(m)}.\n\n"
          f"Eval mode (running statistics), {n} embedded-sample test images, the box before the input quantizer's "
          "rounding (as `--ibp-relax-input` trains it). Mean interval radius over the standard deviation of the "
          "interval centres: the input box, then the input of each activation after a layer. certified: images "
          "whose float bounds prove every margin positive; worst-case CE: the cross-entropy of the bounds' "
          "worst-case logits, the robust term of the IBP loss (the same at every radius once every interval "
          "covers its activation's whole range).\n\n" + md_table(head, table))  # fmt: skip
    write_results("ibp_growth_trained", {"machine": m, "n": n, "seed": 0, "runs": out}, md)
    print(md)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--eps", type=float, default=2.2, help="box radius in 1/255 (default 2.2, the training eps)")
    ap.add_argument("--n", type=int, default=128, help="embedded-sample training images (default 128)")
    ap.add_argument("--runs", nargs="*", default=[], help="trained run directories to measure instead")
    ap.add_argument("--radii", default="0.1,0.5,1,2.2", help="with --runs: comma list of radii in 1/255")
    a = ap.parse_args(argv)
    if a.runs:
        try:
            radii = [float(v) for v in a.radii.split(",")]
        except ValueError:
            radii = []
        if not radii or not all(0 < e <= 255 for e in radii) or a.n < 2:
            print("ibp_growth: --radii must be a comma list of numbers in (0, 255] and --n at least 2", file=sys.stderr)
            return 2
        import torch

        torch.set_num_threads(1)
        return trained(a.runs, radii, a.n)
    if not (0 < a.eps <= 255 and a.n >= 2):
        print("ibp_growth: --eps must lie in (0, 255] and --n be at least 2", file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(1)
    rows: dict[str, Any] = {f"{r} ranges, {i} init": relative_widths(r, i, a.eps, a.n)
                            for r in ("learned", "fixed") for i in ("default", "ibp")}  # fmt: skip
    m = machine()
    head = ["activation ranges, initialisation", "input box"] + [f"act {i}" for i in range(1, 9)]
    # non-finite means every image's interval is the same (no spread of centres): written as null / "all same"
    rows = {k: [v if math.isfinite(v) else None for v in w] for k, w in rows.items()}
    table = [[k] + ["all same" if v is None else f"{v:.3g}" for v in w] for k, w in rows.items()]
    md = (f"# Interval growth through a fresh half-width CNV (w4a4)\n\nCommand: `python -m "
          f"benchmarks.ibp_growth --eps {a.eps:g} --n {a.n}`. {machine_line(m)}.\n\nMean interval radius over "
          f"the standard deviation of the interval centres, BatchNorm in training mode (the clean batch's "
          f"statistics, as certified training sees it), {a.n} embedded-sample "
          f"images, box radius {a.eps:g}/255, seed 0: the input box, then the input of each activation after "
          "a layer (6 convolutions, 2 hidden linear layers). all same: every image's interval there is the same "
          "(the intervals below it covered the whole activation range).\n\n" + md_table(head, table))  # fmt: skip
    write_results("ibp_growth", {"machine": m, "eps": a.eps, "n": a.n, "seed": 0, "relative_width": rows}, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
