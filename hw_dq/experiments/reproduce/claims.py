"""The paper's claims judged from the reproduction's results, by rules written next to each verdict."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hw_dq.experiments.reproduce.plan import Plan, Scale, plan

UNTRAINED_CLEAN = 0.2  # clean accuracy below twice chance (10 classes): the model did not train

NOTE = (
    "A difference counts beyond two binomial standard errors (the tolerance). '(masking WARN)': "
    "a result in the comparison failed a gradient-masking sanity check, so its robust accuracy "
    "may be an overestimate."
)


JUDGED_EPS = (2.0, 8.0)  # the claims are judged at both: the models differ at 2/255, the paper reports 8/255


def _tol(n: int, p: float = 0.5) -> float:
    from hw_dq.robust.sanity import tolerance  # the one binomial tolerance

    return tolerance(p, n, 0.0)


def robust_at(r: dict[str, Any], eps: float) -> tuple[float | None, str]:
    """A result's robust accuracy at ``eps`` (Linf): the per-image worst case over every attack run
    when the result kept per-image flags, else the lowest single attack; and which it was."""
    from hw_dq.robust.evaluate import worst_case

    evs = [{"norm": "Linf", **e} for e in r.get("evaluations", [])]  # results written before norm was stored
    w = worst_case(evs, eps)
    if w is not None:
        return w["robust_acc"], "per-image worst case of " + "+".join(w["attacks"])
    at = [e for e in evs if e["norm"] == "Linf" and float(e["eps"]) == eps]
    if not at:
        return None, "not evaluated"
    return min(e["robust_acc"] for e in at), "lowest of " + "+".join(e["attack"] for e in at)


def masking_flags(r: dict[str, Any] | None) -> list[str]:
    """Names of the gradient-masking checks that warned on a result."""
    if r is None:
        return []
    return [c["name"] for c in r.get("sanity", {}).get("checks", []) if c.get("status") == "warn"]


def claims(results: list[dict[str, Any]], scale: Scale | Plan | None = None) -> list[dict[str, str]]:
    """A verdict per claim of the paper; ``robust`` = the headline (worst attack at 8/255).

    Which runs are compared comes from the plan of ``scale`` (its bit widths and betas; the
    default scale when None). A difference counts only beyond two binomial standard errors;
    otherwise the verdict is ``no measurable difference``. A model whose clean accuracy is below
    twice chance did not train: it is left out of every comparison, and the verdict says so.
    """
    p = scale if isinstance(scale, Plan) else plan(scale or Scale())
    by = {(Path(r["run_dir"]).name, r["name"]): r for r in results}

    def untrained(run: str) -> bool:
        r = by.get((run, "robustness"))
        return r is not None and r["clean_acc"] < UNTRAINED_CLEAN

    def get(run: str, what: str = "robust", name: str = "robustness") -> float | None:
        r = by.get((run, name))
        if r is None or untrained(run):
            return None
        if what.startswith("robust@"):  # the per-image worst case at that eps
            return robust_at(r, float(what[7:]))[0]
        return r["clean_acc"] if what == "clean" else r["headline"]["robust_acc"]

    n = max([r["n_examples"] for r in results] or [1])
    tol = _tol(n)
    abits, low, ranks = p.scale.abits, p.low_abits, range(1, len(p.scale.betas) + 1)

    def flagged(run: str, name: str = "robustness") -> bool:
        r = by.get((run, name))
        return r is not None and r.get("sanity", {}).get("verdict") == "warn"

    def compare(claim: str, pairs: list[tuple[str, float | None, float | None, bool, list[str]]]) -> dict[str, str]:
        """Each pair (label, a, b, masked?) supports the claim when a > b + tol, contradicts when a < b - tol.

        ``masked``: a result in the pair has a gradient-masking warning; a claim supported only
        by such pairs is reported as such, since its robust accuracies may be overestimates."""
        dead = sorted({d for p in pairs for d in p[4]})
        note = (" Left out, did not train (clean accuracy below twice chance): "
                + ", ".join(f"{d} ({100 * by[(d, 'robustness')]['clean_acc']:.1f}% clean)" for d in dead) + "."
                if dead else "")  # fmt: skip
        pairs = [p for p in pairs if p[1] is not None and p[2] is not None]
        if not pairs:
            return {"claim": claim, "verdict": "not measured", "evidence": ("runs missing" if not dead else "") + note}
        sup = [p for p in pairs if p[1] > p[2] + tol]
        con = [p for p in pairs if p[1] < p[2] - tol]
        verdict = ("holds" if not con and sup else "does not hold" if con and not sup
                   else "mixed" if con else "no measurable difference")  # fmt: skip
        if verdict == "holds" and all(p[3] for p in sup):
            verdict = "holds only on masking-flagged evidence"
        ev = "; ".join(f"{lab}: {100 * a:.1f}% vs {100 * b:.1f}%{' (masking WARN)' if m else ''}"
                       for lab, a, b, m, _ in pairs)  # fmt: skip
        flags = sorted({f"{run}: {f}" for lab, *_ in pairs for run in _runs_of(lab) for f in masking_flags(
            by.get((run, "robustness")))})  # fmt: skip
        masking = "; ".join(flags) if flags else "no masking check warned"
        return {"claim": claim, "verdict": verdict, "masking": masking,
                "evidence": f"{ev} (tolerance {100 * tol:.1f} points). Masking checks: {masking}.{note}"}  # fmt: skip

    labels: dict[str, tuple[str, str]] = {}

    def _runs_of(label: str) -> tuple[str, ...]:
        return labels.get(label, ())

    def pair(label: str, a: tuple[str, ...], b: tuple[str, ...], what: str = "robust") -> tuple:
        """(label, value of run a, value of run b, whether either is masking-flagged, untrained runs)."""
        ra, rb = (a[0], a[1] if len(a) > 1 else "robustness"), (b[0], b[1] if len(b) > 1 else "robustness")
        masked = what.startswith("robust") and (flagged(*ra) or flagged(*rb))
        dead = [r for r in (a[0], b[0]) if untrained(r)]
        labels[label] = (a[0], b[0])
        return label, get(ra[0], what, ra[1]), get(rb[0], what, rb[1]), masked, dead

    fp = p.find("FP")

    def vq(a: int, adv: bool = False) -> str:
        return p.find("VQ", a, adversarial=adv)

    def dq(a: int, rank: int = -1, adv: bool = False) -> str:
        return p.find("DQ", a, rank, adversarial=adv)

    def best_dq(a: int, what: str = "robust") -> str:
        vals = {dq(a, r): get(dq(a, r), what) for r in ranks}
        return max((r for r in vals if vals[r] is not None), key=lambda r: vals[r], default=dq(a, 1))

    evaluated = {float(e["eps"]) for r in results for e in r.get("evaluations", []) if e.get("norm", "Linf") == "Linf"}
    settings = []
    for e in JUDGED_EPS:
        if e in evaluated:
            sets = sorted({a for r in results for a in (robust_at(r, e)[1].split(" of ")[-1].split("+"))
                           if robust_at(r, e)[0] is not None})  # fmt: skip
            settings.append((f"robust@{e:g}", f"per-image worst case at {e:g}/255 over {', '.join(sets)}"))
    if not settings:
        settings = [("robust", "the headline robust accuracy")]
    two_betas = len(ranks) >= 2  # "larger beta" needs two betas to compare
    robustness = []
    for what, where in settings:
        robustness += [
            compare(
                f"VQ is less robust than FP at low bits (FP vs VQ, {where})",
                [pair(f"FP vs VQ a{a}", (fp,), (vq(a),), what) for a in low],
            ),
            compare(
                f"DQ is at least as robust as FP (best DQ vs FP, {where}; "
                "'no measurable difference' also satisfies it)",
                [pair(f"DQ a{a} vs FP", (best_dq(a, what),), (fp,), what) for a in abits],
            ),
            compare(
                f"larger beta is more robust (DQ beta{len(ranks)} vs beta1, {where})",
                [pair(f"a{a}", (dq(a),), (dq(a, 1),), what) for a in abits if two_betas],
            ),
        ]
    focus = p.scale.adv_abits
    squeezers = sorted({k[1] for k in by if k[1].startswith("squeeze-")})
    return [
        *robustness,
        compare(f"DQ improves clean accuracy at low bits (DQ beta{len(ranks)} vs VQ, clean)",
                [pair(f"a{a}", (dq(a),), (vq(a),), "clean") for a in low]),
        compare("DQ composes with adversarial training (DQ+AT vs DQ, and DQ+AT vs VQ+AT)",
                [x for a in p.scale.at_abits for x in (pair(f"DQ+AT vs DQ a{a}", (dq(a, adv=True),), (dq(a),)),
                                            pair(f"DQ+AT vs VQ+AT a{a}", (dq(a, adv=True),), (vq(a, True),)))]),
        compare("DQ composes with feature squeezing (DQ+squeeze vs VQ+squeeze, PGD/FGSM at 8/255)",
                [pair(sq if len(focus) == 1 else f"{sq} a{a}", (dq(a), sq), (vq(a), sq))
                 for a in focus for sq in squeezers]),
    ]  # fmt: skip
