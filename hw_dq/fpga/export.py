"""Export stage: Brevitas -> QONNX, with the accelerator's interface and an equivalence check.

Writes into ``RUN_DIR/export/``:

* ``qonnx.onnx``       the cleaned QONNX model with the accelerator's interface: UINT8
                       NCHW image in (the 8-bit input quantizer with scale 1/255 becomes a
                       ``Mul(1/255)`` on a UINT8 input, which FINN's streamlining absorbs into
                       the first thresholds, as finn-examples' CNV does), logits out or the
                       top-1 label (TopK, ``--head label``);
* ``qcdq.onnx``        (``--qcdq``) QuantizeLinear/Clip/DequantizeLinear ONNX for onnxruntime;
* ``sample_input.npy`` / ``sample_output.npy``  real test images (UINT8) and the PyTorch
                       model's outputs: the build stage's verification vectors;
* ``equivalence.json`` QONNX execution vs PyTorch on those images.

Brevitas exports every 1-bit quantizer as ``BipolarQuant`` ({-s, +s}). That is right for the
binary weights but wrong for hw-dq's 1-bit ReLU6 activations, which are unsigned {0, 6}:
such nodes are rewritten to the equivalent unsigned 1-bit ``Quant`` (checked by the
equivalence test, which fails without the rewrite).
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from onnx import helper

from hw_dq import run as rd
from hw_dq.errors import ExportError, HwDqError
from hw_dq.run import EXPORT_DIR, QONNX_FILE, SAMPLE_INPUT, SAMPLE_OUTPUT, Run

HEADS = ("logits", "label")
__all__ = ["EXPORT_DIR", "QONNX_FILE", "ExportError", "ExportResult", "export_model", "export_run"]


@dataclass(frozen=True)
class ExportResult:
    """Paths and figures of one export."""

    qonnx: Path
    qcdq: Path | None
    sample_input: Path
    sample_output: Path
    equivalence: dict[str, Any]


def _quiet_export(model: torch.nn.Module, x: torch.Tensor, path: Path, qcdq: bool = False) -> None:
    import contextlib
    import io
    import warnings

    from brevitas.export import export_onnx_qcdq, export_qonnx

    fn = export_onnx_qcdq if qcdq else export_qonnx
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        fn(model, x, str(path))


def _rewrite_unsigned_binary_acts(model: Any) -> int:
    """Replace activation ``BipolarQuant`` nodes of unsigned 1-bit quantizers by ``Quant``.

    Weight quantizers (constant input) stay bipolar. An activation BipolarQuant can only come
    from hw-dq's unsigned 1-bit ReLU6 quantizer (the only 1-bit activation quantizer here).
    """
    changed = 0
    for node in list(model.graph.node):
        if node.op_type != "BipolarQuant" or model.get_initializer(node.input[0]) is not None:
            continue
        producer = model.find_producer(node.input[0])
        if producer is not None and producer.op_type in ("BipolarQuant", "Quant"):
            continue
        zero, bits = node.name + "_zeropt", node.name + "_bitwidth"
        model.set_initializer(zero, np.asarray(0.0, dtype=np.float32))
        model.set_initializer(bits, np.asarray(1.0, dtype=np.float32))
        new = helper.make_node(
            "Quant", [node.input[0], node.input[1], zero, bits], list(node.output),
            name=node.name.replace("BipolarQuant", "Quant1b"), domain="qonnx.custom_op.general",
            rounding_mode="ROUND", signed=0, narrow=0,
        )  # fmt: skip
        idx = list(model.graph.node).index(node)
        model.graph.node.remove(node)
        model.graph.node.insert(idx, new)
        changed += 1
    return changed


def _uint8_input(model: Any) -> None:
    """Turn the 8-bit input quantizer (scale 1/255, unsigned) into Mul(1/255) on a UINT8 input."""
    from qonnx.core.datatype import DataType

    gin = model.graph.input[0].name
    consumers = model.find_consumers(gin)
    node = consumers[0] if len(consumers) == 1 else None
    if node is None or node.op_type != "Quant":
        raise ExportError("the model's input is not followed by its 8-bit input quantizer; cannot take UINT8 images")
    scale, zero, bits = (model.get_initializer(i) for i in node.input[1:4])
    signed = {a.name: a.i for a in node.attribute}.get("signed", 1)
    if scale is None or scale.size != 1 or abs(float(scale.ravel()[0]) * 255 - 1) > 1e-6:
        raise ExportError("the input quantizer's scale is not 1/255; cannot take UINT8 images")
    if float(bits.ravel()[0]) != 8 or signed or float(np.abs(zero).max()) != 0:
        raise ExportError("the input quantizer is not unsigned 8-bit with zero point 0")
    sc = node.name + "_uint8_scale"
    model.set_initializer(sc, np.asarray(1.0 / 255.0, dtype=np.float32))
    mul = helper.make_node("Mul", [gin, sc], [node.output[0]], name="InputScale_1_over_255")
    idx = list(model.graph.node).index(node)
    model.graph.node.remove(node)
    model.graph.node.insert(idx, mul)
    model.set_tensor_datatype(gin, DataType["UINT8"])


def _label_head(model: Any) -> Any:
    from qonnx.transformation.insert_topk import InsertTopK

    model = model.transform(InsertTopK(k=1))
    return model


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[0, 1] float images -> UINT8 pixel values (as float32, FINN's container type)."""
    return np.round(x.detach().cpu().numpy() * 255.0).clip(0, 255).astype(np.float32)


