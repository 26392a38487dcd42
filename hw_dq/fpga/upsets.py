"""Random upsets in the accelerator's memories and activation streams, Monte Carlo on the simulation.

Each trial draws independent flips at a rate per stored bit: persistent ones in the chosen weight
and threshold memories (one fault pattern, evaluated on every image) and transient ones in the
activation streams (drawn afresh for every image, as a single-event upset in a stream would be).
The accuracy over trials gets a Student-t 95% confidence interval; the expected number of upsets
follows from the stored bits of each memory (:func:`hw_dq.fpga.faults.bits_table`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from hw_dq.fpga.faults import FaultError, FaultyBuild, Memory, check_rates, flip_values, predict
from hw_dq.fpga.sim import HwSimulator


def sample_flips(rng: np.random.Generator, n_bits: int, bits: int, rate: float) -> tuple[np.ndarray, np.ndarray]:
    """Independent flips at ``rate`` per stored bit: (flat value index, bit position) of each upset."""
    k = int(rng.binomial(n_bits, rate)) if rate > 0 else 0
    if k == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    flat = rng.choice(n_bits, size=k, replace=False)
    return flat // bits, flat % bits


def _flip_stream(
    out: torch.Tensor, dt: Any, bits: int, rate: float, rng: np.random.Generator
) -> tuple[torch.Tensor, int]:
    """Flips in a freshly computed stream tensor, in place: only the hit values are read and written."""
    idx, bit = sample_flips(rng, out.numel() * bits, bits, rate)
    if len(idx) == 0:
        return out, 0
    uniq, inv = np.unique(idx, return_inverse=True)
    flat = out.reshape(-1) if out.is_contiguous() else out.contiguous().reshape(-1)
    pos = torch.from_numpy(uniq).to(flat.device)
    new = flip_values(flat[pos].cpu().numpy(), inv.reshape(-1), bit, dt)
    flat[pos] = torch.from_numpy(new).to(flat.device, flat.dtype)
    return flat.reshape(out.shape), len(idx)


@contextmanager
def activation_upsets(
    sim: HwSimulator, mems: Sequence[Memory], rate: float, rng: np.random.Generator, counter: list[int]
) -> Iterator[HwSimulator]:
    """Transient upsets in the listed activation streams while inside the block (each image its own).

    Wraps the simulator's compiled steps that produce those streams (restored on exit); the
    simulator itself is not changed. ``counter[0]`` accumulates the number of flipped bits.
    """
    from qonnx.core.datatype import DataType

    by_tensor = {m.tensor: m for m in mems if m.kind == "activations"}
    saved: list[tuple[Any, Callable]] = []

    def wrap(fn: Callable, dt: Any, bits: int) -> Callable:
        def run(*args: torch.Tensor) -> torch.Tensor:
            res, n = _flip_stream(fn(*args), dt, bits, rate, rng)
            counter[0] += n
            return res

        return run

    try:
        for step in sim.steps:
            if step.outputs and step.outputs[0] in by_tensor:
                m = by_tensor[step.outputs[0]]
                saved.append((step, step.fn))
                step.fn = wrap(step.fn, DataType[m.dtype], m.bits)
        if len(saved) != len(by_tensor):
            missing = set(by_tensor) - {s.outputs[0] for s, _ in saved}
            raise FaultError(f"the simulator computes no stream {sorted(missing)[0]}; cannot inject activation upsets")
        yield sim
    finally:
        for step, fn in saved:
            step.fn = fn


@dataclass
class RateResult:
    rate: float
    trials: int
    acc_mean: float
    acc_std: float
    ci95: float  # half-width of the 95% confidence interval of the mean accuracy over trials
    accs: list[float]
    expected_flips_memory: float  # per trial, persistent upsets in weights/thresholds
    expected_flips_activation_per_image: float
    mean_flips_memory: float
    mean_flips_activation_per_image: float
    wall_s: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def ci95(accs: Sequence[float]) -> float:
    """Half-width of the Student-t 95% interval of the mean (0 for one trial or identical trials)."""
    if len(set(accs)) < 2:
        return 0.0
    from scipy import stats

    return float(stats.t.ppf(0.975, len(accs) - 1) * np.std(accs, ddof=1) / math.sqrt(len(accs)))


def random_trial(
    fb: FaultyBuild, mems: Sequence[Memory], rate: float, x: np.ndarray, y: np.ndarray, rng: np.random.Generator
) -> tuple[float, int, int]:
    """One Monte Carlo trial: (accuracy, memory flips, activation flips over all images)."""
    edits: dict[str, np.ndarray] = {}
    n_mem = 0
    for m in mems:
        if m.kind == "activations":
            continue
        idx, bit = sample_flips(rng, m.n_bits, m.bits, rate)
        if len(idx):
            from qonnx.core.datatype import DataType

            edits[m.tensor] = flip_values(fb.stored(m), idx, bit, DataType[m.dtype])
            n_mem += len(idx)
    acts = [m for m in mems if m.kind == "activations"]
    counter = [0]
    with fb.edited(edits) as sim:
        if acts and rate > 0:
            with activation_upsets(sim, acts, rate, rng, counter):
                pred = predict(sim, x)
        else:
            pred = predict(sim, x)
    return float((pred == y).mean()), n_mem, counter[0]


def random_faults(
    fb: FaultyBuild,
    mems: Sequence[Memory],
    rates: Sequence[float],
    x: np.ndarray,
    y: np.ndarray,
    trials: int,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> list[RateResult]:
    """Accuracy under independent upsets at each rate, Monte Carlo over ``trials`` fault patterns."""
    check_rates(rates)
    if trials < 1:
        raise FaultError(f"invalid --trials {trials}: must be >= 1")
    mem_bits = sum(m.n_bits for m in mems if m.kind != "activations")
    act_bits = sum(m.n_bits for m in mems if m.kind == "activations")
    out = []
    for i, rate in enumerate(rates):
        t0 = time.time()
        rng = np.random.default_rng([seed, i])
        accs, nm, na = [], [], []
        for _ in range(trials):
            acc, n_mem, n_act = random_trial(fb, mems, rate, x, y, rng)
            accs.append(acc)
            nm.append(n_mem)
            na.append(n_act / len(x))
        # identical trials (rate 0) report that accuracy exactly: a float mean of equal values can round
        same = accs[0] if len(set(accs)) == 1 else None
        r = RateResult(
            rate=float(rate), trials=trials, acc_mean=same if same is not None else float(np.mean(accs)),
            acc_std=0.0 if same is not None else float(np.std(accs, ddof=1)), ci95=ci95(accs), accs=accs,
            expected_flips_memory=mem_bits * rate, expected_flips_activation_per_image=act_bits * rate,
            mean_flips_memory=float(np.mean(nm)), mean_flips_activation_per_image=float(np.mean(na)),
            wall_s=time.time() - t0,
        )  # fmt: skip
        out.append(r)
        if progress:
            progress(f"  rate {rate:g}: accuracy {100 * r.acc_mean:.2f}% +- {100 * r.ci95:.2f} "
                     f"({r.mean_flips_memory:.1f} memory flips/trial, {r.mean_flips_activation_per_image:.2f} "
                     f"activation flips/image; {r.wall_s:.1f} s)")  # fmt: skip
    return out
