"""The run directory: the contract between pipeline stages.

Layout (each stage adds its own files; none rewrites another's)::

    RUN_DIR/
      config.json            resolved training config (model, bits, beta, recipe, data)
      checkpoint.safetensors training state for --resume (model, optimizer, position)
      model.safetensors      final weights (what attack / export / build read)
      metrics.jsonl          one JSON line per epoch
      lipschitz.json / .md   the Lipschitz diagnostic of the final model
      attacks/<name>.json    one evaluation record per attack run (and a .md rendering)
      export/                qonnx.onnx, sample_input.npy, sample_output.npy, equivalence.json
      build/<Board>/         one FINN build per board, named by the catalogue's spelling

:class:`Run` is the handle every stage uses to read and write these files; the functions
below it are its building blocks.

Weights are safetensors (no pickle); every file is written atomically (temp file in the
same directory, fsync, rename), so a killed process never leaves a half-written file. A stage
that writes into a run directory holds :func:`run_lock` (``RUN_DIR/.lock``: PID, host, start
time; a kernel lock, so a killed holder never blocks the next run), and :func:`guard` turns a
full disk or a read-only folder into a one-line error. Loaded tensors must be finite.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save_file
from torch import nn

from hw_dq.errors import CheckpointError, ConfigError, DataError, HwDqError

# the lock is part of the run directory's contract: its names are re-exported here
from hw_dq.lock import (  # noqa: F401
    DISK_ERRORS,
    KILL_ENV,
    LOCK_FILE,
    guard,
    guard_verb,
    kill_point,
    lock_is_stale,
    remove_dead_scratch,
    run_lock,
)

CONFIG = "config.json"
CHECKPOINT = "checkpoint.safetensors"
MODEL = "model.safetensors"
METRICS = "metrics.jsonl"
ATTACKS_DIR = "attacks"
EXPORT_DIR = "export"
QONNX_FILE = "qonnx.onnx"
SAMPLE_INPUT = "sample_input.npy"  # verification images (UINT8 NCHW), in export/ and in each build
SAMPLE_OUTPUT = "sample_output.npy"  # the PyTorch model's outputs on them
BUILD_DIR = "build"
DATAFLOW_MODEL = "dataflow_model.onnx"  # what a finished build leaves for the simulator
REPO_ROOT = Path(__file__).resolve().parents[1]  # a checkout's root (committed results are relative to it)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` then atomically rename ``tmp`` to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        kill_point(path.name)
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        if e.filename is None or str(e.filename) == tmp:  # name the file the user knows, not the scratch
            raise OSError(e.errno, e.strerror or str(e), str(path)) from e
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n"))


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text))


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found; is this a hw-dq run directory?") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({str(e)[:120]}); delete it or re-run the stage") from None
    except OSError as e:
        raise CheckpointError(f"{path} cannot be read ({e.strerror})") from None


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Save tensors as safetensors, with ``meta`` stored as JSON in the header."""
    flat = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    header = {"hw_dq": json.dumps(meta)}
    atomic_write(path, lambda p: save_file(flat, str(p), metadata=header))


def load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a safetensors file written by :func:`save_tensors` (tensors, metadata)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found; train first (hw-dq train --out DIR)")
    try:
        # One read of one open file: a writer's os.replace between two opens (metadata, then tensors)
        # would mix two checkpoints, or map a header against the other file's size.
        with open(path, "rb") as f:
            data = f.read()
        if len(data) < 8:
            raise ValueError("file shorter than a safetensors header")
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + n]) if 8 + n <= len(data) else None
        if not isinstance(header, dict):
            raise ValueError("truncated or invalid safetensors header")
        raw = (header.get("__metadata__") or {}).get("hw_dq", "{}")
        tensors = load_bytes(data)
        meta = json.loads(raw)
    except (SafetensorError, OSError, ValueError, TypeError, AttributeError, RuntimeError) as e:
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not a safetensors file ({e}); "
            "delete it and re-train, or --resume from an intact run"
        ) from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint {path}: its hw_dq metadata is not a JSON object; re-train")
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(
                f"checkpoint {path}: tensor {name} holds NaN or Inf (a diverged run?); "
                "re-train (lower --lr, --grad-clip) or --resume from an earlier intact run"
            )
    return tensors, meta


