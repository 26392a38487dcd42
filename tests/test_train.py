from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from hw_dq import run as rd
from hw_dq.errors import CheckpointError, ConfigError
from hw_dq.train import adversarial as adv
from hw_dq.train import loop
from hw_dq.train.loop import TrainConfig, train

from .conftest import ROOT, assert_one_line_error, run_cli_here

SMALL = dict(model="tiny", train_subset=256, test_subset=128, batch_size=64, epochs=1, lr=0.05)


@pytest.mark.parametrize(
    "wbits, abits, beta, mode",
    [(None, None, 0.0, "FP"), (2, 2, 0.0, "VQ"), (2, 2, 1e-3, "DQ"), (4, 1, 1e-3, "DQ")],
)
def test_fp_vq_dq_train_and_write_run_dir(tmp_path, wbits, abits, beta, mode):
    cfg = TrainConfig(**SMALL, wbits=wbits, abits=abits, beta=beta)
    assert cfg.mode == mode
    row = train(cfg, tmp_path / "run", progress=False)
    run = tmp_path / "run"
    for f in (
        "config.json",
        "checkpoint.safetensors",
        "model.safetensors",
        "metrics.jsonl",
        "lipschitz.json",
        "lipschitz.md",
    ):
        assert (run / f).is_file(), f
    assert set(row) >= {"loss", "ce", "reg", "train_acc", "test_acc", "mean_op_norm"}
    assert (row["reg"] > 0) == (beta > 0)
    assert row["loss"] == pytest.approx(row["ce"] + row["reg"], rel=1e-5)
    conf = json.loads((run / "config.json").read_text())
    assert conf["mode"] == mode and conf["model"]["wbits"] == wbits
    model, _ = rd.load_model(run)
    assert not model.training


def test_dq_regulariser_reduces_orthogonality_residual(tmp_path):
    base = dict(SMALL, epochs=2, wbits=2, abits=2)
    vq = train(TrainConfig(**base, beta=0.0), tmp_path / "vq", progress=False)
    dq = train(TrainConfig(**base, beta=0.3), tmp_path / "dq", progress=False)
    rv = json.loads((tmp_path / "vq" / "lipschitz.json").read_text())["layers"]
    rq = json.loads((tmp_path / "dq" / "lipschitz.json").read_text())["layers"]
    assert sum(r["ortho_residual"] for r in rq) < 0.5 * sum(r["ortho_residual"] for r in rv)
    assert vq["reg"] == 0 and dq["reg"] > 0


@pytest.mark.parametrize("kind, radius", [("pgd", 1), ("apgd", 1), ("fgsm", 1), ("trades", 1), ("nfgsm", 3)])
def test_adversarial_examples_respect_eps_and_box(kind, radius):
    from hw_dq.data import load_split
    from hw_dq.nn.models import create_model

    recipe = TrainConfig(**SMALL, wbits=2, abits=2, adv_train=kind, adv_eps=8, adv_steps=3).adv
    torch.manual_seed(0)  # the weights must not depend on what ran before in this process
    model = create_model("tiny", 2, 2)
    x, y = load_split("sample", "test").take(32).tensors()
    before = [b.clone() for b in model.buffers()]
    xa = adv.craft(model, x, y, recipe, torch.Generator().manual_seed(0))
    # projected recipes stay in the eps-ball; N-FGSM (noise 2 eps + step eps, no projection) within 3 eps
    assert (xa - x).abs().max() <= radius * 8 / 255 + 1e-6
    assert kind != "nfgsm" or (xa - x).abs().max() > 8 / 255 + 1e-6
    assert xa.min() >= 0 and xa.max() <= 1
    # BatchNorm running statistics are untouched by the attack's forward passes
    assert all(torch.equal(a, b) for a, b in zip(before, model.buffers(), strict=True))
    # the examples are adversarial: the loss the recipe maximises went up (TRADES maximises the KL divergence
    # from the clean prediction, not the cross-entropy: twice what a random corner of the eps-ball gives)
    F = torch.nn.functional  # noqa: N806
    with torch.no_grad():
        if kind == "trades":
            corner = x + (torch.randint(0, 2, x.shape, generator=torch.Generator().manual_seed(1)) * 2 - 1) * 8 / 255
            kl = [
                F.kl_div(F.log_softmax(model(a), 1), F.softmax(model(x), 1), reduction="batchmean")
                for a in (xa, corner.clamp(0, 1))
            ]
            assert kl[0] > 2 * kl[1]
        else:
            assert F.cross_entropy(model(xa), y) > F.cross_entropy(model(x), y)


