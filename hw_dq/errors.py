"""User-facing errors: the CLI prints their message on one line and exits with code 2.

Every error class of the pipeline stages this file's owner keeps lives here, so that a stage can
raise or catch another stage's error without importing it (the cycle build -> report -> build
existed only for BuildError). Modules re-export theirs (``hw_dq.fpga.build.BuildError``).
"""

from __future__ import annotations


class HwDqError(Exception):
    """A problem with the user's input (arguments, files, data) with a one-line fix.

    The message must say what is wrong and how to fix it; the CLI prints it without a
    traceback and exits with status 2. It is one line whatever it quotes (a user's field
    name or value with a line break in it is shown escaped).
    """

    def __str__(self) -> str:
        text = super().__str__()
        return text.replace("\r", "\\r").replace("\n", "\\n") if "\n" in text or "\r" in text else text


class DataError(HwDqError):
    """A dataset is missing, corrupt or in an unexpected layout."""


class ConfigError(HwDqError):
    """An invalid configuration value (bit width, model name, beta, ...)."""


class CheckpointError(HwDqError):
    """A run directory or checkpoint is missing, corrupt or incompatible."""


class BoardError(HwDqError):
    """A board file is malformed, or a board name is unknown."""


class ExportError(HwDqError):
    """The model cannot be exported, or the export does not reproduce the PyTorch model."""


class BuildError(HwDqError):
    """The model cannot be built by FINN (not QONNX, float, unmappable, does not streamline)."""


class CertifyError(HwDqError):
    """Bad certification input, or a graph op without interval semantics."""
