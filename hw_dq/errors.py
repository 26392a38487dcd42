"""User-facing errors: the CLI prints their message on one line and exits with code 2."""

from __future__ import annotations


class HwDqError(Exception):
    """A problem with the user's input (arguments, files, data) with a one-line fix.

    The message must say what is wrong and how to fix it; the CLI prints it without a
    traceback and exits with status 2.
    """


class DataError(HwDqError):
    """A dataset is missing, corrupt or in an unexpected layout."""


class ConfigError(HwDqError):
    """An invalid configuration value (bit width, model name, beta, ...)."""


class CheckpointError(HwDqError):
    """A run directory or checkpoint is missing, corrupt or incompatible."""
