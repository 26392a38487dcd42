"""Bit flips in the accelerator's memories (weights, thresholds, activation streams), on its exact simulation.

A FINN accelerator keeps its weights and thresholds in on-chip memories (BRAM/LUTRAM/URAM), where
single-event upsets and deliberate fault injection flip bits. This module reads those memories from
a folded build (what each MVAU / Thresholding node stores, its bit width, and where FINN places each
value: processing element, SIMD lane, memory word), flips bits in a *copy* of the integer state and
runs the edited build on :class:`hw_dq.fpga.sim.HwSimulator` (the build folder is never changed).

Storage model, per FINN's folding (``get_hw_compatible_*_tensor`` of the MVAU/Thresholding ops):

* weights: an ``MW x MH`` matrix of ``weightDataType`` (k bits; BIPOLAR = 1 bit, 0 -> -1, 1 -> +1).
  Output channel ``r`` lives in PE ``r % PE``; input ``c`` in SIMD lane ``c % SIMD`` of word
  ``(r // PE) * (MW // SIMD) + c // SIMD`` of that PE's memory.
* thresholds: ``MH x T`` values of the threshold tensor's datatype (its bit width after FINN's
  minimize_bit_width), channel ``r`` in PE ``r % PE``, word ``r // PE``.
* activations: the integer values a thresholding layer emits into its output stream
  (``outputDataType`` bits per value), one transient upset per flipped bit of one image.

A flip works in two's complement for signed types. A k-bit narrow-range weight (Brevitas keeps
|w| <= 2^(k-1) - 1) can become -2^(k-1) after a flip: the memory holds it, FINN's INTk datatype
includes it, and the simulator and FINN's execution both compute with it, so it is kept (it is
what the hardware would compute, save that the accumulator width FINN minimised for the
original weights may then be too narrow; see :func:`accumulator_exceeded`). Unsorted
thresholds after a flip are counted one by one (``x >= t`` for each t), as FINN's MultiThreshold
and the HLS thresholding do. Not modelled: the float output scale of a logits head
(ElementwiseMul) and FIFOs/data-width converters (their content is the activation stream).
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hw_dq.errors import HwDqError
from hw_dq.fpga.hwattack import DATAFLOW, PARENT, load_simulator
from hw_dq.fpga.sim import HwSimulator

KINDS = ("weights", "thresholds", "activations")
TARGETS = (*KINDS, "all")


class FaultError(HwDqError):
    """Invalid fault-injection request (rate, flips, target memory, build)."""


def _base(op: str) -> str:
    return op.removesuffix("_hls").removesuffix("_rtl")


def _attrs(node: Any) -> dict[str, Any]:
    from onnx import helper

    out = {}
    for a in node.attribute:
        v = helper.get_attribute_value(a)
        out[a.name] = v.decode() if isinstance(v, bytes) else v
    return out


# ------------------------------------------------------------------ value <-> stored code
def dtype_bits(dt: Any) -> int:
    """Bits one stored value of a FINN/QONNX DataType takes."""
    return int(dt.bitwidth())


def to_code(values: np.ndarray, dt: Any) -> np.ndarray:
    """Integer values -> the unsigned k-bit words the memory holds (two's complement if signed)."""
    v = np.rint(np.asarray(values, dtype=np.float64)).astype(np.int64)
    if dt.name == "BIPOLAR":
        return (v > 0).astype(np.int64)
    k = dtype_bits(dt)
    return np.bitwise_and(v, (1 << k) - 1) if dt.signed() else v


def from_code(codes: np.ndarray, dt: Any) -> np.ndarray:
    """Stored k-bit words -> integer values (as float32, the dtype FINN's initializers use)."""
    c = np.asarray(codes, dtype=np.int64)
    if dt.name == "BIPOLAR":
        return (2 * c - 1).astype(np.float32)
    k = dtype_bits(dt)
    if dt.signed():
        c = np.where(c >= (1 << (k - 1)), c - (1 << k), c)
    return c.astype(np.float32)


def flip_values(values: np.ndarray, index: np.ndarray, bit: np.ndarray, dt: Any) -> np.ndarray:
    """A copy of ``values`` with bit ``bit[i]`` of the value at flat ``index[i]`` flipped (repeats XOR)."""
    out = np.array(values, dtype=np.float32, copy=True)
    if len(index) == 0:
        return out
    flat = out.reshape(-1)
    uniq, inv = np.unique(np.asarray(index, dtype=np.int64), return_inverse=True)
    masks = np.zeros(len(uniq), dtype=np.int64)
    np.bitwise_xor.at(masks, inv, np.left_shift(1, np.asarray(bit, dtype=np.int64)))
    flat[uniq] = from_code(np.bitwise_xor(to_code(flat[uniq], dt), masks), dt)
    return out


# ------------------------------------------------------------------ the build's memories
@dataclass(frozen=True)
class Memory:
    """One memory of the folded accelerator (or one layer's activation stream)."""

    layer: int  # index of the compute node (MVAU / Thresholding) in the dataflow graph
    node: str
    op: str
    kind: str  # weights | thresholds | activations
    tensor: str  # initializer name (weights, thresholds) or output tensor name (activations)
    dtype: str
    bits: int  # per stored value
    shape: tuple[int, ...]  # per image for activations
    pe: int
    simd: int

    @property
    def count(self) -> int:
        return math.prod(self.shape)

    @property
    def n_bits(self) -> int:
        return self.count * self.bits

    def locate(self, index: int) -> dict[str, int]:
        """Where the value at flat ``index`` sits in FINN's folded memory (PE, lane, word)."""
        if self.kind == "weights":
            mw, mh = self.shape
            c, r = divmod(int(index), mh)
            return {"input": c, "output": r, "pe": r % self.pe, "simd_lane": c % self.simd,
                    "word": (r // self.pe) * (mw // self.simd) + c // self.simd}  # fmt: skip
        if self.kind == "thresholds":
            r, j = divmod(int(index), self.shape[1])
            return {"channel": r, "threshold": j, "pe": r % self.pe, "word": r // self.pe}
        return {"element": int(index)}


def find_memories(model: Any) -> list[Memory]:
    """Weights, thresholds and activation streams of every MVAU / Thresholding node, in graph order."""
    from qonnx.core.datatype import DataType

    mems: list[Memory] = []
    layer = 0
    for node in model.graph.node:
        op = _base(node.op_type)
        if op not in ("MVAU", "Thresholding"):
            continue
        a = _attrs(node)
        pe = int(a.get("PE", 1))
        simd = int(a.get("SIMD", 1))
        thr_in = None
        if op == "MVAU":
            w = model.get_initializer(node.input[1])
            if w is not None:
                wdt = (
                    DataType[a.get("weightDataType")]
                    if a.get("weightDataType")
                    else model.get_tensor_datatype(node.input[1])
                )
                mems.append(Memory(layer, node.name, node.op_type, "weights", node.input[1], wdt.name,
                                   dtype_bits(wdt), tuple(w.shape), pe, simd))  # fmt: skip
            if int(a.get("noActivation", 0)) == 0 and len(node.input) > 2:
                thr_in = node.input[2]
        else:
            thr_in = node.input[1]
        if thr_in is not None and model.get_initializer(thr_in) is not None:
            t = model.get_initializer(thr_in)
            tdt = model.get_tensor_datatype(thr_in)
            mems.append(Memory(layer, node.name, node.op_type, "thresholds", thr_in, tdt.name, dtype_bits(tdt),
                               tuple(t.shape), pe, 1))  # fmt: skip
            odt = model.get_tensor_datatype(node.output[0])
            shape = tuple(int(d) for d in model.get_tensor_shape(node.output[0])[1:])
            mems.append(Memory(layer, node.name, node.op_type, "activations", node.output[0], odt.name,
                               dtype_bits(odt), shape, pe, 1))  # fmt: skip
        layer += 1
    return mems


def bits_table(mems: Sequence[Memory]) -> list[dict[str, Any]]:
    """Stored bits per layer and memory (activations: bits per image in the layer's output stream)."""
    rows: dict[int, dict[str, Any]] = {}
    for m in mems:
        row = rows.setdefault(m.layer, {"layer": m.layer, "node": m.node, "pe": m.pe, "simd": m.simd,
                                        "weights": 0, "thresholds": 0, "activations": 0})  # fmt: skip
        row[m.kind] += m.n_bits
        row[f"{m.kind}_dtype"] = m.dtype
    return [rows[k] for k in sorted(rows)]


def accumulator_exceeded(model: Any, node_name: str, weights: np.ndarray) -> bool:
    """Whether the worst-case accumulator of an MVAU with ``weights`` leaves its minimised accDataType."""
    from qonnx.core.datatype import DataType

    node = next(n for n in model.graph.node if n.name == node_name)
    a = _attrs(node)
    if not a.get("accDataType"):
        return False
    acc = DataType[a["accDataType"]]
    idt = DataType[a["inputDataType"]]
    w = np.asarray(weights, dtype=np.float64)
    lo = np.where(w > 0, w * idt.min(), w * idt.max()).sum(0).min()
    hi = np.where(w > 0, w * idt.max(), w * idt.min()).sum(0).max()
    return bool(lo < acc.min() or hi > acc.max())


# ------------------------------------------------------------------ an editable copy of a build
class FaultyBuild:
    """A FINN build folder whose integer state can be edited in memory and simulated exactly."""

    def __init__(self, build: str | Path, verify: int = 8):
        from qonnx.core.modelwrapper import ModelWrapper

        self.build = Path(build)
        self.clean = load_simulator(self.build, verify)  # checked bit-exact against FINN's execution
        self.parent = ModelWrapper(str(self.build / PARENT))
        self.model = ModelWrapper(str(self.build / DATAFLOW))
        self.memories = find_memories(self.model)
        if not self.memories:
            raise FaultError(f"{self.build}: the dataflow model has no MVAU or Thresholding memories to fault")
        self._tmp = tempfile.TemporaryDirectory(prefix="hwdq-faults-")

    def values(self, mem: Memory) -> np.ndarray:
        return np.array(self.model.get_initializer(mem.tensor), dtype=np.float32, copy=True)

    def select(self, kinds: Sequence[str], layers: Sequence[int] | None = None) -> list[Memory]:
        """Memories of the given kinds (and layers); a kind or layer the build lacks is an error."""
        n_layers = 1 + max(m.layer for m in self.memories)
        for layer in layers or ():
            if not 0 <= layer < n_layers:
                raise FaultError(f"layer {layer} does not exist: the build has layers 0..{n_layers - 1}")
        chosen = [m for m in self.memories if m.kind in kinds and (layers is None or m.layer in layers)]
        for kind in kinds:
            if not any(m.kind == kind for m in chosen):
                where = f"layer(s) {', '.join(map(str, layers))} of " if layers else ""
                raise FaultError(f"{where}{self.build} has no {kind} memory; choose another --target or --layer")
        return chosen

    def simulator(self, edits: dict[str, np.ndarray]) -> HwSimulator:
        """The accelerator with some initializers replaced (the clean simulator when there are none)."""
        if not edits:
            return self.clean
        saved = {name: self.model.get_initializer(name) for name in edits}
        path = Path(self._tmp.name) / DATAFLOW
        try:
            for name, arr in edits.items():
                self.model.set_initializer(name, np.asarray(arr, dtype=np.float32))
            # the simulator reads a partition from a file: write the edited copy to a private one
            self.model.save(str(path))
        finally:
            for name, arr in saved.items():
                self.model.set_initializer(name, arr)
        return HwSimulator(self.parent, partition=path)


def predict(sim: HwSimulator, x_uint8: np.ndarray, batch: int = 256) -> np.ndarray:
    """Top-1 labels of the simulated accelerator (a TopK head returns the label itself)."""
    outs = [sim(x_uint8[i : i + batch]).numpy().reshape(len(x_uint8[i : i + batch]), -1)
            for i in range(0, len(x_uint8), batch)]  # fmt: skip
    out = np.concatenate(outs)
    return out[:, 0].astype(np.int64) if out.shape[1] == 1 else out.argmax(1)


# ------------------------------------------------------------------ random upsets
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
    idx, bit = sample_flips(rng, out.numel() * bits, bits, rate)
    if len(idx) == 0:
        return out, 0
    flat = out.detach().cpu().numpy().reshape(-1)
    new = flip_values(flat, idx, bit, dt)
    return torch.from_numpy(new).reshape(out.shape).to(out.device, out.dtype), len(idx)


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
    """Half-width of the Student-t 95% interval of the mean (0 for one trial)."""
    if len(accs) < 2:
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

            edits[m.tensor] = flip_values(fb.values(m), idx, bit, DataType[m.dtype])
            n_mem += len(idx)
    sim = fb.simulator(edits)
    acts = [m for m in mems if m.kind == "activations"]
    counter = [0]
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
        r = RateResult(
            rate=float(rate), trials=trials, acc_mean=float(np.mean(accs)),
            acc_std=float(np.std(accs, ddof=1)) if trials > 1 else 0.0, ci95=ci95(accs), accs=accs,
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


def check_rates(rates: Sequence[float]) -> None:
    if not rates:
        raise FaultError("give at least one --rate")
    for r in rates:
        if not (math.isfinite(r) and 0.0 <= r <= 1.0):
            raise FaultError(f"invalid rate {r}: a bit-flip rate is a probability in [0, 1]")


def kinds_for(target: str) -> tuple[str, ...]:
    if target not in TARGETS:
        raise FaultError(f"unknown target {target!r}; choose from {', '.join(TARGETS)}")
    return KINDS if target == "all" else (target,)
