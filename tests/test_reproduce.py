"""hw-dq reproduce: a micro plan end to end, resumable, with bad-argument errors."""

from __future__ import annotations

import json

import pytest

from hw_dq.errors import ConfigError
from hw_dq.experiments.reproduce import Scale, plan, reproduce
from hw_dq.robust.results import certificate_violations, load

MICRO = Scale(
    data="sample", train_subset=256, width=0.125, fp_epochs=1, q_epochs=1, batch_size=64, abits=[2],
    betas=[3e-4], adv_train=False, n_eval=32, eps=[8.0], aa_iters=2, aa_targets=1, aa_queries=10, n_probe=16,
    squeezers=["bits:4"], n_amplification=16, n_hw=16, hw_queries=20, aa_version="reduced", judged_eps=[8.0],
    hw_attacks=["transfer-pgd", "square"],
)  # fmt: skip


def test_cpu_plan_covers_the_paper_grid():
    p = plan(Scale(), None)
    names = p.names
    assert names[0] == "fp" and "fp-at" in names
    for a in (1, 2, 4):
        assert {f"vq-a{a}", f"dq1-a{a}", f"dq2-a{a}"} <= set(names)
    assert {"vq-a2-at", "dq2-a2-at", "vq-a4-at", "dq2-a4-at"} <= set(names)  # the AT arm at w2a2 and w4a4
    dq = p.get("dq2-a1")
    assert dq.train.wbits == 2 and p.get("dq2-a4").train.wbits == 4 and dq.init_from == "fp"
    # the typed fields say what a run is; nothing parses the name
    assert (dq.mode, dq.wbits, dq.abits, dq.beta, dq.beta_rank, dq.adv_train) == ("DQ", 2, 1, 3e-4, 2, "none")
    assert p.get("dq2-a2-at").adv_train == "nfgsm" and p.get("dq2-a2-at").twin == "fp-at"
    assert {r.name for r in p if r.squeeze} == {"fp", "vq-a2", "dq2-a2"}
    assert [r.name for r in p if r.amplification] == ["fp", "vq-a1", "dq2-a1", "vq-a2", "dq2-a2"]
    # the accelerator columns for every quantized run, the adversarially trained ones included
    assert {r.name for r in p if r.hardware} == {n for n in names if not n.startswith("fp")}


def test_the_cpu_scale_judges_on_the_reference_autoattack_and_adaptive_attacks_at_2_and_8():
    s = Scale()
    assert s.strong_attacks == ["autoattack", "bpda", "pgd-temp"] and s.judged_eps == [2.0, 8.0]
    assert s.hw_attacks == ["transfer-autoattack", "square", "hsj"] and s.hw_queries == 5000
    assert Scale(aa_version="reduced").strong_attacks == ["apgd-ce", "apgd-t", "square", "bpda", "pgd-temp"]
    with pytest.raises(ConfigError, match="aa_version"):
        Scale(aa_version="plus-ultra")
    with pytest.raises(ConfigError, match="adv_recipe"):
        Scale(adv_recipe="free")
    with pytest.raises(ConfigError, match="no weight bits for activation widths 3"):
        Scale(at_abits=[3])
    with pytest.raises(ConfigError, match="unknown train settings lrr"):
        Scale(at_finetune={"4": {"lrr": 0.1}})


def test_the_adversarial_arm_fine_tunes_each_width_with_its_recipe():
    """At 4 bits VQ+AT and DQ+AT share the short fine-tune of robust_cpu; at 2 bits the FP twin's recipe."""
    from benchmarks.robust_gpu import SHORT

    p = plan(Scale())
    a4 = [r for r in p if r.adversarial and r.abits == 4]
    a2 = [r for r in p if r.adversarial and r.abits == 2]
    assert {r.mode for r in a4} == {"VQ", "DQ"} and {r.mode for r in a2} == {"VQ", "DQ"}
    for r in a4:
        assert {k: getattr(r.train, k) for k in SHORT} == SHORT and r.adv_train == "pgd" and r.train.adv_steps == 3
    fp = p.get("fp-at")
    for r in a2:
        assert (r.train.adv_train, r.train.epochs, r.train.lr) == (fp.train.adv_train, Scale().q_epochs, Scale().q_lr)


