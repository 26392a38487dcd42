"""Claim verdicts: judged at 2/255 and 8/255 on the per-image worst case, masking flags beside each verdict."""

from __future__ import annotations

from hw_dq.experiments.reproduce.claims import claims, robust_at
from hw_dq.experiments.reproduce.plan import Scale, plan

N = 200


def _mask(k: int, offset: int = 0) -> str:
    """k robust images out of N, starting at ``offset`` (wrapping)."""
    m = ["0"] * N
    for i in range(k):
        m[(offset + i) % N] = "1"
    return "".join(m)


def _result(run: str, clean: float, per_eps: dict[float, list[tuple[str, int, int]]], warn: bool = False) -> dict:
    evals = [
        {"attack": a, "kind": "white" if a == "pgd" else "ensemble", "norm": "Linf", "eps": e,
         "robust_acc": k / N, "n_examples": N, "seed": 0, "wall_s": 1.0, "max_perturbation": e / 255,
         "params": {}, "breakdown": {}, "robust_mask": _mask(k, off)}
        for e, rows in per_eps.items() for a, k, off in rows
    ]  # fmt: skip
    checks = [{"name": "worst_case_near_white_box", "status": "warn" if warn else "pass", "evidence": "x"}]
    return {"run_dir": f"runs/{run}", "name": "robustness", "clean_acc": clean, "n_examples": N,
            "evaluations": evals, "headline": {"eps": 8.0, "robust_acc": 0.0, "attack": None},
            "sanity": {"verdict": "warn" if warn else "pass", "checks": checks}}  # fmt: skip


def test_claims_use_the_per_image_worst_case_at_2_and_8_and_show_masking():
    p = plan(Scale())
    # FP: PGD and AutoAttack break disjoint halves at 2/255: worst case 0.10, each attack alone 0.30
    fp = _result(
        "fp", 0.8, {2.0: [("pgd", 60, 0), ("autoattack", 60, 40)], 8.0: [("pgd", 10, 0), ("autoattack", 10, 0)]}
    )
    assert robust_at(fp, 2.0) == (20 / N, "per-image worst case of pgd+autoattack")
    # VQ a1 and a2: 0.25 at 2/255 under both attacks (same images), so VQ > FP's worst case, not its PGD number;
    # vq-a2 is masking-flagged
    vq = {run: _result(run, 0.8, {2.0: [("pgd", 50, 0), ("autoattack", 50, 0)],
                                  8.0: [("pgd", 10, 0), ("autoattack", 10, 0)]}, warn=run == "vq-a2")
          for run in ("vq-a1", "vq-a2")}  # fmt: skip
    verdicts = claims([fp, *vq.values()], p)
    at2 = next(v for v in verdicts if v["claim"].startswith("VQ is less robust than FP") and "2/255" in v["claim"])
    at8 = next(v for v in verdicts if v["claim"].startswith("VQ is less robust than FP") and "8/255" in v["claim"])
    # with the worst case FP (10%) is *less* robust than VQ (25%) at 2/255; with PGD alone it would be 30% vs 25%
    assert at2["verdict"] == "does not hold", at2
    assert "10.0% vs 25.0%" in at2["evidence"]
    assert "per-image worst case at 2/255" in at2["claim"]
    assert at8["verdict"] == "no measurable difference"
    assert at2["masking"] == "vq-a2: worst_case_near_white_box"
    assert "Masking checks: vq-a2: worst_case_near_white_box" in at2["evidence"]
