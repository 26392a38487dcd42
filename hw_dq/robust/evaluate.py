"""One evaluation record for both targets (the PyTorch model, the simulated accelerator), and evaluate_run.

:func:`record` builds the results-file object of :mod:`hw_dq.robust.results` from a run's
config, the data, the evaluations and the sanity section; :func:`evaluation` builds one
entry of ``evaluations``. The headline is the per-image worst case over every attack run at
the headline eps (:func:`worst_case`): an image counts as robust only if it survived all of
them, as RobustBench reports; each attack's own number stays beside it.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hw_dq.errors import ConfigError
from hw_dq.robust.results import HEADLINE_EPS, SCHEMA, describe, now, validate, worst_case, worst_cases
from hw_dq.robust.results import headline as lowest

WORST_EPS = (2.0, 8.0)  # eps at which the worst case is always reported when evaluated


def evaluation(attack: str, kind: str, norm: str, eps: float, robust_acc: float, n: int, seed: int, wall_s: float,
               max_perturbation: float, params: dict, breakdown: dict | None = None,
               robust_mask: str | None = None, warnings: Sequence[str] = ()) -> dict[str, Any]:  # fmt: skip
    """One entry of a result's ``evaluations`` (the same fields on both targets)."""
    ev = {"attack": attack, "kind": kind, "norm": norm, "eps": float(eps), "robust_acc": float(robust_acc),
          "n_examples": int(n), "seed": int(seed), "wall_s": round(float(wall_s), 3),
          "max_perturbation": float(max_perturbation), "params": params, "breakdown": breakdown or {}}  # fmt: skip
    if robust_mask is not None:
        ev["robust_mask"] = robust_mask
    if warnings:
        ev["warnings"] = list(warnings)
    return ev


def headline(evaluations: Sequence[dict], eps: float = HEADLINE_EPS) -> dict[str, Any]:
    """The reported number at ``eps``: the per-image worst case when flags exist, else the lowest attack."""
    w = worst_case(evaluations, eps)
    if w is not None:
        return {"eps": eps, "robust_acc": w["robust_acc"], "attack": "worst case of " + "+".join(w["attacks"])}
    return lowest(evaluations, eps)


def record(*, name: str, run_dir: Path, cfg: dict, dataset: str, n: int, seed: int, clean_acc: float,
           evaluations: list[dict], sanity: dict, defense: str | None = None, target: str = "sw",
           extra: dict | None = None, device: str | None = "cpu",
           per_image_worst: bool = True) -> dict[str, Any]:  # fmt: skip
    """The validated results-file object (schema :data:`hw_dq.robust.results.SCHEMA`).

    ``per_image_worst`` False: the evaluations are not attacks to combine (a certificate, one per eps), so the
    headline is the lowest one at the headline eps and no ``worst_case`` is written."""
    from hw_dq.provenance import provenance
    from hw_dq.version import __version__

    tr, mc = cfg.get("train", {}), cfg.get("model", {})
    adv = tr.get("adv_train", "none")
    result = {
        "schema": SCHEMA, "name": name, "created": now(), "hw_dq_version": __version__,
        "run_dir": str(run_dir), "model": mc.get("name", "?"), "width": mc.get("width"),
        "mode": cfg.get("mode", "FP"), "wbits": mc.get("wbits"), "abits": mc.get("abits"),
        "beta": float(tr.get("beta", 0.0)), "lipschitz_target": tr.get("lipschitz_target", "weight"),
        "adv_train": adv, "adv_eps": tr.get("adv_eps") if adv != "none" else None, "defense": defense,
        "dataset": dataset, "split": "test", "n_examples": int(n), "seed": int(seed),
        "threat_model": "Linf", "eps_units": "1/255", "clean_acc": float(clean_acc), "evaluations": evaluations,
        "headline": headline(evaluations) if per_image_worst else lowest(evaluations),
        **({"worst_case": worst_cases(evaluations)} if per_image_worst else {}), "sanity": sanity,
        **({"target": "hw"} if target == "hw" else {}), **(extra or {}),
        "provenance": provenance(device, seed),
    }  # fmt: skip
    return validate(json.loads(json.dumps(result)), name)


def write(run_dir: Path, result: dict[str, Any]) -> None:
    """``RUN_DIR/attacks/<name>.json`` and ``.md`` (atomic)."""
    from hw_dq import run as rd

    rd.write_json(Path(run_dir) / "attacks" / f"{result['name']}.json", result)
    rd.write_text(Path(run_dir) / "attacks" / f"{result['name']}.md", describe(result))


def result_name(run_dir: str | Path, name: str | None, default: str, force: bool) -> str:
    """The results-file stem: ``name`` (refused if it exists, unless ``force``), or a fresh default."""
    out = Path(run_dir) / "attacks"
    if name is not None:
        if (out / f"{name}.json").is_file() and not force:
            raise ConfigError(f"{out / name}.json exists; choose another --name or add --force to overwrite it")
        return name
    cand, k = default, 2
    while (out / f"{cand}.json").is_file():
        cand, k = f"{default}-{k}", k + 1
    return cand


