"""The hw-dq command line: one verb per stage."""

from hw_dq.cli.main import main

__all__ = ["main"]
