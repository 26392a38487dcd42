"""The run directory: the contract between pipeline stages.

Layout (each stage adds its own files; none rewrites another's)::

    RUN_DIR/
      config.json            resolved training config (model, bits, beta, recipe, data)
      checkpoint.safetensors training state for --resume (model, optimizer, position)
      model.safetensors      final weights (what attack / export / build read)
      metrics.jsonl          one JSON line per epoch
      lipschitz.json / .md   the Lipschitz diagnostic of the final model

Weights are safetensors (no pickle); every file is written atomically (temp file in the
same directory, fsync, rename), so a killed process never leaves a half-written file.
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
from safetensors.torch import load_file, save_file
from torch import nn

from hw_dq.errors import CheckpointError, ConfigError

CONFIG = "config.json"
CHECKPOINT = "checkpoint.safetensors"
MODEL = "model.safetensors"
METRICS = "metrics.jsonl"


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` then atomically rename ``tmp`` to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
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
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); delete it or re-run the stage") from None


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
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("hw_dq", "{}")
        tensors = load_file(str(path))
        meta = json.loads(raw)
    except (SafetensorError, OSError, ValueError, json.JSONDecodeError) as e:
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not a safetensors file ({e}); "
            "delete it and re-train, or --resume from an intact run"
        ) from None
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
