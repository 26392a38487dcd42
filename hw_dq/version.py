"""The hw-dq version (its own module, so stages can stamp results without importing the package root)."""

__version__ = "0.1.0"