def test_apgd_training_examples_follow_the_run_generator_not_the_global_one():
    from hw_dq.data import load_split
    from hw_dq.nn.models import create_model

    recipe = TrainConfig(**SMALL, wbits=2, abits=2, adv_train="apgd", adv_eps=8, adv_steps=3).adv
    model = create_model("tiny", 2, 2)
    x, y = load_split("sample", "test").take(16).tensors()
    state = torch.get_rng_state()
    a = adv.craft(model, x, y, recipe, torch.Generator().manual_seed(0))
    assert torch.equal(torch.get_rng_state(), state)  # the library's random start did not draw from it
    torch.manual_seed(123)  # another global state: same examples
    assert torch.equal(adv.craft(model, x, y, recipe, torch.Generator().manual_seed(0)), a)
    assert not torch.equal(adv.craft(model, x, y, recipe, torch.Generator().manual_seed(1)), a)


def test_rslad_crafts_against_the_teacher_and_pulls_the_student_towards_it(tmp_path):
    from hw_dq.data import load_split

    base = dict(SMALL, adv_eps=8, adv_steps=3, robust_eval_n=0)
    train(TrainConfig(**base), tmp_path / "teacher", progress=False)
    teacher, _ = rd.load_model(tmp_path / "teacher")
    x, y = load_split("sample", "test").take(64).tensors()
    with torch.no_grad():
        soft = torch.softmax(teacher(x), 1)
    # the examples stay in the eps-ball and raise the student's divergence from the teacher's soft labels
    student = TrainConfig(**base, wbits=2, abits=2, adv_train="rslad", teacher=str(tmp_path / "teacher"))
    model, _ = rd.load_model(tmp_path / "teacher")
    model.train()
    xa = adv.craft(model, x, y, student.adv, torch.Generator().manual_seed(0), soft=soft)
    assert (xa - x).abs().max() <= 8 / 255 + 1e-6 and xa.min() >= 0 and xa.max() <= 1
    with torch.no_grad():
        assert adv._kl(model(xa), soft).mean() > adv._kl(model(x), soft).mean()
    with pytest.raises(ValueError, match="teacher"):
        adv.adversarial_loss(model, x, y, student.adv, torch.Generator())

    # descending on the loss pulls a quantized student towards the teacher's soft labels, clean and attacked
    from hw_dq.nn.models import create_model

    torch.manual_seed(0)
    pupil = create_model("tiny", 2, 2)
    pupil.train()
    opt = torch.optim.Adam(pupil.parameters(), lr=0.001)  # SGD at 0.01-0.05 oscillates on a 2-bit student
    gen = torch.Generator().manual_seed(0)

    def gap() -> float:
        with torch.no_grad():
            return float(adv._kl(pupil(x), soft).mean())

    before = gap()
    for _ in range(40):
        loss, _ = adv.adversarial_loss(pupil, x, y, student.adv, gen, teacher=teacher)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert gap() < 0.25 * before, (before, gap())  # measured: 0.40 -> 0.03, 0.47 -> 0.02 (two machines' teachers)


def test_rslad_run_passes_its_frozen_teacher_to_every_step(tmp_path, monkeypatch):
    train(TrainConfig(**SMALL), tmp_path / "teacher", progress=False)
    seen = []
    real = adv.adversarial_loss
    monkeypatch.setattr(
        adv, "adversarial_loss", lambda *a, **k: seen.append(a[7] if len(a) > 7 else k.get("teacher")) or real(*a, **k)
    )
    cfg = TrainConfig(**SMALL, wbits=2, abits=2, adv_train="rslad", adv_steps=2, robust_eval_n=64,
                      teacher=str(tmp_path / "teacher"), init_from=str(tmp_path / "teacher"))  # fmt: skip
    train(cfg, tmp_path / "student", progress=False)
    assert len(seen) == (256 - 64) // 64
    t = seen[0]
    assert all(m is t for m in seen) and not t.training and not any(p.requires_grad for p in t.parameters())
    stored = json.loads((tmp_path / "student" / "config.json").read_text())["train"]
    assert stored["teacher"] == str(tmp_path / "teacher")


