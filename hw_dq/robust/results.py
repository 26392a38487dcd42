"""Robustness results as data: one JSON file per evaluation, with a fixed schema.

Schema ``hw-dq/robustness/v1`` (RobustBench-like; every accuracy is a fraction in [0, 1],
every eps in units of 1/255)::

    {
      "schema": "hw-dq/robustness/v1",
      "name": str,                   # file stem under RUN_DIR/attacks/
      "created": str,                # ISO 8601 UTC
      "hw_dq_version": str,
      "run_dir": str,
      "model": str, "width": float|null,
      "mode": "FP"|"VQ"|"DQ",
      "wbits": int|null, "abits": int|null,   # null = full precision
      "beta": float, "lipschitz_target": str,
      "adv_train": str, "adv_eps": float|null,  # "none" or "pgd"/"fgsm" with its eps
      "defense": str|null,           # input defense in the loop (e.g. "bits:4+median:2")
      "dataset": str, "split": "test", "n_examples": int, "seed": int,
      "threat_model": "Linf", "eps_units": "1/255",
      "clean_acc": float,
      "evaluations": [               # one per (attack, eps)
        {"attack": str, "kind": "white"|"black"|"ensemble"|"transfer", "norm": "Linf"|"L2",
         "eps": float, "robust_acc": float, "n_examples": int, "seed": int, "wall_s": float,
         "max_perturbation": float, "params": {...}, "breakdown": {...},
         "robust_mask": str,         # optional: per image "1" = survived, "0" = broken (same image order)
         "warnings": [str]}          # optional: what the attack library itself warned about
      ],
      "headline": {"eps": float, "robust_acc": float|null, "attack": str|null},
                                     # at the headline eps (8/255): the per-image worst case over every
                                     # attack with a robust_mask ("worst case of a+b+..."), else the lowest
      "worst_case": [{"eps", "norm", "robust_acc", "n_examples", "attacks", "per_attack"}],  # optional
      "sanity": {"verdict": "pass"|"warn"|"incomplete", "checks": [
         {"name": str, "status": "pass"|"warn"|"skip", "evidence": str}]}
    }

:func:`load` reads and validates any set of these files; :func:`tabulate` prints them as
one markdown table.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from hw_dq.errors import HwDqError

SCHEMA = "hw-dq/robustness/v1"
HEADLINE_EPS = 8.0
MODES = ("FP", "VQ", "DQ")
KINDS = ("white", "black", "ensemble", "transfer", "adaptive")
STATUSES = ("pass", "warn", "skip")
VERDICTS = ("pass", "warn", "incomplete")

_NUM = (int, float)
_TOP: dict[str, tuple[type, ...]] = {
    "schema": (str,), "name": (str,), "created": (str,), "hw_dq_version": (str,), "run_dir": (str,),
    "model": (str,), "width": (*_NUM, type(None)), "mode": (str,), "wbits": (int, type(None)),
    "abits": (int, type(None)), "beta": _NUM, "lipschitz_target": (str,), "adv_train": (str,),
    "adv_eps": (*_NUM, type(None)), "defense": (str, type(None)), "dataset": (str,), "split": (str,),
    "n_examples": (int,), "seed": (int,), "threat_model": (str,), "eps_units": (str,), "clean_acc": _NUM,
    "evaluations": (list,), "headline": (dict,), "sanity": (dict,),
}  # fmt: skip
_EVAL: dict[str, tuple[type, ...]] = {
    "attack": (str,), "kind": (str,), "norm": (str,), "eps": _NUM, "robust_acc": _NUM, "n_examples": (int,),
    "seed": (int,), "wall_s": _NUM, "max_perturbation": _NUM, "params": (dict,), "breakdown": (dict,),
}  # fmt: skip


class SchemaError(HwDqError):
    """A results file does not follow :data:`SCHEMA`."""


def _check_fields(obj: dict, spec: dict[str, tuple[type, ...]], where: str) -> None:
    for key, types in spec.items():
        if key not in obj:
            raise SchemaError(f"{where}: missing field {key!r}")
        v = obj[key]
        if isinstance(v, bool) or not isinstance(v, types):
            raise SchemaError(f"{where}: field {key!r} has type {type(v).__name__}, expected {types}")


def _frac(v: float, what: str) -> None:
    if not 0.0 <= v <= 1.0:
        raise SchemaError(f"{what} = {v} is not a fraction in [0, 1]")


def _finite(obj: dict, keys: Iterable[str], where: str) -> None:
    """Every number of ``keys`` finite (NaN passes no comparison, so it is refused explicitly)."""
    for k in keys:
        v = obj.get(k)
        if isinstance(v, float) and not math.isfinite(v):
            raise SchemaError(f"{where}: field {k!r} is {v}, not a finite number")


def _count(v: Any, what: str) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise SchemaError(f"{what} = {v!r} is not a non-negative integer")


def _check_headline_and_worst(obj: dict, where: str) -> None:
    h = obj["headline"]
    missing = [k for k in ("eps", "robust_acc", "attack") if k not in h]
    if missing:
        raise SchemaError(f"{where}: field 'headline.{missing[0]}' is missing")
    if not isinstance(h.get("eps"), _NUM) or isinstance(h.get("eps"), bool) or not math.isfinite(h["eps"]):
        raise SchemaError(f"{where}: field 'headline.eps' must be a finite number")
    if h.get("robust_acc") is not None:
        if isinstance(h["robust_acc"], bool) or not isinstance(h["robust_acc"], _NUM):
            raise SchemaError(f"{where}: field 'headline.robust_acc' must be a number or null")
        _frac(h["robust_acc"], f"{where}: headline.robust_acc")
    if not isinstance(h.get("attack"), str | type(None)):
        raise SchemaError(f"{where}: field 'headline.attack' must be a string or null")
    worst = obj.get("worst_case", [])
    if not isinstance(worst, list):
        raise SchemaError(f"{where}: field 'worst_case' must be a list")
    for i, wc in enumerate(worst):
        w = f"{where}: worst_case[{i}]"
        if not isinstance(wc, dict) or not isinstance(wc.get("attacks"), list):
            raise SchemaError(f"{w} needs robust_acc and attacks")
        _check_fields(wc, {"eps": _NUM, "norm": (str,), "robust_acc": _NUM, "per_attack": (dict,)}, w)
        _finite(wc, ("eps",), w)
        _count(wc.get("n_examples"), f"{w}.n_examples")
        _frac(wc["robust_acc"], f"{w}.robust_acc")


def validate(obj: Any, where: str = "results") -> dict[str, Any]:
    """Check ``obj`` against the schema; returns it, or raises :class:`SchemaError`."""
    if not isinstance(obj, dict):
        raise SchemaError(f"{where}: not a JSON object")
    if obj.get("schema") != SCHEMA:
        raise SchemaError(f"{where}: schema is {obj.get('schema')!r}, expected {SCHEMA!r}")
    _check_fields(obj, _TOP, where)
    if obj["mode"] not in MODES:
        raise SchemaError(f"{where}: mode {obj['mode']!r} not in {MODES}")
    _finite(obj, ("width", "beta", "adv_eps", "clean_acc"), where)
    _frac(obj["clean_acc"], f"{where}: clean_acc")
    _count(obj["n_examples"], f"{where}: n_examples")
    if obj["adv_train"] != "none" and not isinstance(obj["adv_eps"], _NUM):
        raise SchemaError(f"{where}: field 'adv_eps' must be a number when adv_train is {obj['adv_train']!r}")
    for i, ev in enumerate(obj["evaluations"]):
        w = f"{where}: evaluations[{i}]"
        if not isinstance(ev, dict):
            raise SchemaError(f"{w}: not an object")
        _check_fields(ev, _EVAL, w)
        _finite(ev, ("eps", "robust_acc", "wall_s", "max_perturbation"), w)
        _frac(ev["robust_acc"], f"{w}.robust_acc")
        _count(ev["n_examples"], f"{w}.n_examples")
        if ev["kind"] not in KINDS or ev["norm"] not in ("Linf", "L2") or ev["eps"] < 0:
            raise SchemaError(f"{w}: bad kind/norm/eps ({ev['kind']}, {ev['norm']}, {ev['eps']})")
        mask = ev.get("robust_mask")
        if mask is not None and (not isinstance(mask, str) or len(mask) != ev["n_examples"] or set(mask) - {"0", "1"}):
            raise SchemaError(f"{w}: robust_mask must be a string of n_examples 0/1 characters")
        warns = ev.get("warnings", [])
        if not isinstance(warns, list) or not all(isinstance(x, str) for x in warns):
            raise SchemaError(f"{w}: field 'warnings' must be a list of strings")
    _check_headline_and_worst(obj, where)
    san = obj["sanity"]
    if san.get("verdict") not in VERDICTS or not isinstance(san.get("checks"), list):
        raise SchemaError(f"{where}: sanity needs a verdict in {VERDICTS} and a list of checks")
    for c in san["checks"]:
        if (
            not isinstance(c, dict)
            or not isinstance(c.get("name"), str)
            or c.get("status") not in STATUSES
            or not isinstance(c.get("evidence"), str)
        ):
            raise SchemaError(f"{where}: sanity check {str(c)[:80]} needs name, status in {STATUSES} and evidence")
    return obj


def now() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def headline(evaluations: Sequence[dict], eps: float = HEADLINE_EPS) -> dict[str, Any]:
    """The lowest Linf robust accuracy at ``eps`` over all attacks (the reported number)."""
    at = [e for e in evaluations if e["norm"] == "Linf" and abs(e["eps"] - eps) < 1e-9]
    if not at:
        return {"eps": eps, "robust_acc": None, "attack": None}
    best = min(at, key=lambda e: e["robust_acc"])
    return {"eps": eps, "robust_acc": best["robust_acc"], "attack": best["attack"]}


def load(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Read and validate result files; a directory contributes every ``*.json`` below it."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*.json") if _looks_like_result(f))
        elif p.is_file():
            files.append(p)
        else:
            raise HwDqError(f"{p}: no such results file or directory")
    out = []
    for f in files:
        try:
            obj = json.loads(f.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise SchemaError(f"{f}: not valid JSON ({str(e)[:120]})") from None
        except OSError as e:
            raise SchemaError(f"{f}: cannot be read ({e.strerror})") from None
        out.append(validate(obj, str(f)))
    return out


def _looks_like_result(f: Path) -> bool:
    try:
        return json.loads(f.read_text()).get("schema") == SCHEMA
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, OSError, RecursionError):
        return False


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _bits(r: dict) -> str:
    if r["wbits"] is None and r["abits"] is None:
        return "fp32"
    return f"w{r['wbits'] or 'f'}a{r['abits'] or 'f'}"


def columns(results: Sequence[dict]) -> list[tuple[str, float, str]]:
    """(attack, eps, norm) columns present in any result, in a stable order."""
    seen: dict[tuple[str, float, str], None] = {}
    for r in results:
        for e in r["evaluations"]:
            seen[(e["attack"], float(e["eps"]), e["norm"])] = None
    return sorted(seen, key=lambda c: (c[2], c[0], c[1]))


def tabulate(results: Sequence[dict], cols: Sequence[tuple[str, float, str]] | None = None) -> str:
    """Markdown table: one row per result, robust accuracy (%) per attack and eps."""
    cols = list(cols) if cols is not None else columns(results)
    head = ["model", "mode", "bits", "beta", "adv. train", "defense", "target", "n", "clean"]
    head += [f"{a}@{e:g}" + ("" if n == "Linf" else f" ({n})") for a, e, n in cols]
    head += ["headline", "sanity"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        ev = {(e["attack"], float(e["eps"]), e["norm"]): e["robust_acc"] for e in r["evaluations"]}
        adv = r["adv_train"] if r["adv_train"] == "none" else f"{r['adv_train']}@{r['adv_eps']:g}"
        cells = [r["model"], r["mode"], _bits(r), f"{r['beta']:g}", adv, r["defense"] or "-",
                 "FPGA sim" if r.get("target") == "hw" else "PyTorch",
                 str(r["n_examples"]), _pct(r["clean_acc"])]  # fmt: skip
        cells += [_pct(ev.get(c)) for c in cols]
        h = r["headline"]
        cells += [f"{_pct(h['robust_acc'])} ({h['attack']})" if h["attack"] else "-", r["sanity"]["verdict"]]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Accuracies in %; eps in 1/255 (Linf radius, or L2 radius x 255 for L2 attacks).")
    return "\n".join(lines)


def describe(r: dict[str, Any]) -> str:
    """A markdown report of one result: the table row, every evaluation and the sanity checks."""
    lines = [f"# Robustness of {r['run_dir']} ({r['name']})", "", tabulate([r]), "", "## Evaluations", ""]
    lines += [
        "| attack | kind | norm | eps | robust acc | n | seed | wall s | params |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for e in r["evaluations"]:
        par = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in e["params"].items())
        lines.append(
            f"| {e['attack']} | {e['kind']} | {e['norm']} | {e['eps']:g} | {_pct(e['robust_acc'])} "
            f"| {e['n_examples']} | {e['seed']} | {e['wall_s']:.1f} | {par} |"
        )
    if r.get("worst_case"):
        lines += [
            "",
            "## Per-image worst case over every attack",
            "",
            "| eps | norm | robust acc | n | attacks (each one's own robust acc) |",
            "|---|---|---|---|---|",
        ]
        for w in r["worst_case"]:
            each = ", ".join(f"{a} {_pct(v)}" for a, v in w["per_attack"].items())
            if w.get("excluded"):
                each += "; not combined (other image count): " + ", ".join(
                    f"{x['attack']} (n={x['n_examples']})" for x in w["excluded"]
                )
            lines.append(f"| {w['eps']:g} | {w['norm']} | {_pct(w['robust_acc'])} | {w['n_examples']} | {each} |")
    lines += ["", f"## Gradient-masking sanity checks: {r['sanity']['verdict'].upper()}", ""]
    lines += [f"- **{c['status'].upper()}** {c['name']}: {c['evidence']}" for c in r["sanity"]["checks"]]
    return "\n".join(lines) + "\n"


def _flagged(evaluations: Sequence[dict], eps: float, norm: str = "Linf") -> list[dict]:
    """The evaluations at (``eps``, ``norm``) that kept per-image flags."""
    at = (e for e in evaluations if e.get("norm", "Linf") == norm and abs(float(e["eps"]) - eps) < 1e-9)
    return [e for e in at if e.get("robust_mask")]


def worst_case(evaluations: Sequence[dict], eps: float, norm: str = "Linf") -> dict[str, Any] | None:
    """Per-image worst case over the evaluations at (``eps``, ``norm``) that kept per-image flags.

    Flags combine image by image only over one image set: when the evaluations at this eps ran on
    different numbers of images, the set with the most attacks (then the most images) is used and
    the others are named in ``excluded``, never dropped silently.
    Returns ``{"eps", "norm", "robust_acc", "n_examples", "attacks", "per_attack"[, "excluded"]}``
    or None when no evaluation at that eps has flags.
    """
    at = _flagged(evaluations, eps, norm)
    if not at:
        return None
    sizes = Counter(len(e["robust_mask"]) for e in at)
    n = max(sizes, key=lambda k: (sizes[k], k))
    excluded = [{"attack": e["attack"], "n_examples": len(e["robust_mask"])} for e in at if len(e["robust_mask"]) != n]
    at = [e for e in at if len(e["robust_mask"]) == n]
    alive = [all(e["robust_mask"][i] == "1" for e in at) for i in range(n)]
    return {
        "eps": float(eps), "norm": norm, "robust_acc": sum(alive) / max(1, n), "n_examples": n,
        "attacks": [e["attack"] for e in at], "per_attack": {e["attack"]: e["robust_acc"] for e in at},
        **({"excluded": excluded} if excluded else {}),
    }  # fmt: skip


def worst_cases(evaluations: Sequence[dict]) -> list[dict[str, Any]]:
    """:func:`worst_case` at every (eps, norm) evaluated, in eps order."""
    keys = sorted({(float(e["eps"]), e.get("norm", "Linf")) for e in evaluations}, key=lambda k: (k[1], k[0]))
    return [w for e, nm in keys if (w := worst_case(evaluations, e, nm)) is not None]


def certificate_violations(certified: dict[str, Any], attacked: dict[str, Any], eps: float) -> list[int]:
    """Images a certificate accepts at ``eps`` that an attack in ``attacked`` broke (a sound
    certificate has none). Both results must hold per-image flags over the same images (same
    ``n_examples`` and ``seed``); raises :class:`SchemaError` when they cannot be compared."""
    n, seed = certified.get("n_examples"), certified.get("seed")
    if (attacked.get("n_examples"), attacked.get("seed")) != (n, seed):
        raise SchemaError(
            f"the certificate ran on {n} images (seed {seed}), the attacks on {attacked.get('n_examples')} "
            f"(seed {attacked.get('seed')}): run both with the same --n and --seed"
        )
    cert, atk = ([e["robust_mask"] for e in _flagged(r["evaluations"], eps) if len(e["robust_mask"]) == n]
                 for r in (certified, attacked))  # fmt: skip
    if not cert or not atk:
        which = "certificate" if not cert else "attack result"
        raise SchemaError(f"the {which} has no per-image flags at eps {eps:g}/255 over {n} images")
    return [i for i in range(n) if cert[0][i] == "1" and any(m[i] == "0" for m in atk)]
