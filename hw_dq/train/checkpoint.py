"""Training checkpoints: what a resumable checkpoint holds, and the models a run starts from or learns from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from hw_dq import run as rd
from hw_dq.errors import ConfigError
from hw_dq.nn.quant import QUANT_SCHEME, LearnedRange


def calibration_state(model: nn.Module) -> dict[str, nn.Module]:
    """Learned activation ranges whose statistics-calibration counter and running buffer live outside
    Brevitas' state_dict: a checkpoint must carry them, or a resumed run calibrates differently."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LearnedRange)}


def checkpoint_tensors(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The tensors of a resumable checkpoint: the model, the optimizer's per-parameter state, the range calibration."""
    t = {f"model.{k}": v for k, v in model.state_dict().items()}
    for i, p in enumerate(opt.param_groups[0]["params"]):  # SGD's momentum, Adam's moments and step count
        for k, v in opt.state.get(p, {}).items():
            if isinstance(v, torch.Tensor):
                t[f"optim.{i}.{k}"] = v
    for n, m in calibration_state(model).items():
        t[f"calib.{n}.counter"] = torch.tensor([int(m.counter)])
        t[f"calib.{n}.buffer"] = m.buffer.detach().clone()
        # during calibration Brevitas' state_dict stores the running statistic as the value
        t[f"calib.{n}.value"] = m.value.detach().clone()
    return t


def restore_model(model: nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Load a checkpoint's model weights and range calibration into ``model`` (a one-line error if they do not fit)."""
    state = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    rd.load_state(model, state, path)
    for n, m in calibration_state(model).items():
        if f"calib.{n}.counter" in tensors:
            m.counter = int(tensors[f"calib.{n}.counter"][0])
            with torch.no_grad():
                m.buffer.copy_(tensors[f"calib.{n}.buffer"])
                m.value.copy_(tensors[f"calib.{n}.value"])


def restore_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    """Load a checkpoint's per-parameter optimizer state into ``opt``."""
    by_param: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            i, name = key[6:].split(".", 1)
            by_param.setdefault(int(i), {})[name] = v
    for i, p in enumerate(opt.param_groups[0]["params"]):
        for name, v in by_param.get(i, {}).items():  # Adam keeps its step count on the CPU
            opt.state[p][name] = v.clone() if name == "step" else v.to(p.device).clone()


# model-section fields that must agree between a run and the run it starts from (bits may differ:
# fine-tuning a quantized model from its full-precision twin is the point of --init-from)
_SAME_ARCH = ("name", "width", "depth", "in_channels", "num_classes")


def init_from(model: nn.Module, src: str, mcfg: dict[str, Any], scheme_here: str) -> None:
    """Start ``model`` from another run's weights (``--init-from``): same architecture, same quantizer scheme."""
    path = Path(src)
    if path.is_dir():
        cfg_src = rd.read_json(path / rd.CONFIG) if (path / rd.CONFIG).is_file() else None
        if cfg_src is not None:
            other = cfg_src.get("model", {})
            diff = [k for k in _SAME_ARCH if k in other and other[k] != mcfg.get(k)]
            if diff:
                k = diff[0]
                raise ConfigError(
                    f"--init-from {src} is a different architecture ({k} {other[k]!r} there, {mcfg.get(k)!r} here); "
                    "start from a run of the same model, width and data"
                )
            scheme = cfg_src.get("quant_scheme", QUANT_SCHEME)
            if scheme != scheme_here and (other.get("wbits"), other.get("abits")) != (None, None):
                raise ConfigError(
                    f"--init-from {src} was trained under quantizers '{scheme}', not '{scheme_here}'; retrain it"
                )
        path = path / rd.MODEL
    tensors, _ = rd.load_tensors(path)
    state = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    rd.load_state(model, state, path)


def teacher_model(src: str, num_classes: int, device: str) -> nn.Module:
    """rslad's teacher: a finished run's model, frozen in eval mode; a one-line error for anything else."""
    path = Path(src)
    if not (path / rd.MODEL).is_file() or not (path / rd.CONFIG).is_file():
        raise ConfigError(f"--teacher {src} is not a finished training run (no {rd.MODEL}); train it first")
    teacher, tcfg = rd.load_model(path, device=device)
    if tcfg.get("model", {}).get("num_classes", num_classes) != num_classes:
        raise ConfigError(f"--teacher {src} predicts {tcfg['model']['num_classes']} classes, not {num_classes}")
    return teacher.requires_grad_(False)