def test_adversarial_training_runs_the_attack_and_keeps_the_best_robust_epoch(tmp_path, monkeypatch):
    calls = []
    real = adv.craft
    monkeypatch.setattr(adv, "craft", lambda *a, **k: calls.append(a[3].kind) or real(*a, **k))
    base = dict(SMALL, epochs=2, wbits=2, abits=2, robust_eval_n=64)
    row = train(TrainConfig(**base, adv_train="nfgsm"), tmp_path / "at", progress=False)
    steps = (256 - 64) // 64
    assert calls == ["nfgsm"] * (2 * steps)  # one crafted batch per training step, and only for the robust run
    rows = rd.read_jsonl(tmp_path / "at" / "metrics.jsonl")
    assert all("holdout_pgd_acc" in r and "collapse" in r for r in rows)
    assert row["holdout_pgd_acc"] <= 1.0
    best = max(range(2), key=lambda i: (rows[i]["holdout_pgd_acc"], -i))
    kept = load_file(tmp_path / "at" / "model.safetensors")
    ref = load_file(tmp_path / "at" / "best_robust.safetensors")
    assert all(torch.equal(kept[k], ref[k]) for k in ref), f"model.safetensors is not the best epoch ({best})"
    # the same seed without the attack trains to other weights
    train(TrainConfig(**base), tmp_path / "clean", progress=False)
    assert "holdout_pgd_acc" not in rd.read_jsonl(tmp_path / "clean" / "metrics.jsonl")[0]
    other = load_file(tmp_path / "clean" / "model.safetensors")
    assert any(not torch.equal(other[k], kept[k]) for k in kept if k.endswith("weight"))


def test_ibp_run_keeps_the_epoch_with_the_best_held_out_certificate(tmp_path):
    """Certified training chooses its kept epoch by what IBP certifies on the held-out images (a sound
    bound, the quantity it optimises), not by PGD; the figure logged is the bound's own."""
    from hw_dq.data import to_float
    from hw_dq.nn.ibp import certified_fraction

    cfg = TrainConfig(**dict(SMALL, epochs=3, wbits=2, abits=2, robust_eval_n=64), adv_train="ibp", adv_eps=2.0)
    assert loop.selection_key(cfg) == "holdout_certified_acc"
    assert loop.selection_key(TrainConfig(**SMALL, adv_train="pgd")) == "holdout_pgd_acc"
    train(cfg, tmp_path / "ibp", progress=False)
    rows = rd.read_jsonl(tmp_path / "ibp" / "metrics.jsonl")
    certs = [r["holdout_certified_acc"] for r in rows]
    assert all("holdout_pgd_acc" in r for r in rows)
    _, meta = rd.load_tensors(tmp_path / "ibp" / "best_robust.safetensors")
    best = max(range(3), key=lambda i: (certs[i], -i))
    assert int(meta["epoch"]) == best and meta["holdout_certified_acc"] == certs[best]
    # the logged figure is IBP's certificate of the kept weights on the held-out images
    model, _ = rd.load_model(tmp_path / "ibp", device="cpu")
    held = loop._load_data(cfg).holdout
    x, y = to_float(torch.from_numpy(held.x)), torch.from_numpy(held.y).long()
    assert certified_fraction(model, x, y, 2.0 / 255) == pytest.approx(certs[best], abs=1e-9)


def test_collapse_is_detected_from_the_held_out_curve():
    assert adv.collapsed([0.30, 0.35], 0.05)
    assert not adv.collapsed([0.30, 0.35], 0.30)
    assert not adv.collapsed([0.01, 0.02], 0.0)  # noise near zero is not a collapse


def test_channels_and_classes_come_from_the_data(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 256), ("test", 64)):
        x = rng.integers(0, 256, (n, 32, 32, 1), dtype=np.uint8)
        y = rng.integers(0, 100, n)
        np.savez_compressed(tmp_path / f"{split}.npz", x=x, y=y)
    cfg = TrainConfig(**{**SMALL, "test_subset": None}, data="npz", data_dir=str(tmp_path))
    train(cfg, tmp_path / "r", progress=False)
    conf = json.loads((tmp_path / "r" / "config.json").read_text())
    assert conf["model"]["in_channels"] == 1 and conf["model"]["num_classes"] == 100
    model, _ = rd.load_model(tmp_path / "r")
    assert model(torch.rand(2, 1, 32, 32)).shape == (2, 100)