class Progress:
    """Per-batch progress on stderr (running robust accuracy, ETA); silent unless enabled and a TTY."""

    def __init__(self, enabled: bool) -> None:
        self.on = bool(enabled) and sys.stderr.isatty()
        self.label, self.t0 = "", time.time()

    def start(self, label: str) -> None:
        self.label, self.t0 = label, time.time()

    def __call__(self, done: int, total: int, robust: int) -> None:
        if not self.on or not total:
            return
        el = time.time() - self.t0
        eta = el / max(1, done) * (total - done)
        end = "\n" if done >= total else ""
        print(f"\r  {self.label}: {done}/{total} images, running robust acc {100 * robust / max(1, done):.1f}%, "
              f"ETA {eta:.0f} s   ", end=end, file=sys.stderr, flush=True)  # fmt: skip


def evaluate_run(
    run_dir: str | Path,
    attacks: Sequence[str],
    eps: Sequence[float],
    *,
    n: int | None = None,
    seed: int = 0,
    batch_size: int = 128,
    name: str = "robustness",
    params: Any = None,
    sanity: bool = True,
    sanity_cfg: Any = None,
    transfer_from: str | Path | None = None,
    defense: str | None = None,
    data: str | None = None,
    data_dir: str | None = None,
    progress: bool = False,
    device: str = "auto",
    version: str = "standard",
    force: bool = True,
) -> dict[str, Any]:
    """Attack a run directory's model; writes ``RUN_DIR/attacks/<name>.json`` and ``.md``.

    ``device``: where the model runs (``auto``: the GPU if PyTorch sees one). ``defense``
    (e.g. ``"bits:4+median:2"``) puts input squeezers in the loop; ``transfer_from`` is the
    source run for ``transfer-pgd``; ``version`` the AutoAttack version; ``force`` False
    refuses to overwrite an existing result of that name.
    """
    from hw_dq import run as rd
    from hw_dq.robust import autoattack as aa
    from hw_dq.robust.attacks import AttackParams, clean_accuracy, robust_accuracy
    from hw_dq.robust.registry import check
    from hw_dq.robust.sanity import run_checks

    if not attacks or not eps:
        raise ConfigError("give at least one attack (--attacks) and one eps (--eps)")
    for a in attacks:
        for e in eps:
            check(a, e)
    aa.check_version(version)
    if n is not None and n <= 0:
        raise ConfigError(f"invalid --n {n}: must be positive")
    if batch_size <= 0:
        raise ConfigError(f"invalid --batch-size {batch_size}: must be positive")
    run = Path(run_dir)
    name = result_name(run, name, name, force)
    dev = rd.resolve_device(device)
    model, cfg = rd.load_model(run, device=dev)
    source = rd.load_model(transfer_from, device=dev)[0] if transfer_from else None
    if "transfer-pgd" in attacks and source is None:
        raise ConfigError("attack transfer-pgd needs --transfer-from RUN_DIR (e.g. the full-precision twin)")
    if defense:
        from hw_dq.robust.squeeze import apply_defense

        model = apply_defense(model, defense).to(dev)
    ds = rd.Run(run).test_set(n, seed, data, data_dir)  # the one definition of the evaluated images
    x, y = ds.tensors()
    params = params or AttackParams()
    clean = clean_accuracy(model, x, y, batch_size)
    evals = []
    bar = Progress(progress)
    for a in attacks:
        for e in eps:
            bar.start(f"{a} @ {e:g}/255")
            r = robust_accuracy(model, x, y, a, e, seed=seed, batch_size=batch_size, params=params, source=source,
                                state_dir=run / "attacks" / ".state", state_name=name, version=version,
                                progress=bar if bar.on else None)  # fmt: skip
            evals.append(evaluation(a, r.kind, r.norm, e, r.robust_acc, r.n_examples, seed, r.wall_s,
                                    r.max_perturbation, r.params, r.breakdown, r.robust_mask, r.warnings))  # fmt: skip
            if progress and not bar.on:
                print(f"  {a} @ {e:g}/255: {100 * r.robust_acc:.1f}% ({r.wall_s:.1f} s)", flush=True)
    san = (
        run_checks(
            model, x, y, evals, clean, params=params, cfg=sanity_cfg, seed=seed, batch_size=batch_size, source=source
        )  # fmt: skip
        if sanity
        else {"verdict": "incomplete", "checks": [{"name": "all", "status": "skip", "evidence": "--no-sanity"}]}
    )
    result = record(name=name, run_dir=run, cfg=cfg, dataset=ds.name, n=len(ds), seed=seed, clean_acc=clean,
                    evaluations=evals, sanity=san, defense=defense, device=dev)  # fmt: skip
    write(run, result)
    state = run / "attacks" / ".state"
    if state.is_dir() and not any(state.iterdir()):
        state.rmdir()
    return result
