"""The model zoo: committed, portable, loadable by name in every verb, never written into."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hw_dq import zoo
from hw_dq.errors import ConfigError
from tests.conftest import ROOT, assert_one_line_error, run_cli

SAMPLE = ["sm-dq-w2a2-at", "sm-dq-w4a4-at", "sm-fp-at", "sm-vq-w2a1-at", "sm-vq-w2a2-at", "sm-vq-w4a4-at"]
CPU = ["cpu-dq-w2a2e8-at", "cpu-fp-at", "cpu-vq-w2a2e8-at", "cpu-vq-w4a4-pgd3-at", "cpu-vq-w4a4-short-at"]
# (the CPU models are CIFAR-10 models: --data-dir to use them)
NAMES = sorted(SAMPLE + CPU)
BENCH = json.loads((ROOT / "benchmarks" / "results" / "robust_sample.json").read_text())
BENCH_CPU = json.loads((ROOT / "benchmarks" / "results" / "robust_cpu.json").read_text())


def _tree(path: Path) -> dict[str, int]:
    return {str(p.relative_to(path)): p.stat().st_mtime_ns for p in sorted(path.rglob("*"))}


def test_zoo_is_small_portable_and_cites_its_results() -> None:
    assert zoo.names() == NAMES
    total = sum(p.stat().st_size for p in (ROOT / "zoo").rglob("*") if p.is_file())
    assert total <= 20 * 2**20, total
    for name in NAMES:
        folder = zoo.resolve(f"zoo:{name}")
        assert folder == ROOT / "zoo" / name
        text = (folder / "config.json").read_text()
        assert str(ROOT.parent) not in text and ".gpu" not in text and '"/' not in text, name  # no machine paths
        res = json.loads((folder / "result.json").read_text())
        assert (ROOT / res["source"]).is_file()
        ev = (BENCH if name in SAMPLE else BENCH_CPU)["eval"][f"{name}@8"]
        assert res["clean_acc"] == ev["clean"] and res["robust"]["8"] == ev["worst_case"]
    listing = run_cli("zoo")
    assert listing.returncode == 0, listing.stderr
    row = next(line for line in listing.stdout.splitlines() if line.startswith("| sm-vq-w4a4-at "))
    assert "| 36.5% | 14.0% | 23.5% |" in row  # the README's robust table, from the committed results


def test_attack_zoo_model_writes_a_copy_under_runs(tmp_path: Path) -> None:
    before = _tree(ROOT / "zoo")
    cmd = ("attack", "zoo:sm-vq-w2a2-at", "--attacks", "fgsm", "--n", "200", "--no-sanity")
    proc = run_cli(*cmd, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    copy = tmp_path / "runs" / "zoo" / "sm-vq-w2a2-at"
    rec = json.loads((copy / "attacks" / "robustness.json").read_text())
    # the zoo's weights are the ones behind the committed table: same 200 images, same clean accuracy
    assert rec["clean_acc"] == pytest.approx(BENCH["eval"]["sm-vq-w2a2-at@8"]["clean"], abs=1e-6)
    assert rec["evaluations"][0]["robust_acc"] < rec["clean_acc"]
    # a second verb meets the same copy (results accumulate there), and the committed zoo is untouched
    proc = run_cli(*cmd[:4], "--n", "8", "--no-sanity", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (copy / "attacks" / "robustness-2.json").is_file()
    assert _tree(ROOT / "zoo") == before


def test_unknown_zoo_name_and_foreign_copy_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert_one_line_error(run_cli("attack", "zoo:no-such-model", "--n", "4", cwd=tmp_path), "unknown zoo model", "sm-")
    # HW_DQ_RUNS_DIR picks the root of the copies; a copy holding other weights is refused, not overwritten
    other = tmp_path / "elsewhere" / "zoo" / "sm-fp-at"
    other.mkdir(parents=True)
    (other / "model.safetensors").write_bytes(b"not the zoo's weights")
    monkeypatch.setenv("HW_DQ_RUNS_DIR", str(tmp_path / "elsewhere"))
    with pytest.raises(ConfigError, match="does not hold zoo:sm-fp-at's weights"):
        zoo.materialise("sm-fp-at")
    assert (other / "model.safetensors").read_bytes() == b"not the zoo's weights"
    assert zoo.materialise("zoo:sm-dq-w2a2-at") == tmp_path / "elsewhere" / "zoo" / "sm-dq-w2a2-at"
    assert_one_line_error(run_cli("lipschitz", "zoo:sm-fp-at", cwd=tmp_path), "does not hold", "HW_DQ_RUNS_DIR")


def test_cpu_scale_zoo_model_is_the_one_behind_its_table(tmp_path: Path, shared_data: Path) -> None:
    """The CIFAR-10 zoo models take the user's --data-dir; the weights reproduce the committed clean accuracy."""
    name = "cpu-vq-w4a4-short-at"
    proc = run_cli("attack", f"zoo:{name}", "--attacks", "fgsm", "--n", "1000", "--no-sanity", "--quiet",
                   "--data-dir", str(shared_data), cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rec = json.loads((tmp_path / "runs" / "zoo" / name / "attacks" / "robustness.json").read_text())
    assert rec["clean_acc"] == pytest.approx(BENCH_CPU["eval"][f"{name}@8"]["clean"], abs=1e-6)
    assert rec["evaluations"][0]["robust_acc"] < rec["clean_acc"]
