"""Bit flips in the accelerator's memories (weights, thresholds, activation streams), on its exact simulation.

A FINN accelerator keeps its weights and thresholds in on-chip memories (BRAM/LUTRAM/URAM), where
single-event upsets and deliberate fault injection flip bits. This module reads those memories from
a folded build (what each MVAU / Thresholding node stores, its bit width, and where FINN places each
value: processing element, SIMD lane, memory word), flips bits in a *copy* of the integer state and
runs the edited build on :class:`hw_dq.fpga.sim.HwSimulator` (the build folder is never changed).
A trial edits the loaded simulator in place (:meth:`FaultyBuild.edited`: the edited constants and
the steps that read them are recompiled by the simulator's own op methods, and restored on exit);
:meth:`FaultyBuild.simulator` re-loads a saved edited model, the slower path the tests compare with.

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
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
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
    ram: str = "auto"  # FINN's ram_style of the memory (block = BRAM, distributed = LUTRAM, ultra = URAM)

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
                                   dtype_bits(wdt), tuple(w.shape), pe, simd,
                                   str(a.get("ram_style", "auto"))))  # fmt: skip
            if int(a.get("noActivation", 0)) == 0 and len(node.input) > 2:
                thr_in = node.input[2]
        else:
            thr_in = node.input[1]
        if thr_in is not None and model.get_initializer(thr_in) is not None:
            t = model.get_initializer(thr_in)
            tdt = model.get_tensor_datatype(thr_in)
            # one row shared by all channels is stored once per channel (FINN tiles it to MH rows)
            rows = int(a.get("MH", a.get("NumChannels", t.shape[0])))
            mems.append(Memory(layer, node.name, node.op_type, "thresholds", thr_in, tdt.name, dtype_bits(tdt),
                               (max(rows, t.shape[0]), t.shape[1]), pe, 1,
                               str(a.get("ram_style_thresholds", a.get("ram_style", "auto")))))  # fmt: skip
            odt = model.get_tensor_datatype(node.output[0])
            shape = tuple(int(d) for d in model.get_tensor_shape(node.output[0])[1:])
            mems.append(Memory(layer, node.name, node.op_type, "activations", node.output[0], odt.name,
                               dtype_bits(odt), shape, pe, 1, "stream"))  # fmt: skip
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
        row[f"{m.kind}_ram"] = m.ram
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
        self._values: dict[str, np.ndarray] = {}

    def values(self, mem: Memory) -> np.ndarray:
        """A copy of a memory's stored values, in the memory's shape (shared threshold rows tiled)."""
        return self.stored(mem).copy()

    def stored(self, mem: Memory) -> np.ndarray:
        """The clean values of a memory, read once (read-only)."""
        if mem.tensor not in self._values:
            arr = np.array(self.model.get_initializer(mem.tensor), dtype=np.float32, copy=True)
            if arr.shape != mem.shape:
                arr = np.tile(arr, (mem.shape[0] // arr.shape[0], 1))
            arr.setflags(write=False)
            self._values[mem.tensor] = arr
        return self._values[mem.tensor]

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

    @contextmanager
    def edited(self, edits: dict[str, np.ndarray]) -> Iterator[HwSimulator]:
        """The loaded simulator with some initializers replaced while inside the block, restored on exit.

        Only the steps that read an edited tensor are recompiled, by the simulator's own op methods
        (the same code that compiles a loaded model, so the result equals :meth:`simulator`'s).
        Arrays equal to the clean values are skipped. A step that the edit moves off its fused
        path (a flipped weight widening the accumulator past exact float32) falls back to
        re-loading the edited model."""
        from hw_dq.fpga.sim import _attrs as sim_attrs
        from hw_dq.fpga.sim import _base_op

        sim = self.clean
        clean = {m.tensor: m for m in self.memories if m.kind != "activations"}
        changed = {n: a for n, a in edits.items() if n not in clean or not np.array_equal(a, self.stored(clean[n]))}
        touched = [st for st in sim.steps if any(n in changed for n in st.inputs)]
        saved_consts = {n: sim.consts[n] for n in changed}
        saved_fns = [(st, st.fn) for st in touched]
        fallback = False
        for n in changed:
            if n not in sim.consts:
                raise FaultError(f"{n} is not a stored tensor of {self.build}'s simulated accelerator")
        try:
            for n, arr in changed.items():
                sim.consts[n] = torch.from_numpy(np.array(arr, dtype=np.float32)).to(sim.device)
            for st in touched:
                if len(st.nodes) == 2:  # a fused im2col + MVAU
                    fn = sim._fused_conv(st.graph, *st.nodes)
                else:
                    node = st.nodes[0]
                    fn = getattr(sim, f"_op_{_base_op(node.op_type)}")(st.graph, node, sim_attrs(node))
                if fn is None:
                    fallback = True
                    break
                st.fn = fn
        except BaseException:
            self._restore(sim, saved_consts, saved_fns)
            raise
        if fallback:
            self._restore(sim, saved_consts, saved_fns)
            yield self.simulator(edits)
            return
        try:
            yield sim
        finally:
            self._restore(sim, saved_consts, saved_fns)

    @staticmethod
    def _restore(sim: HwSimulator, consts: dict[str, torch.Tensor], fns: list[tuple[Any, Any]]) -> None:
        sim.consts.update(consts)
        for st, fn in fns:
            st.fn = fn

    def simulator(self, edits: dict[str, np.ndarray]) -> HwSimulator:
        """The accelerator with some initializers replaced, re-loaded from a saved edited model (the clean
        simulator when there are none); :meth:`edited` is the fast in-place path."""
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


def finn_execute(build: str | Path, edits: dict[str, np.ndarray], x_uint8: np.ndarray) -> np.ndarray:
    """FINN's own python execution (``execute_onnx``, one image at a time) of the build with some
    initializers of its python-executable partition replaced: the reference a faulted simulation
    must equal."""
    from hw_dq.fpga import finn_compat
    from hw_dq.fpga.hwattack import _reference_partition

    finn_compat.prepare_finn()
    from finn.core.onnx_exec import execute_onnx
    from qonnx.core.modelwrapper import ModelWrapper

    b = Path(build)
    parent = ModelWrapper(str(b / PARENT))
    ref = _reference_partition(b, parent)
    if ref is None:
        raise FaultError(f"{b}: FINN's python-executable partition is missing; rebuild with 'hw-dq build'")
    with tempfile.TemporaryDirectory(prefix="hwdq-finn-") as tmp:
        part = ModelWrapper(ref)
        for name, arr in edits.items():
            if part.get_initializer(name) is None:
                raise FaultError(f"{name} is not a stored tensor of FINN's partition {ref}")
            part.set_initializer(name, np.asarray(arr, dtype=np.float32))
        path = str(Path(tmp) / "partition.onnx")
        part.save(path)
        for node in parent.graph.node:
            if node.op_type == "StreamingDataflowPartition":
                for a in node.attribute:
                    if a.name == "model":
                        a.s = path.encode()
        iname, oname = parent.graph.input[0].name, parent.graph.output[0].name
        outs = [execute_onnx(parent, {iname: x_uint8[i : i + 1]})[oname] for i in range(len(x_uint8))]
    return np.concatenate(outs)