def test_plan_follows_the_scale_betas_and_bits():
    """Three betas and bit widths 3/5: the claims compare the scale's own runs, not dq1/dq2/a2."""
    from hw_dq.experiments.reproduce import claims

    s = Scale(
        abits=[2, 3], wbits={"2": 2, "3": 3}, betas=[1e-4, 3e-4, 1e-3], adv_abits=[3], at_abits=[3], adv_train=True
    )
    p = plan(s)
    assert {"dq3-a2", "dq3-a3", "dq3-a3-at"} <= set(p.names) and "dq1-a3-at" not in p.names
    assert {r.name for r in p if r.squeeze} == {"fp", "vq-a3", "dq3-a3"}
    rs = [_result("fp", 0.1), _result("dq1-a2", 0.1), _result("dq3-a2", 0.5), _result("dq1-a3", 0.1),
          _result("dq3-a3", 0.5), _result("vq-a3", 0.1), _result("dq3-a3-at", 0.6),
          _result("vq-a3-at", 0.2)]  # fmt: skip
    v = {c["claim"].split(" (")[0]: c for c in claims(rs, s)}
    assert (
        v["larger beta is more robust"]["verdict"] == "holds"
        and "a3: 50.0% vs 10.0%" in (v["larger beta is more robust"]["evidence"])
    )
    assert v["DQ composes with adversarial training"]["verdict"] == "holds"
    assert "DQ+AT vs VQ+AT a3: 60.0% vs 20.0%" in v["DQ composes with adversarial training"]["evidence"]


def test_dry_run_needs_no_data_and_names_fp(tmp_path, capsys):
    s = Scale(data="cifar10")  # the real dataset, which a dry run must not look for
    out = reproduce(tmp_path / "nowhere", scale=s, data_dir=str(tmp_path / "no-data"), dry_run=True)
    text = capsys.readouterr().out
    assert out["plan"][0] == "fp" and "None" not in text
    assert text.splitlines()[0].split()[:3] == ["fp", "FP", "fp"] and " w2a1 " in text
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.slow  # 1-3 min on 2 shared cores
def test_micro_reproduction_end_to_end_and_resumes(tmp_path, monkeypatch):
    out = tmp_path / "rep"
    summary = reproduce(out, scale=MICRO, progress=False)
    results = load([out / "runs"])
    names = sorted((r["run_dir"].split("/")[-1], r["name"]) for r in results)
    assert ("fp", "robustness") in names and ("dq1-a2", "robustness") in names and ("vq-a2", "squeeze-bits4") in names
    assert ("vq-a2", "robustness-hw") in names and ("dq1-a2", "robustness-hw") in names  # hardware columns
    hw = next(r for r in results if r["run_dir"].endswith("vq-a2") and r["name"] == "robustness-hw")
    assert hw["target"] == "hw" and {e["attack"] for e in hw["evaluations"]} == {"transfer-pgd", "square"}
    dq = next(r for r in results if r["run_dir"].endswith("dq1-a2") and r["name"] == "robustness")
    strong = {"apgd-ce", "apgd-t", "square", "bpda", "pgd-temp", "transfer-pgd"}
    assert {e["attack"] for e in dq["evaluations"]} == {"fgsm", "pgd"} | strong
    # the headline is the per-image worst case over every attack at 8/255, each one's number beside it
    assert set(dq["headline"]["attack"].removeprefix("worst case of ").split("+")) == {"fgsm", "pgd"} | strong
    assert dq["headline"]["robust_acc"] <= min(e["robust_acc"] for e in dq["evaluations"] if e["eps"] == 8.0)
    assert dq["sanity"]["verdict"] in ("pass", "warn")
    cert = next(r for r in results if r["run_dir"].endswith("vq-a2") and r["name"] == "certified-hw")
    assert cert["target"] == "hw-certified" and cert["n_examples"] == hw["n_examples"]
    # a certificate is a floor under every attack on the same accelerator and images
    assert cert["evaluations"][0]["robust_acc"] <= hw["headline"]["robust_acc"]
    assert certificate_violations(cert, hw, 8.0) == []  # image by image, not only in the totals
    md = (out / "summary.md").read_text()
    row = next(ln for ln in md.splitlines() if ln.startswith("| vq-a2 |"))
    cells = [c.strip() for c in row.split("|")[1:-1]]  # model, clean, worst case, accelerator, certified
    assert len(cells) == 5 and "-" not in cells, row
    assert (out / "amplification.png").is_file() and (out / "summary.md").is_file()
    assert len(summary["claims"]) == 6
    stamp = (out / "runs" / "fp" / "attacks" / "robustness.json").stat().st_mtime_ns
    again = reproduce(out, scale=MICRO, progress=False)  # finished steps are not redone
    assert (out / "runs" / "fp" / "attacks" / "robustness.json").stat().st_mtime_ns == stamp
    assert again["timing_s"] == summary["timing_s"]
    # a run FINN cannot take is reported and retried later; it does not stop the reproduction
    import hw_dq.experiments.reproduce.runner as rp
    from hw_dq.errors import HwDqError

    def fail(run, s):
        raise HwDqError("QONNX does not reproduce the PyTorch model (planted)")

    monkeypatch.setattr(rp, "_hardware", fail)
    (out / "runs" / "vq-a2" / "attacks" / "robustness-hw.settings").unlink()
    reproduce(out, scale=MICRO, progress=False)
    assert "vq-a2" in json.loads((out / "hw_failures.json").read_text())
    assert "## Hardware columns that failed" in (out / "summary.md").read_text()


