"""A fast, batched, bit-exact executor of a FINN dataflow graph (the accelerator's semantics).

FINN's own python execution (``finn.core.onnx_exec.execute_onnx``) is the reference, but it
runs one image at a time, node by node, through numpy and onnxruntime sessions, far too
slowly for attacks over thousands of images; and the specialised ``_hls``/``_rtl`` nodes
of a finished build execute only in cppsim/rtlsim (Vitis HLS / Vivado). No library runs a
FINN graph batched, so this module compiles the graph into torch operations that reproduce
each node's arithmetic exactly:

* MVAU / MatMul: integer matrix-vector accumulation (exact: float32 when every possible
  accumulator fits 2^24, float64 otherwise), then multi-threshold activation;
* Thresholding / MultiThreshold: the count of thresholds ``x >= t`` per channel + ActVal;
* ConvolutionInputGenerator (FINN's im2col order: kh, kw, C), FMPadding, Pool,
  StreamingMaxPool, GlobalAccPool, LabelSelect (ties to the lower index, as ONNX TopK);
* Elementwise ops with numpy's promotion rules (integer operands in int64, the result
  stored as float32), data-width converters and FIFOs as identities.

Specialised nodes (``MVAU_hls``, ``Thresholding_rtl``...) compute what their base op does,
so a folded build folder executes here too. Unknown nodes raise :class:`SimulationError`.

(One module past 400 lines: the op table is one class, whose methods share the compiled graph's
constants, accumulator dtypes and the fused im2col + MVAU path, and whose walk ``certify`` reuses.)
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F  # noqa: N812

from hw_dq.errors import HwDqError
from hw_dq.run import resolve_device

EXACT_FLOAT32 = 2**24
SEARCH_ABOVE = 8  # thresholds per channel above which a binary search beats comparisons


class SimulationError(HwDqError):
    """The graph holds a node the simulator cannot execute bit-exactly."""


def _base_op(op_type: str) -> str:
    for suffix in ("_hls", "_rtl"):
        if op_type.endswith(suffix):
            return op_type[: -len(suffix)]
    return op_type


def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


@dataclass
class Step:
    """One compiled node: ``fn(*inputs) -> outputs`` on torch tensors (batch first)."""

    name: str
    op: str
    inputs: list[str]
    outputs: list[str]
    fn: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]]
    shapes: list[tuple[int, ...] | None] | None = None  # declared output shapes (batch 1)
    # the ONNX node(s) this step computes (ConvolutionInputGenerator + MVAU when fused) and the
    # graph they belong to, so another semantics (hw_dq.fpga.certify's intervals) can re-read them
    nodes: tuple[Any, ...] = ()
    graph: Any = None


def _threshold(x: torch.Tensor, thr: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """Number of thresholds each value reaches (``x >= t``), per channel; exact counting."""
    if not channels_last and x.dim() > 2:
        x = x.movedim(1, -1)
    c = x.shape[-1]
    t = thr.to(x.dtype)
    if t.shape[0] == 1 and c > 1:
        t = t.expand(c, -1)
    if t.shape[1] > SEARCH_ABOVE and bool((t[:, 1:] >= t[:, :-1]).all()):
        # many sorted thresholds: a batched binary search per channel counts t <= x exactly
        flat = x.reshape(-1, c)
        out = torch.searchsorted(t.contiguous(), flat.t().contiguous(), right=True).t().to(x.dtype)
        out = out.reshape(x.shape)
    else:
        # few (or unsorted) thresholds: one broadcast comparison per threshold, counted in place in
        # uint8 where the count fits (a quarter of the memory traffic of a float count)
        out = torch.ge(x, t[:, 0]).to(torch.uint8 if t.shape[1] < 256 else torch.int32)
        for j in range(1, t.shape[1]):
            out.add_(torch.ge(x, t[:, j]))
        out = out.to(x.dtype)
    if not channels_last and out.dim() > 2:
        out = out.movedim(-1, 1)
    return out


class HwSimulator:
    """Compile a FINN (or streamlined QONNX) graph once, then run batches through it."""

    def __init__(
        self,
        model_or_path,
        device: str = "cpu",
        partition: str | Path | None = None,
        fuse: bool = True,
        chunk: int = 64,
    ):
        """``partition``: run this dataflow model in place of the graph's StreamingDataflowPartition
        (a build folder's folded ``dataflow_model.onnx`` inside its ``dataflow_parent.onnx``).
        ``fuse``: run each im2col + MVAU pair as one convolution where that is exact.
        ``chunk``: images per pass through the graph (bounds memory and keeps layers in cache)."""
        from qonnx.core.modelwrapper import ModelWrapper

        if chunk < 1:
            raise SimulationError(f"chunk must be >= 1 image, got {chunk}")
        self.fuse, self.chunk = fuse, chunk
        self.partition = Path(partition) if partition is not None else None

        self.model = model_or_path if isinstance(model_or_path, ModelWrapper) else ModelWrapper(str(model_or_path))
        # a graph read from a file may only reference files in that file's folder
        self.folder = None if isinstance(model_or_path, ModelWrapper) else Path(model_or_path).resolve().parent
        self.device = resolve_device(device)  # one-line error for a device this machine lacks
        self.consts: dict[str, torch.Tensor] = {}
        self.steps: list[Step] = []
        self.input_name = self.model.graph.input[0].name
        self.output_name = self.model.graph.output[0].name
        self.input_shape = tuple(self.model.get_tensor_shape(self.input_name))
        for init in self.model.graph.initializer:
            self.consts[init.name] = _finite_const(init.name, self.model.get_initializer(init.name), device)
        self._compile(self.model)

    # ------------------------------------------------------------------ compile
    def _dtype(self, model, name: str):
        return model.get_tensor_datatype(name)

    def _compile(self, model) -> None:
        skip: set[str] = set()  # nodes already compiled into a fused step
        for node in model.graph.node:
            op = _base_op(node.op_type)
            if op == "StreamingDataflowPartition":
                from qonnx.core.modelwrapper import ModelWrapper

                child = ModelWrapper(str(self.partition) if self.partition else self._inside(_attrs(node)["model"]))
                for init in child.graph.initializer:
                    self.consts[init.name] = _finite_const(init.name, child.get_initializer(init.name), self.device)
                # wire the partition's own input/output names through the child graph
                self.steps.append(Step(node.name, "Identity", [node.input[0]], [child.graph.input[0].name], _identity))
                self._compile(child)
                self.steps.append(
                    Step(node.name, "Identity", [child.graph.output[0].name], [node.output[0]], _identity)
                )
                continue
            if node.name in skip:
                continue
            if op == "ConvolutionInputGenerator" and self.fuse:
                consumers = model.find_consumers(node.output[0]) or []
                if len(consumers) == 1 and _base_op(consumers[0].op_type) == "MVAU":
                    mvau = consumers[0]
                    fn = self._fused_conv(model, node, mvau)
                    if fn is not None:
                        ins = [node.input[0], *mvau.input[1:]]
                        shapes = [_shape(model, o) for o in mvau.output]
                        self.steps.append(
                            Step(mvau.name, mvau.op_type, ins, list(mvau.output), fn, shapes, (node, mvau), model)
                        )
                        skip.add(mvau.name)
                        continue
            maker = getattr(self, f"_op_{op}", None)
            if maker is None:
                raise SimulationError(
                    f"node {node.name} ({node.op_type}) has no bit-exact simulation in hw_dq.fpga.sim; "
                    "supported: " + ", ".join(sorted(m[4:] for m in dir(self) if m.startswith("_op_")))
                )
            fn = maker(model, node, _attrs(node))
            shapes = [_shape(model, o) for o in node.output]
            self.steps.append(
                Step(node.name, node.op_type, list(node.input), list(node.output), fn, shapes, (node,), model)
            )

    def _inside(self, ref: Any) -> str:
        """A partition's model path from the graph, refused when it leaves the graph file's folder."""
        path = Path(ref.decode() if isinstance(ref, bytes) else str(ref))
        if self.folder is not None:
            full = (self.folder / path).resolve()
            if not full.is_relative_to(self.folder):
                raise SimulationError(
                    f"the graph references {path}, outside its own folder {self.folder}; pass the partition "
                    "explicitly (a build folder's dataflow_model.onnx) or rebuild"
                )
            path = full
        return str(path)

    def _const(self, name: str) -> torch.Tensor:
        return self.consts[name]

    def _op_Transpose(self, model, node, a):  # noqa: N802
        perm = list(a["perm"])
        return lambda x: x.permute(*perm)

    def _op_Reshape(self, model, node, a):  # noqa: N802
        shape = [int(s) for s in self._const(node.input[1]).tolist()]
        return lambda x, _s=None: x.reshape(x.shape[0], *shape[1:])

    def _op_Flatten(self, model, node, a):  # noqa: N802
        return lambda x: x.reshape(x.shape[0], -1)

    def _op_Identity(self, model, node, a):  # noqa: N802
        return _identity

    _op_StreamingDataWidthConverter = _op_Identity
    _op_StreamingFIFO = _op_Identity

    def _op_MultiThreshold(self, model, node, a):  # noqa: N802
        thr = self._const(node.input[1])
        scale, bias = float(a.get("out_scale", 1.0)), float(a.get("out_bias", 0.0))
        layout = a.get("data_layout", b"NCHW")
        layout = layout.decode() if isinstance(layout, bytes) else layout
        last = layout in ("NHWC", "NWC", "NC")
        return lambda x, _t=None: (scale * _threshold(x, thr, last) + bias).to(x.dtype)

    def _op_Thresholding(self, model, node, a):  # noqa: N802
        thr = self._const(node.input[1])
        bias = float(a.get("ActVal", 0))
        bipolar = a.get("outputDataType", b"") in (b"BIPOLAR", "BIPOLAR")

        def run(x, _t=None):
            y = _threshold(x, thr, True) + bias
            return 2 * y - 1 if bipolar else y

        return run

    def _acc_dtype(self, model, node, w: torch.Tensor) -> torch.dtype:
        idt = self._dtype(model, node.input[0])
        xmax = max(abs(idt.min()), abs(idt.max())) if idt.is_integer() else float("inf")
        bound = float(w.abs().sum(0).max()) * xmax
        return torch.float32 if bound < EXACT_FLOAT32 else torch.float64

    def _mvau_parts(self, model, node, a):
        """(K x OC weights in the accumulation dtype, XNOR popcount?, accumulator -> output)."""
        w = self._const(node.input[1]).double()
        xnor = bool(a.get("binaryXnorMode", 0))
        idt, wdt = self._dtype(model, node.input[0]), self._dtype(model, node.input[1])
        bipolar_both = str(idt) == "BIPOLAR" and str(wdt) == "BIPOLAR"
        popcount = xnor or bipolar_both
        if popcount:
            w = (w + 1) / 2 if bipolar_both else w
            dt = torch.float32 if w.shape[0] < EXACT_FLOAT32 else torch.float64
        else:
            dt = self._acc_dtype(model, node, w)
        act = int(a.get("noActivation", 0)) == 0
        thr = self._const(node.input[2]) if act else None
        bipolar_out = a.get("outputDataType", b"") in (b"BIPOLAR", "BIPOLAR")
        scale, bias = (2.0, -1.0) if bipolar_out else (1.0, float(a.get("ActVal", 0)))

        def activate(acc: torch.Tensor) -> torch.Tensor:
            if act:
                acc = _threshold(acc, thr, True)
                if scale != 1.0:
                    acc.mul_(scale)
                if bias:
                    acc.add_(bias)
            return acc.float()

        return w.to(dt), popcount, bipolar_both, activate

    def _op_MVAU(self, model, node, a):  # noqa: N802
        wt, popcount, bipolar_both, activate = self._mvau_parts(model, node, a)
        dt, mw = wt.dtype, int(a["MW"])

        def run(x, *_):
            lead = x.shape[:-1] if x.shape[-1] == mw else (x.shape[0],)
            x = x.reshape(*lead, mw).to(dt)
            if popcount:
                xb = (x + 1) / 2 if bipolar_both else x
                acc = xb @ wt + (1 - xb) @ (1 - wt)  # popcount of XNOR
            else:
                acc = x @ wt
            return activate(acc)

        return run

    def _fused_conv(self, model, cig, mvau) -> Callable | None:
        """ConvolutionInputGenerator + MVAU as one ``conv2d`` (no im2col copy), where exact.

        FINN's im2col order is (kh, kw, C), so the MVAU's K x OC matrix is a (kh, kw, C, OC)
        kernel. A float32 convolution of integers is exact when every partial sum stays below
        2^24 (the accumulator bound), whatever the summation order; wider accumulators, 1D and
        depthwise generators keep the unfused path. ``run`` forces full fp32 precision (no
        TF32/bf16 reductions), and every build is checked against FINN when it is loaded.
        """
        ca, ma = _attrs(cig), _attrs(mvau)
        k, s = list(ca["ConvKernelDim"]), list(ca["Stride"])
        d = list(ca.get("Dilation", [1, 1]))
        if int(ca.get("depthwise", 0)) or len(k) != 2 or k[0] * k[1] * int(ca["IFMChannels"]) != int(ma["MW"]):
            return None
        wt, popcount, bipolar_both, activate = self._mvau_parts(model, mvau, ma)
        if wt.dtype != torch.float32:
            return None
        ch, oc = int(ca["IFMChannels"]), wt.shape[1]
        kern = wt.reshape(k[0], k[1], ch, oc).permute(3, 2, 0, 1).contiguous(memory_format=torch.channels_last)
        inv = (1 - kern).contiguous(memory_format=torch.channels_last) if popcount else None

        def conv(x: torch.Tensor, wk: torch.Tensor) -> torch.Tensor:
            return F.conv2d(x, wk, stride=tuple(s), dilation=tuple(d))

        def run(x, *_):
            xc = x.permute(0, 3, 1, 2)  # NHWC storage read as channels-last NCHW: no copy
            if popcount:
                xb = (xc + 1) / 2 if bipolar_both else xc
                acc = conv(xb, kern) + conv(1 - xb, inv)
            else:
                acc = conv(xc, kern)
            return activate(acc.permute(0, 2, 3, 1))

        return run

    def _op_ConvolutionInputGenerator(self, model, node, a):  # noqa: N802
        k, s, d = list(a["ConvKernelDim"]), list(a["Stride"]), list(a.get("Dilation", [1, 1]))
        ch = int(a["IFMChannels"])

        def run(x):
            n, h, w, c = x.shape
            oh = (h - d[0] * (k[0] - 1) - 1) // s[0] + 1
            ow = (w - d[1] * (k[1] - 1) - 1) // s[1] + 1
            if d == [1, 1]:
                # a strided view (N, OH, OW, C, kh, kw), copied once in FINN's (kh, kw, C) order
                v = x.unfold(1, k[0], s[0]).unfold(2, k[1], s[1])[:, :oh, :ow]
                return v.permute(0, 1, 2, 4, 5, 3).reshape(n, oh, ow, k[0] * k[1] * ch)
            # dilated: one strided slice per kernel position, in FINN's (kh, kw, C) order
            windows = [
                x[
                    :,
                    ky * d[0] : ky * d[0] + s[0] * (oh - 1) + 1 : s[0],
                    kx * d[1] : kx * d[1] + s[1] * (ow - 1) + 1 : s[1],
                ]
                for ky in range(k[0])
                for kx in range(k[1])
            ]
            return torch.stack(windows, dim=3).reshape(n, oh, ow, k[0] * k[1] * ch)

        return run

    def _op_FMPadding(self, model, node, a):  # noqa: N802
        p = list(a["Padding"])  # top, left, bottom, right
        return lambda x: F.pad(x, (0, 0, p[1], p[3], p[0], p[2]))

    def _op_Pool(self, model, node, a):  # noqa: N802
        fn, k, ch = a["Function"], list(a["KernelSize"]), int(a["Channels"])
        fn = fn.decode() if isinstance(fn, bytes) else fn
        k2 = k[0] * k[1]
        shift = 0
        if fn == "QuantAvgPool":
            ib = self._dtype(model, node.input[0]).bitwidth()
            ob = self._dtype(model, node.output[0]).bitwidth()
            shift = max(0, int((2**ib - 1) * k2).bit_length() - ob)

        def run(x):
            v = x.reshape(*x.shape[:-1], k2, ch)
            if fn == "MaxPool":
                return v.amax(-2)
            if fn == "AccPool":
                return v.sum(-2)
            if fn == "AvgPool":
                return v.double().mean(-2).float()
            if fn == "QuantAvgPool":
                return torch.bitwise_right_shift(v.sum(-2).long(), shift).float()
            raise SimulationError(f"node {node.name}: pool function {fn} is not supported")

        return run

    def _op_StreamingMaxPool(self, model, node, a):  # noqa: N802
        k = list(a["PoolDim"])
        ceil = bool(a.get("CeilMode", 0))
        return lambda x: F.max_pool2d(x.permute(0, 3, 1, 2), tuple(k), ceil_mode=ceil).permute(0, 2, 3, 1)

    def _op_GlobalAccPool(self, model, node, a):  # noqa: N802
        return lambda x: x.double().sum(dim=(1, 2), keepdim=True).float()

    def _op_LabelSelect(self, model, node, a):  # noqa: N802
        k = int(a["K"])
        return lambda x: torch.sort(x.reshape(x.shape[0], -1), dim=1, descending=True, stable=True)[1][:, :k].float()

    def _op_TopK(self, model, node, a):  # noqa: N802
        k = int(self._const(node.input[1]).reshape(-1)[0])

        def run(x, *_):
            vals, idx = torch.sort(x, dim=-1, descending=True, stable=True)
            return vals[..., :k], idx[..., :k]

        return run

    def _binary(self, model, node, op: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        dts = [self._dtype(model, i) for i in node.input[:2]]

        def prep(v: torch.Tensor, dt) -> torch.Tensor:
            return v.long() if dt.is_integer() else v

        def run(x, y):
            a_, b_ = prep(x, dts[0]), prep(y, dts[1])
            if a_.dtype == torch.long and b_.is_floating_point() or b_.dtype == torch.long and a_.is_floating_point():
                a_, b_ = a_.double(), b_.double()  # numpy: int64 (op) float32 -> float64
            return op(a_, b_).float()

        return run

    def _op_ElementwiseMul(self, model, node, a):  # noqa: N802
        return self._binary(model, node, torch.mul)

    def _op_ElementwiseAdd(self, model, node, a):  # noqa: N802
        return self._binary(model, node, torch.add)

    def _op_ElementwiseSub(self, model, node, a):  # noqa: N802
        return self._binary(model, node, torch.sub)

    def _op_AddStreams(self, model, node, a):  # noqa: N802
        return lambda x, y: (x.double() + y.double()).float()

    def _op_DuplicateStreams(self, model, node, a):  # noqa: N802
        n_out = len(node.output)
        return lambda x: tuple(x for _ in range(n_out))

    def _op_Mul(self, model, node, a):  # noqa: N802
        return lambda x, y: x * y

    def _op_Add(self, model, node, a):  # noqa: N802
        return lambda x, y: x + y

    def _op_Div(self, model, node, a):  # noqa: N802
        return lambda x, y: x / y

    def _op_MatMul(self, model, node, a):  # noqa: N802
        return lambda x, y: (x.double() @ y.double()).float()

    # ------------------------------------------------------------------ run
    def run(self, x: torch.Tensor | np.ndarray, keep: bool = False) -> dict[str, torch.Tensor]:
        """Execute a batch (first axis = batch); returns the output (and every tensor if ``keep``)."""
        xt = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).float().to(self.device)
        if tuple(xt.shape[1:]) != self.input_shape[1:]:
            raise SimulationError(
                f"input shape {tuple(xt.shape[1:])} does not match the graph's {self.input_shape[1:]}"
            )
        if not bool(torch.isfinite(xt).all()):
            raise SimulationError("the input images hold NaN or Inf; the accelerator takes UINT8 pixels (0..255)")
        with _exact_fp32():
            if keep or len(xt) <= self.chunk:
                out = self._run(xt, keep)
            else:
                parts = [self._run(xt[i : i + self.chunk], False) for i in range(0, len(xt), self.chunk)]
                out = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        y = out[self.output_name]
        if y.is_floating_point() and not bool(torch.isfinite(y).all()):
            raise SimulationError("the simulated accelerator produced NaN or Inf outputs; rebuild with 'hw-dq build'")
        return out

    def _run(self, xt: torch.Tensor, keep: bool) -> dict[str, torch.Tensor]:
        return self.walk(xt, keep)

    def walk(
        self, xt: torch.Tensor, keep: bool = False, fns: list[Callable[..., Any]] | None = None
    ) -> dict[str, torch.Tensor]:
        """One pass of the graph walk over an already-checked batch (no chunking, no fp32 guard).

        ``fns`` (one callable per step, default each step's own ``fn``) gives the walk another
        semantics over the same wiring: :mod:`hw_dq.fpga.certify` passes interval functions."""
        ctx: dict[str, torch.Tensor] = {self.input_name: xt}
        if not hasattr(self, "_free"):
            last = {n: i for i, st in enumerate(self.steps) for n in st.inputs}
            self._free = [
                [n for n in st.inputs if last.get(n) == i and n != self.output_name] for i, st in enumerate(self.steps)
            ]
        for i, step in enumerate(self.steps):
            args = []
            for name in step.inputs:
                if not name:
                    continue
                args.append(ctx[name] if name in ctx else self.consts[name])
            out = (step.fn if fns is None else fns[i])(*args)
            outs = out if isinstance(out, tuple) else (out,)
            for j, (name, val) in enumerate(zip(step.outputs, outs, strict=False)):
                shape = step.shapes[j] if step.shapes else None
                if shape is not None and val.shape[1:] != shape[1:] and val[0].numel() == math.prod(shape[1:]):
                    val = val.reshape(val.shape[0], *shape[1:])  # as FINN reshapes to the declared shape
                ctx[name] = val
            if not keep:
                for name in self._free[i]:
                    ctx.pop(name, None)
        if not keep:
            ctx.pop(self.input_name, None)
        return ctx

    def __call__(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        """The graph's output for a batch, on the CPU whatever the simulation device (callers
        take ``.numpy()`` of it)."""
        return self.run(x)[self.output_name].cpu()


def _shape(model, name: str) -> tuple[int, ...] | None:
    try:
        shape = model.get_tensor_shape(name)
    except Exception:  # tensors without value info have no declared shape
        return None
    return tuple(int(d) for d in shape) if shape else None


@contextlib.contextmanager
def _exact_fp32():
    """Full-precision float32 matmul/convolution while simulating: TF32 off for matmul and for
    cuDNN convolutions (on by default for cuDNN), no reduced-precision bf16/fp16 reductions; any
    of them would break exactness on a GPU. The caller's settings are restored afterwards."""
    cuda_mm, cudnn_conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    before = (
        torch.get_float32_matmul_precision(), cudnn_conv.fp32_precision,
        cuda_mm.allow_bf16_reduced_precision_reduction, cuda_mm.allow_fp16_reduced_precision_reduction,
    )  # fmt: skip
    torch.set_float32_matmul_precision("highest")
    cudnn_conv.fp32_precision = "ieee"  # the new API only: mixing it with allow_tf32 is an error
    cuda_mm.allow_bf16_reduced_precision_reduction = False
    cuda_mm.allow_fp16_reduced_precision_reduction = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before[0])
        cudnn_conv.fp32_precision = before[1]
        cuda_mm.allow_bf16_reduced_precision_reduction = before[2]
        cuda_mm.allow_fp16_reduced_precision_reduction = before[3]


def _finite_const(name: str, arr: Any, device: str) -> torch.Tensor:
    """A graph constant as a tensor; NaN in a weight, threshold or scale is refused (an inf threshold
    is a level never reached, as FINN pads threshold tables, and stays)."""
    a = np.array(arr, copy=True)
    if a.dtype.kind == "f" and np.isnan(a).any():
        raise SimulationError(f"graph constant {name} holds NaN; the build is corrupt, rebuild with 'hw-dq build'")
    if a.dtype.kind == "f" and np.isinf(a).any() and "thres" not in name.lower():
        raise SimulationError(f"graph constant {name} holds Inf; the build is corrupt, rebuild with 'hw-dq build'")
    return torch.from_numpy(a).to(device)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def load(path: str | Path) -> HwSimulator:
    """A simulator for an ONNX file, with a one-line error for a missing or broken file."""
    p = Path(path)
    if not p.is_file():
        raise SimulationError(f"{p} not found; run 'hw-dq build' first")
    try:
        return HwSimulator(p)
    except SimulationError:
        raise
    except Exception as e:  # onnx/protobuf parse errors have many types
        raise SimulationError(f"{p} is not a readable FINN/ONNX model ({type(e).__name__}: {e})") from None
