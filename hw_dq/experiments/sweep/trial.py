"""One sweep trial: an ordinary run directory trained, built for the board (``--fit``) and attacked on the accelerator.

Each stage is the project's own function (train, build_run, evaluate_hw); a stage whose output
already exists is not redone, so a retried trial continues its run directory where it stopped.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hw_dq import run as rd
from hw_dq.errors import ConfigError
from hw_dq.experiments.sweep.spec import SweepSpec

SUMMARY = "sweep_trial.json"  # per-trial summary in the run directory (relative paths only)
PROXY = "proxy-hw"  # attacks/<PROXY>.json: the search's robustness measure
FINAL = "final-hw"  # attacks/<FINAL>.json: the front's re-evaluation


def suggest(trial: Any, space: dict[str, Any]) -> dict[str, Any]:
    """The trial's point of the search space (categorical lists, int or float ranges)."""
    params: dict[str, Any] = {}
    for name, dim in space.items():
        if isinstance(dim, list):
            params[name] = trial.suggest_categorical(name, dim)
        elif all(isinstance(dim[k], int) for k in ("low", "high")) and not dim.get("log") and "step" not in dim:
            params[name] = trial.suggest_int(name, dim["low"], dim["high"])
        else:
            params[name] = trial.suggest_float(name, dim["low"], dim["high"], log=bool(dim.get("log")),
                                               step=dim.get("step"))  # fmt: skip
    return params


def train_config(spec: SweepSpec, params: dict[str, Any]) -> Any:
    """The TrainConfig of a point: the SPEC's model, data and fixed recipe with the point's values."""
    from hw_dq.train.config import TrainConfig

    return TrainConfig.from_dict({"model": spec.model, "seed": spec.seed, **spec.data, **spec.fixed, **params})


def held_out_acc(row: dict[str, Any]) -> float:
    """What the pruner reads from an epoch's metrics row: held-out (test-subset) clean accuracy."""
    return float(row["test_acc"])


def should_prune(spec: SweepSpec, epoch: int, acc: float, finished: list[list[float]], n_classes: int = 10) -> bool:
    """Hopeless after ``epoch`` (1-based): at chance level, or below the finished trials' percentile."""
    p = spec.pruner
    if not p.enabled or epoch < p.warmup_epochs:
        return False
    if acc <= 1.0 / n_classes + p.margin:
        return True
    at = sorted(c[epoch - 1] for c in finished if len(c) >= epoch)
    if len(at) < p.n_startup:
        return False
    k = (len(at) - 1) * p.percentile / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    threshold = at[lo] + (at[hi] - at[lo]) * (k - lo)
    return acc < threshold


def _finite(d: dict[str, Any], where: str) -> None:
    for k, v in d.items():
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{where}: {k} is {v}; a trial's measurements must be finite")


def run_trial(
    spec: SweepSpec,
    run: Path,
    params: dict[str, Any],
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train, build and attack one point into run directory ``run``; returns (and writes) its summary."""
    from hw_dq.fpga.boards import get_board
    from hw_dq.fpga.build import build_run
    from hw_dq.fpga.hwattack import evaluate_hw
    from hw_dq.train.loop import train

    say = progress or (lambda _m: None)
    board = get_board(spec.board)
    timing: dict[str, float] = {}
    t0 = time.time()
    cfg = train_config(spec, params)
    if not (run / rd.MODEL).is_file():
        say(f"train {cfg.tag} width={cfg.width} beta={cfg.beta:g} adv={cfg.adv_train} epochs={cfg.epochs}")
    train(cfg, run, resume=True, progress=False, on_epoch=on_epoch)
    timing["train_s"] = time.time() - t0
    t0 = time.time()
    report_path = rd.Run(run).build_dir(board.name) / "report.json"
    if report_path.is_file():
        rep = rd.read_json(report_path)
    else:
        say(f"build for {board.name} (--fit)")
        rep = build_run(run, board.name, fit=True, clock_mhz=spec.clock_mhz)
    timing["build_s"] = time.time() - t0
    t0 = time.time()
    proxy_path = rd.Run(run).result_path(PROXY)
    if proxy_path.is_file():
        res = rd.read_json(proxy_path)
    else:
        say(f"proxy: {'+'.join(spec.proxy.attacks)} on the simulated accelerator, n={spec.proxy.n}")
        res = evaluate_hw(run, list(spec.proxy.attacks), [spec.proxy.eps], board=board.name, n=spec.proxy.n,
                          seed=spec.seed, steps=spec.proxy.steps, queries=spec.proxy.queries, name=PROXY,
                          sanity=False)  # fmt: skip
    timing["proxy_s"] = time.time() - t0
    metrics = rd.read_jsonl(run / rd.METRICS)
    summary = {
        "params": params,
        "tag": cfg.tag,
        "end_bits": cfg.end_bits,
        "width": cfg.width,
        "beta": cfg.beta,
        "lipschitz_target": cfg.lipschitz_target,
        "adv_train": cfg.adv_train,
        "adv_eps": cfg.adv_eps if cfg.adv_train != "none" else None,
        "epochs": cfg.epochs,
        "curve": [held_out_acc(r) for r in metrics],
        "test_acc_sw": float(metrics[-1]["test_acc"]) if metrics else None,
        "clean": float(res["clean_acc"]),
        "robust": float(res["headline"]["robust_acc"]),
        "robust_by_attack": {e["attack"]: float(e["robust_acc"]) for e in res["evaluations"]},
        "proxy": {"attacks": list(spec.proxy.attacks), "eps": spec.proxy.eps, "n": int(res["n_examples"])},
        "fps": float(rep["fps"]),
        "lut": float(rep["total"]["LUT"]),
        "bram": float(rep["total"]["BRAM_18K"]),
        "lut_util": float(rep["utilisation"]["LUT"]),
        "bram_util": float(rep["utilisation"]["BRAM_18K"]),
        "fits": bool(rep["fits"]),
        "board": board.name,
        "clock_mhz": float(rep["clock_mhz"]),
        "timing_s": {k: round(v, 2) for k, v in timing.items()},
    }
    _finite({k: v for k, v in summary.items() if isinstance(v, float)}, f"trial {run.name}")
    rd.write_json(run / SUMMARY, summary)
    return summary


def objective_values(spec: SweepSpec, s: dict[str, Any]) -> list[float]:
    """The summary's values in the SPEC's objective order."""
    return [float(s[o]) for o in spec.objectives]


def constraint_values(spec: SweepSpec, s: dict[str, Any]) -> dict[str, float]:
    """Optuna's convention: a trial is feasible when every value is <= 0. The board's own limits
    (FINN's recommended utilisation) always apply; the SPEC's constraints add to them."""
    from hw_dq.fpga.boards import UTIL_LIMITS

    c = spec.constraints
    lut_cap = min(UTIL_LIMITS["LUT"], c.get("max_lut", 1.0))
    bram_cap = min(UTIL_LIMITS["BRAM_18K"], c.get("max_bram", 1.0))
    out = {"lut": s["lut_util"] - lut_cap, "bram": s["bram_util"] - bram_cap}
    if "min_fps" in c:
        out["fps"] = (c["min_fps"] - s["fps"]) / max(1.0, c["min_fps"])
    return out
