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


def test_version_matches_the_package():
    import tomllib

    from tests.conftest import ROOT

    proc = run_cli("--version")
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert proc.returncode == 0 and proc.stdout.strip() == f"hw-dq {version}"


def test_every_help_shows_the_defaults():
    """Each option with a default (numbers, names; not None or an off flag) shows it in --help."""
    import argparse

    from hw_dq.cli.main import build_parser

    parser = build_parser()
    verbs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    missing = []
    for verb, sub in verbs.items():
        text = " ".join(sub.format_help().split())
        for act in sub._actions:
            d = act.default
            if not act.option_strings or d is None or d is False or d == argparse.SUPPRESS or act.dest == "help":
                continue
            shown = d if not isinstance(d, list) else d[0]
            forms = {f"default: {shown}", f"default {shown}"}
            if isinstance(shown, float):
                forms |= {f"default: {shown:g}", f"default {shown:g}"}
            if not any(f in text for f in forms):
                missing.append(f"{verb} {act.option_strings[0]} ({d!r})")
    assert not missing, missing


def test_export_out_leaves_the_run_untouched(tmp_path):
    """`export --out DIR` writes there, not into the run."""
    from tests.conftest import FIXTURE_RUN, copy_fixture_run

    run = copy_fixture_run(tmp_path)
    proc = run_cli("export", str(run), "--out", str(tmp_path / "exp"), "--n", "4")
    assert proc.returncode == 0, proc.stderr
    assert f"exported {tmp_path / 'exp' / 'qonnx.onnx'}" in proc.stdout and (tmp_path / "exp" / "qonnx.onnx").is_file()
    assert not (run / "export").exists() and not (FIXTURE_RUN / "export").exists()


def test_folding_config_file_errors_are_one_line_and_early(tmp_path):
    from tests.conftest import copy_fixture_run

    run = copy_fixture_run(tmp_path)
    bad = tmp_path / "fold.json"
    bad.write_text('{"MVAU_hls_0": {"PE": 4}')
    assert_one_line_error(run_cli("build", str(run), "--board", "pynq-z1", "--folding-config", str(bad)),
                          "folding config", "not valid JSON")  # fmt: skip
    bad.write_text('{"MVAU_hls_0": 4}')
    assert_one_line_error(run_cli("build", str(run), "--board", "pynq-z1", "--folding-config", str(bad)),
                          "entry 'MVAU_hls_0' must be an object")  # fmt: skip
    assert_one_line_error(run_cli("build", str(run), "--board", "pynq-z1", "--folding-config", str(bad), "--fit"),
                          "not allowed with argument")  # fmt: skip
    assert not (run / "export").exists()  # nothing was exported or built
