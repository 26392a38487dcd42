"""The Python API: one function per ``hw-dq`` verb, calling the same stage functions as the CLI.

Every function takes and returns plain values (paths, dicts of the JSON records the CLI writes),
so a notebook or a script can chain the stages exactly as the command line does::

    import hw_dq

    run = hw_dq.train("runs/mine", model="tiny", epochs=1, train_subset=512)
    result = hw_dq.attack(run, attacks=["fgsm"], n=16)

User errors raise :class:`hw_dq.errors.HwDqError` subclasses with a one-line message (the
CLI prints that line). Nothing is imported until a function is called, so ``import hw_dq``
stays cheap. Progress output is off by default here (``progress=True`` turns it on).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hw_dq.errors import ConfigError

if TYPE_CHECKING:
    import numpy as np

    from hw_dq.fpga.export import ExportResult
    from hw_dq.robust.attacks import AttackParams

__all__ = [
    "TrainResult",
    "attack",
    "attack_hw",
    "build",
    "certify",
    "export",
    "faults",
    "reproduce",
    "simulate",
    "sweep",
    "sweep_report",
    "train",
]

RunLike = str | os.PathLike[str]


def _path(run: RunLike) -> Path:
    return Path(os.fspath(run))


@dataclass(frozen=True)
class TrainResult:
    """A finished (or resumed) training run: its directory and its last epoch's metrics.

    It is path-like, so it can be passed straight to :func:`attack`, :func:`export`, ...
    """

    run_dir: Path
    metrics: dict[str, Any] = field(default_factory=dict)

    def __fspath__(self) -> str:
        return str(self.run_dir)

    @property
    def test_acc(self) -> float | None:
        """Test accuracy of the last epoch (a fraction), when the run evaluated one."""
        return self.metrics.get("test_acc")


def train(
    out: RunLike, config: str | Path | None = None, *, resume: bool = False, progress: bool = False, **options: Any
) -> TrainResult:
    """Quantization-aware training into the run directory ``out`` (``hw-dq train``).

    Args:
        out: run directory to create (or continue with ``resume=True``).
        config: a JSON config file or a shipped config name (``hw-dq configs``); None: the defaults.
        resume: continue a killed run from its last checkpoint.
        progress: print per-epoch progress.
        **options: any :class:`hw_dq.train.config.TrainConfig` field, overriding the config
            (``model="tiny"``, ``wbits=2``, ``beta=1e-4`` with ``lipschitz_target="bn_folded"`` (the
            recommended DQ setting), ``epochs=1``, ``train_subset=512``,
            ``model="package.module:ClassName"`` with ``model_args={...}`` for your own network).

    Returns:
        The run directory and its final metrics row.
    """
    from hw_dq.train.config import load_config
    from hw_dq.train.loop import train as train_run

    cfg = load_config(config, **options)
    row = train_run(cfg, _path(out), resume=resume, progress=progress)
    return TrainResult(_path(out), dict(row or {}))


def _attack_params(params: AttackParams | Mapping[str, Any] | None) -> AttackParams | None:
    from hw_dq.robust.attacks import AttackParams

    if params is None or isinstance(params, AttackParams):
        return params
    try:
        return AttackParams(**dict(params))
    except TypeError as e:
        raise ConfigError(f"invalid attack parameters ({e})") from None


def attack(
    run_dir: RunLike,
    attacks: Sequence[str] | None = None,
    eps: Sequence[float] = (8.0,),
    *,
    on: str = "sw",
    board: str | None = None,
    n: int | None = None,
    seed: int = 0,
    batch_size: int = 128,
    name: str | None = None,
    force: bool = False,
    params: AttackParams | Mapping[str, Any] | None = None,
    sanity: bool = True,
    transfer_from: RunLike | None = None,
    defense: str | None = None,
    data: str | None = None,
    data_dir: str | None = None,
    device: str = "auto",
    version: str = "standard",
    progress: bool = False,
) -> dict[str, Any]:
    """Attack a trained run (``hw-dq attack``); writes ``RUN_DIR/attacks/<name>.json`` and returns that record.

    Args:
        run_dir: a training run directory.
        attacks: attack names (``hw-dq attack --help`` lists them); default ``fgsm, pgd`` on the
            PyTorch model, the accelerator's defaults with ``on="hw"``.
        eps: Linf radii in units of 1/255 (8 means 8/255); L2 attacks take the radius x 255.
        on: ``"sw"`` the PyTorch model, ``"hw"`` the bit-exact simulation of its FINN build
            (see :func:`attack_hw`).
        board: with ``on="hw"``, which build of the run (default: its only one).
        n: test images (default: the whole test set).
        name: results file stem (default ``robustness``, or ``robustness-2``, ... if taken).
        force: overwrite an existing result called ``name``.
        params: attack budgets, an :class:`hw_dq.robust.attacks.AttackParams` or a dict of its fields.
        sanity: run the gradient-masking checks.
        transfer_from: source run for ``transfer-pgd`` (e.g. the full-precision twin).
        defense: input squeezers in the loop, e.g. ``"bits:4+median:2"``.
        device: where the model runs (``auto``: the GPU where PyTorch sees one).

    Returns:
        The ``hw-dq/robustness/v1`` record: ``clean_acc``, ``evaluations`` (one per attack and
        eps, with ``robust_acc``), ``headline`` (the per-image worst case), ``sanity``, ...
    """
    from hw_dq.robust.autoattack import check_version
    from hw_dq.robust.registry import check

    if on not in ("sw", "hw"):
        raise ConfigError(f"unknown target on={on!r}; use 'sw' (the PyTorch model) or 'hw' (the accelerator)")
    if on == "hw":
        refused = {"defense": defense, "transfer_from": transfer_from}
        if version != "standard":
            refused["version"] = version
        given = [k for k, v in refused.items() if v is not None]
        if given:
            raise ConfigError(f"attack(on='hw') does not take {', '.join(given)} (PyTorch-side options)")
        return attack_hw(run_dir, attacks, eps, board=board, n=n, seed=seed, batch_size=batch_size, name=name,
                         force=force, params=params, sanity=sanity, data=data, data_dir=data_dir, device=device,
                         progress=progress)  # fmt: skip
    check_version(version)
    attacks = list(attacks) if attacks is not None else ["fgsm", "pgd"]
    for a in attacks:
        for e in eps:
            check(a, e, "sw")
    from hw_dq.robust.evaluate import evaluate_run, result_name

    stem = result_name(_path(run_dir), name, "robustness", force)
    return evaluate_run(
        _path(run_dir), attacks, list(eps), n=n, seed=seed, batch_size=batch_size, name=stem,
        params=_attack_params(params), sanity=sanity,
        transfer_from=None if transfer_from is None else _path(transfer_from), defense=defense, data=data,
        data_dir=data_dir, progress=progress, device=device, version=version, force=True,
    )  # fmt: skip


def attack_hw(
    run_dir: RunLike,
    attacks: Sequence[str] | None = None,
    eps: Sequence[float] = (8.0,),
    *,
    board: str | None = None,
    n: int | None = None,
    seed: int = 0,
    batch_size: int = 128,
    name: str | None = None,
    force: bool = False,
    params: AttackParams | Mapping[str, Any] | None = None,
    sanity: bool = True,
    data: str | None = None,
    data_dir: str | None = None,
    device: str = "auto",
    progress: bool = False,
) -> dict[str, Any]:
    """Attack the simulated accelerator of a run's FINN build (``hw-dq attack --on hw``).

    The threat models of a deployed accelerator: score- and decision-based black-box attacks
    on its bit-exact simulation, and transfer attacks crafted on the run's PyTorch model.
    Needs a build (:func:`build`). Writes ``RUN_DIR/attacks/<name>.json`` (default
    ``robustness-hw``) and returns that record, which adds the software/hardware agreement.
    """
    from hw_dq.fpga.hwattack import DEFAULT_HW_ATTACKS, evaluate_hw
    from hw_dq.robust.evaluate import result_name
    from hw_dq.robust.registry import check

    attacks = list(attacks) if attacks is not None else list(DEFAULT_HW_ATTACKS)
    for a in attacks:
        for e in eps:
            check(a, e, "hw")
    stem = result_name(_path(run_dir), name, "robustness-hw", force)
    return evaluate_hw(
        _path(run_dir), attacks, list(eps), board=board, n=n, seed=seed, params=_attack_params(params), name=stem,
        data=data, data_dir=data_dir, progress=progress, device=device, batch_size=batch_size, sanity=sanity,
    )  # fmt: skip


def export(
    run_dir: RunLike, *, head: str = "logits", qcdq: bool = False, n: int = 32, out: RunLike | None = None
) -> ExportResult:
    """QONNX export of a run with the equivalence check against PyTorch (``hw-dq export``).

    Args:
        head: ``"logits"`` or ``"label"`` (a TopK node: the accelerator outputs the class index).
        qcdq: also write a QCDQ ONNX file (runs in onnxruntime).
        n: test images of the equivalence check.
        out: export folder (default ``RUN_DIR/export``, where :func:`build` looks).

    Returns:
        The paths (``qonnx``, ``qcdq``) and the ``equivalence`` record (``ok``, ``max_abs_logit_diff``, ...).
    """
    from hw_dq.fpga.export import export_run

    return export_run(_path(run_dir), head=head, qcdq=qcdq, n=n, out=None if out is None else _path(out))


def build(
    run_dir: RunLike,
    board: str,
    *,
    target_fps: float | None = None,
    fit: bool = False,
    clock_mhz: float | None = None,
    out: RunLike | None = None,
    boards_dir: RunLike | None = None,
    folding_config: RunLike | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """FINN dataflow build of a run (exported first if needed) or of a QONNX file (``hw-dq build``).

    Args:
        run_dir: a run directory, or a QONNX ``.onnx`` file.
        board: a board of the catalogue (``hw-dq boards``), e.g. ``"Pynq-Z1"``.
        target_fps: fold for this throughput; ``fit=True``: the highest throughput within
            FINN's utilisation limits (the default when neither is given).
        folding_config: a FINN folding JSON (e.g. an edited ``BUILD/folding_config.json``).
        out: build folder (default ``RUN_DIR/build/<board>``).

    Returns:
        The build report: ``fps``, ``latency_us``, ``utilisation``, ``fits``, ``build_dir``, ...
    """
    from hw_dq.fpga.build import build_run

    return build_run(
        _path(run_dir), board, target_fps=target_fps, fit=fit, clock_mhz=clock_mhz,
        out=None if out is None else _path(out), boards_dir=None if boards_dir is None else _path(boards_dir),
        progress=progress, folding_config=None if folding_config is None else _path(folding_config),
    )  # fmt: skip


def simulate(run_dir: RunLike, images: np.ndarray, *, board: str | None = None, batch_size: int = 256) -> np.ndarray:
    """The accelerator's outputs on ``images`` (float NCHW in [0, 1]), from the bit-exact simulator.

    ``run_dir`` is a run with a build (``board`` picks one of several) or a build folder. The
    simulator is first checked against FINN's own execution on the build's sample images.
    """
    from hw_dq.fpga.hwattack import find_build, hw_logits, load_simulator

    sim = load_simulator(find_build(_path(run_dir), board))
    return hw_logits(sim, images, batch_size=batch_size)


def certify(
    run_dir: RunLike,
    eps: Sequence[float] = (1.0, 2.0, 4.0, 8.0),
    *,
    on: str = "hw",
    board: str | None = None,
    n: int | None = None,
    seed: int = 0,
    name: str | None = None,
    data: str | None = None,
    data_dir: str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Certified accuracy of a run's accelerator (``on="hw"``) or PyTorch model (``"sw"``) per Linf radius
    (``hw-dq certify``).

    ``hw``: sound interval bounds propagated through the build's exact integer arithmetic, a lower bound
    on the robust accuracy under every attack; ``sw``: the float interval bounds of the PyTorch model (a
    float run has no build). ``eps`` in units of 1/255. Writes ``RUN_DIR/attacks/<name>.json`` (default
    ``certified-hw`` or ``certified-sw``) and returns it (``certified``: one row per eps).
    """
    if on == "sw":
        from hw_dq.robust.certified import certify_model_run

        if board is not None:
            raise ConfigError("a board names an accelerator build; certifying the PyTorch model (on sw) takes none: "
                              "drop --board")  # fmt: skip
        return certify_model_run(_path(run_dir), list(eps), n=n, seed=seed, name=name or "certified-sw", data=data,
                                 data_dir=data_dir, progress=progress)  # fmt: skip
    if on != "hw":
        raise ConfigError(f"unknown target on={on!r}; use 'hw' (the accelerator) or 'sw' (the PyTorch model)")
    from hw_dq.fpga.certify import certify_run

    return certify_run(_path(run_dir), list(eps), board=board, n=n, seed=seed, name=name or "certified-hw",
                       data=data, data_dir=data_dir, progress=progress)  # fmt: skip


