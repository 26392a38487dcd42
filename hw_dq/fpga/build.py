"""Build stage: a FINN dataflow accelerator for a board, from the exported QONNX model.

Runs FINN's own build steps in-process (qonnx_to_finn, tidy_up, streamline, convert_to_hw,
create_dataflow_partition, specialize_layers, folding, minimize_bit_width, estimate reports),
with FINN's python verification steps on real sample images, then writes a bitstream-ready
build folder::

    BUILD_DIR/
      report.json / report.md     est. FPS, latency, per-layer + total resources vs the board
      dataflow_model.onnx         folded FINN dataflow model (input of HW code generation)
      dataflow_parent.onnx        the parent graph (input transpose + the dataflow partition)
      folding_config.json         the folding (PE/SIMD/...) that was chosen
      build_config.json           FINN DataflowBuildConfig: HW codegen -> bitfile, driver, package
      sample_input.npy / sample_output.npy   verification vectors for the continuation
      finn/                       FINN's own output (report/, intermediate_models/, verification_output/)

Folding: ``target_fps``, or ``fit``: the highest throughput whose FINN resource estimate stays
within FINN's recommended utilisation of the board, searched over FINN's SetFolding targets,
with weight/window memories moved from BRAM to LUTRAM (and multipliers to DSPs) where the
estimate is over a limit (:mod:`hw_dq.fpga.folding`). The report and build folder are written by
:mod:`hw_dq.fpga.report`.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from hw_dq import run as rd
from hw_dq.errors import BuildError, HwDqError
from hw_dq.fpga import finn_compat, folding
from hw_dq.fpga.boards import Board, get_board
from hw_dq.fpga.report import ESTIMATED, BuildOutcome, finish_build
from hw_dq.run import SAMPLE_INPUT, SAMPLE_OUTPUT, Run

QUANT_OPS = ("Quant", "BipolarQuant", "BinaryQuant", "Trunc", "MultiThreshold")
WEIGHT_OPS = ("Conv", "Gemm", "MatMul", "ConvTranspose")
ESTIMATE_STEPS = (
    "step_qonnx_to_finn", "step_tidy_up", "step_streamline", "step_convert_to_hw",
    "step_minimize_bit_width_initial", "step_create_dataflow_partition", "step_specialize_layers",
)  # fmt: skip


# ---------------------------------------------------------------- input validation
def _save_npy(path: Path, arr: np.ndarray) -> None:
    with open(path, "wb") as f:  # a handle: np.save would append .npy to the scratch name
        np.save(f, arr.astype(np.float32), allow_pickle=False)


def load_qonnx(path: str | Path) -> Any:
    """Load and check a QONNX file: one-line errors for missing, truncated, non-QONNX, float."""
    import onnx
    from qonnx.core.modelwrapper import ModelWrapper

    path = Path(path)
    if not path.is_file():
        raise BuildError(f"{path} not found; run 'hw-dq export RUN_DIR' first")
    try:
        proto = onnx.load(str(path))
        onnx.checker.check_model(proto)
    except Exception as e:  # protobuf DecodeError, checker errors: all mean "not a usable ONNX file"
        why = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise BuildError(f"{path} is not a valid ONNX file (truncated or corrupt: {why})") from None
    model = ModelWrapper(proto)
    ops = [n.op_type for n in model.graph.node]
    if not any(op in QUANT_OPS for op in ops):
        raise BuildError(
            f"{path} is not a QONNX model (no Quant/BipolarQuant nodes: float weights and activations); "
            "FINN maps only quantized models - export a quantized run with 'hw-dq export'"
        )
    for init in model.graph.initializer:  # a NaN/Inf weight or scale would only surface as a verification mismatch
        arr = model.get_initializer(init.name)
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise BuildError(f"{path}: initializer {init.name!r} holds NaN or Inf values; re-export a finite model")
    for node in model.graph.node:
        if node.op_type in WEIGHT_OPS and len(node.input) > 1 and model.get_initializer(node.input[1]) is not None:
            raise BuildError(
                f"layer {node.name} ({node.op_type}) has float weights (no weight quantizer); "
                "FINN needs integer weights - train with an integer --wbits"
            )
    return model


def _finn_error(step: str, e: Exception) -> BuildError:
    msg = " ".join(str(e).split())[:300] or type(e).__name__
    return BuildError(f"FINN step {step.removeprefix('step_')} failed: {msg}")


def _reason(model: Any, node: Any) -> str:
    dyn = [i for i in node.input if model.get_initializer(i) is None]
    if node.op_type in ("Add", "Sub") and len(dyn) == 2:
        return (
            "a residual add of two streams that FINN cannot map - an AddStreams layer needs both branches "
            "to arrive as integers with the same quantization scale (add a shared quantizer on both)"
        )
    if node.op_type in ("Add", "Sub", "Mul", "Div"):
        return (
            "a float scale/bias that streamlining could not absorb into a threshold (the topology does not streamline)"
        )
    if node.op_type in ("Im2Col", "MatMul", "MultiThreshold", "Transpose", "MaxPoolNHWC"):
        return (
            "its input did not streamline to an integer NHWC stream (a float scale or layout transpose is "
            "left at a fork or residual branch)"
        )
    return f"op {node.op_type} has no FINN hardware layer"


def check_mapped(model: Any) -> None:
    """After convert_to_hw every node must be a HW layer, except the input NCHW->NHWC transpose.

    The error names the root cause where there is one (a residual add), else the first unmapped node.
    """
    gin = model.graph.input[0].name
    bad = [
        n for n in model.graph.node
        if not n.domain.startswith("finn.custom_op.fpgadataflow")
        and not (n.op_type == "Transpose" and n.input[0] == gin)
    ]  # fmt: skip
    if not bad:
        return
    adds = [n for n in bad if n.op_type in ("Add", "Sub") and all(model.get_initializer(i) is None for i in n.input)]
    node = adds[0] if adds else bad[0]
    raise BuildError(
        f"layer {node.name} ({node.op_type}) cannot be mapped to FINN hardware: {_reason(model, node)}; "
        f"{len(bad)} node(s) unmapped"
    )


# ---------------------------------------------------------------- FINN plumbing
def _has_residual(model: Any) -> bool:
    """A fork (tensor read by two nodes) or an add of two streams: the graph needs residual streamlining."""
    consumers: dict[str, int] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers[i] = consumers.get(i, 0) + 1
    return any(c > 1 for t, c in consumers.items() if model.get_initializer(t) is None) or any(
        n.op_type == "Add" and all(model.get_initializer(i) is None for i in n.input) for n in model.graph.node
    )


def step_streamline_residual(model: Any, cfg: Any) -> Any:
    """FINN's streamlining; for residual graphs first move scalar scales past forks and joins.

    A scale at a fork goes into both branches (``MoveLinearPastFork``), identical scales on both
    inputs of an add go past it (``MoveLinearPastEltwiseAdd``), then FINN's ``Streamline`` absorbs
    them into thresholds; layout transposes are moved past forks/adds until they cancel.
    A GlobalAveragePool becomes FINN's GlobalAccPool and a scale that
    streamlining moves past the classifier. Chain graphs get FINN's plain ``step_streamline``.
    """
    from finn.builder import build_dataflow_steps as steps

    if not _has_residual(model):
        return steps.step_streamline(model, cfg)
    from finn.transformation.fpgadataflow.convert_to_hw.global_acc_pool import InferGlobalAccPoolLayer
    from finn.transformation.streamline import Streamline
    from finn.transformation.streamline.absorb import (
        AbsorbConsecutiveTransposes,
        AbsorbScalarBiasIntoMultiThreshold,
        AbsorbTransposeIntoMultiThreshold,
    )
    from finn.transformation.streamline.reorder import (
        MoveLinearPastEltwiseAdd,
        MoveLinearPastFork,
        MoveScalarLinearPastInvariants,
        MoveTransposePastFork,
        MoveTransposePastJoinAdd,
    )
    from finn.transformation.streamline.round_thresholds import RoundAndClipThresholds

    finn_compat.reduce_mean_as_global_avg_pool(model)
    for _ in range(3):
        model = model.transform(AbsorbScalarBiasIntoMultiThreshold())
        model = model.transform(MoveLinearPastFork())
        model = model.transform(MoveLinearPastEltwiseAdd())
        model = model.transform(MoveScalarLinearPastInvariants())
        model = model.transform(Streamline())
    model = model.transform(InferGlobalAccPoolLayer())  # integer input by now; its 1/N scale streamlines away
    model = steps.step_streamline(model, cfg)
    for _ in range(3):  # NCHW<->NHWC transposes around forks and adds would become Shuffle layers
        model = model.transform(MoveTransposePastJoinAdd())
        model = model.transform(AbsorbTransposeIntoMultiThreshold())
        model = model.transform(MoveTransposePastFork())
        model = model.transform(AbsorbConsecutiveTransposes())
    # a shortcut's signed quantizer on an unsigned stream has thresholds below the input range
    return model.transform(RoundAndClipThresholds())


def _finn_config(board: Board, out: Path, clock_mhz: float, vin: Path, vout: Path, **kw: Any) -> Any:
    from finn.builder import build_dataflow_config as bc

    cfg = bc.DataflowBuildConfig(
        output_dir=str(out), synth_clk_period_ns=1000.0 / clock_mhz, board=board.finn_board,
        fpga_part=board.part, shell_flow_type=bc.ShellFlowType(board.shell_flow),
        vitis_platform=board.vitis_platform, generate_outputs=[bc.DataflowOutputType.ESTIMATE_REPORTS],
        verify_input_npy=str(vin), verify_expected_output_npy=str(vout),
        # FINN's mean *relative* error is ill-conditioned for a logit that is exactly 0 in one
        # executor and 3e-8 in another (relative error 1 for that element fails the whole
        # check); the element-wise isclose (atol 1e-3) and the mean absolute error still apply.
        verification_mean_rtol=math.inf, **kw,
    )  # fmt: skip
    for d in (
        cfg.get_report_directory(),
        cfg.get_intermediate_models_directory(),
        cfg.get_verification_output_directory(),
    ):
        Path(d).mkdir(parents=True, exist_ok=True)
    return cfg


def _check_verification(cfg: Any, names: list[str]) -> dict[str, str]:
    vdir = Path(cfg.get_verification_output_directory())
    out = {}
    for name in names:
        files = list(vdir.glob(f"verify_{name}_*"))
        fails = [f for f in files if "FAIL" in f.name]
        if not files:
            raise BuildError(f"FINN verification {name} produced no result (see {vdir})")
        if fails:
            raise BuildError(
                f"FINN verification {name} FAILED on {len(fails)} of {len(files)} sample images (see {vdir})"
            )
        out[name] = f"SUCCESS on {len(files)} images"
    return out


def _verify_hw_python(model: Any, vin: np.ndarray, vout: np.ndarray) -> str:
    """Node-by-node python execution of the HW-layer graph (before specialisation) on the samples."""
    from finn.core.onnx_exec import execute_onnx

    iname, oname = model.graph.input[0].name, model.graph.output[0].name
    for i in range(len(vin)):
        got = execute_onnx(model, {iname: vin[i : i + 1]})[oname]
        if not np.allclose(got.reshape(vout[i : i + 1].shape), vout[i : i + 1], atol=1e-3, rtol=1e-5):
            raise BuildError(f"FINN HW-layer python execution differs from the exported model on sample {i}")
    return f"SUCCESS on {len(vin)} images"


# ---------------------------------------------------------------- the build
def build_model(
    onnx_path: str | Path,
    board: Board,
    out_dir: str | Path,
    *,
    target_fps: float | None = None,
    fit: bool = False,
    clock_mhz: float | None = None,
    sample_input: str | Path | None = None,
    sample_output: str | Path | None = None,
    n_verify: int = 4,
    progress: bool = False,
    folding_config: str | Path | None = None,
) -> dict[str, Any]:
    """Build one QONNX model for ``board``; returns (and writes) the report.

    ``folding_config``: a FINN folding JSON (e.g. an edited ``folding_config.json`` of an earlier
    build) used instead of the folding search.

    FINN's console chatter (prints, warnings) goes to ``BUILD_DIR/finn/build.log``.
    """
    import contextlib
    import io
    import warnings

    fold_cfg = folding.read_folding_config(folding_config) if folding_config is not None else None
    if fold_cfg is not None and (fit or target_fps is not None):
        raise BuildError("--folding-config sets the folding itself; drop --fit / --target-fps")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            warnings.simplefilter("ignore")
            return _build_model(onnx_path, board, out, target_fps, fit, clock_mhz, sample_input, sample_output,
                                n_verify, progress, (str(folding_config), fold_cfg) if fold_cfg else None)  # fmt: skip
    finally:
        (out / "finn").mkdir(parents=True, exist_ok=True)
        (out / "finn" / "build.log").write_text(buf.getvalue())


def _build_model(
    onnx_path: Any, board: Board, out: Path, target_fps: float | None, fit: bool, clock_mhz: float | None,
    sample_input: Any, sample_output: Any, n_verify: int, progress: bool, user_folding: tuple[str, dict] | None,
) -> dict[str, Any]:  # fmt: skip
    import sys

    if target_fps is not None and target_fps <= 0:
        raise BuildError(f"invalid --target-fps {target_fps}: must be positive")
    if clock_mhz is not None and not 1 <= clock_mhz <= 1000:
        raise BuildError(f"invalid --clock-mhz {clock_mhz}: use 1..1000")
    t0 = time.time()
    model = load_qonnx(onnx_path)
    tools = finn_compat.prepare_finn(out / "finn" / "tmp")
    finn_compat.quiet_finn_logging()
    vin, vout = _verification_vectors(model, out, sample_input, sample_output, n_verify)
    clk = clock_mhz or board.clock_mhz
    from finn.builder import build_dataflow_config as bc
    from finn.builder import build_dataflow_steps as steps

    vsteps = [bc.VerificationStepType.QONNX_TO_FINN_PYTHON, bc.VerificationStepType.TIDY_UP_PYTHON,
              bc.VerificationStepType.STREAMLINED_PYTHON]  # fmt: skip
    cfg = _finn_config(board, out / "finn", clk, out / SAMPLE_INPUT, out / SAMPLE_OUTPUT, verify_steps=vsteps)
    timings: dict[str, float] = {}
    hw_check = ""
    for name in ESTIMATE_STEPS:
        ts = time.time()
        if progress:
            print(f"  {name.removeprefix('step_')} ...", file=sys.__stdout__, flush=True)
        try:
            fn = step_streamline_residual if name == "step_streamline" else getattr(steps, name)
            model = fn(model, cfg)
            if name == "step_minimize_bit_width_initial":
                finn_compat.keep_bipolar_weights(model)
        except HwDqError:
            raise
        except Exception as e:
            raise _finn_error(name, e) from None
        timings[name] = round(time.time() - ts, 2)
        model.save(str(Path(cfg.get_intermediate_models_directory()) / f"{name}.onnx"))
        if name == "step_convert_to_hw":
            check_mapped(model)
            hw_check = _verify_hw_python(model, vin, vout)
    verification = _check_verification(cfg, [v.value for v in vsteps])
    verification["hw_layers_python"] = hw_check
    ts = time.time()
    if user_folding is not None:
        chosen = folding.apply_folding_config(model, cfg, user_folding[1], board, user_folding[0])
        mode = "folding_config"
    elif fit or target_fps is None:
        chosen = folding.search_fit(model, cfg, board)
        mode = "fit"
    else:
        chosen = folding.fold(model, cfg, max(1, int(clk * 1e6 / target_fps)), 36, board)
        mode = "target_fps"
    timings["folding"] = round(time.time() - ts, 2)
    model = steps.step_generate_estimate_reports(chosen["model"], cfg)
    est = folding.estimate(model, board.part, cfg.synth_clk_period_ns)
    return finish_build(BuildOutcome(
        model=model, cfg=cfg, board=board, out=out, chosen=chosen, est=est, fits=folding.fits(est["total"], board),
        mode=mode, clock_mhz=clk, tools=tools, started=t0, target_fps=target_fps, verification=verification,
        timings=timings,
    ))  # fmt: skip


def _verification_vectors(
    model: Any, out: Path, vin_path: Any, vout_path: Any, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """Sample images (UINT8) and expected outputs: the export's, or real sample images run through the model."""
    if vin_path is not None and Path(vin_path).is_file() and vout_path is not None and Path(vout_path).is_file():
        vin, vout = np.load(vin_path)[:n], np.load(vout_path)[:n]
    else:
        from hw_dq.data import load_split
        from hw_dq.fpga.export import execute, to_uint8

        shape = model.get_tensor_shape(model.graph.input[0].name)
        x, _ = load_split("sample", "test").take(n).tensors()
        if list(x.shape[1:]) != list(shape[1:]):
            raise BuildError(f"the model's input shape {shape} does not take the sample images {list(x.shape[1:])}")
        vin = to_uint8(x)
        vout = execute(model, vin)
    for name, arr in ((SAMPLE_INPUT, vin), (SAMPLE_OUTPUT, vout)):
        rd.atomic_write(out / name, lambda p, a=arr: _save_npy(p, a))
    return vin.astype(np.float32), vout.astype(np.float32)


