"""Import graph of the hw_dq package read from its source (AST; lazy imports inside functions count).

Prints the number of modules, import edges, levels (longest import chain) and cycles, and every
import that goes up the stage order. ``--tree DIR`` reads another copy of the package (e.g. an
old commit unpacked with ``git archive COMMIT hw_dq | tar -x -C DIR``); ``--json`` prints JSON.

Stage order (imports only go downward): errors, data (and the board catalogue, which is data)
-> nn -> run -> robust -> train -> fpga -> experiments -> cli (robust before train: adversarial
training crafts its examples with the attack engine). A flat pre-subpackage layout has
no stages, so only its counts and cycles are reported.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("errors", "data", "nn", "run", "robust", "train", "fpga", "experiments", "cli")
# modules whose stage is not their folder's, with the reason
STAGE_OF = {
    "hw_dq.data": "errors",  # errors and data form the lowest stage together
    "hw_dq.fpga.boards": "errors",  # the board catalogue: JSON data and its validation, imports only errors
    "hw_dq.boards": "errors",  # the board JSON files themselves (a data package in a wheel)
}


def modules(pkg_dir: Path) -> dict[str, Path]:
    """Module name -> file, for every .py file of the package (``__init__`` names the package)."""
    out = {}
    for f in sorted(pkg_dir.rglob("*.py")):
        parts = list(f.relative_to(pkg_dir.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def _resolve(name: str, mods: dict[str, Path]) -> str | None:
    """The package module an import names (``hw_dq.a.b.c`` -> the longest known prefix)."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        cand = ".".join(parts[:i])
        if cand in mods:
            return cand
    return None


def edges(mods: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the package modules it imports (any import statement, at any depth).

    ``from hw_dq.x import y`` is an edge to the module ``hw_dq.x.y`` when there is one, else to ``hw_dq.x``."""
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            hits: list[str | None] = []
            if isinstance(node, ast.Import):
                hits = [_resolve(a.name, mods) for a in node.names if a.name.startswith("hw_dq")]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative import
                    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    stem = ".".join(base + ([node.module] if node.module else []))
                else:
                    stem = node.module or ""
                if not stem.startswith("hw_dq"):
                    continue
                hits = [f"{stem}.{a.name}" if f"{stem}.{a.name}" in mods else _resolve(stem, mods) for a in node.names]
            graph[mod] |= {h for h in hits if h and h != mod}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


def levels(graph: dict[str, set[str]]) -> int:
    """Length of the longest import chain, in modules (cycles collapsed to one node)."""
    comp_of = {m: i for i, c in enumerate(cycles(graph)) for m in c}
    memo: dict[str, int] = {}

    def depth(v: str, seen: frozenset[str]) -> int:
        if v in memo:
            return memo[v]
        nxt = [w for w in graph[v] if w not in seen and comp_of.get(w, w) != comp_of.get(v, v)]
        d = 1 + max((depth(w, seen | {w}) for w in nxt), default=0)
        memo[v] = d
        return d

    return max((depth(v, frozenset([v])) for v in graph), default=0)


def stage(mod: str) -> str | None:
    if mod in STAGE_OF:
        return STAGE_OF[mod]
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in STAGES else None


def upward(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Imports of a module from a later stage than its own."""
    bad = []
    for a, targets in graph.items():
        for b in targets:
            sa, sb = stage(a), stage(b)
            if sa and sb and STAGES.index(sb) > STAGES.index(sa):
                bad.append((a, b))
    return sorted(bad)


def measure(pkg_dir: Path) -> dict:
    """Counts for the package in ``pkg_dir``: modules (package ``__init__``/``__main__`` files not
    counted), lines, import edges (module pairs), levels, cycles and upward imports."""
    mods = modules(pkg_dir)
    graph = edges(mods)
    return {
        "modules": sum(p.name not in ("__init__.py", "__main__.py") for p in mods.values()),
        "lines": sum(len(p.read_text().splitlines()) for p in mods.values()),
        "import_edges": sum(len(v) for v in graph.values()),
        "levels": levels(graph), "cycles": cycles(graph), "upward_imports": upward(graph),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tree", type=Path, default=ROOT, help="folder that holds hw_dq/ (default: this checkout)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    m = measure(a.tree / "hw_dq")
    if a.json:
        print(json.dumps(m, indent=2))
        return 0
    print(f"modules {m['modules']}  lines {m['lines']}  import edges {m['import_edges']}  levels {m['levels']}  "
          f"cycles {len(m['cycles'])}  upward imports {len(m['upward_imports'])}")  # fmt: skip
    for c in m["cycles"]:
        print("cycle: " + " <-> ".join(c))
    for a_, b_ in m["upward_imports"]:
        print(f"upward: {a_} -> {b_} ({stage(a_)} imports {stage(b_)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
