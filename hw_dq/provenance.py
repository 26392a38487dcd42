"""Where a result came from: hw-dq's version and commit, the library versions, the machine, the device."""

from __future__ import annotations

import functools
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from hw_dq.version import __version__

# the distributions whose versions change a number hw-dq reports (training, export, build, attacks)
LIBRARIES = ("torch", "brevitas", "qonnx", "finn-plus", "onnxruntime", "pyautoattack",
             "adversarial-robustness-toolbox", "numpy")  # fmt: skip


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=1)
def commit() -> str | None:
    """The git commit of the hw-dq source in use (``+dirty`` when it has uncommitted edits), or None.

    None for an installed wheel or where git is absent: a wheel's version is its provenance.
    """
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "hw_dq"], cwd=root,
                               capture_output=True, text=True, timeout=10)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str | None) -> str:
    """A readable name of the device a stage ran on (the GPU's model, or the CPU's)."""
    if device and device.startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(torch.device(device))
    return cpu_model()


@functools.lru_cache(maxsize=1)
def _static() -> dict[str, Any]:
    return {
        "hw_dq_version": __version__,
        "hw_dq_commit": commit(),
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.release()} {platform.machine()}",
        "libraries": {name: _version(name) for name in LIBRARIES},
        "cpus": os.cpu_count(),
    }


def provenance(device: str | None = "cpu", seed: int | None = None) -> dict[str, Any]:
    """The ``provenance`` section every result and build report carries.

    Args:
        device: the torch device the stage ran on ("cpu", "cuda", "cuda:1"); None for a stage
            that runs no torch model.
        seed: the seed that chose the images and the attacks' randomness, when there is one.
    """
    import torch

    out = dict(_static())
    out["libraries"] = dict(out["libraries"])
    out["device"] = device or "none"
    out["device_name"] = device_name(device)
    out["torch_threads"] = torch.get_num_threads()
    if seed is not None:
        out["seed"] = int(seed)
    return out