def test_bad_arguments():
    with pytest.raises(ConfigError, match="unknown scale"):
        reproduce("x", scale="huge")
    with pytest.raises(ConfigError, match="unknown run"):
        reproduce("x", scale=MICRO, only="fp,zz")


def _result(run: str, robust: float, clean: float = 0.6, sanity: str = "pass", name: str = "robustness") -> dict:
    return {"run_dir": f"/r/runs/{run}", "name": name, "clean_acc": clean, "n_examples": 1000,
            "headline": {"robust_acc": robust}, "sanity": {"verdict": sanity}}  # fmt: skip


def test_claims_follow_the_numbers_and_name_masked_evidence():
    from hw_dq.experiments.reproduce import claims

    rs = [_result("fp", 0.00), _result("vq-a2", 0.01), _result("dq1-a2", 0.10, sanity="warn"),
          _result("dq2-a2", 0.30, clean=0.5), _result("vq-a2", 0.0, name="squeeze-bits4"),
          _result("dq2-a2", 0.2, sanity="warn", name="squeeze-bits4")]  # fmt: skip
    v = {c["claim"].split(" (")[0]: c for c in claims(rs)}
    assert v["VQ is less robust than FP at low bits"]["verdict"] == "no measurable difference"
    assert v["DQ is at least as robust as FP"]["verdict"] == "holds"  # dq2 (the best DQ) is not flagged
    assert v["larger beta is more robust"]["verdict"] == "holds only on masking-flagged evidence"
    assert v["DQ improves clean accuracy at low bits"]["verdict"] == "does not hold"
    assert v["DQ composes with adversarial training"]["verdict"] == "not measured"
    squeeze = v["DQ composes with feature squeezing"]
    assert squeeze["verdict"] == "holds only on masking-flagged evidence" and "(masking WARN)" in squeeze["evidence"]


def test_claims_leave_out_models_that_did_not_train():
    from hw_dq.experiments.reproduce import claims

    rs = [_result("fp", 0.02, clean=0.65), _result("vq-a1", 0.0, clean=0.11), _result("dq2-a1", 0.0, clean=0.10),
          _result("dq1-a1", 0.0, clean=0.09), _result("vq-a2", 0.0), _result("dq2-a2", 0.0)]  # fmt: skip
    v = {c["claim"].split(" (")[0]: c for c in claims(rs)}
    fp_vq = v["VQ is less robust than FP at low bits"]
    assert "a1" not in fp_vq["evidence"].split("Left out")[0] and "vq-a1 (11.0% clean)" in fp_vq["evidence"]
    beta = v["larger beta is more robust"]
    assert beta["verdict"] == "not measured" and "dq1-a1" in beta["evidence"] and "dq2-a1" in beta["evidence"]


