"""Attacks on the simulated accelerator: the three threat models, eps on the UINT8 grid, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from hw_dq.data import load_split
from hw_dq.fpga.build import build_run
from hw_dq.fpga.hwattack import craft, evaluate_hw, find_build, hw_labels, load_simulator
from hw_dq.robust.registry import HW_ATTACKS
from hw_dq.run import load_model
from hw_dq.train.loop import TrainConfig, train
from tests.conftest import assert_one_line_error, run_cli, run_cli_here

EPS = 8.0


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("hwatk") / "tiny"
    # lr 0.01: at 0.05 a one-thread run collapsed to one class, leaving HopSkipJump no start
    cfg = TrainConfig(
        model="tiny", wbits=2, abits=2, epochs=2, train_subset=2048, test_subset=64, batch_size=64, lr=0.01
    )
    train(cfg, run, progress=False)
    build_run(run, "Pynq-Z1", target_fps=1000)
    return run


@pytest.mark.parametrize("attack", HW_ATTACKS)
def test_attack_modes_stay_on_the_uint8_grid_within_eps(tiny_build, attack):
    model, _ = load_model(tiny_build)
    sim = load_simulator(find_build(tiny_build))
    x, y = (t.numpy() for t in load_split("sample", "test").take(12, seed=3).tensors())
    adv, params = craft(attack, model, sim, x, y, EPS, seed=0, steps=3, queries=60)
    assert adv.shape == x.shape and params
    assert np.array_equal(np.rint(adv * 255), adv * 255), "not on the UINT8 grid"
    assert adv.min() >= 0 and adv.max() <= 1
    if attack != "hsj":  # HopSkipJump minimises the perturbation instead of bounding it
        assert np.abs(adv - x).max() * 255 <= EPS + 1e-4


def test_evaluate_hw_writes_schema_results(tiny_build):
    res = evaluate_hw(tiny_build, ["transfer-pgd", "square"], [EPS], n=16, steps=3, queries=40, name="hwtest")
    path = tiny_build / "attacks" / "hwtest.json"
    saved = json.loads(path.read_text())
    assert saved["target"] == "hw" and saved["schema"] == "hw-dq/robustness/v1"
    assert {e["attack"] for e in saved["evaluations"]} == {"transfer-pgd", "square"}
    for e in res["evaluations"]:
        # robust = right on the clean image and on the adversarial one, so never above clean accuracy
        assert e["robust_acc"] <= res["clean_acc"] + 1e-9, e
        assert e["max_perturbation"] <= EPS + 1e-4
        assert e["robust_mask"].count("1") == round(e["robust_acc"] * 16)
    # the accelerator's headline: the per-image worst case, at most every attack's own number
    worst = saved["worst_case"][0]
    assert worst["attacks"] == ["transfer-pgd", "square"]
    assert saved["headline"]["robust_acc"] == worst["robust_acc"] <= min(e["robust_acc"] for e in saved["evaluations"])
    both = [a == b == "1" for a, b in zip(*(e["robust_mask"] for e in saved["evaluations"]), strict=True)]
    assert worst["robust_acc"] == pytest.approx(sum(both) / 16)


def test_cli_hw_attack_and_errors(tiny_build, tmp_path):
    ok = run_cli("attack", str(tiny_build), "--on", "hw", "--attacks", "transfer-pgd", "--eps", "4",
                 "--n", "8", "--pgd-steps", "2", "--quiet")  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    # a run directory without a FINN build
    bare = tmp_path / "bare"
    train(TrainConfig(model="tiny", epochs=1, train_subset=128, test_subset=32, batch_size=64), bare, progress=False)
    assert_one_line_error(run_cli_here("attack", str(bare), "--on", "hw", "--n", "4"), "no FINN build", "hw-dq build")
    # a build folder whose FINN model is gone
    broken = tmp_path / "broken"
    import shutil

    shutil.copytree(tiny_build, broken)
    (broken / "build" / "Pynq-Z1" / "dataflow_model.onnx").unlink()
    assert_one_line_error(run_cli_here("attack", str(broken), "--on", "hw", "--n", "4"), "no FINN build")
    assert_one_line_error(
        run_cli_here("attack", str(tiny_build), "--on", "hw", "--attacks", "fgsm", "--n", "4"), "on the accelerator"
    )
    # every flag is honoured or refused in one line
    assert_one_line_error(run_cli_here("attack", str(tiny_build), "--on", "hw", "--defense", "bits:4"), "--defense")
    # the default name never overwrites: a second run gets robustness-hw-2; an explicit taken name needs --force
    assert (tiny_build / "attacks" / "robustness-hw.json").is_file()
    assert_one_line_error(
        run_cli_here("attack", str(tiny_build), "--on", "hw", "--name", "robustness-hw", "--n", "4"), "--force"
    )


def test_find_build_matches_board_names_case_insensitively(tmp_path):
    from hw_dq.errors import HwDqError
    from hw_dq.fpga.hwattack import find_build
    from hw_dq.run import DATAFLOW_MODEL

    build = tmp_path / "run" / "build" / "ZCU104"
    build.mkdir(parents=True)
    (build / DATAFLOW_MODEL).write_bytes(b"")
    assert find_build(tmp_path / "run", "zcu104") == build
    assert find_build(tmp_path / "run", "ZCU104") == build
    with pytest.raises(HwDqError, match="no FINN build .* for board pynq-z1 .builds: ZCU104"):
        find_build(tmp_path / "run", "pynq-z1")


def test_a_build_folder_refuses_another_board(tmp_path):
    """A build folder given directly: --board must be the board its report names (no report: --board refused)."""
    from hw_dq.errors import HwDqError
    from hw_dq.run import DATAFLOW_MODEL

    build = tmp_path / "build_mine_ZCU104"
    build.mkdir()
    (build / DATAFLOW_MODEL).write_bytes(b"")
    assert find_build(build) == build
    with pytest.raises(HwDqError, match="records no board"):
        find_build(build, "ZCU104")
    (build / "report.json").write_text(json.dumps({"board": {"name": "ZCU104", "finn_board": "ZCU104"}}))
    assert find_build(build, "zcu104") == build == find_build(build, "ZCU104")
    with pytest.raises(HwDqError, match="is for board ZCU104, not Pynq-Z1; drop --board or pass --board ZCU104"):
        find_build(build, "Pynq-Z1")


def test_transfer_autoattack_progress_on_a_terminal_only(tiny_build, tmp_path, monkeypatch):
    """attack --on hw shows the transfer of AutoAttack batch by batch on a terminal (a real process on a
    pseudo-terminal, the real attack); with --quiet on a terminal, or on a pipe, the attack gets no reporter
    and nothing is printed (main() in process, the attack recorded instead of run: its progress wiring is
    what differs between the three, and a second and third full AutoAttack cost CI a minute)."""
    import re

    from hw_dq.fpga import hwattack
    from tests.test_progress import _on_terminal

    args = ("attack", str(tiny_build), "--on", "hw", "--attacks", "transfer-autoattack", "--n", "16",
            "--batch-size", "8", "--no-sanity")  # fmt: skip
    code, err = _on_terminal(*args, "--name", "tty", cwd=tmp_path)
    assert code == 0, err
    lines = [s.strip() for s in re.split(r"[\r\n]", err) if "hw transfer-autoattack @ 8/255" in s and "batch" in s]
    assert lines, err
    assert re.search(r"batch \d+/\d+ \(\d+ images\), running robust acc [\d.]+%, ETA", lines[0]), lines

    given = []

    def recorded(model, sim, x, y, eps, p, seed, batch_size, progress=None):
        given.append(progress)
        return x, {}

    monkeypatch.setattr(hwattack, "hw_transfer_autoattack", recorded)
    for name, tty, extra in (("quiet", True, ("--quiet",)), ("piped", False, ()), ("control", True, ())):
        proc = run_cli_here(*args, "--name", name, *extra, tty=tty)
        assert proc.returncode == 0, proc.stderr
        if name != "control":
            assert "batch" not in proc.stderr and "ETA" not in proc.stderr, proc.stderr
    assert given[0] is None and given[1] is None
    assert given[2] is not None and given[2].on  # the control: on a terminal without --quiet the attack reports


def test_attack_hw_without_the_layer_search_counts_the_same(tiny_build):
    """locate=0 (the robust benchmark's setting) skips the layer search, even where the accelerator and
    the PyTorch model disagree, and scores exactly what the default does."""
    from hw_dq.fpga.hwattack import attack_hw, locate_disagreement

    model, _ = load_model(tiny_build)
    sim = load_simulator(find_build(tiny_build))
    x, y = (t.numpy() for t in load_split("sample", "test").take(16, seed=3).tensors())
    a = attack_hw("square", model, sim, x, y, EPS, seed=0, queries=40, locate=0)
    b = attack_hw("square", model, sim, x, y, EPS, seed=0, queries=40)
    assert a.first_diff_layers == {} and a.robust_mask == b.robust_mask
    assert a.disagreement_adv == b.disagreement_adv
    assert locate_disagreement(model, sim, x[:0]) == []  # an empty batch (locate=0 used to send one) is no error


def test_hsj_is_sound_and_repeatable_from_its_seed(tiny_build):
    """While no image reaches the cap, each HopSkipJump example is its clean image or one the accelerator
    labels otherwise than the clean image; a second run from the same seed on part of the batch gives those
    images the same examples (ART's own start is unseeded: hw_hsj draws it), and another seed moves some image."""
    from hw_dq.fpga.hwattack import hw_hsj
    from hw_dq.robust.attacks import AttackParams

    sim = load_simulator(find_build(tiny_build))
    x, y = (t.numpy() for t in load_split("sample", "test").take(6, seed=5).tensors())
    p = AttackParams(square_queries=200)
    np.random.seed(123)
    mine, par = hw_hsj(None, sim, x, y, EPS / 255, p, 0, 64)
    assert np.random.randint(1 << 30) == np.random.RandomState(123).randint(1 << 30)  # global state restored
    assert par["capped"] == 0 and par["max_iter"] == 2 and par["seed"] == 0
    moved = (mine != x).reshape(len(x), -1).any(1)
    assert moved.sum() >= 2  # the attack did something to check
    # each moved image leaves the accelerator's own clean label (HopSkipJump starts from that label, so an image
    # misclassified clean may move to its true class: the score counts it wrong clean); eps is the cascade's check
    assert (hw_labels(sim, mine[moved]) != hw_labels(sim, x[moved])).all()
    again, _ = hw_hsj(None, sim, x[3:], y[3:], EPS / 255, p, 0, 64)
    assert np.array_equal(again, mine[3:])
    other, _ = hw_hsj(None, sim, x[3:], y[3:], EPS / 255, p, 1, 64)
    assert not np.array_equal(other, mine[3:])


def test_hsj_step_search_that_never_ends_is_capped(tiny_build, monkeypatch):
    """ART's step-size search can halve its step forever on the accelerator's UINT8-rounded labels
    (a run held one image for over 50 minutes). Each image stops at its query cap; it keeps the closest
    misclassified query it made, or its clean image: a stop never invents an example."""
    from art.attacks.evasion import HopSkipJump

    from hw_dq.fpga.hwattack import hw_hsj
    from hw_dq.robust.attacks import AttackParams

    def endless(self, x, y, y_p, **kwargs):
        while True:  # what the step-size search does when the step it halves never succeeds
            self._adversarial_satisfactory(x[None], y_p, 0.0, 1.0)

    monkeypatch.setattr(HopSkipJump, "_perturb", endless)
    sim = load_simulator(find_build(tiny_build))
    x, y = (t.numpy() for t in load_split("sample", "test").take(4, seed=5).tensors())
    calls = []
    real = sim.__class__.__call__
    monkeypatch.setattr(sim.__class__, "__call__", lambda s, a: calls.append(len(a)) or real(s, a))
    adv, par = hw_hsj(None, sim, x, y, EPS / 255, AttackParams(square_queries=100), 0, 64)
    # an image no random start relabels is never attacked (as in ART); every other one hits the cap
    assert par["capped"] >= 2 and par["capped"] + par["no_start"] == 4 and sum(calls) <= 4 * par["query_cap"]
    labels, clean = hw_labels(sim, adv), hw_labels(sim, x)
    for i in range(4):  # either the clean image, or a query the accelerator really labels otherwise
        assert np.array_equal(adv[i], x[i]) or labels[i] != clean[i]