def test_init_from_another_architecture_is_refused(tmp_path):
    train(TrainConfig(**SMALL, width=0.5), tmp_path / "src", progress=False)
    with pytest.raises(ConfigError, match="different architecture"):
        train(TrainConfig(**SMALL, init_from=str(tmp_path / "src")), tmp_path / "r", progress=False)


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--adv-train", "pgd", "--adv-eps", "0"], "--adv-eps"),
        (["--adv-train", "pgd", "--adv-eps", "nan"], "not finite"),
        (["--adv-train", "pgd", "--adv-steps", "0"], "--adv-steps"),
        (["--adv-train", "trades", "--trades-beta", "-1"], "--trades-beta"),
        (["--act-margin", "-1", "--abits", "2"], "--act-margin"),
        (["--act-margin", "inf", "--abits", "2"], "not finite"),
        (["--act-margin", "0.1", "--wbits", "float", "--abits", "float"], "needs --abits"),
        (["--act-noise", "1.5", "--abits", "2"], "--act-noise"),
        (["--act-noise", "0.5", "--wbits", "float", "--abits", "float"], "needs --abits"),
        (["--adv-train", "mart"], "invalid choice"),
        (["--lipschitz-project", "2", "--lipschitz-norm", "1"], "invalid choice"),
        (["--adv-train", "ibp", "--ibp-reg", "-1"], "--ibp-reg"),
        (["--adv-train", "pgd", "--ibp-reg", "0.5"], "--adv-train ibp"),
        (["--adv-train", "ibp", "--ibp-init", "--init-from", "x"], "--ibp-init"),
        (["--adv-train", "ibp", "--ibp-warmup", "0.6", "--ibp-ramp", "0.6"], "invalid IBP ramp"),
        (["--adv-train", "ibp", "--ibp-ramp", "0"], "invalid IBP ramp"),
        (["--adv-train", "ibp", "--ibp-schedule", "cubic"], "invalid choice"),
        (["--adv-train", "pgd", "--ibp-relax-input"], "--adv-train ibp"),
        (["--adv-train", "pgd", "--ibp-relu-grad"], "--adv-train ibp"),
        (["--optimizer", "lbfgs"], "invalid choice"),
        (["--adv-train", "rslad"], "--teacher"),
        (["--adv-train", "pgd", "--teacher", "x"], "--adv-train rslad"),
        (["--adv-train", "rslad", "--teacher", "no-such-run"], "not a finished training run"),
    ],
)
def test_bad_adversarial_recipe_is_one_line(tmp_path, flags, needle):
    proc = run_cli_here("train", "--model", "tiny", "--out", str(tmp_path / "r"), *flags)
    assert_one_line_error(proc, needle)
    assert not (tmp_path / "r").exists()


def test_existing_run_needs_resume(tmp_path):
    train(TrainConfig(**SMALL), tmp_path / "r", progress=False)
    with pytest.raises(ConfigError, match="--resume"):
        train(TrainConfig(**SMALL), tmp_path / "r", progress=False)
    # resuming a finished run is a no-op that returns its last metrics
    assert train(TrainConfig(**SMALL), tmp_path / "r", resume=True, progress=False)["epoch"] == 0


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    train(TrainConfig(**SMALL), tmp_path / "r", progress=False)
    (tmp_path / "r" / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="corrupt or not a safetensors"):
        rd.load_model(tmp_path / "r")


def test_config_validation():
    with pytest.raises(ConfigError, match="beta"):
        TrainConfig(beta=-1)
    with pytest.raises(ConfigError, match="unknown config key"):
        TrainConfig.from_dict({"modle": "cnv"})


