"""Property-based fuzzing (Hypothesis) of every loader of user files: .npz datasets, board JSON, config
JSON, results JSON, safetensors files and ONNX graphs.

Each loader either accepts its input (and then what it returns satisfies what the stages that use it
assume) or raises a one-line :class:`hw_dq.errors.HwDqError`: never another exception, never a hang
(every case runs under a hard time limit), never unpickling. The budget is bounded for CI
(``HW_DQ_FUZZ_EXAMPLES`` per loader, default 40, derandomized so that CI runs the same cases); a longer
campaign is ``HW_DQ_FUZZ_EXAMPLES=2000 pytest tests/test_fuzz_loaders.py``. Every crashing input found
is kept under ``tests/fixtures/fuzz/`` and replayed by ``tests/test_fuzz_regressions.py``.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import signal
import struct
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from hw_dq import run as rd
from hw_dq.data import MAX_CLASSES, load_split
from hw_dq.errors import HwDqError
from hw_dq.fpga import boards, sim
from hw_dq.robust import results
from hw_dq.train.config import TrainConfig, load_config
from tests.conftest import ROOT

FUZZ = ROOT / "tests" / "fixtures" / "fuzz"
EXAMPLES = int(os.environ.get("HW_DQ_FUZZ_EXAMPLES", "40"))
CASE_LIMIT_S = 10.0  # a hard bound per case: a hang is a failure, not a stuck CI job
FOUND = os.environ.get("HW_DQ_FUZZ_SAVE")  # a folder: save every input that crashes (campaigns only)
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 100, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)  # fmt: skip
COUNTS: dict[str, int] = {}  # cases run per loader (printed by the summary test for the README table)


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    def _raise(*_: Any) -> None:
        raise TimeoutError(f"a fuzz case ran longer than {seconds} s")

    old = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def accepts_or_one_line(loader: str, fn: Callable[[], Any], sample: bytes | None = None) -> Any:
    """``fn()``'s value, or None when it raised a one-line HwDqError; anything else fails the test."""
    COUNTS[loader] = COUNTS.get(loader, 0) + 1
    try:
        with time_limit(CASE_LIMIT_S):
            return fn()
    except HwDqError as e:
        assert "\n" not in str(e) and str(e).strip(), repr(str(e))
        return None
    except BaseException:
        if FOUND and sample is not None:
            out = Path(FOUND) / loader
            out.mkdir(parents=True, exist_ok=True)
            (out / f"crash-{abs(hash(sample)) % 10**10}").write_bytes(sample)
        raise


def _tmp() -> Path:
    return Path(tempfile.mkdtemp(prefix="hwdq-fuzz-"))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=12,
)


def mutate(obj: Any, data: st.DataObject) -> Any:
    """Replace, delete or add one field somewhere in a JSON object (a user's typo, a truncated edit)."""
    obj = copy.deepcopy(obj)
    node = obj
    while True:
        keys = list(node) if isinstance(node, dict) else list(range(len(node))) if isinstance(node, list) else []
        if not keys:
            return data.draw(json_values)
        key = data.draw(st.sampled_from(keys))
        child = node[key]
        if isinstance(child, dict | list) and child and data.draw(st.booleans()):
            node = child
            continue
        action = data.draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "replace":
            node[key] = data.draw(json_values)
        elif action == "delete" and isinstance(node, dict):
            del node[key]
        elif isinstance(node, dict):
            node[data.draw(st.text(max_size=8))] = data.draw(json_values)
        else:
            node.append(data.draw(json_values))
        return obj


def flip_bytes(raw: bytes, data: st.DataObject) -> bytes:
    """A damaged copy: a few bytes overwritten, and maybe cut short."""
    b = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 8))):
        b[data.draw(st.integers(0, len(b) - 1))] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        b = b[: data.draw(st.integers(0, len(b)))]
    return bytes(b)


# ---------------------------------------------------------------- .npz datasets
DTYPES = st.sampled_from([np.uint8, np.int8, np.int64, np.uint64, np.float32, np.float64, np.bool_, np.int32])
arrays = DTYPES.flatmap(lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=0, max_dims=5, min_side=0, max_side=6)))


