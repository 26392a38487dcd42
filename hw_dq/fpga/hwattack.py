"""Attacks on the accelerator's own arithmetic (the bit-exact simulation of a FINN build).

A deployed accelerator takes UINT8 images and computes in integers; what matters is whether
*it* is as robust as the PyTorch model said. The threat models (entries of
:mod:`hw_dq.robust.registry` with an accelerator factory here):

* ``square`` - score-based black box on the simulation's logits (the AutoAttack authors'
  Square, 5,000 queries by default, as on the PyTorch model);
* ``transfer-autoattack`` / ``transfer-pgd`` - the reference AutoAttack's / PGD's examples
  crafted on the PyTorch model, rounded to the UINT8 grid, then run on the simulation;
* ``hsj`` - decision-based (ART's HopSkipJump) on the top-1 label only, which is all a
  finn-examples style board (TopK head) returns.

The accelerator's headline is the per-image worst case over the attacks run.

Every query is rounded to the UINT8 grid first (the accelerator's input), so an eps of
k/255 around a clean image stays within k/255. Loading and checking the simulator (build
folders, bare builds, the UINT8 grid, software/hardware agreement) lives in
:mod:`hw_dq.fpga.hwload`; its names stay importable from here.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hw_dq.fpga.hwload import DATAFLOW as DATAFLOW
from hw_dq.fpga.hwload import PARENT as PARENT
from hw_dq.fpga.hwload import _hw_activations as _hw_activations
from hw_dq.fpga.hwload import _reference_partition as _reference_partition
from hw_dq.fpga.hwload import _sw_activations as _sw_activations
from hw_dq.fpga.hwload import (
    agreement,
    bare_build,
    bare_source,
    bare_test_set,
    find_build,
    hw_labels,
    hw_logits,
    load_simulator,
    locate_disagreement,
    sw_labels,
    uint8_grid,
)
from hw_dq.fpga.hwload import build_board as build_board
from hw_dq.fpga.hwload import check_board as check_board
from hw_dq.fpga.hwload import finn_reference as finn_reference
from hw_dq.fpga.sim import HwSimulator

DEFAULT_HW_ATTACKS = ("square", "transfer-autoattack", "hsj")  # issue 10's standard for the accelerator
NO_MODEL = ("transfer attacks craft their examples on a PyTorch model, and a build of a bare QONNX file "
            "(build --onnx) has none")  # fmt: skip


# ------------------------------------------------------------------ attacks
@dataclass
class HwAttackResult:
    attack: str
    eps: float  # in 1/255
    n_examples: int
    seed: int
    robust_acc_hw: float  # accuracy of the accelerator on the adversarial inputs
    robust_acc_sw: float | None  # the PyTorch model on the same (UINT8-rounded) inputs; None: no model
    disagreement_adv: float | None  # fraction of adversarial inputs where the two top-1 labels differ
    max_linf_255: float  # largest perturbation actually used, in 1/255
    params: dict
    wall_s: float
    first_diff_layers: dict  # layer index -> count, over the disagreeing adversarial inputs
    robust_mask: str = ""  # per image: "1" = the accelerator survived

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _scores(sim: HwSimulator, nb_classes: int = 10):
    """The accelerator as a score function for attacks: [0, 1] torch images -> logits (one-hot for a TopK head)."""

    def predict(x: torch.Tensor) -> torch.Tensor:
        if len(x) == 0:  # Square asks for the scores of an empty batch once every image is fooled
            return torch.zeros((0, nb_classes))
        logits = hw_logits(sim, x.detach().cpu().numpy().astype(np.float32))
        if logits.shape[1] == 1:
            logits = np.eye(nb_classes, dtype=np.float32)[logits[:, 0].astype(np.int64)]
        return torch.from_numpy(logits)

    return predict


class _QueriesSpent(Exception):
    """An image's query cap was reached inside a decision-based attack (see :func:`hw_hsj`)."""