def faults(run_dir: RunLike, *, progress: bool = False, **options: Any) -> dict[str, Any]:
    """Bit flips in a build's memories (``hw-dq faults``): random upsets or the Bit-Flip Attack.

    Args:
        run_dir: a run directory with a FINN build, or the build folder of ``hw-dq build --onnx``
            (random mode only: a bare QONNX build has no PyTorch model for the targeted attack).
        progress: print progress lines.
        **options: the keywords of :func:`hw_dq.fpga.faults_results.evaluate_faults`, which
            defines them and their defaults once: ``mode`` (``"random"``: Monte Carlo upsets at
            each of ``rates``, probability per stored bit; ``"targeted"``: the progressive
            Bit-Flip Attack, ``flips`` flips), ``target`` (random mode: ``"weights"``,
            ``"thresholds"``, ``"activations"`` or ``"all"``), ``layers``, ``trials``, ``n``,
            ``board``, ``seed``, ``name``, ``data``, ``data_dir``, ...

    Returns:
        The record written to ``RUN_DIR/faults/<name>.json``.
    """
    import inspect

    from hw_dq.fpga.faults_results import evaluate_faults

    known = sorted(set(inspect.signature(evaluate_faults).parameters) - {"run_dir", "progress"})
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join(unknown)} for faults(); valid: {', '.join(known)}")
    if options.get("mode", "random") == "random" and not options.get("rates"):
        raise ConfigError("faults(mode='random') needs rates=[...] (upset probability per stored bit)")
    return evaluate_faults(_path(run_dir), progress=print if progress else None, **options)


