"""Kill tests: every long stage SIGKILLed at deterministic points, then run again with the same command
(train, export, build, attack on the PyTorch model and on the accelerator, faults).

``HW_DQ_TEST_KILL_AT=<file>[:n]`` makes the process SIGKILL itself just before the n-th atomic rename
onto ``<file>`` (:func:`hw_dq.run.kill_point`): the file is complete in its temporary name and not yet
visible. After each kill the run's lock is left behind by a dead process and must not block; the rerun
must give what an uninterrupted run gives (training bit-identical; attacks the same numbers for the same
seed), and no temporary or half-written file may remain.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from hw_dq import run as rd
from tests.conftest import ROOT

TRAIN = ["train", "--model", "tiny", "--wbits", "2", "--abits", "2", "--epochs", "2", "--batch-size", "64",
         "--train-subset", "256", "--test-subset", "32", "--checkpoint-every", "2", "--seed", "1",
         "--quiet"]  # fmt: skip
SW_ATTACK = ["--attacks", "fgsm,pgd", "--eps", "8", "--n", "32", "--pgd-steps", "3", "--no-sanity", "--seed", "3"]
HW_ATTACK = ["--on", "hw", "--attacks", "square", "--square-queries", "20", "--eps", "8", "--n", "16",
             "--no-sanity", "--seed", "3"]  # fmt: skip


def cli(*args: str, kill: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop(rd.KILL_ENV, None)
    if kill:
        env[rd.KILL_ENV] = kill
    cmd = [sys.executable, "-m", "hw_dq.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)


def ok(*args: str) -> subprocess.CompletedProcess:
    proc = cli(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def killed(run: Path, *args: str, at: str) -> None:
    """Run ``args`` killed at ``at``; the lock it leaves behind names a dead process."""
    proc = cli(*args, kill=at)
    assert proc.returncode == -signal.SIGKILL, (at, proc.returncode, proc.stderr[-3000:])
    lock = run / rd.LOCK_FILE
    assert lock.is_file() and rd.lock_is_stale(lock), "a killed process's lock must be recognisably stale"


def clean(folder: Path) -> None:
    """Nothing half-written visible, no scratch file left, no lock left."""
    assert not [p for p in folder.rglob("*.tmp")], "temporary files left behind"
    assert not (folder / rd.LOCK_FILE).exists()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An uninterrupted training run and one killed twice (mid-epoch, then again while resuming) and resumed."""
    root = tmp_path_factory.mktemp("kill")
    ref, victim = root / "ref", root / "victim"
    ok(*TRAIN, "--out", str(ref))
    killed(victim, *TRAIN, "--out", str(victim), at=f"{rd.CHECKPOINT}:3")  # epoch 1, after its first 2 steps
    assert not (victim / rd.MODEL).exists()
    killed(victim, *TRAIN, "--out", str(victim), "--resume", at=f"{rd.CHECKPOINT}:1")  # killed again on resume
    assert not (victim / rd.MODEL).exists()
    ok(*TRAIN, "--out", str(victim), "--resume")
    return ref, victim


def test_train_killed_twice_resumes_bit_identical(runs: tuple[Path, Path]) -> None:
    ref, victim = runs
    a, b = load_file(str(ref / rd.MODEL)), load_file(str(victim / rd.MODEL))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ"
    assert [r["epoch"] for r in rd.read_jsonl(victim / rd.METRICS)] == [0, 1]
    assert rd.read_jsonl(victim / rd.METRICS) == rd.read_jsonl(ref / rd.METRICS) or all(
        {k: v for k, v in r.items() if "time" not in k and not k.endswith("_s")}
        == {k: v for k, v in s.items() if "time" not in k and not k.endswith("_s")}
        for r, s in zip(rd.read_jsonl(victim / rd.METRICS), rd.read_jsonl(ref / rd.METRICS), strict=True)
    )
    clean(victim)


def test_train_killed_between_last_checkpoint_and_final_weights(runs: tuple[Path, Path], tmp_path: Path) -> None:
    """A kill just before model.safetensors is renamed in leaves the final checkpoint and no weights
    (what HW_DQ_TEST_KILL_AT=model.safetensors leaves); --resume must write them."""
    import shutil

    ref, _ = runs
    run = Path(shutil.copytree(ref, tmp_path / "run"))
    for f in (rd.MODEL, "lipschitz.json", "lipschitz.md"):
        (run / f).unlink()
    ok(*TRAIN, "--out", str(run), "--resume")
    (got, meta), (want, meta_ref) = rd.load_tensors(run / rd.MODEL), rd.load_tensors(ref / rd.MODEL)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    # the same config; only the provenance (the process that wrote it) may differ
    assert {k: v for k, v in meta["config"].items() if k != "provenance"} == {
        k: v for k, v in meta_ref["config"].items() if k != "provenance"
    }
    assert (run / "lipschitz.json").is_file()


