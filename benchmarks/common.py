"""Helpers shared by the benchmarks: machine description, JSON/markdown output."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent


def cpu_model() -> str:
    from hw_dq.provenance import cpu_model as model

    return model()


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import brevitas
    import torch

    try:
        load = os.getloadavg()
    except OSError:
        load = (float("nan"),) * 3
    return {
        "cpu": cpu_model(),
        "cores_visible": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "brevitas": brevitas.__version__,
        "platform": platform.platform(),
        "git_commit": git_commit(),
        "date_utc": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "loadavg_at_start": [round(v, 2) for v in load],
    }


def machine_line(m: dict[str, Any]) -> str:
    return (
        f"{m['cpu']}, {m['cores_usable']} usable cores (torch threads {m['torch_threads']}), "
        f"{'CUDA' if m['cuda'] else 'no GPU'}; Python {m['python']}, torch {m['torch']}, "
        f"brevitas {m['brevitas']}; commit {m['git_commit']}; {m['date_utc']}; "
        f"load average at start {m['loadavg_at_start']} (machine shared with other jobs)"
    )


def write_results(name: str, data: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    RESULTS.mkdir(parents=True, exist_ok=True)
    js, md = RESULTS / f"{name}.json", RESULTS / f"{name}.md"
    from hw_dq.run import write_text  # atomic: a killed benchmark never leaves half a results file

    write_text(js, json.dumps(data, indent=2) + "\n")
    write_text(md, markdown.rstrip() + "\n")
    return js, md


def md_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)
