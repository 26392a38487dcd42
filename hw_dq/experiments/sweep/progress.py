"""The progress display of a long sweep: trials done, time per trial, the best front so far."""

from __future__ import annotations

import time
from typing import Any

from hw_dq.experiments.sweep.pareto import collect, front
from hw_dq.experiments.sweep.spec import SweepSpec


class Progress:
    """Prints one status block after every trial this worker finishes (all workers' trials are counted)."""

    def __init__(self, spec: SweepSpec, enabled: bool = True) -> None:
        self.spec, self.enabled, self.t0 = spec, enabled, time.time()

    def log(self, msg: str) -> None:
        if self.enabled:
            print(f"[sweep {self.spec.name}] {msg}", flush=True)

    def status(self, study: Any) -> str:
        """``done/total, per-state counts, mean time per trial, ETA, the front so far``."""
        rows = collect(study)
        c: dict[str, int] = {}
        for r in rows:
            c[r["state"]] = c.get(r["state"], 0) + 1
        done = c.get("COMPLETE", 0) + c.get("PRUNED", 0)
        walls = [r["wall_s"] for r in rows if r["state"] in ("COMPLETE", "PRUNED") and r.get("wall_s")]
        per = sum(walls) / len(walls) if walls else 0.0
        left = max(0, self.spec.n_trials - done)
        running = max(1, c.get("RUNNING", 0))
        pts = sorted(front(rows, self.spec.objectives), key=lambda r: -r["summary"]["robust"])
        best = "; ".join(
            f"#{r['number']} {r['summary']['tag']} robust {100 * r['summary']['robust']:.1f}% "
            f"clean {100 * r['summary']['clean']:.1f}% {r['summary']['fps']:,.0f} FPS {r['summary']['lut']:,.0f} LUT"
            for r in pts[:4]
        )
        return (
            f"{done}/{self.spec.n_trials} trials done (complete {c.get('COMPLETE', 0)}, pruned {c.get('PRUNED', 0)}, "
            f"failed {c.get('FAIL', 0)}, running {c.get('RUNNING', 0)}); {per:.0f} s per trial, about "
            f"{left * per / running / 60:.0f} min left; front ({len(pts)} points): {best or '-'}"
        )

    def __call__(self, study: Any) -> None:
        self.log(self.status(study))
