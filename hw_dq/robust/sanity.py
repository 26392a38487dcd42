"""Gradient-masking sanity checks (Carlini et al. 2019; Croce & Hein 2020's flags).

Quantized networks are known to mask gradients: a straight-through or zero gradient makes
white-box attacks weak while the model is not robust. Each check below returns ``pass``,
``warn`` or ``skip`` with the numbers that decided it:

* ``monotone_in_eps``      robust accuracy does not rise with eps (per attack);
* ``zero_at_large_eps``    PGD at a large eps (64/255) drives accuracy to about 0;
* ``iterative_beats_single_step``  PGD is at least as strong as FGSM / R+FGSM;
* ``white_box_beats_black_box``    gradient attacks are at least as strong as Square;
* ``more_steps_restarts``  PGD with many more steps and restarts does not reveal a much
  lower accuracy than the reported PGD;
* ``transfer_not_stronger``        (with a source model) examples crafted on the
  full-precision twin are not stronger than white-box ones;
* ``worst_case_near_white_box``    the per-image worst case over every attack run is not much
  below the best gradient attack alone (if it is, the gradient attacks are being masked);
* ``adaptive_not_stronger``        BPDA / temperature-scaled PGD do not find much more than PGD;
* ``attack_library_warnings``      the attack library's own checks (AutoAttack's randomness,
  output-range and "Square decreased the robust accuracy" warnings) said nothing.

Numbers from the main evaluation are used where they exist; otherwise the check runs its
own small probe on the first ``n_probe`` examples. A difference counts only when it is
larger than ``max(tol_abs, 2 * binomial standard error)`` (see :func:`tolerance`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from hw_dq.robust.attacks import AttackParams, robust_accuracy
from hw_dq.robust.registry import SINGLE_STEP

GRADIENT_ATTACKS = ("pgd", "apgd-ce", "apgd-t")


@dataclass
class SanityConfig:
    """Budgets and tolerances of the checks."""

    large_eps: float = 64.0
    zero_tol: float = 0.05
    probe_eps: float = 8.0
    n_probe: int = 200
    tol_abs: float = 0.02
    masking_gap: float = 0.05
    strong_steps_factor: int = 5
    strong_restarts: int = 3
    square_queries: int = 1000


def tolerance(p: float, n: int, tol_abs: float) -> float:
    """Slack for comparing two accuracies measured on ``n`` examples.

    Two binomial standard errors, with p(1-p) floored at 1/n so that an accuracy of 0 on a
    small sample still allows for about two examples either way.
    """
    n = max(1, n)
    return max(tol_abs, 2.0 * math.sqrt(max(p * (1 - p), 1.0 / n) / n))


def _check(name: str, ok: bool | None, evidence: str, **values: Any) -> dict[str, Any]:
    status = "skip" if ok is None else ("pass" if ok else "warn")
    return {"name": name, "status": status, "evidence": evidence, "values": values}


def verdict(checks: Sequence[dict]) -> str:
    """``warn`` if any check warns, ``pass`` if at least one passed, else ``incomplete``."""
    if any(c["status"] == "warn" for c in checks):
        return "warn"
    return "pass" if any(c["status"] == "pass" for c in checks) else "incomplete"


class _Probe:
    """Looks up (attack, eps) in the evaluations, or runs it on the probe subset."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, evaluations: Sequence[dict],
                 params: AttackParams, cfg: SanityConfig, seed: int, batch_size: int):  # fmt: skip
        self.model, self.params, self.cfg, self.seed, self.bs = model, params, cfg, seed, batch_size
        self.x, self.y = x[: cfg.n_probe], y[: cfg.n_probe]
        self.evals = {(e["attack"], float(e["eps"])): e for e in evaluations if e["norm"] == "Linf"}
        self.n_full = len(y)
        self.cache: dict[tuple, tuple[float, int, str]] = {}

    def have(self, attack: str, eps: float) -> bool:
        return (attack, float(eps)) in self.evals

    def get(self, attack: str, eps: float, probe: bool = False, params: AttackParams | None = None
            ) -> tuple[float, int, str]:  # fmt: skip
        """(robust acc, n, source); ``probe`` forces the probe subset (same-subset comparisons)."""
        e = self.evals.get((attack, float(eps)))
        if e is not None and not probe and params is None:
            return e["robust_acc"], e["n_examples"], "evaluation"
        p = params or self.params
        key = (attack, float(eps), tuple(asdict(p).values()))
        if key not in self.cache:
            r = robust_accuracy(self.model, self.x, self.y, attack, eps, seed=self.seed, batch_size=self.bs, params=p)
            self.cache[key] = (r.robust_acc, r.n_examples, f"probe n={r.n_examples}")
        return self.cache[key]