def test_claims_at_the_small_eps_use_the_worst_attack_there():
    from hw_dq.experiments.reproduce import claims

    def ev(run: str, at2: list[float], **kw) -> dict:
        r = _result(run, 0.0, **kw)
        pairs = zip(("fgsm", "pgd"), at2, strict=True)
        r["evaluations"] = [{"attack": a, "eps": 2.0, "robust_acc": v} for a, v in pairs]
        r["evaluations"].append({"attack": "autoattack", "eps": 8.0, "robust_acc": 0.0})
        return r

    rs = [ev("fp", [0.35, 0.29]), ev("vq-a2", [0.50, 0.45], sanity="warn"), ev("dq1-a2", [0.5, 0.2]),
          ev("dq2-a2", [0.6, 0.5])]  # fmt: skip
    v = [c for c in claims(rs) if "at 2/255" in c["claim"]]
    assert len(v) == 3
    by = {c["claim"].split(" (")[0]: c for c in v}
    assert by["DQ is at least as robust as FP"]["verdict"] == "holds"  # dq2: min(60, 50) = 50 vs fp 29
    assert "50.0% vs 29.0%" in by["DQ is at least as robust as FP"]["evidence"]
    assert by["VQ is less robust than FP at low bits"]["verdict"] == "does not hold"  # VQ 45 > FP 29
    assert by["larger beta is more robust"]["verdict"] == "holds"


def test_timing_keeps_steps_written_by_another_process(tmp_path):
    from hw_dq.experiments.reproduce import add_timing

    path = tmp_path / "timing.json"
    add_timing(path, "train/fp", 10.0)
    path.write_text(json.dumps({**json.loads(path.read_text()), "attack/vq-a4": 5.0}))  # a parallel --only process
    add_timing(path, "train/fp", 2.5)
    assert json.loads(path.read_text()) == {"train/fp": 12.5, "attack/vq-a4": 5.0}


def test_the_default_output_is_a_fresh_folder_under_runs_not_the_committed_results():
    import inspect

    from hw_dq.experiments.reproduce import DEFAULT_OUT

    assert inspect.signature(reproduce).parameters["out"].default == DEFAULT_OUT
    assert DEFAULT_OUT.startswith("runs/") and "benchmarks" not in DEFAULT_OUT


@pytest.mark.slow  # two micro reproductions without hardware columns: 1-3 min on 2 shared cores
def test_reproduce_killed_mid_attack_then_rerun_gives_the_uninterrupted_numbers(tmp_path):
    """SIGKILL just before the first model's results file is renamed in; the same command again finishes,
    with the numbers of an uninterrupted run and no scratch file left behind."""
    import dataclasses
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    scale = dataclasses.replace(MICRO, hw_board=None, squeezers=[], abits=[2], n_amplification=8)
    spec = tmp_path / "scale.json"
    spec.write_text(json.dumps(dataclasses.asdict(scale)))

    def cli(out, kill=None):
        env = {k: v for k, v in os.environ.items() if k != "HW_DQ_TEST_KILL_AT"}
        if kill:
            env["HW_DQ_TEST_KILL_AT"] = kill
        argv = [sys.executable, "-m", "hw_dq.cli", "reproduce", "--scale", str(spec), "--out", str(out), "--quiet"]
        return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)

    killed = cli(tmp_path / "killed", kill="robustness.json")
    assert killed.returncode == -9, killed.stderr  # SIGKILL
    assert not (tmp_path / "killed" / "runs" / "fp" / "attacks" / "robustness.json").exists()
    assert cli(tmp_path / "killed").returncode == 0
    assert cli(tmp_path / "ref").returncode == 0

    def numbers(out):
        return {(r["run_dir"].split("/")[-1], r["name"], e["attack"], e["eps"]): (e["robust_acc"], e.get("robust_mask"))
                for r in load([out / "runs"]) for e in r["evaluations"]}  # fmt: skip

    got, want = numbers(tmp_path / "killed"), numbers(tmp_path / "ref")
    assert got == want and len(want) > 10
    assert not [p for p in (tmp_path / "killed").rglob("*.tmp")]
