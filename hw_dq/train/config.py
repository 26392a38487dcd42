"""Training configs: JSON files (shipped ones by name, or your own path), flags override."""

from __future__ import annotations

import json
from dataclasses import fields, replace
from importlib import resources
from pathlib import Path
from typing import Any

from hw_dq.errors import ConfigError
from hw_dq.train.loop import TrainConfig


def shipped_configs() -> dict[str, str]:
    """Names of the configs shipped in ``hw_dq/configs`` with their one-line description."""
    out = {}
    for f in sorted(resources.files("hw_dq").joinpath("configs").iterdir(), key=lambda p: p.name):
        if f.name.endswith(".json"):
            out[f.name[:-5]] = json.loads(f.read_text()).get("_about", "")
    return out


def _read(name_or_path: str | Path) -> dict[str, Any]:
    path = Path(name_or_path)
    if path.is_file():
        text = path.read_text()
    else:
        ref = resources.files("hw_dq").joinpath("configs", f"{name_or_path}.json")
        if not ref.is_file():
            raise ConfigError(
                f"config {name_or_path!r} is neither a file nor a shipped config ({', '.join(shipped_configs())})"
            )
        text = ref.read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"config {name_or_path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {name_or_path} must be a JSON object of TrainConfig fields")
    return {k: v for k, v in data.items() if not k.startswith("_")}


def load_config(name_or_path: str | Path | None = None, **overrides: Any) -> TrainConfig:
    """A TrainConfig from a config file (or the defaults), with non-None overrides applied."""
    base = TrainConfig.from_dict(_read(name_or_path)) if name_or_path else TrainConfig()
    known = {f.name for f in fields(TrainConfig)}
    bad = sorted(set(overrides) - known)
    if bad:
        raise ConfigError(f"unknown option(s) {', '.join(bad)}")
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})
