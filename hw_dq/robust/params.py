"""Attack budgets: one dataclass every attack reads its steps, restarts, targets and queries from."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from hw_dq.errors import ConfigError


@dataclass
class AttackParams:
    """Budgets of the attacks (defaults: RobustBench/AutoAttack 'standard' where it has one)."""

    pgd_steps: int = 10
    pgd_restarts: int = 1
    pgd_step_factor: float = 2.5  # step size = factor * eps / steps (Madry et al.)
    rfgsm_alpha: float = 0.5  # R+FGSM random step, as a fraction of eps (Tramer et al. 2018)
    apgd_iters: int = 100
    apgd_targets: int = 9
    square_queries: int = 5000
    square_restarts: int = 1
    cw_iters: int = 20
    cw_search_steps: int = 5
    adaptive_steps_factor: int = 2  # BPDA / temperature PGD run this many times the PGD steps

    def __post_init__(self) -> None:
        for k, v in asdict(self).items():
            if v <= 0 and k != "rfgsm_alpha" or v < 0:
                raise ConfigError(f"invalid attack parameter {k}={v}: must be positive")
