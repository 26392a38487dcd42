"""Reference AutoAttack (Croce & Hein, ICML 2020): the authors' own code, package ``pyautoattack``.

``standard`` is what RobustBench reports: APGD-CE, APGD-T (9 target classes), FAB-T (9
targets) and Square (5,000 queries), each run only on the images still robust, the
per-image worst case kept. ``rand`` is the EOT version for models with randomness (APGD-CE
and APGD-DLR, 20 EOT samples per step); ``plus`` adds restarts and the untargeted losses.

The evaluation state (which attacks ran, the per-image robust flags) is the library's own
resumable JSON file, kept inside the run directory, so a killed evaluation continues where
it stopped. The library's warnings (its randomness, output-range and "Square decreased the
robust accuracy" checks) are captured, not printed, and returned for the sanity section.
With ``progress``, the library's own per-batch log line drives a progress line on stderr
(component, batch, running robust accuracy, ETA of the component); the attack is unchanged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hw_dq.errors import CheckpointError, ConfigError
from hw_dq.run import load_tensors, save_tensors, write_json

VERSIONS = ("standard", "plus", "rand")
LOGGER = "auto-attack"  # the library's logger name (pyautoattack/autoattack.py)


@dataclass
class AutoAttackOutput:
    """Adversarial images, the library's per-image robust flags, and what it reported."""

    x_adv: torch.Tensor
    robust: torch.Tensor  # bool (N,): still correctly classified after every component
    breakdown: dict[str, float]  # robust accuracy after each component, as the library logs it
    warnings: list[str] = field(default_factory=list)
    params: dict = field(default_factory=dict)
    resumed: bool = False


def check_version(version: str) -> str:
    """Raise ConfigError unless ``version`` is one of :data:`VERSIONS`."""
    if version not in VERSIONS:
        raise ConfigError(f"unknown AutoAttack --version {version!r}; choose from {', '.join(VERSIONS)}")
    return version


# pyautoattack 0.2.0 logs this after every batch of every component (AutoAttack.verbose, on by default)
_BATCH_LINE = re.compile(r"^(\S+) - (\d+)/(\d+) - (\d+) out of (\d+) successfully perturbed$")


class _Reporter:
    """Progress on stderr from the library's per-batch log lines: running robust accuracy and ETA."""

    def __init__(self, label: str, n: int) -> None:
        self.label, self.n = label, max(1, n)
        self.comp, self.robust, self.done, self.t0 = "", 0, 0, time.time()

    def component(self, comp: str, robust: int) -> None:
        self.comp, self.robust, self.done, self.t0 = comp, robust, 0, time.time()

    def __call__(self, message: str) -> None:
        m = _BATCH_LINE.match(message)
        if m is None:
            return
        batch, n_batches, fooled, size = (int(g) for g in m.groups()[1:])
        self.robust -= fooled
        self.done += size
        eta = (time.time() - self.t0) / batch * (n_batches - batch)
        print(f"\r  {self.label} {self.comp}: batch {batch}/{n_batches} ({self.done} images), running robust acc "
              f"{100 * self.robust / self.n:.1f}%, ETA {eta:.0f} s   ", end="\n" if batch >= n_batches else "",
              file=sys.stderr, flush=True)  # fmt: skip


class _Capture(logging.Handler):
    def __init__(self, on_message: _Reporter | None = None) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.on_message = on_message

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        if self.on_message is not None:
            self.on_message(record.getMessage())


def _key(x: torch.Tensor, y: torch.Tensor, eps: float, norm: str, version: str, seed: int) -> dict:
    digest = hashlib.sha256(x.detach().cpu().numpy().tobytes() + y.cpu().numpy().tobytes()).hexdigest()[:16]
    return {"eps": float(eps), "norm": norm, "version": version, "seed": int(seed), "n": len(y), "data": digest}


def _load_state(path: Path, key: dict) -> dict | None:
    """The saved progress of this evaluation, None if there is none; one-line error if unusable."""
    if not path.is_file():
        return None
    try:
        st = json.loads(path.read_text())
        ok = isinstance(st, dict) and isinstance(st.get("done"), list) and isinstance(st.get("robust"), list)
        ok = ok and isinstance(st.get("breakdown"), dict) and len(st["robust"]) == key["n"]
        adv = load_tensors(path.with_suffix(".safetensors"))[0]["x_adv"] if ok else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, CheckpointError, KeyError):
        ok = False
    if not ok:
        raise CheckpointError(f"corrupt AutoAttack state file {path}; delete it to restart that evaluation")
    if st.get("key") != key:
        raise CheckpointError(f"AutoAttack state file {path} belongs to another evaluation (model inputs, eps, "
                              "norm, version or seed differ); delete it to restart")  # fmt: skip
    st["x_adv"] = adv
    return st


def _save_state(path: Path, st: dict, x_adv: torch.Tensor) -> None:
    save_tensors(path.with_suffix(".safetensors"), {"x_adv": x_adv.contiguous()}, {})
    write_json(path, {k: v for k, v in st.items() if k != "x_adv"})


