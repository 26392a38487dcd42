"""The Bit-Flip Attack (Rakin, He, Fan, ICCV 2019) on the weight memories of a FINN accelerator.

Progressive bit search: the gradient of the loss with respect to every stored weight bit comes
from the Brevitas twin (the run's PyTorch model, whose integer weights equal the accelerator's);
in each layer the bit whose flip raises the loss most to first order is a candidate, the
candidate that raises the true loss most across layers is flipped in the integer memory of the
build, and the edited accelerator is re-evaluated on the bit-exact simulator. Repeat K times.

The twin runs on the *integer* weights directly: a forward hook on each quantized layer's weight
proxy replaces its output by ``w_int * scale`` with ``w_int`` a leaf tensor, so ``d loss / d w_int``
is exact (no straight-through estimate for the weights) and a flipped value outside Brevitas'
narrow range (-2^(k-1)) is represented as the memory holds it. The reference BFA code flips
bits of PyTorch's int8 tensors; no library runs it on a FINN build, hence this module.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from hw_dq.fpga.faults import FaultError, FaultyBuild, Memory, accumulator_exceeded, flip_values, predict


@dataclass
class TwinLayer:
    """A quantized PyTorch layer matched to the weight memory of one MVAU."""

    name: str
    module: nn.Module
    mem: Memory
    to_mem: np.ndarray  # flat memory index of each flat element of the Brevitas weight (O, I, ...)
    sign: torch.Tensor  # per output channel: stored value = sign * PyTorch integer weight
    w_int: torch.Tensor  # current integer weights, Brevitas layout (leaf, requires grad)


def _layouts(w: np.ndarray) -> list[tuple[str, Callable[[np.ndarray], np.ndarray]]]:
    """Candidate maps from a Brevitas weight (O, I[, kh, kw]) to FINN's MW x MH matrix."""
    if w.ndim == 4:  # FINN's im2col order is (kh, kw, C)
        return [("conv (kh, kw, C)", lambda t: t.transpose(2, 3, 1, 0).reshape(-1, t.shape[0]))]
    out: list[tuple[str, Callable[[np.ndarray], np.ndarray]]] = [("linear", lambda t: t.T)]
    o, i = w.shape
    for c in range(1, i + 1):  # a flatten of (C, H, W) that FINN reads as (H, W, C)
        hw = i // c
        if i % c == 0 and hw > 1 and int(round(hw**0.5)) ** 2 == hw:
            s = int(round(hw**0.5))

            def chw_to_hwc(t: np.ndarray, c: int = c, s: int = s) -> np.ndarray:
                return t.reshape(t.shape[0], c, s, s).transpose(2, 3, 1, 0).reshape(-1, t.shape[0])

            out.append((f"linear after flatten (C={c}, {s}x{s})", chw_to_hwc))
    return out


def match_twin(model: nn.Module, fb: FaultyBuild) -> list[TwinLayer]:
    """Pair each quantized conv/linear layer with its MVAU weight memory; the integers must be equal.

    Up to a sign per output channel: FINN's streamlining moves the sign of a negative per-channel
    scale (BatchNorm's gamma) into the weight column and mirrors that channel's thresholds.
    """
    import brevitas.nn as qnn

    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, qnn.QuantConv2d | qnn.QuantLinear)]
    mems = [m for m in fb.memories if m.kind == "weights"]
    if len(layers) != len(mems):
        raise FaultError(
            f"the PyTorch model has {len(layers)} quantized layers but the build {len(mems)} weight memories; "
            "the targeted attack needs the run's own build (re-run 'hw-dq build')"
        )
    twin = []
    for (name, mod), mem in zip(layers, mems, strict=True):
        with torch.no_grad():
            w = mod.quant_weight().int().detach().cpu().numpy().astype(np.float32)
        stored = fb.values(mem)
        for _label, fn in _layouts(w):
            f = fn(w)
            if f.shape != stored.shape:
                continue
            sign = np.where((f == stored).all(0), 1.0, np.where((f == -stored).all(0), -1.0, 0.0))
            if not sign.all():
                continue
            idx = fn(np.arange(w.size, dtype=np.int64).reshape(w.shape)).reshape(-1)
            to_mem = np.empty(w.size, dtype=np.int64)
            to_mem[idx] = np.arange(w.size)
            sgn = torch.from_numpy(sign.astype(np.float32)).reshape(-1, *([1] * (w.ndim - 1)))
            twin.append(TwinLayer(name, mod, mem, to_mem, sgn, torch.from_numpy(w.copy()).requires_grad_(True)))
            break
        else:
            raise FaultError(
                f"layer {name}: its integer weights differ from {mem.node}'s memory in the build; "
                "the build is not of this run's model (re-run 'hw-dq build')"
            )
    return twin


