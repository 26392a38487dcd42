"""Folding for ``hw-dq build``: the fastest FINN folding that fits a board (``--fit``), or a user's own.

Every figure is FINN's own: SetFolding chooses PE/SIMD for a cycles target, FINN's per-node
resource estimate prices it, and memories/multipliers are moved between BRAM, LUTRAM and
DSPs (FINN node attributes) where the estimate exceeds one of the board's limits.
``--folding-config FILE`` takes a hand-edited ``folding_config.json`` back (checked, then FINN's
ApplyConfig).
"""

from __future__ import annotations

import copy
import json
import math
from functools import partial
from pathlib import Path
from typing import Any

from hw_dq.errors import BuildError
from hw_dq.fpga import finn_compat
from hw_dq.fpga.boards import Board
from hw_dq.fpga.report import ESTIMATED


def estimate(model: Any, part: str, clk_ns: float) -> dict[str, Any]:
    from finn.analysis.fpgadataflow.exp_cycles_per_layer import exp_cycles_per_layer
    from finn.analysis.fpgadataflow.res_estimation import res_estimation

    res = model.analysis(partial(res_estimation, fpgapart=part))
    cycles = model.analysis(exp_cycles_per_layer)
    total = {k: float(sum(float(r.get(k, 0)) for r in res.values())) for k in ESTIMATED}
    worst = max(cycles, key=lambda k: cycles[k])
    return {"layers": res, "cycles": cycles, "total": total, "max_cycles": int(cycles[worst]),
            "bottleneck": worst, "fps": 1e9 / clk_ns / max(1, cycles[worst])}  # fmt: skip


def fits(total: dict[str, float], board: Board) -> dict[str, bool]:
    lim = board.limits()
    return {k: total.get(k, 0.0) <= lim[k] for k in ESTIMATED}


def fold(model: Any, cfg: Any, target_cycles: int, wmax: int, board: Board | None = None) -> dict[str, Any]:
    """FINN's SetFolding for a cycles target, then memory placement for ``board``; returns model + estimate."""
    from finn.builder import build_dataflow_steps as steps
    from finn.transformation.fpgadataflow.set_folding import SetFolding
    from qonnx.transformation.general import GiveUniqueNodeNames

    m = copy.deepcopy(model).transform(SetFolding(int(target_cycles), mvau_wwidth_max=wmax, two_pass_relaxation=True))
    m = m.transform(GiveUniqueNodeNames())
    m = steps.step_minimize_bit_width(m, cfg)
    finn_compat.keep_bipolar_weights(m)
    m = steps.step_transpose_decomposition(m, cfg)
    placement = place_memories(m, board) if board is not None else []
    return {"model": m, "target_cycles": int(target_cycles), "mvau_wwidth_max": wmax, "placement": placement,
            **estimate(m, cfg.fpga_part, cfg.synth_clk_period_ns)}  # fmt: skip


def _node_res(inst: Any, part: str, attr: str, value: str) -> tuple[dict[str, float], dict[str, float]]:
    """FINN's estimate of one node before and after setting ``attr`` to ``value`` (left unchanged)."""
    old = inst.get_nodeattr(attr)
    before = inst.node_res_estimation(part)
    inst.set_nodeattr(attr, value)
    after = inst.node_res_estimation(part)
    inst.set_nodeattr(attr, old)
    return before, after


def _moves(model: Any, part: str, attr: str, value: str, freed: str, paid: str) -> list[tuple[float, Any, dict]]:
    """Candidate (cost per unit freed, node, resource delta) for setting ``attr=value`` per node."""
    from qonnx.custom_op.registry import getCustomOp

    out = []
    for node in model.graph.node:
        if not node.op_type.startswith(("MVAU", "ConvolutionInputGenerator", "VVAU")):
            continue
        inst = getCustomOp(node)
        types = inst.get_nodeattr_types()
        if attr not in types or inst.get_nodeattr(attr) == value:
            continue
        if node.op_type.startswith(("MVAU", "VVAU")) and inst.get_nodeattr("mem_mode") != "internal_decoupled":
            continue
        before, after = _node_res(inst, part, attr, value)
        delta = {k: float(after.get(k, 0)) - float(before.get(k, 0)) for k in ESTIMATED}
        if delta[freed] < 0:
            out.append((max(0.0, delta[paid]) / -delta[freed], node, delta))
    return sorted(out, key=lambda c: c[0])


def place_memories(model: Any, board: Board) -> list[str]:
    """Trade resources where FINN's estimate exceeds the board's limit; returns what was changed.

    BRAM over the limit: weight / sliding-window memories go to LUTRAM (``ram_style=distributed``),
    most BRAM freed per LUT first, while LUT stays within its limit. LUT over the limit: MVAU
    multipliers go to DSPs (``resType=dsp``) the same way. Every figure is FINN's node estimate.
    """
    from qonnx.custom_op.registry import getCustomOp

    part, lim = board.part, board.limits()
    total = estimate_totals(model, part)
    changed: list[str] = []
    plan = [("ram_style", "distributed", "BRAM_18K", "LUT"), ("resType", "dsp", "LUT", "DSP"),
            ("ram_style", "distributed", "BRAM_18K", "LUT")]  # fmt: skip
    for attr, value, freed, paid in plan:
        if total[freed] <= lim[freed]:
            continue
        for _, node, delta in _moves(model, part, attr, value, freed, paid):
            if total[freed] <= lim[freed]:
                break
            if any(total[k] + delta[k] > lim[k] for k in ESTIMATED if delta[k] > 0):
                continue
            getCustomOp(node).set_nodeattr(attr, value)
            total = {k: total[k] + delta[k] for k in ESTIMATED}
            changed.append(f"{node.name}.{attr}={value}")
    return changed


