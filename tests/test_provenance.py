"""Every result says where it came from: hw-dq's commit, library versions, device and seed."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from hw_dq import run as rd
from hw_dq.provenance import LIBRARIES, commit, provenance
from tests.conftest import ROOT, run_cli, tiny_run


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs a git checkout")
def test_the_commit_is_the_checkouts_head():
    commit.cache_clear()  # computed once per process; the test may run after a commit was made
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert commit() is not None and commit().removesuffix("+dirty") == head


def test_provenance_names_versions_device_and_seed():
    import torch

    p = provenance("cpu", seed=7)
    assert set(LIBRARIES) <= set(p["libraries"])
    assert p["libraries"]["torch"] == torch.__version__.split("+")[0] or p["libraries"]["torch"] == torch.__version__
    assert p["libraries"]["brevitas"] and p["libraries"]["pyautoattack"]
    assert p["device"] == "cpu" and p["seed"] == 7 and p["device_name"]
    assert "seed" not in provenance(None)


def test_an_attack_result_and_the_training_config_carry_provenance(tmp_path):
    run = tiny_run(tmp_path)
    assert rd.read_json(run / rd.CONFIG)["provenance"]["libraries"]["brevitas"]
    proc = run_cli("attack", str(run), "--attacks", "fgsm", "--eps", "8", "--n", "16", "--seed", "3",
                   "--no-sanity", "--name", "prov")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    p = rd.read_json(run / "attacks" / "prov.json")["provenance"]
    commit.cache_clear()
    assert p["seed"] == 3 and p["device"] == "cpu"
    assert p["hw_dq_commit"].removesuffix("+dirty") == commit().removesuffix("+dirty")
