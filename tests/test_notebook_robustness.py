"""notebooks/robustness.ipynb is stored without outputs and runs top to bottom (small settings)."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "robustness.ipynb"


def test_notebook_is_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None


@pytest.mark.slow  # 1-3 min on 2 shared cores
def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    monkeypatch.setenv("HW_DQ_NB_EPOCHS", "1")
    monkeypatch.setenv("HW_DQ_NB_N", "32")
    monkeypatch.setenv("HW_DQ_NB_TRAIN", "512")
    monkeypatch.setenv("HW_DQ_NB_QUERIES", "50")
    monkeypatch.setenv("HW_DQ_NB_OUT", str(tmp_path / "nb"))
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    # one thread: on a loaded 2-core machine two OpenMP threads in the kernel thrash (minutes instead of seconds)
    client.execute(env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert (tmp_path / "nb" / "analyse" / "amplification.png").is_file()
    assert (tmp_path / "nb" / "vq" / "attacks" / "notebook.json").is_file()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "sanity" in text