class _IntWeights:
    """Forward hooks that make each layer use its ``w_int`` leaf (times the layer's own scale)."""

    def __init__(self, twin: Sequence[TwinLayer]):
        self.handles = []
        for t in twin:

            def hook(_mod: nn.Module, _inp: Any, out: Any, t: TwinLayer = t) -> Any:
                return type(out)(t.w_int * out.scale, out.scale, out.zero_point, out.bit_width, out.signed,
                                 out.training)  # fmt: skip

            self.handles.append(t.module.weight_quant.register_forward_hook(hook))

    def __enter__(self) -> _IntWeights:
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()


def _flip_deltas(t: TwinLayer) -> torch.Tensor:
    """For every weight and bit position: the change of the PyTorch integer weight that flipping
    that bit of the stored value causes; shape (bits, *w.shape)."""
    from qonnx.core.datatype import DataType

    mem = t.mem
    dt = DataType[mem.dtype]
    v = (t.w_int.detach() * t.sign).round().long()  # the stored values
    if mem.dtype == "BIPOLAR":
        return (-2 * v).unsqueeze(0).float() * t.sign
    k = mem.bits
    code = torch.bitwise_and(v, (1 << k) - 1) if dt.signed() else v
    deltas = []
    for b in range(k):
        c = torch.bitwise_xor(code, 1 << b)
        if dt.signed():
            c = torch.where(c >= (1 << (k - 1)), c - (1 << k), c)
        deltas.append((c - v).float())
    return torch.stack(deltas) * t.sign


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(x), y)


