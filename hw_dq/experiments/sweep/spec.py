"""The sweep SPEC (JSON or YAML): search space, board, data, proxy attacks, objectives, constraints; validated once."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from hw_dq.errors import ConfigError

# TrainConfig fields a search space may range over (the knobs, plus the recipe's budget)
SEARCHABLE = (
    "wbits", "abits", "end_bits", "width", "beta", "lipschitz_target", "lipschitz_project", "bn_gain_max",
    "adv_train", "adv_eps", "adv_steps", "epochs", "lr", "train_subset", "act_range",
)  # fmt: skip
# objective name -> (direction, what it is)
OBJECTIVES: dict[str, tuple[str, str]] = {
    "robust": ("maximize", "robust accuracy on the simulated accelerator (proxy attacks, per-image worst case)"),
    "clean": ("maximize", "clean accuracy on the simulated accelerator"),
    "fps": ("maximize", "FINN's estimated throughput (images/s) at the board's clock"),
    "lut": ("minimize", "FINN's LUT estimate"),
    "bram": ("minimize", "FINN's BRAM_18K estimate"),
}
SAMPLERS = ("nsga2", "tpe")
TOP_KEYS = (
    "name", "board", "clock_mhz", "n_trials", "seed", "sampler", "population_size", "model", "data", "space",
    "fixed", "proxy", "final", "objectives", "constraints", "pruner", "heartbeat_s", "grace_s", "max_failures",
)  # fmt: skip


@dataclass(frozen=True)
class Proxy:
    """The fast robustness measure of every trial: attacks on the simulated accelerator."""

    attacks: tuple[str, ...] = ("transfer-pgd", "square")
    eps: float = 8.0
    n: int = 200
    steps: int = 10
    queries: int = 300


@dataclass(frozen=True)
class Final:
    """The evaluation standard the front is re-evaluated with (``--report --final``)."""

    attacks: tuple[str, ...] = ("square", "transfer-autoattack", "hsj")
    eps: float = 8.0
    n: int = 500


@dataclass(frozen=True)
class Pruner:
    """Stop a trial after an epoch whose held-out accuracy is below the given percentile of the
    finished trials' accuracy at the same epoch (after ``n_startup`` finished trials), or at
    chance level plus ``margin``."""

    percentile: float = 25.0
    n_startup: int = 4
    warmup_epochs: int = 1
    margin: float = 0.02
    enabled: bool = True


@dataclass(frozen=True)
class SweepSpec:
    """One sweep: everything that defines its study (saved as ``SWEEP_DIR/spec.json``)."""

    board: str
    space: dict[str, Any]
    name: str = "sweep"
    clock_mhz: float | None = None
    n_trials: int = 12
    seed: int = 0
    sampler: str = "nsga2"
    population_size: int = 6
    model: str = "cnv"
    data: dict[str, Any] = field(default_factory=lambda: {"data": "sample"})
    fixed: dict[str, Any] = field(default_factory=dict)
    proxy: Proxy = field(default_factory=Proxy)
    final: Final = field(default_factory=Final)
    objectives: tuple[str, ...] = tuple(OBJECTIVES)
    constraints: dict[str, float] = field(default_factory=dict)
    pruner: Pruner = field(default_factory=Pruner)
    heartbeat_s: int = 30
    grace_s: int = 120
    max_failures: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    @property
    def digest(self) -> str:
        """What a second worker or a resumed run must agree on (the study's identity)."""
        d = self.to_dict()
        for k in ("heartbeat_s", "grace_s", "final"):  # may change between runs of one study
            d.pop(k)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def directions(self) -> list[str]:
        return [OBJECTIVES[o][0] for o in self.objectives]


def _sub(cls: type, raw: Any, where: str) -> Any:
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise ConfigError(f"SPEC '{where}' must be a mapping of {', '.join(f.name for f in fields(cls))}")
    known = {f.name for f in fields(cls)}
    if bad := sorted(set(raw) - known):
        raise ConfigError(f"unknown key(s) {', '.join(bad)} in SPEC '{where}'; valid keys: {', '.join(sorted(known))}")
    vals = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
    return cls(**vals)


def _check_dimension(name: str, dim: Any) -> None:
    where = f"SPEC space.{name}"
    if isinstance(dim, list):
        if not dim:
            raise ConfigError(f"{where} is an empty list; give at least one value")
        if len({json.dumps(v) for v in dim}) != len(dim):
            raise ConfigError(f"{where} lists a value twice; give each value once")
        return
    if not isinstance(dim, dict) or not {"low", "high"} <= set(dim) or set(dim) - {"low", "high", "log", "step"}:
        raise ConfigError(f"{where} must be a list of values or {{low, high[, log][, step]}}")
    lo, hi = dim["low"], dim["high"]
    if not all(isinstance(v, int | float) and math.isfinite(v) for v in (lo, hi)):
        raise ConfigError(f"{where}: low and high must be finite numbers")
    if lo > hi:
        raise ConfigError(f"{where} is an empty range (low {lo} > high {hi}); swap them")
    if dim.get("log") and lo <= 0:
        raise ConfigError(f"{where}: a log range needs low > 0 (use a list such as [0, 1e-4, 1e-3] to include 0)")


def _check_trainconfigs(spec: SweepSpec) -> None:
    """Every corner of the space must be a valid TrainConfig (caught here, not in trial 7)."""
    from hw_dq.train.config import TrainConfig

    base = {"model": spec.model, **spec.data, **spec.fixed}
    try:
        TrainConfig.from_dict(base)
    except ConfigError as e:
        raise ConfigError(f"SPEC fixed/data: {e}") from None
    for name, dim in spec.space.items():
        values = dim if isinstance(dim, list) else [dim["low"], dim["high"]]
        for v in values:
            try:
                TrainConfig.from_dict({**base, name: v})
            except ConfigError as e:
                raise ConfigError(f"SPEC space.{name} value {v!r}: {e}") from None


def _check_constraints(spec: SweepSpec) -> None:
    from hw_dq.fpga.boards import get_board

    board = get_board(spec.board)
    clock = spec.clock_mhz or board.clock_mhz
    if not 1 <= clock <= 1000:
        raise ConfigError(f"SPEC clock_mhz {clock} is outside 1..1000")
    for k, v in spec.constraints.items():
        if k not in ("min_fps", "max_lut", "max_bram"):
            raise ConfigError(f"unknown constraint {k!r} in SPEC constraints; use min_fps, max_lut, max_bram")
        if not isinstance(v, int | float) or not math.isfinite(v):
            raise ConfigError(f"SPEC constraints.{k} must be a finite number")
    ceiling = clock * 1e6  # a dataflow accelerator finishes at most one image per clock cycle
    if spec.constraints.get("min_fps", 0) > ceiling:
        raise ConfigError(
            f"impossible constraint min_fps {spec.constraints['min_fps']:g}: at {clock:g} MHz a dataflow "
            f"accelerator does at most {ceiling:g} images/s; lower it or raise clock_mhz"
        )
    for k in ("max_lut", "max_bram"):
        if k in spec.constraints and not 0 < spec.constraints[k] <= 1:
            raise ConfigError(
                f"impossible constraint {k} {spec.constraints[k]:g}: give a fraction of the board in (0, 1]"
            )


def parse_spec(raw: Any, where: str = "SPEC") -> SweepSpec:
    """A validated :class:`SweepSpec` from the parsed SPEC file (a mapping)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping (JSON object / YAML mapping) of {', '.join(TOP_KEYS)}")
    if bad := sorted(set(raw) - set(TOP_KEYS)):
        raise ConfigError(f"unknown key(s) {', '.join(bad)} in {where}; valid keys: {', '.join(TOP_KEYS)}")
    for k in ("board", "space"):
        if k not in raw:
            raise ConfigError(f"{where} has no '{k}'; add it (see docs/sweep.md)")
    space = raw["space"]
    if not isinstance(space, dict) or not space:
        raise ConfigError(f"{where} 'space' must be a non-empty mapping of {', '.join(SEARCHABLE)}")
    if bad := sorted(set(space) - set(SEARCHABLE)):
        raise ConfigError(f"unknown key(s) {', '.join(bad)} in {where} space; searchable: {', '.join(SEARCHABLE)}")
    for name, dim in space.items():
        _check_dimension(name, dim)
    for k in ("data", "fixed", "constraints"):
        if k in raw and not isinstance(raw[k], dict):
            raise ConfigError(f"{where} '{k}' must be a mapping")
    if overlap := sorted(set(raw.get("fixed", {})) & set(space)):
        raise ConfigError(f"{where}: {', '.join(overlap)} both fixed and searched; keep one")
    objectives = tuple(raw.get("objectives", OBJECTIVES))
    bad = sorted(set(objectives) - set(OBJECTIVES))
    if bad or not objectives:
        raise ConfigError(f"unknown objective(s) {', '.join(bad) or '(none)'}; choose from {', '.join(OBJECTIVES)}")
    try:
        spec = SweepSpec(
            board=str(raw["board"]), space=dict(space), objectives=objectives,
            proxy=_sub(Proxy, raw.get("proxy"), "proxy"), final=_sub(Final, raw.get("final"), "final"),
            pruner=_sub(Pruner, raw.get("pruner"), "pruner"),
            **{k: raw[k] for k in TOP_KEYS if k in raw and k not in
               ("board", "space", "objectives", "proxy", "final", "pruner")},
        )  # fmt: skip
    except TypeError as e:
        raise ConfigError(f"invalid {where}: {e}") from None
    checks = [
        (isinstance(spec.n_trials, int) and spec.n_trials >= 1, f"n_trials {spec.n_trials!r} must be >= 1"),
        (spec.sampler in SAMPLERS, f"unknown sampler {spec.sampler!r}; choose {' or '.join(SAMPLERS)}"),
        (isinstance(spec.population_size, int) and spec.population_size >= 2, "population_size must be >= 2"),
        (spec.proxy.n >= 1 and spec.final.n >= 1, "proxy.n and final.n must be >= 1"),
        (spec.proxy.attacks and spec.final.attacks, "proxy.attacks and final.attacks must not be empty"),
        (spec.heartbeat_s >= 1 and spec.grace_s > spec.heartbeat_s, "heartbeat_s must be >= 1 and grace_s larger"),
        (spec.name.replace("-", "").replace("_", "").isalnum(), f"name {spec.name!r}: letters, digits, - and _"),
    ]  # fmt: skip
    for ok, msg in checks:
        if not ok:
            raise ConfigError(f"{where}: {msg}")
    from hw_dq.robust.registry import check

    for a in spec.proxy.attacks + spec.final.attacks:
        check(a, spec.proxy.eps, "hw")
    _check_constraints(spec)
    _check_trainconfigs(spec)
    return spec


def load_spec(path: str | Path) -> SweepSpec:
    """Read and validate a SPEC file (``.json``, ``.yaml`` or ``.yml``; a shipped name such as ``sweep_tiny``)."""
    p = Path(path)
    if not p.is_file():
        from importlib import resources

        for ext in (".yaml", ".json"):
            ref = resources.files("hw_dq").joinpath("configs", f"{path}{ext}")
            if ref.is_file():
                return _parse_text(ref.read_text(), ext, str(path))
        raise ConfigError(f"SPEC {path} is neither a file nor a shipped sweep config (sweep_tiny, sweep_pynq_cpu)")
    return _parse_text(p.read_text(), p.suffix.lower(), str(p))


def _parse_text(text: str, suffix: str, where: str) -> SweepSpec:
    if suffix in (".yaml", ".yml"):
        import yaml

        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"SPEC {where} is not valid YAML ({str(e).splitlines()[0]})") from None
    else:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"SPEC {where} is not valid JSON: {e}") from None
    return parse_spec(raw, f"SPEC {where}")


def spec_from_dict(d: dict[str, Any]) -> SweepSpec:
    """The spec stored in ``SWEEP_DIR/spec.json`` (as :meth:`SweepSpec.to_dict` wrote it)."""
    return parse_spec(d, "spec.json")
