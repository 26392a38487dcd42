"""hw-dq: hardware-aware, adversarially robust (Defensive Quantization) QAT for FPGAs."""

import logging
import warnings

from hw_dq.version import __version__ as __version__

# torch warns on every import on machines with a CUDA toolkit but no GPU (brevitas imports
# torch.utils.cpp_extension); it is noise for a CPU run and would break one-line errors.
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)

# brevitas' export imports an optional CUDA kernel package and warns on every CPU machine
warnings.filterwarnings("ignore", message="fast_hadamard_transform package not found")

# The Python API (hw_dq.api), imported on first use so that 'import hw_dq' stays cheap. Its ``train``
# is not re-exported here: ``hw_dq.train`` is the training subpackage, and a name that is a function
# or a module depending on what was imported before would be a trap; use ``hw_dq.api.train``.
_API = (
    "TrainResult",
    "attack",
    "attack_hw",
    "build",
    "certify",
    "export",
    "faults",
    "reproduce",
    "simulate",
    "sweep",
    "sweep_report",
)


def __getattr__(name: str):  # noqa: ANN202 - module-level lazy attribute (PEP 562)
    if name in _API:
        from hw_dq import api

        return getattr(api, name)
    raise AttributeError(f"module 'hw_dq' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