def run(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    *,
    norm: str = "Linf",
    version: str = "standard",
    seed: int = 0,
    batch_size: int = 128,
    state_path: Path | None = None,
    components: list[str] | None = None,
    budgets: dict[str, int] | None = None,
    progress: Any = None,
) -> AutoAttackOutput:
    """AutoAttack ``version`` at radius ``eps`` (input units) on the model's device.

    The components run one at a time through the library's own ``run_standard_evaluation``
    (on the images still robust), and after each one the per-image flags and adversarial
    images are saved to ``state_path`` (JSON + safetensors): rerun with the same arguments,
    a killed evaluation continues after the last finished component. The library's own
    state file is not used: pyautoattack 0.2.0 writes its attack set as a Python set
    literal and then refuses to restore it. The state is removed once the evaluation ends.
    ``progress`` (anything, e.g. :class:`hw_dq.robust.evaluate.Progress`; its ``label`` names the
    line): print per-batch progress on stderr; None: silent.
    """
    from pyautoattack import AutoAttack, checks

    check_version(version)
    if norm not in ("Linf", "L2"):
        raise ConfigError(f"AutoAttack norm must be Linf or L2, got {norm!r}")
    dev = next(model.parameters()).device
    x, y = x.detach().cpu().float(), y.detach().cpu()
    key = _key(x, y, eps, norm, version if not components else "custom:" + ",".join(components), seed)
    st = _load_state(state_path, key) if state_path is not None else None
    resumed = st is not None
    log = logging.getLogger(LOGGER)
    reporter = None if progress is None else _Reporter(str(getattr(progress, "label", "") or "autoattack"), len(y))
    cap = _Capture(reporter)
    old_level, old_prop = log.level, log.propagate
    log.addHandler(cap)
    log.setLevel(logging.DEBUG)
    log.propagate = False  # captured into the result, not printed
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if components:  # single components (apgd-ce, apgd-t, square) with their own budgets
                adversary = AutoAttack(model, norm=norm, eps=float(eps), version="custom", attacks=components,
                                       seed=seed, device=dev)  # fmt: skip
                _set_budgets(adversary, budgets or {})
            else:
                adversary = AutoAttack(model, norm=norm, eps=float(eps), version=version, seed=seed, device=dev)
            components = list(adversary.attacks_to_run)
            if st is None:
                with torch.no_grad():
                    robust = _predict(model, x, batch_size) == y
                st = {
                    "key": key,
                    "done": [],
                    "robust": robust.tolist(),
                    "breakdown": {"clean": float(robust.float().mean())},
                }
                x_adv = x.clone()
            else:
                x_adv = st.pop("x_adv")
            robust = torch.tensor(st["robust"], dtype=torch.bool)
            for comp in components:
                if comp in st["done"]:
                    continue
                idx = torch.nonzero(robust).flatten()
                if reporter is not None:
                    reporter.component(comp, len(idx))
                if len(idx):
                    adversary.attacks_to_run = [comp]
                    cand, _ = adversary.run_standard_evaluation(x[idx].to(dev), y[idx].to(dev), batch_size=batch_size)
                    cand = cand.detach().cpu()
                    with torch.no_grad():
                        fooled = _predict(model, cand, batch_size) != y[idx]
                    x_adv[idx[fooled]] = cand[fooled]
                    robust[idx[fooled]] = False
                st["done"].append(comp)
                st["robust"] = robust.tolist()
                st["breakdown"][comp] = float(robust.float().mean())
                if state_path is not None:
                    _save_state(state_path, st, x_adv)
            adversary.attacks_to_run = components
            checks.check_square_sr(dict(st["breakdown"]), logger=log)  # the library's "Square decreased..." check
    finally:
        log.removeHandler(cap)
        log.setLevel(old_level)
        log.propagate = old_prop
    msgs = [r.getMessage() for r in cap.records if r.levelno >= logging.WARNING]
    msgs += [str(w.message) for w in caught]
    if state_path is not None:  # finished: a rerun attacks afresh instead of replaying old flags
        state_path.unlink(missing_ok=True)
        state_path.with_suffix(".safetensors").unlink(missing_ok=True)
    params = {
        "library": "pyautoattack " + _version(),
        "version": version,
        "components": components,
        "apgd_iters": adversary.apgd.n_iter,
        "apgd_restarts": adversary.apgd.n_restarts,
        "apgd_t_targets": adversary.apgd_targeted.n_target_classes,
        "fab_t_targets": adversary.fab.n_target_classes,
        "square_queries": adversary.square.n_queries,
        "eot_iter": adversary.apgd.eot_iter,
    }
    breakdown = {("clean" if k == "clean" else f"after_{k}"): v for k, v in st["breakdown"].items()}
    return AutoAttackOutput(x_adv, robust, breakdown, sorted(set(msgs)), params, resumed)


def _set_budgets(adversary: object, b: dict[str, int]) -> None:
    """Budgets of single components: APGD iterations (1 restart), APGD-T targets, Square queries."""
    a = adversary
    a.apgd.n_restarts = a.apgd_targeted.n_restarts = 1  # type: ignore[attr-defined]
    if "apgd_iters" in b:
        a.apgd.n_iter = a.apgd_targeted.n_iter = int(b["apgd_iters"])  # type: ignore[attr-defined]
    if "apgd_targets" in b:
        a.apgd_targeted.n_target_classes = int(b["apgd_targets"])  # type: ignore[attr-defined]
    if "square_queries" in b:
        a.square.n_queries = int(b["square_queries"])  # type: ignore[attr-defined]


def _predict(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    dev = next(model.parameters()).device
    return torch.cat([model(x[i : i + batch_size].to(dev)).argmax(1).cpu() for i in range(0, len(x), batch_size)])


def _version() -> str:
    import pyautoattack

    return str(getattr(pyautoattack, "__version__", "?"))