def reproduce(
    out: RunLike | None = None,
    *,
    scale: str = "cpu",
    data_dir: str | None = None,
    only: str | Sequence[str] | None = None,
    dry_run: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """The paper's experiment at CPU scale, resumable (``hw-dq reproduce``).

    Args:
        out: output folder (default: the CLI's default).
        scale: ``"cpu"`` (the stated plan), ``"smoke"`` (minutes), or a JSON scale file.
        only: run names to do (default all).
        dry_run: print the plan only.

    Returns:
        The summary (per-claim verdicts and the results table).
    """
    from hw_dq.experiments.reproduce import DEFAULT_OUT
    from hw_dq.experiments.reproduce import reproduce as run_reproduce

    names = only if only is None or isinstance(only, str) else ",".join(only)
    return run_reproduce(_path(out if out is not None else DEFAULT_OUT), scale=scale, data_dir=data_dir,
                         only=names, dry_run=dry_run, progress=progress)  # fmt: skip


def sweep(spec: str | Path, out: RunLike, *, storage: str | None = None, progress: bool = False) -> dict[str, int]:
    """Search the robustness x FPGA-cost Pareto front with Optuna (``hw-dq sweep SPEC --out DIR``).

    Runs trials until the study holds the SPEC's ``n_trials`` finished ones; calling it again
    continues the same study. ``storage`` (``postgresql://...``) lets any number of calls, on any
    machines, share one study (default: SQLite under ``out``). Returns the trials' state counts.
    """
    from hw_dq.experiments.sweep import sweep as run_sweep

    return run_sweep(spec, _path(out), storage=storage, progress=progress)


def sweep_report(sweep_dir: RunLike, *, min_fps: float = 0.0, final: bool = False,
                 storage: str | None = None, progress: bool = False) -> dict[str, Any]:  # fmt: skip
    """The Pareto front of a sweep folder (``hw-dq sweep DIR --report``): ``report.md``, the PNG plots
    and the best point per board for ``min_fps``; ``final`` re-evaluates the front with the SPEC's
    full evaluation standard first."""
    from hw_dq.experiments.sweep import report

    return report(_path(sweep_dir), storage=storage, min_fps=min_fps, final=final, progress=progress)