def estimate_totals(model: Any, part: str) -> dict[str, float]:
    from finn.analysis.fpgadataflow.res_estimation import res_estimation

    res = model.analysis(partial(res_estimation, fpgapart=part))
    return {k: float(sum(float(r.get(k, 0)) for r in res.values())) for k in ESTIMATED}


FIT_WWIDTH = (36, 144)  # SetFolding's MVAU weight-width cap: SIMD first up to this width, then PE


def search_fit(model: Any, cfg: Any, board: Board, wwidths: tuple[int, ...] = FIT_WWIDTH) -> dict[str, Any]:
    """Highest FINN-estimated FPS whose FINN resource estimate is within the board's limits.

    For each MVAU weight-width cap, bisect (in log space) FINN's SetFolding target cycles per
    frame; every candidate is folded by FINN, its memories placed (:func:`place_memories`)
    and priced by FINN's resource estimate.
    """
    evaluated: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    for wmax in wwidths:
        lo_fail, hi_ok = 1, None
        slow = fold(model, cfg, 10**9, wmax, board)
        top = slow["max_cycles"]
        cands = [top]
        while cands:
            t = cands.pop()
            cand = slow if t == top else fold(model, cfg, t, wmax, board)
            ok = all(fits(cand["total"], board).values())
            evaluated.append({"target_cycles": t, "mvau_wwidth_max": wmax, "max_cycles": cand["max_cycles"],
                              "fps": cand["fps"], **cand["total"], "fits": ok,
                              "moved": len(cand["placement"])})  # fmt: skip
            if ok and (best is None or cand["max_cycles"] < best["max_cycles"]):
                best = cand
            if ok:
                hi_ok = t
            else:
                lo_fail = max(lo_fail, t)
            saturated = ok and cand["max_cycles"] > 2 * t  # FINN cannot unfold further: lower targets change nothing
            if hi_ok is None or saturated or hi_ok <= lo_fail + 1 or hi_ok / lo_fail <= 1.05:
                break
            cands.append(max(lo_fail + 1, int(math.sqrt(lo_fail * hi_ok))))
    if best is None:  # not even the slowest folding fits: report it, built fully folded
        best = fold(model, cfg, 10**9, wwidths[0], board)
    best["search"] = evaluated
    return best


def read_folding_config(path: str | Path) -> dict[str, Any]:
    """A hand-edited FINN folding JSON (``{node name: {attribute: value}}``, optional ``Defaults``),
    checked for shape; one-line errors naming the file and the bad entry."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except OSError as e:
        raise BuildError(f"folding config {p} cannot be read ({e.strerror or e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BuildError(
            f"folding config {p} is not valid JSON ({e}); FINN writes one as folding_config.json"
        ) from None
    if not isinstance(data, dict):
        raise BuildError(f"folding config {p}: expected a JSON object of node name -> attributes")
    for name, attrs in data.items():
        if name == "Defaults":
            ok = isinstance(attrs, dict) and all(isinstance(v, list) and len(v) % 2 == 0 for v in attrs.values())
            if not ok:
                raise BuildError(f"folding config {p}: 'Defaults' must map attribute -> [value, [op types], ...]")
            continue
        if not isinstance(attrs, dict):
            raise BuildError(f"folding config {p}: entry {name!r} must be an object of attribute -> value")
    return data


def apply_folding_config(model: Any, cfg: Any, config: dict[str, Any], board: Board, source: str) -> dict[str, Any]:
    """Fold ``model`` as a user's FINN folding config says (FINN's ApplyConfig), after checking that
    every node and attribute it names exists and that PE/SIMD divide the node's dimensions."""
    from finn.builder import build_dataflow_steps as steps
    from finn.transformation.general import ApplyConfig
    from qonnx.custom_op.registry import getCustomOp
    from qonnx.transformation.general import GiveUniqueNodeNames

    m = copy.deepcopy(model).transform(GiveUniqueNodeNames())
    nodes = {n.name: n for n in m.graph.node}
    for name, attrs in config.items():
        if name == "Defaults":
            continue
        if name not in nodes:
            have = ", ".join(sorted(nodes)[:6])
            raise BuildError(f"folding config {source}: no node {name!r} in this model (nodes: {have}, ...)")
        types = getCustomOp(nodes[name]).get_nodeattr_types()
        for attr in attrs:
            if attr not in types:
                raise BuildError(f"folding config {source}: node {name} has no attribute {attr!r}")
    m = m.transform(ApplyConfig(config))
    for node in m.graph.node:
        if node.op_type.startswith("MVAU"):
            inst = getCustomOp(node)
            mw, mh, simd, pe = (inst.get_nodeattr(a) for a in ("MW", "MH", "SIMD", "PE"))
            if mh % pe or mw % simd:
                raise BuildError(
                    f"folding config {source}: {node.name} needs PE dividing {mh} and SIMD dividing {mw} "
                    f"(got PE={pe}, SIMD={simd})"
                )
    m = steps.step_minimize_bit_width(m, cfg)
    finn_compat.keep_bipolar_weights(m)
    m = steps.step_transpose_decomposition(m, cfg)
    try:
        est = estimate(m, cfg.fpga_part, cfg.synth_clk_period_ns)
    except (AssertionError, ValueError, ZeroDivisionError) as e:
        why = str(e) or type(e).__name__
        raise BuildError(f"folding config {source}: FINN cannot estimate the folded model ({why})") from None
    return {"model": m, "placement": [], "folding_config": source, **est}