def _check_dataset(ds: Any) -> None:
    assert ds.x.dtype == np.uint8 and ds.x.ndim == 4 and ds.x.shape[-1] in (1, 3) and len(ds) >= 1
    assert ds.y.dtype == np.int64 and ds.y.shape == (len(ds),)
    assert ds.y.min() >= 0 and ds.y.max() < min(MAX_CLASSES, ds.num_classes)


@FUZZ_SETTINGS
@given(files=st.dictionaries(st.sampled_from(["x", "y", "images", "labels"]), arrays, max_size=3))
def test_fuzz_npz_dataset_arrays(files: dict[str, np.ndarray]) -> None:
    d = _tmp()
    np.savez(d / "train.npz", **files)
    ds = accepts_or_one_line("npz", lambda: load_split("npz", "train", d), (d / "train.npz").read_bytes())
    if ds is not None:
        _check_dataset(ds)


def _valid_npz() -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    np.savez_compressed(buf, x=rng.integers(0, 255, (3, 8, 8, 3), dtype=np.uint8), y=np.array([0, 1, 2]))
    return buf.getvalue()


@FUZZ_SETTINGS
@given(data=st.data())
def test_fuzz_npz_dataset_bytes(data: st.DataObject) -> None:
    d = _tmp()
    raw = flip_bytes(_valid_npz(), data)
    (d / "test.npz").write_bytes(raw)
    ds = accepts_or_one_line("npz", lambda: load_split("npz", "test", d), raw)
    if ds is not None:
        _check_dataset(ds)


# ---------------------------------------------------------------- board files
VALID_BOARD = json.loads((FUZZ / "valid_board.json").read_text())


def _check_board(b: boards.Board, root: Path) -> None:
    build = (root / "build").resolve()
    assert (root / "build" / b.name).resolve().parent == build, "a board file points a build outside build/"
    assert all(v >= 0 for v in b.resources.values()) and b.resources["LUT"] > 0 and 1 <= b.clock_mhz <= 1000


@FUZZ_SETTINGS
@given(data=st.data())
def test_fuzz_board_json(data: st.DataObject) -> None:
    d = _tmp()
    obj = mutate(VALID_BOARD, data)
    text = json.dumps(obj) if data.draw(st.booleans()) else flip_bytes(json.dumps(obj).encode(), data).decode("latin1")
    (d / "Board.json").write_text(text, encoding="latin1")
    b = accepts_or_one_line("board", lambda: boards.load_board_file(d / "Board.json"), text.encode("latin1"))
    if b is not None:
        _check_board(b, d)


# ---------------------------------------------------------------- training configs
VALID_CONFIG = json.loads((ROOT / "hw_dq" / "configs" / "cnv_cpu.json").read_text())


@FUZZ_SETTINGS
@given(data=st.data())
def test_fuzz_config_json(data: st.DataObject) -> None:
    d = _tmp()
    obj = mutate(VALID_CONFIG, data)
    (d / "c.json").write_text(json.dumps(obj))
    cfg = accepts_or_one_line("config", lambda: load_config(d / "c.json"), json.dumps(obj).encode())
    if cfg is not None:
        assert isinstance(cfg, TrainConfig) and cfg.epochs >= 1 and cfg.batch_size >= 1 and cfg.lr > 0
        # what a run directory stores is read back by every later stage: it must load too
        assert TrainConfig.from_dict(json.loads(json.dumps(cfg.__dict__))) == cfg


# ---------------------------------------------------------------- results files
VALID_RESULT = json.loads((FUZZ / "valid_result.json").read_text())


@FUZZ_SETTINGS
@given(data=st.data())
def test_fuzz_results_json(data: st.DataObject) -> None:
    d = _tmp()
    obj = mutate(VALID_RESULT, data)
    (d / "r.json").write_text(json.dumps(obj))

    def load_and_render() -> list[dict]:
        rs = results.load([d / "r.json"])
        results.tabulate(rs), results.describe(rs[0])  # what `hw-dq results` and the .md do with it
        return rs

    accepts_or_one_line("results", load_and_render, json.dumps(obj).encode())


# ---------------------------------------------------------------- safetensors files
st_dtypes = st.sampled_from(["F32", "F64", "I64", "U8", "BOOL", "F16", "BF16", "I32", "XX", ""])
st_tensor = st.fixed_dictionaries(
    {"dtype": st_dtypes, "shape": st.lists(st.integers(-1, 2**40), max_size=4),
     "data_offsets": st.lists(st.integers(-1, 2**40), min_size=0, max_size=3)}
)  # fmt: skip


