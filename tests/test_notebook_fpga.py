"""notebooks/fpga_build.ipynb is stored without outputs and runs top to bottom (small settings)."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "fpga_build.ipynb"


def test_fpga_notebook_is_stored_without_outputs() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None


def test_fpga_notebook_runs_top_to_bottom(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    out = tmp_path / "nb"
    monkeypatch.setenv("HW_DQ_NB_OUT", str(out))
    monkeypatch.setenv("HW_DQ_NB_TRAIN", "128")
    monkeypatch.setenv("HW_DQ_NB_EPOCHS", "1")
    monkeypatch.setenv("HW_DQ_NB_FIT", "0")  # one FINN folding (--target-fps); tests/test_build.py covers --fit
    monkeypatch.setenv("HW_DQ_NB_TARGET_FPS", "2000")
    monkeypatch.setenv("HW_DQ_NB_N_HW", "16")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(NOTEBOOK.parents[1]), os.environ.get("PYTHONPATH", "")]))
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    # one thread: on a loaded 2-core machine two OpenMP threads in the kernel thrash (minutes instead of seconds)
    client.execute(env={**os.environ, "OMP_NUM_THREADS": "1"})
    build = out / "tiny_w2a2" / "build" / "Pynq-Z1"
    assert (build / "report.json").is_file() and (build / "report.md").is_file()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "FPS, fits: True" in text
    assert "transfer-pgd @ 8/255" in text and "square @ 8/255" in text  # the attack on the simulation ran
