"""Loading and checking a FINN build's bit-exact simulator: build folders, bare builds, UINT8 grid, agreement."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hw_dq.errors import ConfigError, HwDqError
from hw_dq.fpga.sim import HwSimulator, SimulationError

PARENT, DATAFLOW = "dataflow_parent.onnx", "dataflow_model.onnx"
REPORT = "report.json"


def build_board(build: str | Path) -> dict[str, str] | None:
    """The board a build folder was made for (``name`` and ``finn_board`` from its report), None if unrecorded."""
    try:
        board = json.loads((Path(build) / REPORT).read_text()).get("board") or {}
    except (OSError, ValueError, AttributeError):
        return None
    names = {k: str(board[k]) for k in ("name", "finn_board") if isinstance(board, dict) and board.get(k)}
    return names or None


def check_board(build: str | Path, board: str | None) -> None:
    """Refuse ``--board`` naming another board than the one a build folder was made for (same board: fine)."""
    if board is None:
        return
    from hw_dq.fpga.boards import canonical_name

    own = build_board(build)
    if own is None:
        raise ConfigError(f"{build} records no board (no readable {REPORT}); drop --board or rebuild it")
    keys = {board.strip().lower(), canonical_name(board).lower()}
    if not keys & {v.lower() for v in own.values()}:
        name = own.get("name", own.get("finn_board"))
        raise ConfigError(
            f"the build folder {build} is for board {name}, not {board}; drop --board or pass --board {name}"
        )


def find_build(path: str | Path, board: str | None = None) -> Path:
    """A build folder: ``path`` itself (``board``, if given, must be its own), or ``RUN_DIR/build/<board>``
    (the only one if no board)."""
    p = Path(path)
    if (p / PARENT).is_file() or (p / DATAFLOW).is_file():
        check_board(p, board)
        return p
    from hw_dq.run import Run

    return Run(p).find_build(board)  # canonical board names, matched case-insensitively


def bare_build(path: str | Path) -> bool:
    """A FINN build folder given on its own (``build --onnx FILE``): no hw-dq run, so no PyTorch model."""
    p = Path(path)
    return not (p / "config.json").is_file() and ((p / PARENT).is_file() or (p / DATAFLOW).is_file())


def bare_source(build: Path) -> dict[str, Any]:
    """The config-like description of a bare build for results files (a quantized model of unknown training):
    its name, and its weight and activation bits as FINN's layers hold them (the most common width)."""
    from collections import Counter

    from qonnx.core.datatype import DataType
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.custom_op.registry import getCustomOp

    w, a = Counter(), Counter()
    nodes = ModelWrapper(str(build / DATAFLOW)).graph.node if (build / DATAFLOW).is_file() else []
    for node in nodes:
        base = node.op_type.removesuffix("_hls").removesuffix("_rtl")
        if base in ("MVAU", "VVAU", "Thresholding"):
            op = getCustomOp(node)
            if base != "Thresholding":
                w[DataType[op.get_nodeattr("weightDataType")].bitwidth()] += 1
            if base == "Thresholding" or op.get_nodeattr("noActivation") == 0:
                a[DataType[op.get_nodeattr("outputDataType")].bitwidth()] += 1
    bits = {k: c.most_common(1)[0][0] if c else None for k, c in (("wbits", w), ("abits", a))}
    return {"model": {"name": f"qonnx:{build.resolve().name}", **bits}, "mode": "VQ"}


def bare_test_set(n: int | None, seed: int, data: str | None, data_dir: str | Path | None):
    """The evaluated images of a bare build: ``data`` (default: the embedded CIFAR-10 sample), as Run.test_set."""
    from hw_dq.data import load_split

    return load_split(data or "sample", "test", None if data_dir is None else str(data_dir)).take(n, seed)


def _reference_partition(build: Path, parent) -> str | None:
    """The pre-specialisation partition FINN can execute in python (moved builds included)."""
    for node in parent.graph.node:
        if node.op_type == "StreamingDataflowPartition":
            from onnx import helper

            path = next(helper.get_attribute_value(a) for a in node.attribute if a.name == "model").decode()
            if Path(path).is_file():
                return path
            local = build / "finn" / "intermediate_models" / "supported_op_partitions" / Path(path).name
            return str(local) if local.is_file() else None
    return None


def finn_reference(build: Path, x_uint8: np.ndarray) -> np.ndarray:
    """FINN's own node-by-node python execution of the build's graph (one image at a time)."""
    from hw_dq.fpga import finn_compat

    finn_compat.prepare_finn()
    from finn.core.onnx_exec import execute_onnx
    from qonnx.core.modelwrapper import ModelWrapper

    parent = ModelWrapper(str(build / PARENT))
    ref = _reference_partition(build, parent)
    if ref is None:
        raise SimulationError(f"{build}: FINN's python-executable partition is missing; rebuild with 'hw-dq build'")
    for node in parent.graph.node:
        if node.op_type == "StreamingDataflowPartition":
            for a in node.attribute:
                if a.name == "model":
                    a.s = ref.encode()
    iname, oname = parent.graph.input[0].name, parent.graph.output[0].name
    return np.concatenate([execute_onnx(parent, {iname: x_uint8[i : i + 1]})[oname] for i in range(len(x_uint8))])