def build_run(
    run_dir: str | Path,
    board: str,
    *,
    target_fps: float | None = None,
    fit: bool = False,
    clock_mhz: float | None = None,
    out: str | Path | None = None,
    boards_dir: str | Path | None = None,
    progress: bool = False,
    folding_config: str | Path | None = None,
) -> dict[str, Any]:
    """Build a run directory (exporting it first if needed) or a bare QONNX file for ``board``."""
    from hw_dq.fpga.export import export_run

    b = get_board(board, boards_dir)
    if folding_config is not None:  # a malformed file fails before anything is exported or built
        folding.read_folding_config(folding_config)
    src = Path(run_dir)
    if src.suffix == ".onnx" or src.is_file():
        onnx_path, vin, vout = src, None, None
        default_out = src.parent / f"build_{src.stem}_{b.name}"
    else:
        run = Run(src).require()
        if not run.qonnx.is_file():
            if progress:
                print("no export yet: exporting (logits head) ...", flush=True)
            export_run(src)
        onnx_path, vin, vout = run.qonnx, run.sample_inputs, run.sample_outputs
        default_out = run.build_dir(b.name, boards_dir)
    return build_model(
        onnx_path, b, Path(out) if out else default_out, target_fps=target_fps, fit=fit,
        clock_mhz=clock_mhz, sample_input=vin, sample_output=vout, progress=progress, folding_config=folding_config,
    )  # fmt: skip


def demo_summary(run_dir: str | Path, board: str = "Pynq-Z1") -> dict[str, Any]:
    """Export + ``--fit`` build for the demo; returns the report with a one-paragraph ``text``."""
    from hw_dq.fpga.export import export_run

    exp = export_run(run_dir)
    rep = build_run(run_dir, board, fit=True)
    util = ", ".join(f"{k} {100 * rep['utilisation'][k]:.0f}%" for k in ESTIMATED)
    rep["text"] = (
        f"FPGA ({rep['board']['name']}, {rep['clock_mhz']:.0f} MHz): QONNX export matches PyTorch "
        f"(max |logit diff| {exp.equivalence['max_abs_logit_diff']:.2g}, top-1 agreement "
        f"{100 * exp.equivalence['top1_agreement']:.0f}%); FINN estimates {rep['fps']:,.0f} images/s, "
        f"latency {rep['latency_us']:,.0f} us, bottleneck {rep['bottleneck']}; {util} of the board "
        f"({'fits' if rep['fits'] else 'does NOT fit'} FINN's recommended limits). "
        f"{rep['tools_line']} Build folder: {rep['build_dir']}."
    )
    return rep