@FUZZ_SETTINGS
@given(
    tensors=st.dictionaries(st.text(max_size=10), st_tensor | json_values, max_size=3),
    meta=st.none() | st.dictionaries(st.sampled_from(["hw_dq", "format", "x"]), st.text(max_size=20) | json_values),
    claimed=st.none() | st.integers(0, 2**64 - 1),
    payload=st.binary(max_size=64),
)
def test_fuzz_safetensors_header(tensors: dict, meta: Any, claimed: int | None, payload: bytes) -> None:
    d = _tmp()
    header = dict(tensors)
    if meta is not None:
        header["__metadata__"] = meta
    hb = json.dumps(header).encode()
    raw = struct.pack("<Q", len(hb) if claimed is None else claimed) + hb + payload
    (d / "m.safetensors").write_bytes(raw)
    got = accepts_or_one_line("safetensors", lambda: rd.load_tensors(d / "m.safetensors"), raw)
    if got is not None:
        loaded, m = got
        assert isinstance(m, dict) and all(not t.is_floating_point() or t.isfinite().all() for t in loaded.values())


@FUZZ_SETTINGS
@given(data=st.data())
def test_fuzz_safetensors_bytes(data: st.DataObject) -> None:
    d = _tmp()
    raw = flip_bytes((ROOT / "tests" / "fixtures" / "run_v1" / rd.MODEL).read_bytes(), data)
    (d / "m.safetensors").write_bytes(raw)
    got = accepts_or_one_line("safetensors", lambda: rd.load_tensors(d / "m.safetensors"), raw)
    if got is not None:
        assert all(not t.is_floating_point() or t.isfinite().all() for t in got[0].values())


# ---------------------------------------------------------------- ONNX graphs
def _valid_onnx() -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])
    nodes = [helper.make_node("Mul", ["x", "s"], ["m"]), helper.make_node("Transpose", ["m"], ["t"], perm=[0, 2, 3, 1]),
             helper.make_node("Flatten", ["t"], ["y"])]  # fmt: skip
    init = [numpy_helper.from_array(np.full((1,), 0.5, np.float32), "s")]
    return helper.make_model(helper.make_graph(nodes, "g", [x], [y], init)).SerializeToString()


OPS = ["Mul", "Add", "Div", "MatMul", "Transpose", "Reshape", "Flatten", "Identity", "MultiThreshold", "TopK",
       "StreamingDataflowPartition", "Conv", "Loop", "If", ""]  # fmt: skip


@FUZZ_SETTINGS
@given(data=st.data())
def test_fuzz_onnx_graph(data: st.DataObject) -> None:
    """Damaged bytes of a valid graph, or one whose nodes name other ops, inputs and attributes."""
    from onnx import helper

    d = _tmp()
    if data.draw(st.booleans()):
        raw = flip_bytes(_valid_onnx(), data)
    else:
        import onnx

        m = onnx.load_from_string(_valid_onnx())
        node = m.graph.node[data.draw(st.integers(0, len(m.graph.node) - 1))]
        node.op_type = data.draw(st.sampled_from(OPS))
        if data.draw(st.booleans()):
            node.input.append(data.draw(st.sampled_from(["x", "s", "nope", ""])))
        if data.draw(st.booleans()):
            name = data.draw(st.sampled_from(["perm", "model", "K", "out_scale", "data_layout"]))
            val = data.draw(
                st.integers(-5, 5) | st.text(max_size=30) | st.lists(st.integers(-3, 5), min_size=1, max_size=4)
            )
            node.attribute.append(helper.make_attribute(name, val))
        raw = m.SerializeToString()
    (d / "g.onnx").write_bytes(raw)

    def load_and_run() -> Any:
        s = sim.load(d / "g.onnx")
        return s

    accepts_or_one_line("onnx", load_and_run, raw)


def test_fuzz_budget_summary(capsys: pytest.CaptureFixture[str]) -> None:
    """Prints the cases run per loader in this session (the README's reliability table quotes them)."""
    with capsys.disabled():
        print("\nfuzz cases per loader:", json.dumps(dict(sorted(COUNTS.items()))))
