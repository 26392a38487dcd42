from __future__ import annotations

import json

import pytest

from .conftest import assert_one_line_error, run_cli


@pytest.mark.parametrize(
    "args, needles",
    [
        (["train", "--out", "X", "--wbits", "9"], ["--wbits", "1..8"]),
        (["train", "--out", "X", "--abits", "zero"], ["--abits"]),
        (["train", "--out", "X", "--model", "resnet"], ["--model", "cnv"]),
        (["train", "--out", "X", "--beta", "-1"], ["beta"]),
        (["train", "--out", "X", "--config", "nope"], ["nope", "cnv_cpu"]),
        (["train"], ["--out"]),
        (["frobnicate"], ["invalid choice"]),
    ],
)
def test_bad_arguments_one_line_exit_2(tmp_path, args, needles):
    args = [str(tmp_path / a) if a == "X" else a for a in args]
    assert_one_line_error(run_cli(*args), *needles)


def test_missing_dataset(tmp_path):
    proc = run_cli("train", "--out", str(tmp_path / "r"), "--data", "cifar10", "--data-dir", str(tmp_path / "none"))
    assert_one_line_error(proc, "CIFAR-10 not found", str(tmp_path / "none"))


def test_corrupt_config_file(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text("{not json")
    assert_one_line_error(run_cli("train", "--out", str(tmp_path / "r"), "--config", str(cfg)), "not valid JSON")
    cfg.write_text(json.dumps({"model": "cnv", "bogus": 1}))
    assert_one_line_error(run_cli("train", "--out", str(tmp_path / "r"), "--config", str(cfg)), "bogus")


def test_train_cli_then_errors_on_existing_and_corrupt_run(tmp_path):
    out = tmp_path / "run"
    common = ["--model", "tiny", "--epochs", "1", "--train-subset", "128", "--test-subset", "64",
              "--batch-size", "64", "--quiet", "--out", str(out)]  # fmt: skip
    ok = run_cli("train", "--wbits", "float", "--abits", "float", *common)
    assert ok.returncode == 0, ok.stderr
    assert json.loads((out / "config.json").read_text())["mode"] == "FP"
    assert_one_line_error(run_cli("train", *common), "already holds a training run", "--resume")
    lip = run_cli("lipschitz", str(out))
    assert lip.returncode == 0 and "| layer |" in lip.stdout
    (out / "model.safetensors").write_bytes(b"garbage")
    assert_one_line_error(run_cli("lipschitz", str(out)), "corrupt")
    assert_one_line_error(run_cli("lipschitz", str(tmp_path / "nowhere")), "does not exist")


def test_configs_lists_shipped_configs():
    proc = run_cli("configs")
    assert proc.returncode == 0
    assert "cnv_cpu" in proc.stdout and "wrn28_10_paper" in proc.stdout and "demo" in proc.stdout