class _CappedLabels:
    """The accelerator's top-1 label with a per-image query cap, remembering the closest misclassified
    query (Linf, on the UINT8 grid) of the current image: what the attack found, even if it is stopped."""

    def __init__(self, sim: HwSimulator, cap: int) -> None:
        self.sim, self.cap = sim, cap  # start() sets the image before each attack

    def start(self, x0: np.ndarray, y0: int) -> None:
        self.x0, self.y0, self.used, self.best, self.best_d = x0, y0, 0, None, np.inf

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.used + len(x) > self.cap:
            raise _QueriesSpent
        self.used += len(x)
        labels = hw_labels(self.sim, x.astype(np.float32))
        wrong = np.flatnonzero(labels != self.y0)
        if len(wrong):
            d = np.abs(uint8_grid(x[wrong]) / 255.0 - self.x0[None]).reshape(len(wrong), -1).max(1)
            if d.min() < self.best_d:
                self.best_d, self.best = float(d.min()), x[wrong[d.argmin()]].astype(np.float32)
        return labels


def _labels_classifier(labels: Callable[[np.ndarray], np.ndarray], shape: tuple[int, ...], nb_classes: int = 10):
    """ART's decision-based wrapper around a top-1 label function (for HopSkipJump: :class:`_CappedLabels`)."""
    from art.estimators.classification import BlackBoxClassifier

    def predict(x: np.ndarray) -> np.ndarray:
        return np.eye(nb_classes, dtype=np.float32)[labels(x)]

    return BlackBoxClassifier(predict, input_shape=shape, nb_classes=nb_classes, clip_values=(0.0, 1.0))


# Accelerator factories named by the attack registry (hw_dq.robust.registry): each takes the
# PyTorch model, the simulator, images on the UINT8 grid and labels (numpy), eps in [0, 1] units,
# the budgets (AttackParams), the seed and the batch size, and ``progress`` (per-batch progress on
# stderr where the attack reports it, see hw_dq.robust.autoattack; None: silent); returns adversarial
# images and the parameters used.
def hw_transfer_pgd(model: nn.Module, sim: HwSimulator, x: np.ndarray, y: np.ndarray, eps: float, p: Any,
                    seed: int, batch_size: int, progress: Any = None) -> tuple[np.ndarray, dict]:  # fmt: skip
    """PGD crafted on the PyTorch model (straight-through gradients), same budget as ``pgd`` on it."""
    from hw_dq.robust.attacks import craft

    c = craft(model, torch.from_numpy(x), torch.from_numpy(y), "pgd", eps * 255, seed=seed, batch_size=batch_size,
              params=p, progress=progress)  # fmt: skip
    return c.x_adv.numpy(), {"source": "PyTorch model (STE gradients)", **c.params}


def hw_transfer_autoattack(model: nn.Module, sim: HwSimulator, x: np.ndarray, y: np.ndarray, eps: float, p: Any,
                           seed: int, batch_size: int, progress: Any = None) -> tuple[np.ndarray, dict]:  # fmt: skip
    """The reference AutoAttack (standard) examples crafted on the PyTorch model, run on the accelerator."""
    from hw_dq.robust.attacks import craft

    c = craft(model, torch.from_numpy(x), torch.from_numpy(y), "autoattack", eps * 255, seed=seed,
              batch_size=batch_size, params=p, progress=progress)  # fmt: skip
    return c.x_adv.numpy(), {"source": "PyTorch model", **c.params, "breakdown_on_pytorch": c.breakdown}


def hw_square(model: nn.Module, sim: HwSimulator, x: np.ndarray, y: np.ndarray, eps: float, p: Any,
              seed: int, batch_size: int, progress: Any = None) -> tuple[np.ndarray, dict]:  # fmt: skip
    """Square (the AutoAttack authors' implementation and settings) on the accelerator's logits."""
    from pyautoattack.square import SquareAttack

    atk = SquareAttack(_scores(sim), p_init=0.8, n_queries=p.square_queries, eps=eps, norm="Linf", n_restarts=1,
                       seed=seed, verbose=False, device="cpu", resc_schedule=False)  # fmt: skip
    xs, ys = torch.from_numpy(x).split(batch_size), torch.from_numpy(y).split(batch_size)
    adv = torch.cat([atk.perturb(xb, yb) for xb, yb in zip(xs, ys, strict=True)])
    return adv.numpy(), {"queries": p.square_queries, "p_init": 0.8, "library": "pyautoattack",
                         "on": "simulated accelerator logits"}  # fmt: skip