def execute(model: Any, x: np.ndarray) -> np.ndarray:
    """Run a QONNX model image by image with qonnx' reference executor (batch-1 graphs)."""
    from qonnx.core.onnx_exec import execute_onnx

    iname, oname = model.graph.input[0].name, model.graph.output[0].name
    outs = [execute_onnx(model, {iname: x[i : i + 1]})[oname] for i in range(len(x))]
    return np.concatenate(outs, axis=0)


def _is_float(model: torch.nn.Module) -> bool:
    """True when no weight or activation quantizer is enabled (a full-precision model)."""
    import brevitas.nn as qnn

    for m in model.modules():
        proxy = getattr(m, "weight_quant", None)
        if (proxy is not None and proxy.is_quant_enabled) or isinstance(m, qnn.QuantReLU | qnn.QuantIdentity):
            return False
    return True


def export_model(
    model: torch.nn.Module,
    out_dir: str | Path,
    images: torch.Tensor,
    *,
    head: str = "logits",
    qcdq: bool = False,
    atol: float = 1e-3,
    min_agreement: float = 0.95,
    max_tie_images: float = 0.1,
) -> ExportResult:
    """Export ``model`` to ``out_dir`` and check it against PyTorch on ``images`` (float NCHW, [0,1])."""
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.util.cleanup import cleanup_model

    if head not in HEADS:
        raise ExportError(f"unknown output head {head!r}; choose one of {', '.join(HEADS)}")
    if _is_float(model):
        raise ExportError(
            "the model is full precision (float weights and activations): FINN maps only quantized "
            "models; train with integer --wbits/--abits"
        )
    if not bool(torch.isfinite(images).all()):
        raise ExportError("the verification images hold NaN or Inf; use real images in [0, 1]")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = model.eval().cpu()
    t0 = time.time()
    fd, raw_name = tempfile.mkstemp(prefix=f".brevitas_export.{os.getpid()}-", suffix=".tmp", dir=out)
    os.close(fd)
    raw = Path(raw_name)  # a private name: a concurrent or killed export never collides with this one
    try:
        _quiet_export(model, images[:1], raw)
        qm = cleanup_model(ModelWrapper(str(raw)))
    finally:
        raw.unlink(missing_ok=True)
    rewritten = _rewrite_unsigned_binary_acts(qm)
    _uint8_input(qm)
    qm = cleanup_model(qm)
    export_s = time.time() - t0

    with torch.no_grad():
        ref = model(images).numpy()
    xu8 = to_uint8(images)
    logits = execute(qm, xu8)
    per_image = np.abs(logits - ref).reshape(len(ref), -1).max(1)
    diff = float(per_image.max())
    agree = float((logits.argmax(1) == ref.argmax(1)).mean())
    expected = logits  # FINN's build verifies its transformations against the QONNX model itself
    final = qm
    if head == "label":
        final = cleanup_model(_label_head(qm))
        labels = execute(final, xu8).reshape(-1)
        agree = min(agree, float((labels == ref.argmax(1)).mean()))
        expected = labels.reshape(-1, 1).astype(np.float32)
    tol = atol * max(1.0, float(np.abs(ref).max()))
    # PyTorch and onnxruntime sum in different orders, so an activation that sits exactly on a
    # rounding boundary can land one level apart: a few images then differ by a logit quantum.
    # An export bug changes most images; allow up to ``max_tie_images`` of them to differ.
    # a NaN compares False with everything: count every non-finite output as outside the tolerance,
    # and let no non-finite logit agree
    finite = np.isfinite(ref).reshape(len(ref), -1).all(1) & np.isfinite(logits).reshape(len(ref), -1).all(1)
    off = int(((per_image > tol) | ~finite).sum())
    if not finite.all():
        agree, diff = 0.0, float("nan")
    eq = {
        "n_images": len(images), "head": head, "max_abs_logit_diff": diff, "tolerance": tol,
        "images_outside_tolerance": off, "max_tie_images": max_tie_images,
        "top1_agreement": agree, "min_agreement": min_agreement,
        "activation_bipolar_rewritten": rewritten, "input": "UINT8 NCHW (scale 1/255 absorbed)",
        "export_seconds": round(export_s, 2), "non_finite_images": int((~finite).sum()),
        "ok": bool(finite.all()) and off <= max_tie_images * len(images) and agree >= min_agreement,
    }  # fmt: skip
    if not eq["ok"]:
        rd.write_json(out / "equivalence.json", {**eq, "max_abs_logit_diff": None if diff != diff else diff})
        why = f", {eq['non_finite_images']} with NaN/Inf outputs" if not finite.all() else ""
        raise ExportError(
            f"QONNX does not reproduce the PyTorch model: {off} of {len(images)} images outside the logit "
            f"tolerance {tol:.3g}{why} (max diff {diff:.3g}), top-1 agreement {agree:.3f}; "
            f"see {out / 'equivalence.json'}"
        )
    # every file atomically, the QONNX model and the report last: a killed export leaves the previous
    # export or a complete new one, never a model without its verification vectors
    rd.atomic_write(out / SAMPLE_INPUT, lambda p: _save_npy(p, xu8))
    rd.atomic_write(out / SAMPLE_OUTPUT, lambda p: _save_npy(p, expected.astype(np.float32)))
    qcdq_path = None
    if qcdq:
        qcdq_path = out / "qcdq.onnx"
        rd.atomic_write(qcdq_path, lambda p: _quiet_export(model, images[:1], p, qcdq=True))
    qpath = out / QONNX_FILE
    rd.atomic_write(qpath, lambda p: final.save(str(p)))
    rd.write_json(out / "equivalence.json", eq)
    return ExportResult(qpath, qcdq_path, out / SAMPLE_INPUT, out / SAMPLE_OUTPUT, eq)


def _save_npy(path: Path, arr: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.save would append .npy to the temporary name
        np.save(f, arr, allow_pickle=False)


def sample_images(run: Run | None, n: int) -> torch.Tensor:
    """``n`` real test images of the run's dataset; the embedded sample for no run, or when the
    run's data is not on this machine (the images only check the export)."""
    from hw_dq.data import load_split

    if run is not None:
        try:
            return run.test_set(n, 0).tensors()[0]
        except HwDqError:
            pass
    return load_split("sample", "test").take(n, 0).tensors()[0]


def export_run(
    run_dir: str | Path, head: str = "logits", qcdq: bool = False, n: int = 32, out: str | Path | None = None
) -> ExportResult:
    """Export a run directory's model to ``out`` (default ``RUN_DIR/export``; see the module docstring)."""
    if n < 1:
        raise ExportError(f"invalid --n {n}: need at least one test image")
    run = Run(run_dir)
    model = run.model()
    return export_model(model, Path(out) if out else run.export_dir, sample_images(run, n), head=head, qcdq=qcdq)
