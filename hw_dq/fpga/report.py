"""The build folder and its report: folded model, folding, FINN continuation config, report.json/md.

Layout (read by the simulator, keep it stable)::

    BUILD_DIR/report.json, report.md, dataflow_model.onnx, dataflow_parent.onnx,
    folding_config.json, build_config.json, sample_input.npy, sample_output.npy,
    finn/intermediate_models/..., bitstream/intermediate_models/dataflow_parent.onnx
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hw_dq import run as rd
from hw_dq.errors import BuildError
from hw_dq.fpga.boards import Board
from hw_dq.provenance import provenance

ESTIMATED = ("LUT", "BRAM_18K", "URAM", "DSP")  # FINN's analytical estimate has no FF figure
# FINN steps that continue the folded model to a bitfile, driver and deployment package
BITSTREAM_STEPS = [
    "step_assign_ddr_weight_offsets", "step_generate_hardware", "step_create_stitched_ip",
    "step_measure_rtlsim_performance", "step_prepare_synthesis", "step_synthesize_bitfile",
    "step_make_driver", "step_deployment_package",
]  # fmt: skip
# node attributes saved in folding_config.json (what a user edits and feeds back with --folding-config)
HW_ATTRS = [
    "PE", "SIMD", "parallel_window", "ram_style", "ram_style_thresholds", "resType", "mem_mode",
    "runtime_writeable_weights", "depth", "impl_style", "preferred_impl_style",
]  # fmt: skip


@dataclass
class BuildOutcome:
    """What the build stage hands to :func:`finish_build`: the folded model and how it was made."""

    model: Any  # the folded qonnx ModelWrapper, estimate reports attached
    cfg: Any  # FINN's DataflowBuildConfig of the estimate steps
    board: Board
    out: Path
    chosen: dict[str, Any]  # the folding chosen (search log, memory placement)
    est: dict[str, Any]  # folding.estimate(): per-layer and total resources, cycles
    fits: dict[str, bool]
    mode: str  # "fit", "target_fps" or "folding_config"
    clock_mhz: float
    tools: Any  # finn_compat.ToolReport
    started: float  # time.time() at the start of the build
    target_fps: float | None = None
    verification: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


def finish_build(b: BuildOutcome) -> dict[str, Any]:
    """Write the build folder (model, folding, FINN continuation config, report) and return the report."""
    from finn.util.config import extract_model_config_to_json

    model, cfg, board, out, est = b.model, b.cfg, b.board, b.out, b.est
    rd.atomic_write(out / rd.DATAFLOW_MODEL, lambda p: model.save(str(p)))  # a killed build leaves no half model
    parent = Path(cfg.get_intermediate_models_directory()) / "dataflow_parent.onnx"
    if parent.is_file():
        shutil.copyfile(parent, out / "dataflow_parent.onnx")
    extract_model_config_to_json(model, str(out / "folding_config.json"), HW_ATTRS)
    perf = json.loads((Path(cfg.get_report_directory()) / "estimate_network_performance.json").read_text())
    cap = board.resources
    util = {k: est["total"][k] / cap[k] if cap[k] else (0.0 if est["total"][k] == 0 else math.inf) for k in ESTIMATED}
    layers = [
        {"layer": n, "cycles": int(est["cycles"].get(n, 0)), **{k: float(r.get(k, 0)) for k in ESTIMATED}}
        for n, r in est["layers"].items()
    ]
    cont = _continuation_config(cfg, board, out, BITSTREAM_STEPS)
    chosen, fits = b.chosen, b.fits
    command = f"cd {out.resolve()} && finn build build_config.json dataflow_model.onnx"
    report = {
        "board": board.to_dict(), "clock_mhz": b.clock_mhz, "folding": b.mode, "target_fps": b.target_fps,
        "fps": float(perf["estimated_throughput_fps"]), "latency_us": float(perf["estimated_latency_ns"]) / 1000.0,
        "max_cycles": int(perf["max_cycles"]), "bottleneck": str(perf["max_cycles_node_name"]),
        "total": est["total"], "capacity": cap, "limits": board.limits(), "utilisation": util,
        "fits": all(fits.values()), "fits_by_resource": fits,
        "FF": "not estimated by FINN's analytical model (checked by Vivado synthesis)",
        "layers": layers, "verification": b.verification, "fit_search": chosen.get("search", []),
        "mvau_wwidth_max": chosen.get("mvau_wwidth_max"), "memory_placement": chosen.get("placement", []),
        "swg_ram_style": chosen.get("swg_ram_style") or "default", "tools": b.tools.to_dict(),
        "tools_line": b.tools.line(), "bitstream_command": command, "build_dir": str(out), "step_seconds": b.timings,
        "wall_seconds": round(time.time() - b.started, 1), "provenance": provenance(None),
    }  # fmt: skip
    if b.tools.has_vivado:
        report["bitstream"] = _run_bitstream(out, cont)
    rd.write_json(out / "report.json", report)
    rd.write_text(out / "report.md", report_markdown(report))
    return report


def _continuation_config(cfg: Any, board: Board, out: Path, bitstream_steps: list[str]) -> dict[str, Any]:
    """A FINN build config (JSON) that continues the folded model to bitfile, driver and package."""
    d = {
        "output_dir": "bitstream", "synth_clk_period_ns": cfg.synth_clk_period_ns, "board": board.finn_board,
        "fpga_part": board.part, "shell_flow_type": board.shell_flow, "steps": bitstream_steps,
        "generate_outputs": ["stitched_ip", "rtlsim_performance", "bitfile", "pynq_driver", "deployment_package"],
        "folding_config_file": "folding_config.json", "verify_steps": ["stitched_ip_rtlsim"],
        "verify_input_npy": rd.SAMPLE_INPUT, "verify_expected_output_npy": rd.SAMPLE_OUTPUT,
        "auto_fifo_depths": True, "save_intermediate_models": True,
    }  # fmt: skip
    if board.vitis_platform:
        d["vitis_platform"] = board.vitis_platform
    # the stitched-IP verification runs the parent graph; the continuation finds it here
    inter = out / "bitstream" / "intermediate_models"
    inter.mkdir(parents=True, exist_ok=True)
    if (out / "dataflow_parent.onnx").is_file():
        shutil.copyfile(out / "dataflow_parent.onnx", inter / "dataflow_parent.onnx")
    rd.write_json(out / "build_config.json", d)
    return d


def _run_bitstream(out: Path, cont: dict[str, Any]) -> dict[str, Any]:
    """Where Vivado is installed: continue to bitfile, driver and deployment package in-process."""
    import os

    from finn.builder.build_dataflow import build_dataflow_cfg
    from finn.builder.build_dataflow_config import DataflowBuildConfig

    here = os.getcwd()
    try:
        os.chdir(out)
        cfg = DataflowBuildConfig.from_dict(cont)
        rc = build_dataflow_cfg("dataflow_model.onnx", cfg)
    finally:
        os.chdir(here)
    if rc != 0:
        raise BuildError(f"FINN bitstream build failed (exit {rc}); see {out / 'bitstream' / 'build_dataflow.log'}")
    return {"exit": rc, "dir": str(out / "bitstream")}


def report_markdown(r: dict[str, Any]) -> str:
    """The build report as markdown."""
    b = r["board"]
    lines = [
        f"# FINN build: {b['name']} ({b['part']}) at {r['clock_mhz']:.0f} MHz", "",
        f"- folding: **{r['folding']}**; estimated throughput **{r['fps']:,.0f} FPS**, latency "
        f"{r['latency_us']:,.1f} us; bottleneck `{r['bottleneck']}` ({r['max_cycles']:,} cycles/frame)",
        f"- fits FINN's recommended utilisation: **{'yes' if r['fits'] else 'NO'}**",
        "- verification (FINN python execution on sample images): "
        + "; ".join(f"{k}: {v}" for k, v in r["verification"].items()),
        f"- {r['tools_line']}", f"- bitstream: `{r['bitstream_command']}`", "",
        "| resource | estimate | capacity | limit | utilisation |", "|---|---|---|---|---|",
    ]  # fmt: skip
    if r.get("memory_placement"):
        lines.insert(4, "- memories moved by the fit: " + ", ".join(r["memory_placement"]))
    for k in ESTIMATED:
        lines.append(
            f"| {k} | {r['total'][k]:,.0f} | {r['capacity'][k]:,} | {r['limits'][k]:,.0f} "
            f"| {100 * r['utilisation'][k]:.1f}% |"
        )
    lines.append(f"| FF | n/a | {r['capacity']['FF']:,} | {r['limits']['FF']:,.0f} | {r['FF']} |")
    lines += ["", "| layer | cycles | LUT | BRAM_18K | URAM | DSP |", "|---|---|---|---|---|---|"]
    for layer in r["layers"]:
        lines.append(
            f"| {layer['layer']} | {layer['cycles']:,} | {layer['LUT']:,.0f} | {layer['BRAM_18K']:,.0f} "
            f"| {layer['URAM']:,.0f} | {layer['DSP']:,.0f} |"
        )
    return "\n".join(lines) + "\n"