def _pct(v: float) -> str:
    return f"{100 * v:.1f}%"


def run_checks(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    evaluations: Sequence[dict],
    clean_acc: float,
    *,
    params: AttackParams | None = None,
    cfg: SanityConfig | None = None,
    seed: int = 0,
    batch_size: int = 128,
    source: nn.Module | None = None,
) -> dict[str, Any]:
    """All checks; returns ``{"verdict": ..., "checks": [...]}`` (the results-file section)."""
    cfg = cfg or SanityConfig()
    params = params or AttackParams()
    pr = _Probe(model, x, y, evaluations, params, cfg, seed, batch_size)
    checks = [_monotone(evaluations, clean_acc, len(y), cfg)]

    acc, n, src = pr.get("pgd", cfg.large_eps)
    checks.append(_check("zero_at_large_eps", acc <= cfg.zero_tol,
                         f"PGD-{params.pgd_steps} at {cfg.large_eps:g}/255: {_pct(acc)} ({src}); "
                         f"expected <= {_pct(cfg.zero_tol)}", robust_acc=acc, n=n))  # fmt: skip

    checks.append(_iterative(pr, cfg))
    checks.append(_white_vs_black(pr, cfg))

    e = cfg.probe_eps
    base, n, _ = pr.get("pgd", e, probe=True)
    strong_p = AttackParams(**{**asdict(params), "pgd_steps": params.pgd_steps * cfg.strong_steps_factor,
                               "pgd_restarts": cfg.strong_restarts})  # fmt: skip
    strong, _, _ = pr.get("pgd", e, params=strong_p)
    gap = max(cfg.masking_gap, tolerance(base, n, cfg.tol_abs))
    checks.append(_check(
        "more_steps_restarts", base - strong <= gap,
        f"at {e:g}/255 on n={n}: PGD-{params.pgd_steps}x{params.pgd_restarts} {_pct(base)} vs "
        f"PGD-{strong_p.pgd_steps}x{strong_p.pgd_restarts} {_pct(strong)} (allowed drop {_pct(gap)})",
        reported=base, strong=strong,
    ))  # fmt: skip

    if source is not None:
        white, n, _ = pr.get("pgd", e, probe=True)
        tr = robust_accuracy(model, pr.x, pr.y, "transfer-pgd", e, seed=seed, batch_size=batch_size,
                             params=params, source=source).robust_acc  # fmt: skip
        tol = tolerance(white, n, cfg.tol_abs)
        checks.append(_check("transfer_not_stronger", white <= tr + tol,
                             f"at {e:g}/255 on n={n}: white-box PGD {_pct(white)} vs transfer PGD from source "
                             f"{_pct(tr)} (tolerance {_pct(tol)})", white=white, transfer=tr))  # fmt: skip
    checks += masking_checks(evaluations, cfg)
    return {"verdict": verdict(checks), "checks": checks, "config": asdict(cfg)}


def masking_checks(evaluations: Sequence[dict], cfg: SanityConfig | None = None) -> list[dict[str, Any]]:
    """The checks computed from a result's evaluations alone (per-image flags, library warnings)."""
    from hw_dq.robust.registry import ATTACKS
    from hw_dq.robust.results import worst_case

    def kind(v: dict) -> str:  # evaluations built by hand may leave the kind out
        return v.get("kind") or (ATTACKS[v["attack"]].kind if v["attack"] in ATTACKS else "?")

    cfg = cfg or SanityConfig()
    out = []
    lin = [e for e in evaluations if e.get("norm", "Linf") == "Linf"]
    eps_all = sorted({float(e["eps"]) for e in lin})
    rows, ok, seen = [], True, False
    for e in eps_all:
        white = [v for v in lin if float(v["eps"]) == e and kind(v) == "white" and v["attack"] not in SINGLE_STEP]
        w = worst_case(lin, e)
        if not white or w is None or len(w["attacks"]) < 2:
            continue
        seen = True
        best = min(white, key=lambda v: v["robust_acc"])
        gap = max(cfg.masking_gap, tolerance(best["robust_acc"], w["n_examples"], cfg.tol_abs))
        bad = best["robust_acc"] - w["robust_acc"] > gap
        ok &= not bad
        rows.append(f"{e:g}/255: best gradient attack {best['attack']} {_pct(best['robust_acc'])} vs worst case "
                    f"{_pct(w['robust_acc'])} over {'+'.join(w['attacks'])} (allowed gap {_pct(gap)})")  # fmt: skip
    ev = "; ".join(rows) + ("" if ok else " - the gradient attacks overstate robustness (masked gradients)")
    out.append(_check("worst_case_near_white_box", ok if seen else None, ev if seen else "needs >= 2 attacks "
                      "with per-image flags and a gradient attack at one eps"))  # fmt: skip
    rows, ok, seen = [], True, False
    for e in eps_all:
        pgd = [v for v in lin if float(v["eps"]) == e and v["attack"] == "pgd"]
        ada = [v for v in lin if float(v["eps"]) == e and kind(v) == "adaptive"]
        if not pgd or not ada:
            continue
        seen = True
        best = min(ada, key=lambda v: v["robust_acc"])
        p = pgd[0]["robust_acc"]
        gap = max(cfg.masking_gap, tolerance(p, pgd[0]["n_examples"], cfg.tol_abs))
        ok &= p - best["robust_acc"] <= gap
        rows.append(
            f"{e:g}/255: PGD {_pct(p)} vs {best['attack']} {_pct(best['robust_acc'])} (allowed gap {_pct(gap)})"
        )
    out.append(_check("adaptive_not_stronger", ok if seen else None,
                      "; ".join(rows) if seen else "no adaptive attack (bpda, pgd-temp) beside PGD"))  # fmt: skip
    warned = [f"{v['attack']}@{float(v['eps']):g}: {w}" for v in evaluations for w in v.get("warnings", [])]
    lib = [v for v in evaluations if str(v.get("params", {}).get("library", "")).startswith("pyautoattack")]
    quiet = "AutoAttack's own checks raised no warning" if lib else "no attack library with its own checks ran"
    out.append(_check("attack_library_warnings", None if not (warned or lib) else not warned,
                      "; ".join(warned) if warned else quiet))  # fmt: skip
    return out


