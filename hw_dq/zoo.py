"""The model zoo: trained run directories committed under ``zoo/``, named ``zoo:NAME`` by every verb.

Each ``zoo/<name>/`` holds ``model.safetensors``, ``config.json`` (portable: no machine's paths)
and ``result.json`` (the measured figures and the committed results file that reports them).
The committed folders are read-only: a verb given ``zoo:NAME`` works on a copy under
``runs/zoo/<name>/`` (``$HW_DQ_RUNS_DIR/zoo/<name>`` when set), made on first use and reused
after it, so that ``hw-dq build zoo:NAME`` and a later ``hw-dq attack zoo:NAME --on hw`` meet in
one run directory. ``$HW_DQ_ZOO_DIR`` points at another zoo folder (e.g. outside a checkout).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from hw_dq.errors import ConfigError
from hw_dq.run import CONFIG, MODEL, REPO_ROOT, read_json

PREFIX = "zoo:"
RESULT = "result.json"
FILES = (MODEL, CONFIG, RESULT)
# argparse destinations that name a run directory (one path or a list of them)
RUN_ARGS = ("run_dir", "run_dirs", "runs", "transfer_from", "init_from")


def zoo_dir() -> Path:
    """The committed zoo folder (``$HW_DQ_ZOO_DIR`` when set)."""
    return Path(os.environ.get("HW_DQ_ZOO_DIR") or REPO_ROOT / "zoo")


def runs_root() -> Path:
    """Where writable copies go: ``$HW_DQ_RUNS_DIR`` when set, else ``runs`` in the current folder."""
    return Path(os.environ.get("HW_DQ_RUNS_DIR") or "runs")


def names() -> list[str]:
    """The zoo's model names, sorted."""
    root = zoo_dir()
    return sorted(d.name for d in root.iterdir() if (d / MODEL).is_file()) if root.is_dir() else []


def resolve(name: str) -> Path:
    """The committed folder of zoo model ``name`` (``zoo:`` prefix optional); a one-line error if unknown."""
    name = name.removeprefix(PREFIX)
    root = zoo_dir()
    if not root.is_dir():
        raise ConfigError(
            f"no model zoo at {root} (it ships with a checkout of hw-dq, not the wheel); "
            "set HW_DQ_ZOO_DIR to a checkout's zoo/ folder"
        )
    have = names()
    if name not in have:
        raise ConfigError(f"unknown zoo model {name!r}; choose one of {', '.join(have) or 'none'} (see 'hw-dq zoo')")
    return root / name


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def materialise(name: str, root: str | Path | None = None) -> Path:
    """A writable run directory for zoo model ``name``: ``<root>/zoo/<name>``, copied on first use.

    An existing copy is reused when its weights are the zoo's; other weights there are refused."""
    src = resolve(name)
    dest = Path(root or runs_root()) / "zoo" / src.name
    if dest.exists():
        if not (dest / MODEL).is_file() or _digest(dest / MODEL) != _digest(src / MODEL):
            raise ConfigError(
                f"{dest} exists but does not hold zoo:{src.name}'s weights; remove it or set HW_DQ_RUNS_DIR elsewhere"
            )
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{src.name}.", dir=dest.parent))
    try:
        for f in FILES:
            if (src / f).is_file():
                shutil.copyfile(src / f, tmp / f)
        os.replace(tmp, dest)  # the copy appears whole or not at all
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def resolve_args(args: argparse.Namespace) -> None:
    """Replace every ``zoo:NAME`` run argument of a parsed command line by its writable copy (in place)."""
    for key in RUN_ARGS:
        value = getattr(args, key, None)
        if isinstance(value, str) and value.startswith(PREFIX):
            setattr(args, key, str(materialise(value)))
        elif isinstance(value, list):
            setattr(args, key, [str(materialise(v)) if isinstance(v, str) and v.startswith(PREFIX) else v
                                for v in value])  # fmt: skip


def listing() -> list[dict[str, Any]]:
    """One row per zoo model: its setting and headline figures (from its ``result.json``)."""
    rows = []
    for name in names():
        cfg = read_json(zoo_dir() / name / CONFIG)
        res = read_json(zoo_dir() / name / RESULT) if (zoo_dir() / name / RESULT).is_file() else {}
        m, t = cfg.get("model", {}), cfg.get("train", {})
        rows.append({
            "name": name, "model": f"{m.get('name')} x{m.get('width')}", "mode": cfg.get("mode"),
            "bits": f"w{m.get('wbits')}a{m.get('abits')}" if m.get("wbits") else "float",
            "beta": t.get("beta", 0.0), "lipschitz_target": t.get("lipschitz_target"), "adv_train": t.get("adv_train"),
            "clean": res.get("clean_acc"), "robust": res.get("robust", {}), "source": res.get("source"),
        })  # fmt: skip
    return rows


def table() -> str:
    """The zoo as a markdown table (``hw-dq zoo``)."""

    def pct(v: Any) -> str:
        return "-" if v is None else f"{100 * v:.1f}%"

    lines = [
        "| name | model | mode | bits | beta (target) | adv. train | clean | worst case 8/255 | worst case 2/255 |",
        "|---|---|---|---|---|---|---:|---:|---:|",
    ]
    for r in listing():
        beta = f"{r['beta']:g} ({r['lipschitz_target']})" if r["beta"] else "0"
        lines.append(
            f"| {r['name']} | {r['model']} | {r['mode']} | {r['bits']} | {beta} | {r['adv_train']} | {pct(r['clean'])} "
            f"| {pct(r['robust'].get('8'))} | {pct(r['robust'].get('2'))} |"
        )
    sources = sorted({r["source"] for r in listing() if r["source"]})
    return "\n".join(lines) + (
        f"\n\nFigures from {', '.join(sources)}; use a model as zoo:NAME in any verb." if sources else ""
    )
