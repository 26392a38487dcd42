"""Certified accuracy of a run's PyTorch model: float interval bounds (IBP), the float twin of the accelerator's.

A float model has no FINN build, so ``hw-dq certify RUN --on hw`` cannot certify it; this certifies
the PyTorch model instead, with the interval bounds certified training uses (:mod:`hw_dq.nn.ibp`) in
eval mode, on the same images, radii and box as the accelerator's certificate: the test image's pixels
within +-eps levels of 1/255, clipped to [0, 1], then through the model's own input quantizer. The
result is the certificate of a float run, and for a quantized run a second opinion on the accelerator's.

Sound for the PyTorch model up to floating-point rounding: every quantizer's input interval is widened
by :data:`hw_dq.nn.ibp.SLACK` first, so that rounding never flips a level. The accelerator's integer
certificate (:mod:`hw_dq.fpga.certify`) has no such caveat; prefer it wherever the run has a build.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch

from hw_dq.errors import CertifyError

BATCH = 250  # images per bound pass: a few MB of intervals for the tiny and CNV models


def check_request(eps: list[float], n: int | None) -> list[float]:
    """A certificate's radii as floats, each in [0, 255] levels of the UINT8 input, and a positive ``n`` (or
    None: every test image); else one line that says what is wrong."""
    if n is not None and n <= 0:
        raise CertifyError(f"invalid --n {n}: must be positive")
    if not eps:
        raise CertifyError("no eps given: pass --eps as levels of 1/255, e.g. 1,2,4,8")
    for e in eps:
        if not (math.isfinite(e) and 0 <= e <= 255):
            raise CertifyError(f"invalid eps {e}: must lie in [0, 255] (levels of the UINT8 input)")
    return [float(e) for e in eps]


@torch.no_grad()
def certify_model(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """Per image: True where the float bounds prove ``z_y > z_j`` for every ``j != y`` over the box of
    radius ``eps`` levels (1/255) around ``x`` (N x C x H x W in [0, 1]). The model must be in eval mode."""
    from hw_dq.nn.ibp import ibp_margins

    if model.training:
        raise CertifyError("certify_model needs the model in eval mode (BatchNorm's running statistics)")
    out = []
    for i in range(0, len(y), BATCH):
        lb = ibp_margins(model, x[i : i + BATCH], y[i : i + BATCH], eps / 255)
        lb[torch.arange(len(lb)), y[i : i + BATCH]] = 1.0  # z_y - z_y: not a competitor
        if not torch.isfinite(lb).all():
            raise CertifyError("the interval bounds are not finite: the model's weights hold NaN or inf")
        out.append((lb > 0).all(1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool)


def certify_model_run(
    run_dir: str | Path,
    eps: list[float],
    *,
    n: int | None = None,
    seed: int = 0,
    name: str = "certified-sw",
    data: str | None = None,
    data_dir: str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Certified accuracy of a run's PyTorch model per eps; writes ``RUN_DIR/attacks/<name>.{json,md}``.

    Schema ``hw-dq/robustness/v1`` with ``target = "sw-certified"`` and the ``certified`` block of the
    accelerator's certificate (per eps: certified accuracy, count, bound time), without its per-layer
    widths in output levels (a float model has no levels)."""
    from hw_dq import run as rd
    from hw_dq.robust import evaluate as ev

    eps = check_request(eps, n)
    run = Path(run_dir)
    if not (run / rd.CONFIG).is_file():
        raise CertifyError(f"{run} is not a run directory (no {rd.CONFIG}); train one with 'hw-dq train'")
    model, cfg = rd.load_model(run)
    ds = rd.Run(run).test_set(n, seed, data, data_dir)
    x, y = ds.tensors()
    with torch.no_grad():
        t0 = time.perf_counter()
        pred = torch.cat([model(x[i : i + BATCH]).argmax(1) for i in range(0, len(y), BATCH)]) if len(y) else y
        clean_s = time.perf_counter() - t0
    clean = pred == y
    exact0 = bool(torch.equal(certify_model(model, x, y, 0.0), clean))
    evals, blocks = [], []
    for e in eps:
        t0 = time.perf_counter()
        cert = certify_model(model, x, y, e)
        wall = time.perf_counter() - t0
        k = int(cert.sum())
        acc = k / len(y) if len(y) else 0.0  # exact: a count over n, not a float32 mean
        blocks.append({"eps": e, "certified_acc": acc, "n_certified": k, "bound_s": round(wall, 4)})
        evals.append(ev.evaluation(
            "interval-certificate", "white", "Linf", e, acc, len(y), seed, wall, float(math.floor(e + 1e-9)),
            {"method": "float interval bounds through the PyTorch model (hw_dq.nn.ibp), eval mode",
             "sound": "up to floating-point rounding", "last_layer": "logit differences"},
            {"n_certified": k, "bound_s": round(wall, 4)},
            robust_mask="".join("1" if v else "0" for v in cert.tolist()),
        ))  # fmt: skip
        if progress:
            print(f"  certified @ {e:g}/255: {100 * acc:.1f}% ({wall:.2f} s)", flush=True)
    evidence = (
        "at eps 0 the certified images are exactly those the model classifies correctly"
        if exact0
        else "at eps 0 the certificate and the model's predictions disagree (a tie, or float rounding)"
    )
    check = {"name": "eps 0 equals the model", "status": "pass" if exact0 else "warn", "evidence": evidence}
    timing = {"model_clean_s": round(clean_s, 4), "bound_s_total": round(sum(b["bound_s"] for b in blocks), 4)}
    result = ev.record(
        name=name, run_dir=run, cfg=cfg, dataset=ds.name, n=len(y), seed=seed,
        clean_acc=int(clean.sum()) / len(y) if len(y) else 0.0, evaluations=evals,
        sanity={"verdict": "pass" if exact0 else "warn", "checks": [check]},
        extra={"target": "sw-certified", "certified": blocks, "timing": timing}, per_image_worst=False,
    )  # fmt: skip
    rd.write_json(run / rd.ATTACKS_DIR / f"{name}.json", result)
    rd.write_text(run / rd.ATTACKS_DIR / f"{name}.md", describe(result))
    return result


def certified_rows(r: dict[str, Any]) -> list[str]:
    """Markdown table lines of a certificate's ``certified`` block (either target): one row per eps."""
    rows = ["| eps (1/255) | certified acc | certified | bound time s |", "|---|---|---|---|"]
    return rows + [f"| {b['eps']:g} | {100 * b['certified_acc']:.1f}% | {b['n_certified']} | {b['bound_s']:.3f} |"
                   for b in r["certified"]]  # fmt: skip


def describe(r: dict[str, Any]) -> str:
    """Markdown: certified accuracy per eps."""
    lines = [f"# Certified robustness of the PyTorch model: {r['run_dir']} ({r['name']})", "",
             f"Float interval bounds (eval mode), {r['n_examples']} {r['dataset']} test images (seed {r['seed']}), "
             f"clean accuracy {100 * r['clean_acc']:.1f}%.", "", *certified_rows(r)]  # fmt: skip
    return "\n".join(lines) + "\n"