def _monotone(evaluations: Sequence[dict], clean: float, n: int, cfg: SanityConfig) -> dict[str, Any]:
    by: dict[str, list[tuple[float, float]]] = {}
    for e in evaluations:
        by.setdefault(f"{e['attack']}/{e['norm']}", []).append((float(e["eps"]), e["robust_acc"]))
    bad, seen = [], 0
    for name, pts in by.items():
        pts = sorted([(0.0, clean), *pts])
        for (e0, a0), (e1, a1) in zip(pts, pts[1:], strict=False):
            seen += 1
            if a1 > a0 + tolerance(a0, n, cfg.tol_abs):
                bad.append(f"{name}: {_pct(a0)} at {e0:g} -> {_pct(a1)} at {e1:g}")
    if not seen:
        return _check("monotone_in_eps", None, "no evaluations")
    ok = not bad
    ev = "robust accuracy never rises with eps" if ok else "rises: " + "; ".join(bad)
    return _check("monotone_in_eps", ok, f"{ev} ({seen} steps over {len(by)} attack(s))", rises=bad)


def _iterative(pr: _Probe, cfg: SanityConfig) -> dict[str, Any]:
    eps_list = sorted({e for (a, e) in pr.evals if a == "pgd" and any(pr.have(s, e) for s in SINGLE_STEP)})
    rows, ok = [], True
    if eps_list:
        for e in eps_list:
            it, n, _ = pr.get("pgd", e)
            single = min(pr.get(s, e)[0] for s in SINGLE_STEP if pr.have(s, e))
            tol = tolerance(single, n, cfg.tol_abs)
            ok &= it <= single + tol
            rows.append(f"{e:g}/255: PGD {_pct(it)} vs single-step {_pct(single)}")
        src = "evaluation"
    else:
        e = cfg.probe_eps
        it, n, _ = pr.get("pgd", e, probe=True)
        single, _, _ = pr.get("fgsm", e, probe=True)
        ok = it <= single + tolerance(single, n, cfg.tol_abs)
        rows.append(f"{e:g}/255: PGD {_pct(it)} vs FGSM {_pct(single)}")
        src = f"probe n={n}"
    return _check("iterative_beats_single_step", ok, "; ".join(rows) + f" ({src})")


def _white_vs_black(pr: _Probe, cfg: SanityConfig) -> dict[str, Any]:
    e = cfg.probe_eps
    whites = [a for a in GRADIENT_ATTACKS if pr.have(a, e)]
    if whites and pr.have("square", e):
        white, n, _ = min((pr.get(a, e) for a in whites), key=lambda t: t[0])
        black, _, _ = pr.get("square", e)
        src = "evaluation"
    else:
        white, n, _ = pr.get("pgd", e, probe=True)
        q = min(cfg.square_queries, pr.params.square_queries)
        black, _, _ = pr.get("square", e, params=AttackParams(**{**asdict(pr.params), "square_queries": q}))
        src = f"probe n={n}, Square {q} queries"
    tol = tolerance(black, n, cfg.tol_abs)
    return _check("white_box_beats_black_box", white <= black + tol,
                  f"at {e:g}/255: best gradient attack {_pct(white)} vs Square {_pct(black)} "
                  f"(tolerance {_pct(tol)}; {src})", white=white, black=black)  # fmt: skip