def load_state(model: nn.Module, state: dict[str, torch.Tensor], where: Path) -> None:
    """Load a state dict strictly, as a one-line CheckpointError on mismatch."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0] if str(e) else "mismatch"
        missing = [k for k in model.state_dict() if k not in state][:3]
        raise CheckpointError(
            f"{where} does not match the model in config.json ({first}; missing e.g. {missing}); "
            "was it written by another model or hw-dq version?"
        ) from None


def append_jsonl(path: Path, row: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut by a kill: everything after it is dropped
    return rows


def truncate_metrics(path: Path, keep_before_epoch: int) -> None:
    """Drop metric rows of epochs >= ``keep_before_epoch`` (used when resuming)."""
    rows = [r for r in read_jsonl(path) if r.get("epoch", 0) < keep_before_epoch]
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def resolve_device(device: str = "auto") -> str:
    """``auto``: the GPU where PyTorch sees one, else the CPU; any other name is checked."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        raise ConfigError(f"device {device!r} is not usable here ({str(e).splitlines()[0]}); use auto or cpu") from None
    return device


def load_model(run_dir: str | Path, which: str = MODEL, device: str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model of a run directory and load its weights (eval mode, on ``device``)."""
    from hw_dq.nn.models import ModelConfig, model_from_config

    run = Path(run_dir)
    if not run.is_dir():
        raise CheckpointError(f"run directory {run} does not exist")
    cfg = read_json(run / CONFIG)
    # the scheme stamp decides the quantizers (runs before the stamp used scheme 1); unknown: refused
    mcfg = ModelConfig.from_stored(cfg.get("model"), cfg.get("quant_scheme"), run)
    model = model_from_config(mcfg)
    path = run / which
    if which == MODEL and not path.is_file() and (run / CHECKPOINT).is_file():
        path = run / CHECKPOINT  # an unfinished run: use its latest training state
    tensors, _ = load_tensors(path)
    state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    load_state(model, state, path)
    model.eval()
    return model.to(resolve_device(device)), cfg


class Run:
    """A run directory: the one way a stage reads and writes it.

    ``Run(path)`` does not touch the disk; :attr:`config` is read once, on first use.
    """

    def __init__(self, path: str | Path | Run) -> None:
        self.path = path.path if isinstance(path, Run) else Path(path)
        self._config: dict[str, Any] | None = None

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    def require(self) -> Run:
        """This run, or a one-line error when the folder does not exist."""
        if not self.path.is_dir():
            raise CheckpointError(f"run directory {self.path} does not exist")
        return self

    # -- what training wrote ----------------------------------------------------------------
    @property
    def config(self) -> dict[str, Any]:
        """``config.json`` as written by training (read once)."""
        if self._config is None:
            self._config = read_json(self.require().path / CONFIG)
        return self._config

    @property
    def train_settings(self) -> dict[str, Any]:
        """The training section of the config (data, recipe); empty for a bare model."""
        section = self.config.get("train", {})
        return section if isinstance(section, dict) else {}

    def model(self, device: str = "cpu", which: str = MODEL) -> nn.Module:
        """The trained model in eval mode on ``device`` (the latest checkpoint of an unfinished run)."""
        return load_model(self.path, which, device)[0]

    def resolve(self, stored: str | Path | None) -> Path | None:
        """A path stored in the run's files: as written when it exists (absolute, or relative to the
        current folder), else relative to the run directory, else to the repository root (committed
        results store repository-relative paths); as written when none exists."""
        if stored is None:
            return None
        p = Path(stored)
        if p.is_absolute() or p.exists():
            return p
        for base in (self.path, REPO_ROOT):
            if (base / p).exists():
                return base / p
        return p

    def data_source(self, data: str | None = None, data_dir: str | Path | None = None) -> tuple[str, str | None]:
        """The dataset name and folder to evaluate on: the arguments, else the run's own."""
        name = data or self.train_settings.get("data", "sample")
        folder = data_dir if data_dir is not None else self.resolve(self.train_settings.get("data_dir"))
        return name, None if folder is None else str(folder)

    def test_set(self, n: int | None, seed: int = 0, data: str | None = None, data_dir: str | Path | None = None):
        """The ``n`` test images every stage evaluates on: ``load_split(...).take(n, seed)`` of the
        run's dataset (or ``data``/``data_dir``). Returns an :class:`hw_dq.data.ArrayDataset`."""
        from hw_dq.data import load_split

        name, folder = self.data_source(data, data_dir)
        ds = load_split(name, "test", folder).take(n, seed)
        model = self.config.get("model")
        classes = model.get("num_classes") if isinstance(model, dict) else None
        channels = model.get("in_channels") if isinstance(model, dict) else None
        if isinstance(classes, int) and len(ds) and int(ds.y.max()) >= classes:
            raise DataError(
                f"{ds.name}: label {int(ds.y.max())} is out of range for the model of {self.path}, which has "
                f"{classes} classes; evaluate on the dataset it was trained on (--data/--data-dir)"
            )
        if isinstance(channels, int) and ds.channels != channels:
            raise DataError(
                f"{ds.name}: images have {ds.channels} channel(s), the model of {self.path} takes {channels}; "
                "evaluate on the dataset it was trained on (--data/--data-dir)"
            )
        return ds

    # -- evaluation records -----------------------------------------------------------------
    @property
    def attacks_dir(self) -> Path:
        return self.path / ATTACKS_DIR

    def result_path(self, name: str) -> Path:
        return self.attacks_dir / f"{name}.json"

    def write_result(self, name: str, record: dict[str, Any], markdown: str | None = None) -> Path:
        """Write ``attacks/<name>.json`` (and ``.md`` when given), atomically; returns the JSON path."""
        path = self.result_path(name)
        write_json(path, record)
        if markdown is not None:
            write_text(path.with_suffix(".md"), markdown)
        return path

    # -- export and builds ------------------------------------------------------------------
    @property
    def export_dir(self) -> Path:
        return self.path / EXPORT_DIR

    @property
    def qonnx(self) -> Path:
        return self.export_dir / QONNX_FILE

    @property
    def sample_inputs(self) -> Path:
        """The export's verification images (UINT8 NCHW .npy)."""
        return self.export_dir / SAMPLE_INPUT

    @property
    def sample_outputs(self) -> Path:
        return self.export_dir / SAMPLE_OUTPUT

    def builds(self) -> list[Path]:
        """Finished FINN builds of this run (folders with a dataflow model), sorted by name."""
        root = self.path / BUILD_DIR
        return sorted(d for d in root.iterdir() if (d / DATAFLOW_MODEL).is_file()) if root.is_dir() else []

    def build_dir(self, board: str, boards_dir: str | Path | None = None) -> Path:
        """Where the build for ``board`` lives: ``build/<the catalogue's spelling>``, so that
        ``zcu104``, ``ZCU104`` and ``Zcu104`` name one folder. An existing folder whose name
        matches case-insensitively wins (a board file since renamed or removed)."""
        from hw_dq.fpga.boards import canonical_name  # the catalogue is data (imports only errors)

        root = self.path / BUILD_DIR
        if root.is_dir():
            for d in sorted(root.iterdir()):
                if d.is_dir() and d.name.casefold() == board.strip().casefold():
                    return d
        return root / canonical_name(board, boards_dir)

    def find_build(self, board: str | None = None) -> Path:
        """A finished build: the one for ``board``, or the only one when no board is named."""
        if board is not None:
            d = self.build_dir(board)
            if (d / DATAFLOW_MODEL).is_file():
                return d
            have = ", ".join(b.name for b in self.builds()) or "none"
            raise HwDqError(
                f"no FINN build in {self.path} for board {board} (builds: {have}); "
                f"run 'hw-dq build {self.path} --board {board}' first"
            )
        builds = self.builds()
        if not builds:
            raise HwDqError(f"no FINN build in {self.path}; run 'hw-dq build {self.path} --board NAME' first")
        if len(builds) > 1:
            raise HwDqError(f"{self.path} has builds for {', '.join(d.name for d in builds)}; choose one with --board")
        return builds[0]
