"""Sound integer interval bounds through a FINN build's graph: certified robustness of the accelerator.

The accelerator computes in integers (UINT8 pixels, integer weights and accumulators, monotone
thresholds), so interval bounds propagated through its dataflow graph are sound for the exact
hardware semantics. The propagation reuses :class:`hw_dq.fpga.sim.HwSimulator`'s graph walk
(``HwSimulator.walk``) with a second semantics: an interval is the batch ``[lo; hi]`` stacked on
the batch axis, so every monotone op (transpose, reshape, padding, im2col, max-pool, thresholds,
additions of streams) runs its own bit-exact point function on both ends; matrix-vector units use
the centre/radius form ``(lo+hi) @ W`` and ``(hi-lo) @ |W|`` (exact integers, both doubled), and
element-wise ops with a constant take the min/max of the two ends' images (monotone either way).

The last linear layer is handled on the logit differences: the lower bound of ``z_y - z_j`` is
the row ``a_y w_y - a_j w_j`` applied to the interval of its input (tighter than two logit
bounds). An image is certified when, for every ``j != y``, either that lower bound exceeds the
float32 rounding margin of the output, or the accelerator's own output bounds (``lo(z_y)`` vs
``hi(z_j)``) decide the argmax under its tie rule (the lower index wins, as numpy's argmax and
FINN's LabelSelect/TopK do). At eps 0 the second test is the accelerator's exact decision.

No library speaks FINN's integer semantics, hence this module; the float model's bounds for
training are :mod:`hw_dq.nn.ibp`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F  # noqa: N812

from hw_dq.errors import CertifyError
from hw_dq.fpga.sim import EXACT_FLOAT32, HwSimulator, Step, _attrs, _base_op, _exact_fp32

# ops whose point function, applied to both ends of an interval, gives its exact image (monotone
# non-decreasing in every variable input: data movement, padding, max/sum pooling, stream sums)
MONOTONE = (
    "Transpose", "Reshape", "Flatten", "Identity", "StreamingDataWidthConverter", "StreamingFIFO",
    "ConvolutionInputGenerator", "FMPadding", "StreamingMaxPool", "GlobalAccPool", "AddStreams",
    "DuplicateStreams", "Thresholding",
)  # fmt: skip
# element-wise ops: monotone in the variable input when the other is a constant (either sign)
ELEMENTWISE = ("ElementwiseMul", "ElementwiseAdd", "ElementwiseSub", "Mul", "Add", "Div")
TERMINAL = ("LabelSelect", "TopK")  # the argmax head: decided from the bounds before it
THRESHOLDED = ("MVAU", "MultiThreshold", "Thresholding")
COVERED = (*MONOTONE, *ELEMENTWISE, *TERMINAL, "MVAU", "MatMul", "MultiThreshold", "Pool")
F32_MARGIN = 2.0**-21  # eight float32 roundings (relative 2^-24 each) per logit


@dataclass
class _Tail:
    """The last linear layer and the per-class affine map after it: ``z = a * (x @ W + off) + b``."""

    step: int  # index of the linear step
    weff: torch.Tensor  # K x C (float64)
    off: torch.Tensor  # C: popcount constant
    xform: tuple[float, float]  # its input x -> s * x + t (bipolar inputs read as {0, 1})
    a: torch.Tensor  # C
    b: torch.Tensor  # C


@dataclass
class CertifyBatch:
    """Certification of a batch at one eps: per image, and the summed interval widths per layer."""

    certified: np.ndarray  # bool per image
    width_sum: dict[str, float] = field(default_factory=dict)  # layer -> sum of (hi - lo) over values
    width_count: dict[str, int] = field(default_factory=dict)


def _split(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = v.shape[0] // 2
    return v[:n], v[n:]


def _minmax(v: torch.Tensor) -> torch.Tensor:
    a, b = _split(v)
    return torch.cat([torch.minimum(a, b), torch.maximum(a, b)])


class IntervalCertifier:
    """Interval semantics for a compiled :class:`HwSimulator` (same steps, same wiring)."""

    def __init__(self, sim: HwSimulator):
        self.sim = sim
        self.levels: dict[str, float] = {}  # thresholded layer -> output range (in its own units)
        self._record: dict[str, torch.Tensor] = {}
        self.fns = [self._interval_fn(i, st) for i, st in enumerate(sim.steps)]
        self.tail = self._find_tail()
        self.in_dt = sim.model.get_tensor_datatype(sim.input_name)

    # ------------------------------------------------------------------ interval semantics per op
    def _uncovered(self, st: Step, why: str = "") -> CertifyError:
        return CertifyError(
            f"node {st.name} ({st.op}) has no interval semantics in hw_dq.fpga.certify{why}; "
            f"covered: {', '.join(sorted(set(COVERED)))}"
        )

    def _interval_fn(self, i: int, st: Step) -> Callable[..., Any]:
        op = _base_op(st.op)
        node = st.nodes[-1] if st.nodes else None
        a = _attrs(node) if node is not None else {}
        if op in MONOTONE or op in TERMINAL:
            if op == "Thresholding":
                self.levels[st.name] = float(self.sim.consts[st.inputs[1]].shape[-1])
                return self._widths(st.name, st.fn)
            if op in TERMINAL:  # every output (values, indices) carries the scores' bounds on to the end
                k = len(st.outputs)
                return lambda x, *_: x if k == 1 else tuple(x for _ in range(k))
            return st.fn
        if op == "Pool":
            fn = a.get("Function", b"")
            if (fn.decode() if isinstance(fn, bytes) else fn) not in ("MaxPool", "AccPool", "AvgPool", "QuantAvgPool"):
                raise self._uncovered(st, f" (pool function {fn})")
            return st.fn
        if op == "MultiThreshold":
            self.levels[st.name] = float(self.sim.consts[st.inputs[1]].shape[-1]) * abs(float(a.get("out_scale", 1)))
            return self._widths(st.name, lambda x, *r: _minmax(st.fn(x, *r)))
        if op in ELEMENTWISE:
            var = [n for n in st.inputs[:2] if n not in self.sim.consts]
            if op in ("ElementwiseAdd", "Add") and len(var) == 2:
                return st.fn  # the sum of two intervals is the sum of their ends
            if op in ("ElementwiseSub",) and len(var) == 2:
                return lambda x, y: st.fn(x, torch.cat(_split(y)[::-1]))
            if len(var) != 1 or (op == "Div" and st.inputs[1] in var):
                raise self._uncovered(st, " (a product or quotient of two variable inputs)")
            return lambda x, y: _minmax(st.fn(x, y))
        if op == "MVAU":
            fn = self._conv(st) if len(st.nodes) == 2 else self._mvau(st)
            return self._widths(st.name, fn) if len(st.inputs) > 2 else self._keep_input(st.name, fn)
        if op == "MatMul":
            if st.inputs[1] not in self.sim.consts:
                raise self._uncovered(st, " (a product of two variable inputs)")
            return self._keep_input(st.name, self._matmul(st))
        raise self._uncovered(st)

    def _widths(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        """Keep a thresholded layer's output interval (for its width statistics)."""

        def run(*args):
            out = fn(*args)
            self._record[name] = out
            return out

        return run

    def _keep_input(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        """Keep a linear layer's input interval (the logit differences start from it)."""

        def run(x, *rest):
            self._record["in:" + name] = x
            return fn(x, *rest)

        return run

    def _mvau_weights(self, st: Step) -> tuple[torch.Tensor, torch.Tensor, tuple[float, float], Callable]:
        """(K x C effective weights, popcount offset, input transform, activation) of an MVAU.

        Popcount (XNOR) modes are linear in the {0, 1} reading of the input:
        ``xb @ w + (1 - xb) @ (1 - w) = xb @ (2w - 1) + sum(1 - w)``."""
        node = st.nodes[-1]
        wt, popcount, bipolar_both, activate = self.sim._mvau_parts(st.graph, node, _attrs(node))
        w = wt.double()
        if len(st.inputs) > 2:
            n_thr = self.sim.consts[st.inputs[2]].shape[-1]
            self.levels[st.name] = float(n_thr) * (2.0 if _attrs(node).get("outputDataType") in (b"BIPOLAR",) else 1.0)
        if not popcount:
            return w, torch.zeros(w.shape[1], dtype=torch.float64, device=w.device), (1.0, 0.0), activate
        xform = (0.5, 0.5) if bipolar_both else (1.0, 0.0)
        return 2 * w - 1, (1 - w).sum(0), xform, activate

    @staticmethod
    def _centre_radius(lo: torch.Tensor, hi: torch.Tensor, xform: tuple[float, float]):
        """Doubled centre and radius (integers for integer ends) after the input transform."""
        s, t = xform
        if (s, t) != (1.0, 0.0):
            lo, hi = s * lo + t, s * hi + t
        return lo + hi, hi - lo

    def _acc_dtype(self, st: Step, weff: torch.Tensor, xform: tuple[float, float]) -> torch.dtype | None:
        """float32 when every doubled partial sum provably stays below 2^24 (exact), float64 when it
        may not; None when the input type is not an integer one (decided per batch)."""
        idt = st.graph.get_tensor_datatype(st.nodes[0].input[0])
        if not idt.is_integer():
            return None
        s, t = xform
        xmax = max(abs(s * idt.min() + t), abs(s * idt.max() + t))
        return torch.float32 if 2 * xmax * float(weff.abs().sum(0).max()) < EXACT_FLOAT32 else torch.float64

    @staticmethod
    def _exact_dtype(dt: torch.dtype | None, c2: torch.Tensor, weff: torch.Tensor) -> torch.dtype:
        if dt is not None:
            return dt
        bound = float(c2.abs().max()) * float(weff.abs().sum(0).max()) if c2.numel() else 0.0
        return torch.float32 if bound < EXACT_FLOAT32 else torch.float64

    @staticmethod
    def _ends(ac: torch.Tensor, ar: torch.Tensor, off: torch.Tensor) -> torch.Tensor:
        """[lo; hi] accumulators from the doubled centre and radius (exact: both are even or both odd)."""
        n = ac.shape[0]
        acc = torch.empty((2 * n, *ac.shape[1:]), dtype=ac.dtype, device=ac.device)
        torch.sub(ac, ar, out=acc[:n])
        torch.add(ac, ar, out=acc[n:])
        acc.mul_(0.5)
        return acc.add_(off) if bool(off.any()) else acc

    def _mvau(self, st: Step) -> Callable[..., torch.Tensor]:
        weff, off, xform, activate = self._mvau_weights(st)
        mw, fixed = int(_attrs(st.nodes[-1])["MW"]), self._acc_dtype(st, weff, xform)
        ws = {dt: (weff.to(dt), weff.abs().to(dt), off.to(dt)) for dt in (torch.float32, torch.float64)}

        def run(x, *_):
            lead = x.shape[:-1] if x.shape[-1] == mw else (x.shape[0],)
            lo, hi = _split(x.reshape(*lead, mw))
            dt = fixed or self._exact_dtype(fixed, lo.abs() + hi.abs(), weff)
            c2, r2 = self._centre_radius(lo.to(dt), hi.to(dt), xform)
            wc, wr, o = ws[dt]
            return activate(self._ends(c2 @ wc, r2 @ wr, o))

        return run

    def _conv(self, st: Step) -> Callable[..., torch.Tensor]:
        """ConvolutionInputGenerator + MVAU fused by the simulator: the same centre/radius as convolutions."""
        cig = _attrs(st.nodes[0])
        k, s, d = list(cig["ConvKernelDim"]), list(cig["Stride"]), list(cig.get("Dilation", [1, 1]))
        weff, off, xform, activate = self._mvau_weights(st)
        ch, oc = int(cig["IFMChannels"]), weff.shape[1]
        fixed = self._acc_dtype(st, weff, xform)
        kern = weff.reshape(k[0], k[1], ch, oc).permute(3, 2, 0, 1)
        cl = torch.channels_last
        kerns = {
            dt: (kern.to(dt).contiguous(memory_format=cl), kern.abs().to(dt).contiguous(memory_format=cl), off.to(dt))
            for dt in (torch.float32, torch.float64)
        }

        def run(x, *_):
            lo, hi = _split(x.permute(0, 3, 1, 2))  # NHWC storage read as channels-last NCHW
            dt = fixed or self._exact_dtype(fixed, lo.abs() + hi.abs(), weff)
            c2, r2 = self._centre_radius(lo.to(dt), hi.to(dt), xform)
            kc, kr, o = kerns[dt]
            ac = F.conv2d(c2, kc, stride=tuple(s), dilation=tuple(d)).permute(0, 2, 3, 1)
            ar = F.conv2d(r2, kr, stride=tuple(s), dilation=tuple(d)).permute(0, 2, 3, 1)
            return activate(self._ends(ac, ar, o))

        return run

    def _matmul(self, st: Step) -> Callable[..., torch.Tensor]:
        """A float MatMul by a constant: centre/radius in float64, then rounded outwards to float32."""

        def run(x, w):
            lo, hi = _split(x.double())
            wd = w.double()
            c, r = (lo + hi) / 2 @ wd, (hi - lo) / 2 @ wd.abs()
            lo_, hi_ = (c - r).float(), (c + r).float()
            inf = torch.tensor(math.inf)
            return torch.cat([torch.nextafter(lo_, -inf), torch.nextafter(hi_, inf)])

        return run

    # ------------------------------------------------------------------ logit differences
    def _find_tail(self) -> _Tail | None:
        """The last linear layer and the per-class affine ops after it, if the graph ends that way."""
        steps = self.sim.steps
        affine: list[Step] = []
        for i in range(len(steps) - 1, -1, -1):
            st = steps[i]
            op = _base_op(st.op)
            if op in ("Identity", "StreamingDataWidthConverter", "StreamingFIFO", "Reshape", "Flatten", *TERMINAL):
                continue
            if op in ELEMENTWISE and op not in ("Div",):
                var = [n for n in st.inputs[:2] if n not in self.sim.consts]
                if len(var) != 1 or (op.endswith("Sub") and st.inputs[0] not in var):
                    return None
                affine.append(st)
                continue
            if op == "MVAU" and len(st.nodes) == 1 and len(st.inputs) <= 2:
                weff, off, xform, _ = self._mvau_weights(st)
                return self._compose(i, weff, off, xform, affine[::-1])
            if op == "MatMul" and st.inputs[1] in self.sim.consts:
                w = self.sim.consts[st.inputs[1]].double()
                if w.dim() != 2:
                    return None
                return self._compose(i, w, torch.zeros(w.shape[1], dtype=torch.float64), (1.0, 0.0), affine[::-1])
            return None
        return None

    def _compose(self, i: int, weff, off, xform, ops: list[Step]) -> _Tail | None:
        c = weff.shape[1]
        a = torch.ones(c, dtype=torch.float64)
        b = torch.zeros(c, dtype=torch.float64)
        for st in ops:
            name = next(n for n in st.inputs[:2] if n in self.sim.consts)
            k = self.sim.consts[name].double().reshape(-1)
            if k.numel() not in (1, c):
                return None
            op = _base_op(st.op)
            if op.endswith("Mul"):
                a, b = a * k, b * k
            elif op.endswith("Add"):
                b = b + k
            else:
                b = b - k
        return _Tail(i, weff.cpu(), off.cpu(), xform, a, b)

    def _diff_certified(self, y: torch.Tensor) -> torch.Tensor | None:
        """Per image and class j: lower bound of z_y - z_j (reals) above the float32 rounding margin.

        The accelerator rounds each tail op's result to float32 (relative error 2^-24 of that
        intermediate, at most |a_j acc_j| + |b_j|); the margin allows eight such roundings per logit."""
        t = self.tail
        x = self._record.get("in:" + self.sim.steps[t.step].name) if t is not None else None
        if t is None or x is None:
            return None
        lo, hi = _split(x.reshape(x.shape[0], -1).double().cpu())
        c2, r2 = self._centre_radius(lo, hi, t.xform)
        w = t.weff * t.a  # K x C: a_j w_j
        const = t.a * t.off + t.b
        ok = torch.zeros(len(y), w.shape[1], dtype=torch.bool)
        mag = (c2.abs() + r2) @ w.abs() / 2 + (t.a * t.off).abs()
        for cls in torch.unique(y).tolist():
            rows = (y == cls).nonzero().reshape(-1)
            dmat = w[:, cls : cls + 1] - w  # K x C: a_y w_y - a_j w_j
            dc = const[cls] - const
            cen, rad = c2[rows] @ dmat, r2[rows] @ dmat.abs()
            lb = (cen - rad) / 2 + dc
            size = (c2[rows].abs() + r2[rows]) @ dmat.abs() / 2 + dc.abs()  # bounds every fp64 partial sum
            zabs = mag[rows] + t.b.abs()  # per class: the largest |a_j acc_j| + |b_j| over the box
            margin = F32_MARGIN * (zabs[:, cls : cls + 1] + zabs) + 2.0**-40 * size
            ok[rows] = lb > margin
        return ok

    # ------------------------------------------------------------------ running
    def box(self, x: torch.Tensor | np.ndarray, eps: float) -> torch.Tensor:
        """The stacked input box ``[lo; hi]``: pixels within +-floor(eps) levels, clipped to the input type."""
        if not (isinstance(eps, int | float) and math.isfinite(eps) and 0 <= eps <= 255):
            raise CertifyError(f"invalid eps {eps}: must lie in [0, 255] (levels of the UINT8 input)")
        xt = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).float().to(self.sim.device)
        if tuple(xt.shape[1:]) != self.sim.input_shape[1:]:
            raise CertifyError(
                f"input shape {tuple(xt.shape[1:])} does not match the graph's {self.sim.input_shape[1:]}"
            )
        if not self.in_dt.is_integer():
            raise CertifyError(f"the graph's input is {self.in_dt}, not integer pixels: export with a UINT8 input")
        k = math.floor(eps + 1e-9)  # the accelerator sees UINT8 levels only
        lo_, hi_ = float(self.in_dt.min()), float(self.in_dt.max())
        return torch.cat([(xt - k).clamp(lo_, hi_), (xt + k).clamp(lo_, hi_)])

    def bounds(self, x: torch.Tensor | np.ndarray, eps: float, keep: bool = False) -> dict[str, tuple]:
        """Interval ``(lo, hi)`` of the output (and of every tensor if ``keep``) for one batch."""
        stacked = self.box(x, eps)
        self._record = {}
        with _exact_fp32():
            ctx = self.sim.walk(stacked, keep, self.fns)
        return {k: _split(v) for k, v in ctx.items() if isinstance(v, torch.Tensor) and k not in self.sim.consts}

    def certify(self, x: torch.Tensor | np.ndarray, y: np.ndarray, eps: float) -> CertifyBatch:
        """Certify a batch (UINT8 images, NCHW, as float) against its labels at ``eps`` levels."""
        out = CertifyBatch(np.zeros(0, bool))
        chunk = max(1, self.sim.chunk // 2)  # [lo; hi] of chunk/2 images: the working set the simulator tuned
        certified = []
        for i in range(0, len(x), chunk):
            xb, yb = x[i : i + chunk], torch.as_tensor(np.asarray(y[i : i + chunk]), dtype=torch.long)
            lo, hi = self.bounds(xb, eps)[self.sim.output_name]
            lo, hi = lo.reshape(len(xb), -1).double().cpu(), hi.reshape(len(xb), -1).double().cpu()
            for name in self.levels:
                if name in self._record:
                    a, b = _split(self._record[name])
                    wsum = float(b.sum(dtype=torch.float64)) - float(a.sum(dtype=torch.float64))  # exact: integers
                    out.width_sum[name] = out.width_sum.get(name, 0.0) + wsum
                    out.width_count[name] = out.width_count.get(name, 0) + a.numel()
            lo_y = lo.gather(1, yb[:, None])
            n_cls = lo.shape[1]
            j = torch.arange(n_cls)[None, :]
            # the accelerator's own bounds: argmax ties go to the lower index
            ok = torch.where(j > yb[:, None], lo_y >= hi, lo_y > hi)
            diff = self._diff_certified(yb)
            if diff is not None:
                ok = ok | diff
            ok[torch.arange(len(yb)), yb] = True
            certified.append(ok.all(1).numpy())
        out.certified = np.concatenate(certified) if certified else out.certified
        return out


def widths_table(batch: CertifyBatch, levels: dict[str, float], eps: float) -> list[dict[str, Any]]:
    """Per thresholded layer: mean interval width (output levels), as a fraction of its range, and its
    growth over the input's relative width (the certified analogue of error amplification)."""
    rel_in = 2 * math.floor(eps + 1e-9) / 255.0
    rows = []
    for name, total in batch.width_sum.items():
        mean = total / max(1, batch.width_count[name])
        rel = mean / levels[name] if levels.get(name) else None
        growth = rel / rel_in if rel is not None and rel_in > 0 else None
        rows.append({"layer": name, "mean_width": mean, "levels": levels.get(name), "rel_width": rel, "growth": growth})
    return rows


# ------------------------------------------------------------------ a run's accelerator, as a result file
# (the run-level writer lives here, beside the certifier, so the module passes ~400 lines: one stage, one file)
def certify_run(
    run_dir: str | Path,
    eps: list[float],
    *,
    board: str | None = None,
    n: int | None = None,
    seed: int = 0,
    name: str = "certified-hw",
    data: str | None = None,
    data_dir: str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Certified accuracy of a run's accelerator per eps; writes ``RUN_DIR/attacks/<name>.{json,md}``.

    Schema ``hw-dq/robustness/v1`` with ``target = "hw-certified"``: one evaluation per eps
    (``attack = "interval-certificate"``: a lower bound on every attack's robust accuracy), and a
    ``certified`` block with the bound-propagation time and per-layer interval width growth."""
    from hw_dq import run as rd
    from hw_dq.fpga.hwattack import bare_build, bare_source, bare_test_set, find_build, load_simulator, uint8_grid
    from hw_dq.provenance import provenance
    from hw_dq.robust import results as res
    from hw_dq.robust.certified import check_request
    from hw_dq.version import __version__

    eps = check_request(eps, n)
    run = Path(run_dir)
    bare = bare_build(run)  # a user's own QONNX built with 'build --onnx': no hw-dq run around it
    if not bare and not (run / rd.CONFIG).is_file():
        raise CertifyError(
            f"{run} is neither a run directory (no {rd.CONFIG}) nor a FINN build folder; train one with "
            "'hw-dq train', or build a QONNX file with 'hw-dq build --onnx FILE --board B'"
        )
    cfg = bare_source(run) if bare else rd.read_json(run / rd.CONFIG)
    build = find_build(run, board)  # a build folder: checked against --board
    IntervalCertifier(load_simulator(build, verify=0))  # an uncovered op fails before FINN runs
    sim = load_simulator(build)  # checked bit-exact against FINN's execution
    cert = IntervalCertifier(sim)
    tr, mc = cfg.get("train", {}), cfg.get("model", {})
    # the one definition of the evaluated images (a bare build: the embedded sample unless --data)
    ds = bare_test_set(n, seed, data, data_dir) if bare else rd.Run(run).test_set(n, seed, data, data_dir)
    x, y = (t.numpy() for t in ds.tensors())
    xu = uint8_grid(x)
    t0 = time.perf_counter()
    with _exact_fp32():
        labels = np.concatenate([sim(xu[i : i + 256]).numpy().reshape(len(xu[i : i + 256]), -1).argmax(1)
                                 for i in range(0, len(xu), 256)]) if len(xu) else np.zeros(0, np.int64)  # fmt: skip
    sim_s = time.perf_counter() - t0
    clean = labels == y
    exact0 = bool(np.array_equal(cert.certify(xu, y, 0).certified, clean))
    evals, blocks = [], []
    for e in eps:
        t0 = time.perf_counter()
        batch = cert.certify(xu, y, e)
        wall = time.perf_counter() - t0
        acc = float(batch.certified.mean()) if len(y) else 0.0
        layers = widths_table(batch, cert.levels, e)
        blocks.append({"eps": e, "certified_acc": acc, "n_certified": int(batch.certified.sum()),
                       "bound_s": round(wall, 4), "layers": layers})  # fmt: skip
        evals.append({
            "attack": "interval-certificate", "kind": "white", "norm": "Linf", "eps": e, "robust_acc": acc,
            "n_examples": len(y), "seed": seed, "wall_s": round(wall, 3),
            "max_perturbation": float(math.floor(e + 1e-9)),
            "params": {"method": "integer interval bounds through the FINN graph (hw_dq.fpga.certify)",
                       "sound": True, "last_layer": "logit differences" if cert.tail else "per-logit bounds"},
            "breakdown": {"n_certified": int(batch.certified.sum()), "bound_s": round(wall, 4)},
            "robust_mask": "".join("1" if v else "0" for v in batch.certified),  # "1" = certified
        })  # fmt: skip
        if progress:
            print(f"  certified @ {e:g}/255: {100 * acc:.1f}% ({wall:.2f} s)", flush=True)
    adv = tr.get("adv_train", "none")
    evidence = ("at eps 0 the certified images are exactly those the simulated accelerator classifies correctly"
                if exact0 else "at eps 0 the certificate and the accelerator disagree")  # fmt: skip
    check = {"name": "eps 0 equals the accelerator", "status": "pass" if exact0 else "warn", "evidence": evidence}
    result = {
        "schema": res.SCHEMA, "name": name, "created": res.now(), "hw_dq_version": __version__,
        "run_dir": str(run), "model": mc.get("name", "?"), "width": mc.get("width"), "mode": cfg.get("mode", "FP"),
        "wbits": mc.get("wbits"), "abits": mc.get("abits"), "beta": float(tr.get("beta", 0.0)),
        "lipschitz_target": tr.get("lipschitz_target", "weight"), "adv_train": adv,
        "adv_eps": tr.get("adv_eps") if adv != "none" else None, "defense": None, "dataset": ds.name,
        "split": "test", "n_examples": len(ds), "seed": seed, "threat_model": "Linf", "eps_units": "1/255",
        "clean_acc": float(clean.mean()) if len(y) else 0.0, "evaluations": evals, "headline": res.headline(evals),
        "sanity": {"verdict": "pass" if exact0 else "warn", "checks": [check]},
        "target": "hw-certified", "build_dir": str(build), "certified": blocks, "provenance": provenance(None, seed),
        "timing": {"simulator_clean_s": round(sim_s, 4), "bound_s_total": round(sum(b["bound_s"] for b in blocks), 4)},
    }  # fmt: skip
    res.validate(json.loads(json.dumps(result)), name)
    rd.write_json(run / rd.ATTACKS_DIR / f"{name}.json", result)
    rd.write_text(run / rd.ATTACKS_DIR / f"{name}.md", describe(result))
    return result


def describe(r: dict[str, Any]) -> str:
    """Markdown: certified accuracy per eps and the per-layer interval growth."""
    from hw_dq.robust.certified import certified_rows

    lines = [f"# Certified robustness of the accelerator: {r['run_dir']} ({r['name']})", "",
             f"Build `{r['build_dir']}`, {r['n_examples']} {r['dataset']} test images, clean accuracy "
             f"(accelerator) {100 * r['clean_acc']:.1f}%.", "", *certified_rows(r)]  # fmt: skip
    lines += ["", "Per thresholded layer: mean interval width (output levels), as a fraction of the layer's range, "
              "and its growth over the input box's relative width.", "",
              "| eps | layer | mean width | relative | growth |", "|---|---|---|---|---|"]  # fmt: skip
    for b in r["certified"]:
        for row in b["layers"]:
            rel = "-" if row["rel_width"] is None else f"{row['rel_width']:.3f}"
            gr = "-" if row["growth"] is None else f"{row['growth']:.2f}x"
            lines.append(f"| {b['eps']:g} | {row['layer']} | {row['mean_width']:.3f} | {rel} | {gr} |")
    return "\n".join(lines) + "\n"