@pytest.fixture(scope="module")
def exported(runs: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    _, victim = runs
    killed(victim, "export", str(victim), at=rd.QONNX_FILE)  # the samples written, the model not yet
    assert not (victim / rd.EXPORT_DIR / rd.QONNX_FILE).exists()
    ok("export", str(victim))
    return victim


def test_export_killed_then_rerun_equals_an_uninterrupted_export(exported: Path, tmp_path: Path) -> None:
    ok("export", str(exported), "--out", str(tmp_path / "ref"))
    got, want = exported / rd.EXPORT_DIR, tmp_path / "ref"
    for f in (rd.SAMPLE_INPUT, rd.SAMPLE_OUTPUT):
        assert np.array_equal(np.load(got / f), np.load(want / f)), f
    eq_got, eq_want = (json.loads((d / "equivalence.json").read_text()) for d in (got, want))
    eq_got.pop("export_seconds"), eq_want.pop("export_seconds")
    assert eq_got == eq_want and eq_got["ok"]
    assert (got / rd.QONNX_FILE).stat().st_size > 0
    clean(exported)


@pytest.fixture(scope="module")
def built(exported: Path) -> Path:
    killed(exported, "build", str(exported), "--board", "Pynq-Z1", "--quiet", at="report.json")
    ok("build", str(exported), "--board", "Pynq-Z1", "--quiet")
    return exported


def test_build_killed_then_rerun_completes(built: Path) -> None:
    b = built / rd.BUILD_DIR / "Pynq-Z1"
    report = json.loads((b / "report.json").read_text())
    assert report["fps"] > 0 and (b / "report.md").is_file() and (b / "build_config.json").is_file()
    assert [d.name for d in rd.Run(built).builds()] == ["Pynq-Z1"]
    clean(built)


def _numbers(path: Path) -> dict:
    r = json.loads(path.read_text())
    keep = ("attack", "eps", "robust_acc", "n_examples", "seed", "robust_mask", "max_perturbation")
    return {
        "clean_acc": r["clean_acc"],
        "evaluations": [{k: e.get(k) for k in keep} for e in r["evaluations"]],
        "agreement": r.get("agreement"),
    }


@pytest.mark.parametrize("on", ["sw", "hw"])
def test_attack_killed_then_rerun_gives_the_same_numbers(built: Path, on: str) -> None:
    extra = SW_ATTACK if on == "sw" else HW_ATTACK
    killed(built, "attack", str(built), *extra, "--name", f"k-{on}", at=f"k-{on}.json")
    assert not (built / rd.ATTACKS_DIR / f"k-{on}.json").exists()
    ok("attack", str(built), *extra, "--name", f"k-{on}")
    ok("attack", str(built), *extra, "--name", f"ref-{on}")
    got, want = (_numbers(built / rd.ATTACKS_DIR / f"{n}-{on}.json") for n in ("k", "ref"))
    assert got == want
    assert got["evaluations"] and all(e["robust_mask"] for e in got["evaluations"] if on == "sw")
    clean(built)


def test_faults_killed_then_rerun_gives_the_same_numbers(built: Path) -> None:
    args = ["faults", str(built), "--board", "Pynq-Z1", "--rate", "1e-3", "--trials", "2", "--n", "16",
            "--seed", "3", "--quiet"]  # fmt: skip
    killed(built, *args, "--name", "k", at="k.json")
    assert not (built / "faults" / "k.json").exists()
    ok(*args, "--name", "k")
    ok(*args, "--name", "ref")
    got, want = (json.loads((built / "faults" / f"{n}.json").read_text())["random"] for n in ("k", "ref"))
    for r in (got, want):
        for rate in r["rates"]:
            rate.pop("wall_s")
    assert got == want and got["rates"][0]["trials"] == 2
    clean(built)


def test_certify_killed_then_rerun_gives_the_same_numbers(built: Path) -> None:
    args = ["certify", str(built), "--board", "Pynq-Z1", "--eps", "0,1,2", "--n", "32", "--seed", "3", "--quiet"]
    killed(built, *args, "--name", "ck", at="ck.json")
    assert not (built / "attacks" / "ck.json").exists()
    ok(*args, "--name", "ck")
    ok(*args, "--name", "cref")

    def certified(name: str) -> list:
        r = json.loads((built / "attacks" / f"{name}.json").read_text())
        return [(e["eps"], e["robust_acc"], e.get("robust_mask")) for e in r["evaluations"]]

    assert certified("ck") == certified("cref") and len(certified("ck")) == 3
    clean(built)
