"""Attack stage: the registry's attacks respect eps and the [0, 1] box, PGD breaks an undefended model, CLI errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hw_dq import run as rd
from hw_dq.robust.attacks import AttackParams, clean_accuracy, generate, robust_accuracy
from tests.conftest import assert_one_line_error, run_cli, run_cli_here, test_data, tiny_run

SMALL = AttackParams(apgd_iters=10, apgd_targets=2, square_queries=50, cw_iters=5, cw_search_steps=2)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_run(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def model(run_dir: Path) -> torch.nn.Module:
    return rd.load_model(run_dir)[0]


@pytest.mark.parametrize("attack", ["fgsm", "rfgsm", "pgd", "apgd-ce", "apgd-t", "square", "art-apgd-square", "bpda"])
def test_linf_attacks_respect_eps_and_box(model, attack):
    x, y = test_data(24)
    x_adv, _, _ = generate(model, x, y, attack, 8.0, params=SMALL)
    assert x_adv.shape == tuple(x.shape)
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    assert np.abs(x_adv - x.numpy()).max() <= 8 / 255 + 1e-6


@pytest.mark.parametrize("attack", ["pgd-l2", "cw-l2"])
def test_l2_attacks_respect_radius_and_box(model, attack):
    x, y = test_data(8)
    r, x_adv = robust_accuracy(model, x, y, attack, 64.0, params=SMALL, return_adv=True)
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    if attack == "pgd-l2":
        assert r.max_perturbation <= 64 / 255 + 1e-5
    assert r.norm == "L2" and 0.0 <= r.robust_acc <= 1.0


def test_pgd_drives_undefended_model_to_zero(model):
    x, y = test_data(96)
    assert clean_accuracy(model, x, y) > 0.3
    small = robust_accuracy(model, x, y, "pgd", 2.0)
    large = robust_accuracy(model, x, y, "pgd", 64.0)
    assert large.robust_acc <= 0.02 < small.robust_acc
    assert large.n_examples == 96 and large.params["steps"] == 10


def test_eps_zero_is_clean_accuracy_and_seed_is_deterministic(model):
    x, y = test_data(48)
    assert robust_accuracy(model, x, y, "pgd", 0.0).robust_acc == pytest.approx(clean_accuracy(model, x, y))
    a = robust_accuracy(model, x, y, "rfgsm", 8.0, seed=3).robust_acc
    assert robust_accuracy(model, x, y, "rfgsm", 8.0, seed=3).robust_acc == a


def test_cli_attack_writes_validated_results(run_dir):
    from hw_dq.robust.results import load

    proc = run_cli("attack", str(run_dir), "--attacks", "fgsm,pgd", "--eps", "2,8", "--n", "32", "--name", "t",
                   "--square-queries", "50", "--quiet")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    (res,) = load([run_dir / "attacks" / "t.json"])
    assert [(e["attack"], e["eps"]) for e in res["evaluations"]] == [("fgsm", 2), ("fgsm", 8), ("pgd", 2), ("pgd", 8)]
    assert all(e["wall_s"] >= 0 and e["n_examples"] == 32 and e["seed"] == 0 for e in res["evaluations"])
    assert res["mode"] == "FP" and res["sanity"]["verdict"] in ("pass", "warn")
    assert (run_dir / "attacks" / "t.md").read_text().startswith("# Robustness")
    assert json.loads((run_dir / "attacks" / "t.json").read_text())["headline"]["eps"] == 8.0


def test_cli_unknown_attack_is_one_line_exit_2(run_dir):
    # the real command line, once: exit status and stderr as a user sees them
    assert_one_line_error(run_cli("attack", str(run_dir), "--attacks", "fgsm,deepfoo", "--n", "8"), "deepfoo")


def test_cli_negative_eps(run_dir):
    assert_one_line_error(run_cli_here("attack", str(run_dir), "--eps=-2", "--n", "8"), "eps")
    assert_one_line_error(run_cli_here("attack", str(run_dir), "--eps", "2,x"), "numbers")
    assert_one_line_error(run_cli_here("attack", str(run_dir), "--eps", "inf", "--n", "8"), "finite")
    assert_one_line_error(run_cli_here("attack", str(run_dir), "--eps", "nan", "--n", "8"), "finite")


def test_cli_bad_version_and_name_taken(run_dir):
    before = sorted(p.name for p in (run_dir / "attacks").glob("*")) if (run_dir / "attacks").is_dir() else []
    proc = run_cli_here("attack", str(run_dir), "--attacks", "autoattack", "--version", "extreme")
    assert_one_line_error(proc, "--version", "standard")
    (run_dir / "attacks").mkdir(exist_ok=True)
    (run_dir / "attacks" / "taken.json").write_text("{}")
    assert_one_line_error(run_cli_here("attack", str(run_dir), "--name", "taken", "--n", "8"), "--force")
    assert (run_dir / "attacks" / "taken.json").read_text() == "{}"  # nothing lost
    (run_dir / "attacks" / "taken.json").unlink()
    assert sorted(p.name for p in (run_dir / "attacks").glob("*")) == before


def test_small_linf_eps_prints_a_note(model, capsys):
    from hw_dq.robust import registry

    x, y = test_data(4)
    registry._noted.discard(0.031)
    robust_accuracy(model, x, y, "fgsm", 0.031)
    err = capsys.readouterr().err
    assert "units of 1/255" in err and len(err.strip().splitlines()) == 1


def test_corrupt_autoattack_state_is_one_line_and_loses_nothing(run_dir):
    state = run_dir / "attacks" / ".state"
    state.mkdir(parents=True, exist_ok=True)
    bad = state / "cx.apgd-ce.Linf.eps8.state.json"
    bad.write_text("{not json")
    keep = run_dir / "attacks" / "keep.json"
    keep.write_text('{"keep": 1}')
    proc = run_cli_here("attack", str(run_dir), "--attacks", "apgd-ce", "--n", "8", "--name", "cx")
    assert_one_line_error(proc, "corrupt AutoAttack state file", "delete it")
    assert bad.read_text() == "{not json" and keep.read_text() == '{"keep": 1}'
    assert sorted(p.name for p in state.iterdir()) == [bad.name]
    bad.unlink()
    keep.unlink()


def test_autoattack_state_resumes_after_the_last_finished_component(model, tmp_path):
    """A saved state with APGD-CE done is continued (not restarted), and removed at the end."""
    from hw_dq.robust import autoattack

    x, y = test_data(8)
    p = tmp_path / "s.json"
    first = autoattack.run(model, x, y, 8 / 255, state_path=p, components=["apgd-ce"], budgets={"apgd_iters": 5})
    assert not p.exists() and not first.resumed
    # fake a kill after APGD-CE: write the state as run() does after that component
    key = autoattack._key(x.float(), y, 8 / 255, "Linf", "custom:apgd-ce,square", 0)
    st = {"key": key, "done": ["apgd-ce"], "robust": first.robust.tolist(), "breakdown": {"clean": 1.0}}
    autoattack._save_state(p, st, first.x_adv)
    out = autoattack.run(model, x, y, 8 / 255, state_path=p, components=["apgd-ce", "square"],
                         budgets={"apgd_iters": 5, "square_queries": 20})  # fmt: skip
    assert out.resumed and "after_apgd-ce" not in out.breakdown and "after_square" in out.breakdown
    assert bool((out.robust <= first.robust).all())  # square only removes images APGD-CE left
    assert not p.exists()


def test_cli_run_dir_without_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model": {"name": "tiny", "wbits": None, "abits": None}}))
    assert_one_line_error(run_cli_here("attack", str(tmp_path), "--n", "8"), "checkpoint")
    assert_one_line_error(run_cli_here("attack", str(tmp_path / "nope"), "--n", "8"), "does not exist")


def test_cli_transfer_needs_source(run_dir):
    proc = run_cli_here("attack", str(run_dir), "--attacks", "transfer-pgd", "--n", "8")
    assert_one_line_error(proc, "--transfer-from")


def test_cli_unusable_device(run_dir):
    proc = run_cli_here("attack", str(run_dir), "--n", "8", "--device", "tpu9")
    assert_one_line_error(proc, "device 'tpu9' is not usable")
