"""The package's shape: stages import only downward, the wheel carries the boards, old runs still work."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from tests.conftest import FIXTURE_RUN, ROOT, copy_fixture_run, run_cli

sys.path.insert(0, str(ROOT / "scripts"))  # the scripts are tools, not a package
import import_graph  # noqa: E402


def test_no_import_cycle_and_no_import_up_the_stage_order():
    m = import_graph.measure(ROOT / "hw_dq")
    assert m["cycles"] == [], m["cycles"]
    assert m["upward_imports"] == [], f"imports against the stage order {import_graph.STAGES}: {m['upward_imports']}"


def test_the_graph_script_sees_lazy_imports_cycles_and_upward_edges(tmp_path):
    """The checker can fail: a planted cycle through a lazy import and an upward import are found."""
    pkg = tmp_path / "hw_dq"
    (pkg / "nn").mkdir(parents=True)
    (pkg / "robust").mkdir()
    for f in ("__init__.py", "errors.py", "nn/__init__.py", "robust/__init__.py"):
        (pkg / f).write_text('"""x."""\n')
    (pkg / "nn" / "quant.py").write_text("def f():\n    from hw_dq.robust import attacks\n")
    (pkg / "robust" / "attacks.py").write_text("from hw_dq.nn.quant import f\nfrom hw_dq import errors\n")
    m = import_graph.measure(pkg)
    assert m["cycles"] == [["hw_dq.nn.quant", "hw_dq.robust.attacks"]]
    assert m["upward_imports"] == [("hw_dq.nn.quant", "hw_dq.robust.attacks")]
    assert m["modules"] == 3 and m["import_edges"] == 3


def test_every_module_opens_with_a_docstring():
    bare = [str(p.relative_to(ROOT)) for p in (ROOT / "hw_dq").rglob("*.py")
            if not p.read_text().lstrip().startswith(('"""', "'''"))]  # fmt: skip
    assert not bare, bare


def test_pyproject_lists_every_subpackage():
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "hw_dq").rglob("__init__.py")}
    assert found | {"hw_dq.boards"} == set(tool["packages"])
    assert tool["package-dir"] == {"hw_dq.boards": "boards"}


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git to list the tracked files")
def test_the_wheel_carries_every_board_without_an_env_var(tmp_path):
    """A wheel built from the repository holds boards/*.json as hw_dq/boards/*.json."""
    src = tmp_path / "src"
    files = subprocess.run(["git", "ls-files", "pyproject.toml", "README.md", "LICENSE", "hw_dq", "boards"],
                           cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
    for f in files:
        if (ROOT / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, src / f)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "w"),
         str(src)], capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = (tmp_path / "w").glob("hw_dq-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    boards = {p.name for p in (ROOT / "boards").glob("*.json")}
    assert len(boards) == 9
    assert {n.removeprefix("hw_dq/boards/") for n in names if n.startswith("hw_dq/boards/")} == boards
    assert "hw_dq/fpga/boards.py" in names and "hw_dq/data/cifar10_sample.npz" in names


def test_a_run_written_before_the_refactor_loads_and_attacks(tmp_path):
    """tests/fixtures/run_v1 (written by the flat-layout code) loads, and `hw-dq attack` FGSM runs on it."""
    from hw_dq.run import Run

    run = copy_fixture_run(tmp_path)
    r = Run(run)
    model = r.model()
    x, y = r.test_set(16, 0).tensors()
    clean = float((model(x).argmax(1) == y).float().mean())
    proc = run_cli("attack", str(run), "--attacks", "fgsm", "--eps", "8", "--n", "16", "--no-sanity",
                   "--device", "cpu", "--quiet")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    (res,) = (run / "attacks").glob("*.json")
    rec = json.loads(res.read_text())
    (ev,) = rec["evaluations"]
    assert ev["attack"] == "fgsm" and ev["eps"] == 8.0 and rec["n_examples"] == 16
    assert rec["clean_acc"] == pytest.approx(clean) and ev["robust_acc"] <= rec["clean_acc"]
    assert not (FIXTURE_RUN / "attacks").exists()


def test_committed_results_hold_no_absolute_paths_and_resolve_from_the_repository(tmp_path, monkeypatch):
    import relativize_results

    from hw_dq.run import Run

    assert relativize_results.main(["--check"]) == 0
    cfg = json.loads((ROOT / "benchmarks/results/reproduce/runs/vq-a2/config.json").read_text())
    stored = cfg["train"]["init_from"]
    assert not Path(stored).is_absolute()
    monkeypatch.chdir(tmp_path)  # from anywhere: relative to the repository root
    assert Run(ROOT / "benchmarks/results/reproduce/runs/vq-a2").resolve(stored) == ROOT / stored
    assert (ROOT / stored).name == "fp"