def _seeded_start(labels: Callable[[np.ndarray], np.ndarray], x: np.ndarray, y_p: int, rng: np.random.RandomState,
                  tries: int = 100) -> np.ndarray | None:  # fmt: skip
    """A uniform random image the accelerator labels other than ``y_p``, drawn from ``rng`` (ART's own
    start comes from an unseeded ``np.random.RandomState()``, so a run could not be repeated); None if
    ``tries`` draws fail, as ART gives up."""
    for _ in range(tries):
        img = rng.uniform(0.0, 1.0, size=x.shape).astype(np.float32)
        if labels(img[None])[0] != y_p:
            return img
    return None


def hw_hsj(model: nn.Module, sim: HwSimulator, x: np.ndarray, y: np.ndarray, eps: float, p: Any,
           seed: int, batch_size: int, progress: Any = None) -> tuple[np.ndarray, dict]:  # fmt: skip
    """HopSkipJump (ART) on the accelerator's top-1 label; its query budget follows ``square_queries``.

    Each image is attacked on its own with a cap of 3x the nominal queries (``max_iter`` x
    (``max_eval`` + its searches)): on the accelerator's piecewise-constant, UINT8-rounded labels,
    ART's step-size search can halve its step without end (seen: one image held a run for over 50
    minutes, in ``HopSkipJump._attack``'s ``while not success``). A capped image keeps the closest
    misclassified query the attack had made (or its clean image), so a stop never invents an example.

    Repeatable from ``seed``: an image's starting point and its gradient estimate's noise (ART draws it
    from the global ``np.random``, seeded here per image and restored afterwards) depend on the seed and
    the image's pixels only, so a batch gives each image what a run on that image alone gives it."""
    from art.attacks.evasion import HopSkipJump

    it = max(1, p.square_queries // 100)
    cap = 3 * it * (100 + 50)  # the gradient estimate (max_eval) plus binary and step searches, per iteration
    labels = _CappedLabels(sim, cap)
    atk = HopSkipJump(_labels_classifier(labels, tuple(x.shape[1:])), norm=np.inf, max_iter=it, max_eval=100,
                      init_eval=20, verbose=False)  # fmt: skip
    out, capped, no_start = x.astype(np.float32), 0, 0  # astype copies
    state = np.random.get_state()
    try:
        for i in range(len(x)):
            labels.start(x[i], int(y[i]))
            key = [seed, zlib.crc32(np.ascontiguousarray(x[i], dtype=np.float32).tobytes())]
            np.random.seed(key)
            try:
                y_p = int(labels(x[i : i + 1].astype(np.float32))[0])
                start = _seeded_start(labels, x[i], y_p, np.random.RandomState([*key, 1]))
                if start is None:  # no random image changes the label: the attack fails, as ART's would
                    no_start += 1
                    continue
                out[i] = atk.generate(x[i : i + 1], x_adv_init=start[None])[0]
            except _QueriesSpent:
                capped += 1
                out[i] = labels.best if labels.best is not None else x[i]
    finally:
        np.random.set_state(state)
    return out, {"max_iter": it, "max_eval": 100, "query_cap": cap, "capped": capped, "no_start": no_start,
                 "seed": seed, "start": "seeded uniform image the accelerator labels otherwise (per image)",
                 "on": "simulated accelerator labels"}  # fmt: skip


def craft(
    attack: str,
    model: nn.Module,
    sim: HwSimulator,
    x: np.ndarray,
    y: np.ndarray,
    eps_255: float,
    seed: int = 0,
    steps: int | None = None,
    queries: int | None = None,
    params: Any = None,
    batch_size: int = 128,
    progress: Any = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Adversarial examples (on the UINT8 grid, in [0, 1]) for one hardware threat model of the registry.

    ``progress`` (e.g. :class:`hw_dq.robust.evaluate.Progress`): per-batch progress on stderr where the
    attack reports it (the transfer of AutoAttack); None: silent."""
    from hw_dq.robust.attacks import AttackParams
    from hw_dq.robust.registry import check, hw_factory

    entry = check(attack, eps_255, "hw")
    p = _budgets(params or AttackParams(), steps, queries)
    eps = eps_255 / 255.0
    np.random.seed(seed)
    torch.manual_seed(seed)
    adv, par = hw_factory(entry)(model, sim, x, y, eps, p, seed, batch_size, progress=progress)
    adv = np.clip(adv, x - eps, x + eps) if entry.counting != "within-eps" else adv
    return uint8_grid(adv) / 255.0, par


def _budgets(p: Any, steps: int | None, queries: int | None) -> Any:
    from dataclasses import replace

    return replace(p, **({"pgd_steps": steps} if steps else {}), **({"square_queries": queries} if queries else {}))


def attack_hw(
    attack: str,
    model: nn.Module | None,
    sim: HwSimulator,
    x: np.ndarray,
    y: np.ndarray,
    eps_255: float,
    seed: int = 0,
    steps: int | None = None,
    queries: int | None = None,
    locate: int = 32,
    params: Any = None,
    batch_size: int = 128,
    progress: Any = None,
) -> HwAttackResult:
    """Robust accuracy of the accelerator under one threat model at Linf ``eps_255``/255.

    ``model`` (the PyTorch model) may be None for a bare build: the software columns are then None."""
    from hw_dq.robust.registry import check

    entry = check(attack, eps_255, "hw")
    t0 = time.time()
    x = uint8_grid(x) / 255.0
    adv, par = craft(attack, model, sim, x, y, eps_255, seed, steps, queries, params, batch_size, progress)
    linf = np.abs(adv - x).reshape(len(x), -1).max(1) * 255.0
    hw = hw_labels(sim, adv)
    sw = hw if model is None else sw_labels(model, adv)  # no model: no software column
    # robust = right on the clean image and on its adversarial one (as hw_dq.robust.attacks counts it)
    hw_clean = hw_labels(sim, x) == y
    sw_clean = hw_clean if model is None else sw_labels(model, x) == y
    if entry.counting == "within-eps":  # minimal-perturbation attack: an example beyond eps does not count
        within = linf <= eps_255 + 1e-6
        hw_ok = hw_clean & ((hw == y) | ~within)
        sw_ok = sw_clean & ((sw == y) | ~within)
    else:
        hw_ok, sw_ok = hw_clean & (hw == y), sw_clean & (sw == y)
    disagree = np.nonzero(hw != sw)[0]
    hist: dict[str, int] = {}
    if len(disagree) and locate > 0 and model is not None:  # locate=0: no layer search
        for r in locate_disagreement(model, sim, adv[disagree[:locate]].astype(np.float32)):
            hist[str(r["layer"])] = hist.get(str(r["layer"]), 0) + 1
    return HwAttackResult(
        attack=attack, eps=eps_255, n_examples=len(y), seed=seed,
        robust_acc_hw=float(hw_ok.mean()), robust_acc_sw=None if model is None else float(sw_ok.mean()),
        disagreement_adv=None if model is None else float(len(disagree) / max(1, len(y))),
        max_linf_255=float(linf.max(initial=0.0)),
        params=par, wall_s=time.time() - t0, first_diff_layers=hist,
        robust_mask="".join("1" if v else "0" for v in hw_ok),
    )  # fmt: skip


def evaluate_hw(
    run_dir: str | Path,
    attacks: list[str],
    eps: list[float],
    *,
    board: str | None = None,
    n: int | None = None,
    seed: int = 0,
    steps: int | None = None,
    queries: int | None = None,
    name: str = "robustness-hw",
    data: str | None = None,
    data_dir: str | None = None,
    progress: bool = False,
    params: Any = None,
    device: str = "cpu",
    batch_size: int = 128,
    sanity: bool = True,
) -> dict[str, Any]:
    """Attack the simulated accelerator of a run's FINN build; writes ``RUN_DIR/attacks/<name>.json``.

    Same schema and record builder as the software results (:mod:`hw_dq.robust.evaluate`),
    with ``target = "hw"``, the build folder, the software/hardware agreement on clean
    inputs, and per evaluation the PyTorch model's accuracy on the same inputs and where the
    two first disagree. The headline is the per-image worst case over the attacks run.
    ``device`` is where the PyTorch model crafts transfer examples (the simulator runs on
    the CPU: it is exact there); ``steps``/``queries`` override ``params`` (the defaults are
    those of the same attacks on the PyTorch model).
    """
    from hw_dq import run as rd
    from hw_dq.errors import ConfigError
    from hw_dq.robust.attacks import AttackParams
    from hw_dq.robust.evaluate import Progress, evaluation, record, write
    from hw_dq.robust.registry import ATTACKS, check
    from hw_dq.robust.sanity import masking_checks, verdict

    for a in attacks:
        for e in eps:
            check(a, e, "hw")
    if not attacks or not eps:
        raise ConfigError("give at least one attack (--attacks) and one eps (--eps)")
    if n is not None and n <= 0:
        raise ConfigError(f"invalid --n {n}: must be positive")
    if batch_size <= 0:
        raise ConfigError(f"invalid --batch-size {batch_size}: must be positive")
    p = _budgets(params or AttackParams(), steps, queries)
    run = Path(run_dir)
    skipped: list[dict[str, str]] = []
    if bare_build(run):  # a user's own QONNX, built with 'build --onnx': the accelerator alone
        build = find_build(run, board)  # --board, if given, must be the build's own
        model, cfg = None, bare_source(run)
        skipped = [{"attack": a, "reason": NO_MODEL} for a in attacks if ATTACKS[a].kind == "transfer"]
        attacks = [a for a in attacks if ATTACKS[a].kind != "transfer"]
        if not attacks:
            raise ConfigError(f"{run}: {NO_MODEL}; choose square or hsj (--attacks square,hsj)")
        if progress:
            print(f"note: skipped {', '.join(s['attack'] for s in skipped)}: {NO_MODEL}", flush=True)
        ds = bare_test_set(n, seed, data, data_dir)
    else:
        model, cfg = rd.load_model(run, device=rd.resolve_device(device))
        build = find_build(run, board)
        ds = rd.Run(run).test_set(n, seed, data, data_dir)  # the one definition of the evaluated images
    sim = load_simulator(build)
    x, y = (t.numpy() for t in ds.tensors())
    agree = agreement(None if model is None else model.cpu(), sim, x, y)
    model = None if model is None else model.to(rd.resolve_device(device))
    evals = []
    bar = Progress(progress)  # per-batch lines on a terminal only (the transfer of AutoAttack reports them)
    for a in attacks:
        for e in eps:
            bar.start(f"hw {a} @ {e:g}/255")
            r = attack_hw(a, model, sim, x, y, e, seed=seed, params=p, batch_size=batch_size,
                          progress=bar if bar.on else None)  # fmt: skip
            evals.append(evaluation(
                a, ATTACKS[a].kind, "Linf", e, r.robust_acc_hw, r.n_examples, seed, r.wall_s, r.max_linf_255,
                r.params, {"robust_acc_sw_same_inputs": r.robust_acc_sw, "disagreement_adv": r.disagreement_adv,
                           "first_diff_layers": r.first_diff_layers}, r.robust_mask,
            ))  # fmt: skip
            if progress:
                sw = "" if r.robust_acc_sw is None else f", PyTorch {100 * r.robust_acc_sw:.1f}%"
                print(f"  hw {a} @ {e:g}/255: accelerator {100 * r.robust_acc_hw:.1f}%{sw} ({r.wall_s:.1f} s)",
                      flush=True)  # fmt: skip
    checks = masking_checks(evals) if sanity else []
    checks.append({"name": "gradient masking (white-box)", "status": "skip",
                   "evidence": "the accelerator has no gradients; see the software results"})  # fmt: skip
    san = {"verdict": verdict(checks), "checks": checks}
    extra = {
        "build_dir": str(build), "simulator": "hw_dq.fpga.sim (checked bit-exact against FINN)",
        "agreement": {k: v for k, v in agree.items() if k != "first_diff"}, "first_diff_clean": agree["first_diff"],
    }  # fmt: skip
    if model is None:
        extra |= {"pytorch_model": None, "skipped": skipped}
    result = record(
        name=name, run_dir=run, cfg=cfg, dataset=ds.name, n=len(ds), seed=seed, clean_acc=agree["clean_acc_hw"],
        evaluations=evals, sanity=san, target="hw", extra=extra, device=rd.resolve_device(device),
    )  # fmt: skip
    write(run, result)
    return result
