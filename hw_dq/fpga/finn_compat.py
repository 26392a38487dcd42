"""Every finn-plus workaround needed on a machine without Vivado lives here, and only here.

finn-plus (pip-installable FINN) is written for a machine where Vivado/Vitis is installed
and FINN is started through its own ``finn`` launcher. The python part of the compiler
(QONNX -> FINN-ONNX, streamlining, HW-layer conversion, folding, estimates, python
execution) needs none of the AMD tools, but three import-time/boot-time assumptions stop
it from being used as a library. :func:`prepare_finn` undoes them, once per process, and
records what it did; :func:`detect_tools` reports (never assumes) Vivado/Vitis.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# A value with a parseable "20YY.N" so code that inspects the path does not choke; it points
# nowhere and is only ever set when the user has no Vivado at all.
PLACEHOLDER_VIVADO = "/opt/hw-dq/no-vivado/Vivado/2024.2"


@dataclass
class ToolReport:
    """What AMD tools this machine has (found, not assumed)."""

    vivado: str | None = None
    vitis: str | None = None
    vitis_hls: str | None = None
    source: str = "none"
    workarounds: list[str] = field(default_factory=list)

    @property
    def has_vivado(self) -> bool:
        return self.vivado is not None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "has_vivado": self.has_vivado}

    def line(self) -> str:
        if self.has_vivado:
            return f"Vivado found at {self.vivado} ({self.source})"
        return (
            "Vivado/Vitis not found (XILINX_VIVADO unset, no 'vivado' on PATH): stopped after the "
            "estimate reports; run build_config.json's command on a machine with Vivado for the bitfile."
        )


_STATE: dict[str, Any] = {"prepared": False, "report": None}


def detect_tools() -> ToolReport:
    """Vivado/Vitis detection: ``XILINX_VIVADO`` pointing at a real folder, or ``vivado`` on PATH."""
    rep = ToolReport()
    env = os.environ.get("XILINX_VIVADO")
    if env and env != PLACEHOLDER_VIVADO and Path(env).is_dir():
        rep.vivado, rep.source = env, "XILINX_VIVADO"
    else:
        exe = shutil.which("vivado")
        if exe:
            rep.vivado, rep.source = str(Path(exe).resolve().parents[1]), "PATH"
    rep.vitis = os.environ.get("XILINX_VITIS") or (
        str(Path(p).resolve().parents[1]) if (p := shutil.which("v++")) else None
    )
    rep.vitis_hls = os.environ.get("XILINX_HLS") or (
        str(Path(p).resolve().parents[1]) if (p := shutil.which("vitis_hls")) else None
    )
    return rep


def prepare_finn(build_dir: str | Path | None = None) -> ToolReport:
    """Make ``finn.builder`` importable and usable as a library; idempotent per process.

    ``build_dir`` is where FINN puts its generated code (its FINN_BUILD_DIR); default:
    ``$FINN_BUILD_DIR`` or a per-user folder in the system temp directory.
    """
    if _STATE["prepared"]:
        if build_dir is not None:
            _set_build_dir(Path(build_dir))
        return _STATE["report"]
    rep = detect_tools()
    if not rep.has_vivado:
        # 1. finn-plus' verification and IP-generation code records the Vivado path in its
        #    build metadata and some modules read XILINX_VIVADO at import; without Vivado we
        #    give it a clearly fake path. detect_tools() ignores this placeholder.
        if "XILINX_VIVADO" not in os.environ:
            os.environ["XILINX_VIVADO"] = PLACEHOLDER_VIVADO
            rep.workarounds.append("XILINX_VIVADO placeholder (value written into build metadata only)")
        # 2. build_dataflow_steps does `from finn.xsi import SimEngine` at import time; the lazy
        #    attribute loads the XSI (Vivado simulator) extension and raises without Vivado.
        #    SimEngine is only used as a type hint and inside rtlsim, which never runs here, so
        #    a plain module attribute short-circuits the lazy loader.
        import finn.xsi

        finn.xsi.SimEngine = None  # type: ignore[attr-defined]
        rep.workarounds.append("finn.xsi.SimEngine = None (no XSI/rtlsim without Vivado)")
    # 3. finn-plus keeps global settings that its `finn` launcher (run_finn.py) creates; as a
    #    library we create them ourselves, pointing FINN_BUILD_DIR at a folder we own rather
    #    than FINN's default ./FINN_TMP in the current directory.
    _set_build_dir(Path(build_dir) if build_dir else _default_build_dir())
    rep.workarounds.append("FINN settings initialised in-process (no run_finn.py launcher)")
    _STATE.update(prepared=True, report=rep)
    return rep


def _default_build_dir() -> Path:
    env = os.environ.get("FINN_BUILD_DIR")
    if env:
        return Path(env)
    import tempfile

    return Path(tempfile.gettempdir()) / f"hw_dq_finn_{os.getuid()}"


def _set_build_dir(path: Path) -> None:
    from finn.interface.settings import FINNSettings
    from finn.util import settings

    path = path.resolve()
    path.mkdir(parents=True, exist_ok=True)
    os.environ["FINN_BUILD_DIR"] = str(path)
    settings._SETTINGS = FINNSettings.init(  # noqa: SLF001 (FINN has no public setter)
        flow_config=path / "dummy.yaml", finn_build_dir=path, auto_set_environment_vars=False
    )


def quiet_finn_logging() -> None:
    """FINN logs every transformation at INFO to the console; keep the CLI output readable."""
    import logging

    for name in ("finn", "qonnx"):
        logging.getLogger(name).setLevel(logging.WARNING)


def keep_bipolar_weights(model: Any) -> int:
    """Undo finn-plus' widening of {-1, +1} weights from BIPOLAR (1 bit) to INT2; returns the count.

    finn-plus 1.6.1's value-based ``MinimizeWeightBitWidth`` picks the smallest *signed integer*
    type that holds the weights' range, which for binary {-1, +1} weights is INT2: twice the
    weight memory and wider multipliers than the BIPOLAR type FINN's MVAU supports natively
    (``Recast<Binary>`` weights with non-bipolar inputs, as in finn-examples' w1a2 CNV).
    Applied only where the weight initializer is annotated BIPOLAR and holds only -1/+1.
    """
    import numpy as np
    from qonnx.core.datatype import DataType
    from qonnx.custom_op.registry import getCustomOp

    fixed = 0
    for node in model.graph.node:
        if not node.op_type.startswith(("MVAU", "VVAU")) or len(node.input) < 2:
            continue
        w = model.get_initializer(node.input[1])
        if w is None or model.get_tensor_datatype(node.input[1]) != DataType["BIPOLAR"]:
            continue
        inst = getCustomOp(node)
        if inst.get_nodeattr("weightDataType") != "BIPOLAR" and np.isin(w, (-1.0, 1.0)).all():
            inst.set_nodeattr("weightDataType", "BIPOLAR")
            fixed += 1
    return fixed


def reduce_mean_as_global_avg_pool(model: Any) -> int:
    """Rewrite ``ReduceMean(axes=[2, 3], keepdims=1)`` on NCHW into ``GlobalAveragePool``; returns the count.

    torch's dynamo exporter writes ``AdaptiveAvgPool2d(1)`` as a ReduceMean over H and W, which
    finn-plus 1.6.1 maps to hardware only behind an Im2Col; the equivalent GlobalAveragePool is
    what FINN's streamlining moves scales past and ``InferGlobalAccPoolLayer`` maps.
    """
    from onnx import helper

    changed = 0
    for i, node in enumerate(list(model.graph.node)):
        if node.op_type != "ReduceMean" or len(node.input) < 2:
            continue
        axes = model.get_initializer(node.input[1])
        keep = next((a.i for a in node.attribute if a.name == "keepdims"), 1)
        shape = model.get_tensor_shape(node.input[0])
        if axes is None or keep != 1 or shape is None or len(shape) != 4:
            continue
        if sorted(int(a) % 4 for a in axes.reshape(-1)) != [2, 3]:
            continue
        gap = helper.make_node("GlobalAveragePool", [node.input[0]], [node.output[0]], name=node.name + "_gap")
        model.graph.node.remove(node)
        model.graph.node.insert(i, gap)
        changed += 1
    return changed