def _train_cmd(out, *extra):
    return [
        sys.executable, "-m", "hw_dq.cli", "train", "--model", "tiny", "--wbits", "2", "--abits", "2",
        "--beta", "1e-3", "--epochs", "3", "--batch-size", "32", "--train-subset", "512",
        "--test-subset", "64", "--checkpoint-every", "4", "--seed", "3", "--quiet", "--out", str(out), *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("opt", [[], ["--optimizer", "adam", "--lr", "0.002"]], ids=["sgd", "adam"])
def test_killed_run_resumes_to_identical_weights(tmp_path, opt):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref = subprocess.run(_train_cmd(tmp_path / "ref", *opt), env=env, capture_output=True, text=True, cwd=ROOT)
    assert ref.returncode == 0, ref.stderr
    victim = tmp_path / "victim"
    proc = subprocess.Popen(_train_cmd(victim, *opt), env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    ckpt = victim / "checkpoint.safetensors"
    deadline = time.time() + 120
    while time.time() < deadline:  # wait for a mid-training checkpoint (epoch 1 or later)
        if ckpt.is_file():
            try:
                _, meta = rd.load_tensors(ckpt)
                if meta["epoch"] >= 1 and not meta["done"]:
                    break
            except CheckpointError:
                pass
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (victim / "model.safetensors").exists(), "the run finished before it could be killed"
    res = subprocess.run(_train_cmd(victim, "--resume", *opt), env=env, capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    a, b = load_file(str(tmp_path / "ref" / "model.safetensors")), load_file(str(victim / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    rows = rd.read_jsonl(victim / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [0, 1, 2]


def test_ddp_two_cpu_processes_identical_weights(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517",
        str(ROOT / "tests" / "ddp_worker.py"), str(tmp_path),
    ]  # fmt: skip
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    w0, w1 = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    assert w0.keys() == w1.keys()
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    # the run directory is written once (by rank 0) and is complete
    assert (tmp_path / "run" / "model.safetensors").is_file()
    assert len(rd.read_jsonl(tmp_path / "run" / "metrics.jsonl")) == 2


def test_divergence_is_a_clear_error_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    real = loop.lr_at
    # a sane first epoch, then a learning rate that blows the second one up
    monkeypatch.setattr(loop, "lr_at", lambda cfg, step, spe: real(cfg, step, spe) if step < spe else float("inf"))
    cfg = TrainConfig(**{**SMALL, "epochs": 2}, wbits=None, abits=None)
    with pytest.raises(ConfigError, match="training diverged.*checkpoint .* is intact"):
        train(cfg, tmp_path / "r", progress=False)
    tensors, meta = rd.load_tensors(tmp_path / "r" / "checkpoint.safetensors")
    assert meta["epoch"] == 1 and not meta["done"]
    assert all(torch.isfinite(v).all() for v in tensors.values() if v.is_floating_point())
    monkeypatch.setattr(loop, "lr_at", real)  # the intact checkpoint resumes to the end
    assert train(cfg, tmp_path / "r", resume=True, progress=False)["epoch"] == 1


def test_run_from_other_quantizer_scheme_is_refused(tmp_path):
    train(TrainConfig(**SMALL), tmp_path / "r", progress=False)
    conf = json.loads((tmp_path / "r" / "config.json").read_text())
    conf["quant_scheme"] = "some-other-quantizers/9"
    (tmp_path / "r" / "config.json").write_text(json.dumps(conf))
    with pytest.raises(CheckpointError, match="trained with quantizers"):
        rd.load_model(tmp_path / "r")


def test_ibp_recipe_ramps_from_clean_to_the_interval_worst_case():
    from hw_dq.data import load_split
    from hw_dq.nn.models import create_model

    recipe = TrainConfig(**SMALL, wbits=2, abits=2, adv_train="ibp", adv_eps=2).adv
    model = create_model("tiny", 2, 2, act_range="fixed")
    x, y = load_split("sample", "test").take(32).tensors()
    gen = torch.Generator().manual_seed(0)
    loss0, logits = adv.adversarial_loss(model, x, y, recipe, gen, step=0, total=100)
    clean = torch.nn.functional.cross_entropy(logits, y)
    assert torch.allclose(loss0, clean)  # warm-up: eps 0, the clean loss alone
    loss1, logits = adv.adversarial_loss(model, x, y, recipe, gen, step=100, total=100)
    clean = torch.nn.functional.cross_entropy(logits, y)
    assert loss1 > clean + 1e-3  # ramped: the interval worst case raises the loss above the clean one
    # the ramp's fractions and shape reach the step: a longer warm-up is still clean at step 40, the
    # default one is not; the smooth ramp's worst case at the same step is milder than the linear one
    kw = dict(**SMALL, wbits=2, abits=2, adv_train="ibp", adv_eps=16)
    late = TrainConfig(**kw, ibp_warmup=0.5).adv
    smooth = TrainConfig(**kw, ibp_schedule="smooth").adv
    losses = {}
    for name, r in (("late", late), ("linear", TrainConfig(**kw).adv), ("smooth", smooth)):
        loss, logits = adv.adversarial_loss(model.train(), x, y, r, gen, step=40, total=100)
        losses[name] = float(loss - torch.nn.functional.cross_entropy(logits, y))
    assert losses["late"] == pytest.approx(0.0, abs=1e-6) and losses["linear"] > losses["smooth"] > 0
