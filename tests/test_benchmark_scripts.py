"""The robust benchmarks' own inputs: which steps --only runs, and refusals that cost nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import finetune_screen, robust_gpu
from tests.conftest import ROOT


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_only_selects_steps_by_run_or_by_eps() -> None:
    steps = robust_gpu.plan_cpu()
    both = robust_gpu.select(steps, "eval:cpu-dq-w2a2e8-at")
    assert [(s.run, s.eps) for s in both] == [("cpu-dq-w2a2e8-at", 8.0), ("cpu-dq-w2a2e8-at", 2.0)]
    one = robust_gpu.select(steps, "eval:cpu-dq-w2a2e8-at@2, train:cpu-vq-w4a4-short-at")
    assert [(s.kind, s.run, s.eps) for s in one] == [("train", "cpu-vq-w4a4-short-at", 8.0),
                                                     ("eval", "cpu-dq-w2a2e8-at", 2.0)]  # fmt: skip
    with pytest.raises(ValueError, match="eval:cpu-nothing"):
        robust_gpu.select(steps, "eval:cpu-dq-w2a2e8-at,eval:cpu-nothing")


def test_robust_gpu_unknown_step_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    work = tmp_path / "work"
    proc = _run("benchmarks.robust_gpu", "--arm", "cpu", "--data", str(tmp_path), "--work", str(work),
                "--only", "hw:cpu-no-such-run")  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "hw:cpu-no-such-run" in proc.stderr
    assert not work.exists()


def test_finetune_screen_refuses_bad_input_in_one_line(tmp_path: Path) -> None:
    proc = _run("benchmarks.finetune_screen", "--data", str(tmp_path), "--fp", str(tmp_path), "--work",
                str(tmp_path / "w"))  # fmt: skip
    assert proc.returncode == 2 and "no finished cpu-fp-at" in proc.stderr and proc.stderr.strip().count("\n") == 0
    fp = tmp_path / "cpu-fp-at"
    fp.mkdir()
    (fp / "model.safetensors").write_bytes(b"")
    proc = _run("benchmarks.finetune_screen", "--data", str(tmp_path), "--fp", str(tmp_path), "--work",
                str(tmp_path / "w"), "--only", "ptq-w4a4,nope")  # fmt: skip
    assert proc.returncode == 2 and "nope" in proc.stderr and proc.stderr.strip().count("\n") == 0
    assert not (tmp_path / "w").exists()


def test_finetune_screen_never_reuses_a_run_trained_otherwise(tmp_path: Path) -> None:
    """A finished run under the variant's name counts only if it was trained with the variant's settings."""
    run = tmp_path / "w" / "ptq-w4a4"
    run.mkdir(parents=True)
    (run / "model.safetensors").write_bytes(b"")
    label, cfg = finetune_screen.VARIANTS["ptq-w4a4"]
    stored = {**finetune_screen.CS, **cfg, "lr": 0.02}  # another learning rate than the variant's
    (run / "config.json").write_text(json.dumps({"train": stored}))
    with pytest.raises(SystemExit, match=r"other settings \(lr\)"):
        finetune_screen._train("ptq-w4a4", cfg, tmp_path / "w", tmp_path, tmp_path)


def test_finetune_screen_worker_on_a_row_in_training_is_refused(tmp_path: Path) -> None:
    """Two screen workers on one row: the second gets the run lock's one-line error instead of training
    into the same run directory (four workers once did, each appending its own epochs to the log)."""
    from hw_dq import run as rd
    from hw_dq.errors import HwDqError

    label, cfg = finetune_screen.VARIANTS["ptq-w4a4"]
    lock = rd.run_lock(tmp_path / "w" / "ptq-w4a4", "another worker")
    with lock, pytest.raises(HwDqError, match="in use by .*another worker"):
        finetune_screen._train("ptq-w4a4", cfg, tmp_path / "w", tmp_path, tmp_path)


def test_finetune_screen_starts_each_row_from_its_named_run(tmp_path: Path, monkeypatch) -> None:
    """init_from and teacher name runs: absent means --fp's FP twin, a variant's name its run under --work,
    None random weights. A row trained from scratch must not silently start from the twin."""
    from hw_dq import run as rd
    from hw_dq.train import loop

    seen = {}

    def fake(cfg, out: Path, resume: bool, progress: bool) -> None:
        seen[out.name] = (cfg.init_from, cfg.teacher, cfg.width)
        out.mkdir(parents=True, exist_ok=True)
        (out / rd.METRICS).write_text(json.dumps({"epoch": 0, "time_s": 1.0, "holdout_pgd_acc": 0.3}) + "\n")

    monkeypatch.setattr(loop, "train", fake)
    fp, work = tmp_path / "fp", tmp_path / "w"
    for name in ("rslad3-w4a4", "fp-w075", "lr005-w2a2e8-w075", "scratch-w2a2e8"):
        row = finetune_screen._train(name, finetune_screen.VARIANTS[name][1], work, fp, tmp_path)
        assert row == {"epochs": 1, "train_s": 1.0, "holdout_pgd10": [0.3]}
    twin = str(fp / "cpu-fp-at")
    wide = str(work / "fp-w075")
    assert seen == {"rslad3-w4a4": (twin, twin, 0.5), "fp-w075": (None, None, 0.75),
                    "lr005-w2a2e8-w075": (wide, None, 0.75), "scratch-w2a2e8": (None, None, 0.5)}  # fmt: skip


def test_finetune_screen_scratch_rows_train_with_the_fp_twins_recipe(tmp_path: Path, monkeypatch) -> None:
    """A row 'from scratch with the FP twin's recipe' differs from robust_gpu's cpu-fp-at step in its bit
    widths (and, for the width rows, its width and test subset) only: the recipe is read from that plan."""
    from hw_dq import run as rd
    from hw_dq.train import loop
    from hw_dq.train.config import TrainConfig

    seen = {}

    def fake(cfg, out: Path, resume: bool, progress: bool) -> None:
        seen[out.name] = vars(cfg)
        out.mkdir(parents=True, exist_ok=True)
        (out / rd.METRICS).write_text(json.dumps({"epoch": 0, "time_s": 1.0}) + "\n")

    monkeypatch.setattr(loop, "train", fake)
    twin = vars(TrainConfig(**next(s for s in robust_gpu.plan_cpu() if s.run == "cpu-fp-at" and s.kind == "train").cfg))
    own = {"scratch-w2a2e8": {"wbits", "abits", "end_bits"}, "fp-w075": {"width", "test_subset"}}
    for name, allowed in own.items():
        finetune_screen._train(name, finetune_screen.VARIANTS[name][1], tmp_path / "w", tmp_path / "fp", tmp_path)
        assert {k for k, v in seen[name].items() if twin[k] != v} - {"data_dir"} == allowed


def test_finetune_screen_carries_over_only_unchanged_committed_rows(tmp_path: Path, monkeypatch) -> None:
    """--only reruns some rows; the others come from the committed results, but a row whose settings or
    label changed since is dropped rather than shown under the new label."""
    import benchmarks.common

    v = finetune_screen.VARIANTS
    committed = {"references": {"cpu-fp-at": {"label": finetune_screen.REFERENCES["cpu-fp-at"], "autoattack": 0.25},
                                "gone": {"label": "a reference no longer screened"}},
                 "variants": {"ptq-w4a4": {"label": v["ptq-w4a4"][0], "config": v["ptq-w4a4"][1], "apgd": 0.2},
                              "lr002-w4a4": {"label": v["lr002-w4a4"][0], "config": {**v["lr002-w4a4"][1], "lr": 1.0}},
                              "pgd10-w4a4": {"label": "an older label", "config": v["pgd10-w4a4"][1]}}}  # fmt: skip
    (tmp_path / "finetune_screen.json").write_text(json.dumps(committed))
    monkeypatch.setattr(benchmarks.common, "RESULTS", tmp_path)
    refs, rows = finetune_screen._carried({"ptq-w4a4", "lr002-w4a4", "pgd10-w4a4", "calib-w4a4"})
    assert list(refs) == ["cpu-fp-at"] and list(rows) == ["ptq-w4a4"] and rows["ptq-w4a4"]["apgd"] == 0.2
    assert finetune_screen._carried(set())[1] == {}  # a row being rerun is never carried


def test_hw_transfer_measures_only_quantized_models_not_measured_before(tmp_path: Path, monkeypatch) -> None:
    """--hw-transfer redoes nothing: a model already in the results keeps its figures, a float model and a
    model without saved AutoAttack examples are skipped, and only the new quantized model is transferred."""
    import numpy as np

    for name, wbits, examples in [("old", 4, True), ("fp", None, True), ("new", 2, True), ("noex", 2, False)]:
        run = tmp_path / name
        run.mkdir()
        (run / "config.json").write_text(json.dumps({"model": {"wbits": wbits}}))
        if examples:
            (run / "autoattack_x_adv_eps8.safetensors").write_bytes(b"")
    calls = []

    def fake(run: Path, ev: dict, data: Path, n: int) -> dict:
        calls.append(run.name)
        ok = np.array([True, True, False, False])
        return {"hw_clean": ok, "sw_clean": ok, "hw_transfer": np.array([True, False, False, False]),
                "sw_worst": np.array([True, False, False, False])}  # fmt: skip

    monkeypatch.setattr(robust_gpu, "_transfer", fake)
    ev = {"eps": 8.0, "n": 4}
    res = {"eval": {f"{k}@8": ev for k in ("old", "fp", "new", "noex")}, "hw_transfer": {"old@8": {"kept": 1}}}
    out = robust_gpu.hw_transfer(tmp_path, tmp_path, res)
    assert calls == ["new"]
    assert out["old@8"] == {"kept": 1} and set(out) == {"old@8", "new@8"}
    assert out["new@8"]["clean_hw"] == 0.5 and out["new@8"]["transfer_autoattack_hw"] == 0.25


def test_ibp_growth_of_a_trained_run_and_its_bad_radii(tmp_path: Path) -> None:
    """The trained-run mode measures a run's intervals: a wider box is never tighter, and the widths at
    the smallest radius are below those at the largest at every layer; bad radii are one line."""
    from benchmarks import ibp_growth
    from hw_dq.data import load_split
    from hw_dq.nn.models import create_model

    proc = _run("benchmarks.ibp_growth", "--runs", str(tmp_path), "--radii", "0,x")
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "--radii" in proc.stderr
    x, y = load_split("sample", "test").take(64, seed=0).tensors()
    model = create_model("cnv", 4, 4, width=0.25, act_range="fixed").eval()
    small, c_small, ce_small = ibp_growth.widths(model, x, y, 0.1, relax_input=True)
    large, c_large, ce_large = ibp_growth.widths(model, x, y, 4.0, relax_input=True)
    assert len(small) == len(large) == 9  # the input box and the 8 activations after a layer
    assert small[0] < large[0] and small[1] < large[1]
    assert c_small >= c_large and ce_small <= ce_large


def test_cert_arm_trains_the_cpu_recipe_and_reports_certificates_beside_the_worst_case() -> None:
    """The certified arm's runs are the recipe the CPU runs certified with (its IBP options, valid configs on
    every training image), each accelerator certificate waits for its training, and the report puts the
    certificates beside the same model's empirical worst case (a certificate above it would be unsound)."""
    from hw_dq.train.config import TrainConfig

    steps = robust_gpu.plan_cert()
    trains = [s for s in steps if s.kind == "train"]
    for s in trains:
        cfg = TrainConfig(**s.cfg)
        assert cfg.adv_train == "ibp" and cfg.ibp_relax_input and cfg.ibp_relu_grad and cfg.train_subset is None
    ends = [s for s in trains if s.cfg.get("end_bits") == 8]  # the CPU runs' best w2a2 certificate: 8-bit ends
    assert [(s.run, s.cfg["wbits"], s.cfg["model"]) for s in ends] == [("ct-tiny-w2a2e8-ibp", 2, "tiny")]
    assert [s.run for s in steps if s.kind == "cert"].count("ct-tiny-w2a2e8-ibp") == 1
    res = {"train": {}, "eval": {}, "hw": {}, "cert": {}}
    cert = next(s for s in steps if s.kind == "cert")
    assert not robust_gpu._ready(cert, res)
    res["train"][cert.run] = {"epochs": 60}
    assert robust_gpu._ready(cert, res)
    res["cert"][f"{cert.run}@2"] = {"n": 1000, "clean_hw": 0.5, "bound_s": 3.0,
                                    "certified": {"1": 0.41, "2": 0.37, "4": 0.2, "8": 0.05}}  # fmt: skip
    res["eval"][f"{cert.run}@2"] = {"worst_case": 0.39, "clean": 0.5, "robust": {}, "eps": 2.0, "n": 1000}
    row = next(ln for ln in robust_gpu.render(res).splitlines() if ln.startswith(f"| {cert.run} | 1000 |"))
    assert "**37.0%**" in row and "39.0% / -" in row, row