def bit_flip_attack(
    fb: FaultyBuild,
    model: nn.Module,
    x_attack: np.ndarray,
    y_attack: np.ndarray,
    x_eval_uint8: np.ndarray,
    y_eval: np.ndarray,
    flips: int,
    progress: Callable[[str], None] | None = None,
    layers: Sequence[int] | None = None,
) -> dict[str, Any]:
    """K progressive bit flips in the weight memories; accuracy on the simulator after each.

    ``x_attack`` ([0, 1] images) is the attacker's batch for the gradients and the cross-layer
    choice; the accuracy is measured on ``x_eval_uint8`` through the edited accelerator.
    ``layers``: only flip bits in these layers' weight memories (default: all).
    """
    if flips < 1:
        raise FaultError(f"invalid --flips {flips}: the attack needs at least 1 flip")
    model.eval()
    twin = match_twin(model, fb)
    xa, ya = torch.from_numpy(np.asarray(x_attack, np.float32)), torch.from_numpy(np.asarray(y_attack)).long()
    memory = {t.mem.tensor: fb.values(t.mem) for t in twin}
    clean = float((predict(fb.clean, x_eval_uint8) == y_eval).mean())
    curve: list[dict[str, Any]] = []
    t0 = time.time()
    with _IntWeights(twin):
        for step in range(1, flips + 1):
            for t in twin:
                t.w_int.grad = None
            loss = _loss(model, xa, ya)
            loss.backward()
            # in-layer search: the flip with the largest first-order loss increase per layer
            cands = []
            for li, t in enumerate(twin):
                if layers is not None and t.mem.layer not in layers:
                    continue
                deltas = _flip_deltas(t)
                gain = deltas * t.w_int.grad.unsqueeze(0)
                best = int(torch.argmax(gain))
                bit, flat = divmod(best, t.w_int.numel())
                cands.append((li, flat, bit, float(deltas.reshape(len(deltas), -1)[bit, flat])))
            # cross-layer search: the candidate with the largest true loss
            losses = []
            with torch.no_grad():
                for li, flat, _bit, delta in cands:
                    w = twin[li].w_int.view(-1)
                    w[flat] += delta
                    losses.append(float(_loss(model, xa, ya)))
                    w[flat] -= delta
            li, flat, bit, delta = cands[int(np.argmax(losses))]
            t = twin[li]
            with torch.no_grad():
                old = float(t.w_int.view(-1)[flat])
                t.w_int.view(-1)[flat] += delta
            from qonnx.core.datatype import DataType

            mi = int(t.to_mem[flat])
            memory[t.mem.tensor] = flip_values(memory[t.mem.tensor], np.array([mi]), np.array([bit]),
                                               DataType[t.mem.dtype])  # fmt: skip
            sg = float(t.sign.reshape(-1)[flat // (t.w_int.numel() // t.w_int.shape[0])])
            old, new = sg * old, float(memory[t.mem.tensor].reshape(-1)[mi])  # as stored
            if new != old + sg * delta:  # the twin and the memory must stay in step
                raise FaultError(f"internal: flip of {t.mem.node} index {mi} gave {new}, expected {old + sg * delta}")
            with fb.edited(memory) as sim:
                acc = float((predict(sim, x_eval_uint8) == y_eval).mean())
            row = {"flip": step, "acc": acc, "loss_attack_batch": max(losses), "layer": t.mem.layer,
                   "pytorch_layer": t.name, "node": t.mem.node, "memory": "weights", "index": mi, **t.mem.locate(mi),
                   "bit": bit, "old": old, "new": new,
                   "acc_width_exceeded": accumulator_exceeded(fb.model, t.mem.node, memory[t.mem.tensor])}  # fmt: skip
            curve.append(row)
            if progress:
                progress(f"  flip {step}: {t.mem.node} PE {row['pe']} lane {row['simd_lane']} word {row['word']} "
                         f"bit {bit} ({old:g} -> {new:g}): accuracy {100 * acc:.2f}%")  # fmt: skip
    return {"clean_acc": clean, "curve": curve, "wall_s": time.time() - t0, "attack_batch": int(len(xa))}


def random_weight_flips(
    fb: FaultyBuild,
    x_eval_uint8: np.ndarray,
    y_eval: np.ndarray,
    flips: int,
    trials: int,
    seed: int = 0,
) -> list[list[float]]:
    """Baseline: accuracy after 1..K flips of uniformly random weight bits (one list per trial)."""
    from qonnx.core.datatype import DataType

    mems = [m for m in fb.memories if m.kind == "weights"]
    sizes = np.array([m.n_bits for m in mems], dtype=np.float64)
    out = []
    for trial in range(trials):
        rng = np.random.default_rng([seed, 1000 + trial])
        memory = {m.tensor: fb.values(m) for m in mems}
        accs = []
        for _ in range(flips):
            m = mems[int(rng.choice(len(mems), p=sizes / sizes.sum()))]
            pos = int(rng.integers(m.n_bits))
            memory[m.tensor] = flip_values(memory[m.tensor], np.array([pos // m.bits]), np.array([pos % m.bits]),
                                           DataType[m.dtype])  # fmt: skip
            with fb.edited(memory) as sim:
                accs.append(float((predict(sim, x_eval_uint8) == y_eval).mean()))
        out.append(accs)
    return out