def load_simulator(build: str | Path, verify: int = 8) -> HwSimulator:
    """Simulate the folded build; first check it against FINN's execution on the build's samples."""
    b = Path(build)
    if not (b / PARENT).is_file() or not (b / DATAFLOW).is_file():
        raise HwDqError(f"{b} is not a FINN build folder (needs {PARENT} and {DATAFLOW}); run 'hw-dq build' first")
    try:
        sim = HwSimulator(b / PARENT, partition=b / DATAFLOW)
    except SimulationError:
        raise
    except Exception as e:
        raise SimulationError(f"{b}: the FINN model cannot be read ({type(e).__name__}: {e})") from None
    if verify:
        sample = b / "sample_input.npy"
        if not sample.is_file():
            raise SimulationError(f"{sample} is missing; rebuild with 'hw-dq build'")
        x = np.load(sample)[:verify].astype(np.float32)
        ref = finn_reference(b, x)
        got = sim(x).numpy().reshape(ref.shape)
        # an image agrees only when every output is finite and equal (a NaN never agrees)
        bad = int((~(got == ref)).reshape(len(x), -1).any(1).sum())
        if bad:
            raise SimulationError(
                f"the simulation of {b} differs from FINN's execution on {bad} of {len(x)} sample images; "
                "the build folder may be altered or from another finn-plus version"
            )
    return sim


def uint8_grid(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """[0, 1] images -> the accelerator's UINT8 pixel values (as float32, NCHW)."""
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    return np.clip(np.rint(arr * 255.0), 0, 255).astype(np.float32)


def hw_logits(sim: HwSimulator, x01: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Simulated accelerator output for [0, 1] images (rounded to UINT8 first)."""
    out = [sim(uint8_grid(x01[i : i + batch_size])).numpy() for i in range(0, len(x01), batch_size)]
    return np.concatenate(out).reshape(len(x01), -1)


def hw_labels(sim: HwSimulator, x01: np.ndarray, batch_size: int = 256) -> np.ndarray:
    out = hw_logits(sim, x01, batch_size)
    return out[:, 0].astype(np.int64) if out.shape[1] == 1 else out.argmax(1)


def sw_labels(model: nn.Module, x01: np.ndarray, batch_size: int = 256) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return np.concatenate(
            [model(torch.from_numpy(x01[i : i + batch_size])).argmax(1).numpy() for i in range(0, len(x01), batch_size)]
        )


# ------------------------------------------------------------------ layer-by-layer location
def _sw_activations(model: nn.Module, x01: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """Integer codes of every quantized activation of the Brevitas model (input quantizer first)."""
    from brevitas.nn import QuantIdentity, QuantReLU

    acts: list[tuple[str, np.ndarray]] = []
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, QuantIdentity | QuantReLU):

            def hook(mod, _i, out, name=name):
                scale = float(mod.act_quant.scale())
                acts.append((name, np.rint(out.detach().numpy() / scale)))

            hooks.append(m.register_forward_hook(hook))
    model.eval()
    try:
        with torch.no_grad():
            model(torch.from_numpy(x01))
    finally:
        for h in hooks:
            h.remove()
    return acts


def _hw_activations(sim: HwSimulator, x01: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """The accelerator's thresholded (integer) activations in graph order, as NCHW."""
    xin = uint8_grid(x01)
    ctx = sim.run(xin, keep=True)
    acts = [("input", xin)]
    for st in sim.steps:
        base = st.op.removesuffix("_hls").removesuffix("_rtl")
        thresholded = base in ("Thresholding", "MultiThreshold") or (base == "MVAU" and len(st.inputs) > 2)
        if thresholded:
            v = ctx[st.outputs[0]].numpy()
            acts.append((st.name, v.transpose(0, 3, 1, 2) if v.ndim == 4 else v))
    return acts


def locate_disagreement(model: nn.Module, sim: HwSimulator, x01: np.ndarray) -> list[dict[str, Any]]:
    """For each image, the first quantized activation where software and accelerator differ.

    Layers are matched in order (the k-th Brevitas quantized activation with the k-th
    thresholding node of the FINN graph). Returns one dict per image with ``layer`` (index),
    the two layer names and the fraction of differing values, or ``layer = None``.
    """
    if len(x01) == 0:  # nothing to locate (the simulator has no empty batch)
        return []
    sw, hw = _sw_activations(model, x01), _hw_activations(sim, x01)
    rows = []
    for i in range(len(x01)):
        row: dict[str, Any] = {"index": i, "layer": None}
        for k, ((sn, sa), (hn, ha)) in enumerate(zip(sw, hw, strict=False)):
            a, b = sa[i], ha[i]
            if a.size != b.size:
                break
            diff = (
                a.reshape(-1) != b.reshape(a.shape).reshape(-1)
                if a.shape == b.shape
                else a.reshape(-1) != b.reshape(-1)
            )
            if diff.any():
                row.update(layer=k, sw_layer=sn, hw_node=hn, fraction=float(diff.mean()))
                break
        rows.append(row)
    return rows


def agreement(model: nn.Module | None, sim: HwSimulator, x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """Clean accuracy of both, their top-1 disagreement rate, and where they first differ (None: no model)."""
    x = uint8_grid(x) / 255.0
    hw = hw_labels(sim, x)
    if model is None:
        return {"n_examples": len(y), "clean_acc_hw": float((hw == y).mean()) if len(y) else 0.0,
                "clean_acc_sw": None, "disagreement_clean": None, "first_diff": []}  # fmt: skip
    sw = sw_labels(model, x)
    dis = np.nonzero(hw != sw)[0]
    where = locate_disagreement(model, sim, x[dis[:32]].astype(np.float32)) if len(dis) else []
    return {
        "n_examples": len(y),
        "clean_acc_hw": float((hw == y).mean()),
        "clean_acc_sw": float((sw == y).mean()),
        "disagreement_clean": float(len(dis) / max(1, len(y))),
        "first_diff": where,
    }
