"""Bit flips in a FINN build's memories: exact against FINN's execution, random and targeted modes, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hw_dq.data import load_split
from hw_dq.fpga.bfa import bit_flip_attack, match_twin, random_weight_flips
from hw_dq.fpga.build import build_run
from hw_dq.fpga.faults import FaultError, FaultyBuild, finn_execute, flip_values, from_code, predict, to_code
from hw_dq.fpga.faults_results import evaluate_faults, plot_faults, tabulate_faults
from hw_dq.fpga.hwattack import uint8_grid
from hw_dq.fpga.upsets import random_faults
from hw_dq.run import load_model
from hw_dq.train.loop import TrainConfig, train
from tests.conftest import assert_one_line_error, run_cli, run_cli_here

COMMON = dict(model="tiny", test_subset=64, batch_size=64)
N_FINN = 12  # images through FINN's (slow, one image at a time) execution per comparison


@pytest.fixture(scope="module")
def fp_run(tmp_path_factory) -> Path:
    """Full precision first: the low-bit runs fine-tuned from it are trained (QAT from scratch on this
    little data leaves the tiny nets at chance, where the targeted-vs-random inequality means nothing)."""
    run = tmp_path_factory.mktemp("faults") / "fp"
    train(TrainConfig(**COMMON, train_subset=2048, wbits=None, abits=None, epochs=2, lr=0.05), run, progress=False)
    return run


@pytest.fixture(scope="module", params=[(2, 2, 1024), (1, 1, 256)], ids=["w2a2", "w1a1"])
def build(request, fp_run, tmp_path_factory) -> Path:
    """w2a2 fine-tuned from the FP run (trained: the targeted/random inequality runs on it); w1a1 a few
    steps from scratch (fine-tuning 1-bit activations from this FP run can diverge; the FINN
    equivalence checks only need a live network, which they assert)."""
    wbits, abits, subset = request.param  # fine-tuning needs less data than the FP run
    run = tmp_path_factory.mktemp("faults") / f"tiny_w{wbits}a{abits}"
    init = str(fp_run) if wbits > 1 else None
    cfg = TrainConfig(**COMMON, train_subset=subset, wbits=wbits, abits=abits, epochs=1, lr=0.01, init_from=init)
    train(cfg, run, progress=False)
    build_run(run, "Pynq-Z1", target_fps=1000)
    return run


@pytest.fixture(scope="module")
def images() -> tuple[np.ndarray, np.ndarray]:
    x, y = load_split("sample", "test").take(200, seed=1).tensors()
    return uint8_grid(x.numpy()), y.numpy()


def _fb(run: Path) -> FaultyBuild:
    return FaultyBuild(run / "build" / "Pynq-Z1")


# ------------------------------------------------------------------ the stored words
def test_codes_are_twos_complement_and_flips_xor():
    from qonnx.core.datatype import DataType

    i2, b, u3 = DataType["INT2"], DataType["BIPOLAR"], DataType["UINT3"]
    v = np.array([-1.0, 0.0, 1.0], np.float32)  # narrow-range 2-bit weights
    assert to_code(v, i2).tolist() == [3, 0, 1]
    assert np.array_equal(from_code(to_code(v, i2), i2), v)
    # flipping the sign bit of 0 gives -2 = -2^(k-1): outside narrow range, held by the memory
    assert flip_values(v, np.array([1]), np.array([1]), i2).tolist() == [-1.0, -2.0, 1.0]
    assert flip_values(v, np.array([0]), np.array([1]), i2).tolist() == [1.0, 0.0, 1.0]  # 11 -> 01
    # a repeated flip of the same bit cancels; two bits of one value both flip
    assert flip_values(v, np.array([2, 2]), np.array([0, 0]), i2).tolist() == v.tolist()
    assert flip_values(np.array([5.0]), np.array([0, 0]), np.array([0, 2]), u3).tolist() == [0.0]
    assert flip_values(np.array([-1.0, 1.0]), np.array([0, 1]), np.array([0, 0]), b).tolist() == [1.0, -1.0]


def test_memory_layout_is_finns_folding(build):
    """PE / SIMD lane / word of every weight and threshold, as FINN's own packing places them."""
    from hw_dq.fpga import finn_compat

    finn_compat.prepare_finn()
    from qonnx.custom_op.registry import getCustomOp

    fb = _fb(build)
    nodes = {n.name: n for n in fb.model.graph.node}
    checked = 0
    for m in fb.memories:
        if m.kind == "activations" or not nodes[m.node].op_type.startswith("MVAU"):
            continue
        op = getCustomOp(nodes[m.node])
        idx = np.arange(m.count, dtype=np.float64).reshape(m.shape)
        if m.kind == "weights":
            packed = op.get_hw_compatible_weight_tensor(idx)
            for i in np.random.default_rng(0).choice(m.count, 50):
                loc = m.locate(int(i))
                want = (i + 1) / 2 if m.dtype == "BIPOLAR" else i  # FINN maps bipolar {-1, 1} to bits first
                # FINN reverses the SIMD axis when it packs a word: lane 0 is the last column
                assert packed[0, loc["pe"], loc["word"], m.simd - 1 - loc["simd_lane"]] == want
        else:
            packed = op.get_hw_compatible_threshold_tensor(idx)
            for i in range(m.count):
                loc = m.locate(i)
                assert packed[0, loc["pe"], loc["word"], loc["threshold"]] == i
        checked += 1
    assert checked >= 2


# ------------------------------------------------------------------ exact against FINN
@pytest.mark.parametrize("kind", ["weights", "thresholds"])
def test_flip_on_simulator_equals_finn_execution(build, images, kind):
    from qonnx.core.datatype import DataType

    fb = _fb(build)
    x = images[0][:N_FINN]
    clean = fb.clean(x).numpy().reshape(len(x), -1)
    rng = np.random.default_rng(7)
    mems = [m for m in fb.memories if m.kind == kind]
    edits = {}
    for m in mems[:2]:  # the first two layers' memories: upsets there reach the output
        k = 40 if kind == "weights" else 6
        idx = rng.choice(m.count, k, replace=False)
        bit = rng.integers(0, m.bits, k)
        if kind == "thresholds":
            bit[:] = m.bits - 2  # large threshold moves, so that the outputs do change
        edits[m.tensor] = flip_values(fb.values(m), idx, bit, DataType[m.dtype])
        assert (edits[m.tensor] != fb.values(m)).sum() == k
    got = fb.simulator(edits)(x).numpy().reshape(len(x), -1)
    ref = finn_execute(fb.build, edits, x).reshape(len(x), -1)
    assert np.array_equal(got, ref), f"{int((got != ref).any(1).sum())} of {len(x)} images differ from FINN"
    # the in-place path (edited constants and recompiled steps of the loaded simulator) is the same accelerator
    with fb.edited(edits) as sim:
        assert sim is fb.clean
        assert np.array_equal(sim(x).numpy().reshape(len(x), -1), ref)
    assert (got != clean).any(1).sum() >= 2, "the flips changed nothing: the comparison would be vacuous"
    assert np.array_equal(fb.clean(x).numpy().reshape(len(x), -1), clean), "the clean build was altered"


def test_in_place_edit_falls_back_to_reloading_and_restores(build, images, monkeypatch):
    """An edit the fused path cannot take (here: _fused_conv refusing, as for a too-wide accumulator) is run on
    a re-loaded model; either way the loaded simulator is the clean one again afterwards."""
    from qonnx.core.datatype import DataType

    if "w2a2" not in build.name:
        pytest.skip("one bit width is enough")
    fb = _fb(build)
    x = images[0][:16]
    clean = fb.clean(x).numpy()
    fused = [st for st in fb.clean.steps if len(st.nodes) == 2]
    assert fused, "the tiny CNN's convolutions run fused: nothing to fall back from otherwise"
    m = next(mm for mm in fb.memories if mm.kind == "weights" and mm.tensor == fused[0].nodes[1].input[1])
    edits = {m.tensor: flip_values(fb.values(m), np.arange(30), np.full(30, m.bits - 1), DataType[m.dtype])}
    want = fb.simulator(edits)(x).numpy()
    assert not np.array_equal(want, clean)
    with fb.edited(edits) as sim:
        assert sim is fb.clean and np.array_equal(sim(x).numpy(), want)
    monkeypatch.setattr(fb.clean, "_fused_conv", lambda *args: None)
    with fb.edited(edits) as sim:
        assert sim is not fb.clean and np.array_equal(sim(x).numpy(), want)
    monkeypatch.undo()
    assert np.array_equal(fb.clean(x).numpy(), clean)


# ------------------------------------------------------------------ random mode
def test_rate_zero_is_clean_and_upsets_hurt(build, images):
    if "w2a2" not in build.name:
        pytest.skip("one bit width is enough")
    x, y = images[0][:100], images[1][:100]
    fb = _fb(build)
    clean = float((predict(fb.clean, x) == y).mean())
    mems = fb.select(("weights", "thresholds", "activations"))
    res = random_faults(fb, mems, [0.0, 0.05], x, y, trials=3, seed=0)
    assert res[0].accs == [clean] * 3 and res[0].acc_mean == clean and res[0].ci95 == 0.0
    assert res[0].mean_flips_memory == 0 and res[0].mean_flips_activation_per_image == 0
    hit = res[1]
    assert hit.mean_flips_memory > 0.5 * hit.expected_flips_memory
    assert hit.mean_flips_activation_per_image > 0.5 * hit.expected_flips_activation_per_image
    assert hit.acc_mean < clean - 0.05, (hit.acc_mean, clean)
    # activation upsets alone are transient: the next clean run is the clean accuracy again
    acts = fb.select(("activations",))
    assert random_faults(fb, acts, [0.05], x, y, trials=1)[0].acc_mean < clean
    assert float((predict(fb.clean, x) == y).mean()) == clean


# ------------------------------------------------------------------ targeted mode
def test_twin_integer_weights_equal_the_build(build):
    model, _ = load_model(build)
    twin = match_twin(model, _fb(build))
    assert len(twin) == 3
    for t in twin:  # the memory index map sends each PyTorch weight to its stored value
        stored = _fb(build).values(t.mem).reshape(-1)[t.to_mem]
        sign = t.sign.expand_as(t.w_int).reshape(-1).numpy()
        assert np.array_equal(stored, sign * t.w_int.detach().reshape(-1).numpy())


def test_targeted_flips_beat_random_flips(build, images):
    if "w2a2" not in build.name:
        pytest.skip("the inequality needs the trained model")
    x, y = images
    fb = _fb(build)
    model, _ = load_model(build)
    xa, ya = load_split("sample", "train").take(64, seed=0).tensors()
    k = 4
    out = bit_flip_attack(fb, model, xa.numpy(), ya.numpy(), x, y, k)
    curve = [c["acc"] for c in out["curve"]]
    base = random_weight_flips(fb, x, y, k, trials=3)
    base_final = float(np.mean([b[-1] for b in base]))
    assert out["clean_acc"] > 0.2, "the model is not trained: the comparison would be vacuous"
    assert curve[-1] < base_final - 0.05, (curve, base)
    assert curve[-1] < out["clean_acc"] - 0.05
    # each reported flip is where it landed: the stored value at that index, that bit flipped
    from qonnx.core.datatype import DataType

    c = out["curve"][0]
    mem = next(m for m in fb.memories if m.node == c["node"] and m.kind == "weights")
    assert fb.values(mem).reshape(-1)[c["index"]] == c["old"]
    dt = DataType[mem.dtype]
    assert flip_values(np.array([c["old"]]), np.array([0]), np.array([c["bit"]]), dt)[0] == c["new"]
    loc = mem.locate(c["index"])
    assert (c["pe"], c["simd_lane"], c["word"]) == (loc["pe"], loc["simd_lane"], loc["word"])
    # the twin is left as it was: no hook stays, its logits are the freshly loaded model's
    fresh, _ = load_model(build)
    xs = torch.from_numpy(xa.numpy()[:8])
    with torch.no_grad():
        assert torch.equal(model(xs), fresh(xs))


# ------------------------------------------------------------------ CLI, results, errors
def test_cli_results_plot_and_errors(build, tmp_path):
    if "w2a2" not in build.name:
        pytest.skip("one bit width is enough")
    ok = run_cli("faults", str(build), "--rate", "0,1e-3", "--trials", "2", "--n", "32", "--target", "all", "--quiet")
    assert ok.returncode == 0, ok.stderr
    saved = json.loads((build / "faults" / "faults-random-all.json").read_text())
    assert saved["target"] == "hw-faults" and saved["n_examples"] == 32
    assert saved["provenance"]["seed"] == 0 and saved["provenance"]["libraries"]["finn-plus"]
    assert saved["random"]["rates"][0]["acc_mean"] == saved["clean_acc"]
    assert saved["stored_bits"]["weights"] == sum(r["weights"] for r in saved["memories"]) > 0
    from hw_dq.robust import results as res

    res.validate(saved)  # the results family's schema
    tgt = evaluate_faults(build, mode="targeted", flips=2, n=32, attack_n=32, baseline_trials=1)
    assert len(tgt["targeted"]["curve"]) == 2 and (build / "faults" / "faults-targeted.md").is_file()
    # hw-dq results: fault results get their own table (not labelled as a PyTorch attack result)
    shown = run_cli("results", str(build / "faults"))
    assert shown.returncode == 0, shown.stderr
    rows = [line for line in shown.stdout.splitlines() if "FPGA sim (bit flips)" in line]
    assert len(rows) == 2 and "PyTorch" not in shown.stdout, shown.stdout
    rand = next(line for line in rows if "random upsets in all" in line)
    assert f"| {100 * saved['clean_acc']:.2f} |" in rand and "32 images x 2 trials per rate" in rand
    assert f"0.001: {100 * saved['random']['rates'][1]['acc_mean']:.2f}" in rand
    t = tgt["targeted"]
    assert any(f"after 2 flips {100 * t['curve'][-1]['acc']:.2f}%" in line for line in rows)
    png = plot_faults([build, build], tmp_path / "f.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert_one_line_error(run_cli_here("faults", str(build), "--rate", "1.5"), "invalid rate", "[0, 1]")
    assert_one_line_error(run_cli_here("faults", str(build), "--mode", "targeted", "--flips", "0"), "--flips 0")
    # the classifier (layer 2) has no thresholds
    assert_one_line_error(
        run_cli_here("faults", str(build), "--rate", "1e-3", "--target", "thresholds", "--layer", "2"), "no thresholds"
    )
    bare = tmp_path / "bare"  # a run directory that was never built
    bare.mkdir()
    (bare / "config.json").write_text((build / "config.json").read_text())
    assert_one_line_error(run_cli_here("faults", str(bare), "--rate", "1e-3"), "no FINN build", "hw-dq build")


def test_random_faults_on_a_bare_qonnx_build(build, images, tmp_path):
    """A user's own QONNX built with ``build --onnx`` (no hw-dq run): random mode works, targeted is one line."""
    if "w2a2" not in build.name:
        pytest.skip("one bit width is enough")
    import shutil

    onnx = tmp_path / "mine.onnx"
    shutil.copyfile(build / "export" / "qonnx.onnx", onnx)
    build_run(onnx, "Pynq-Z1", target_fps=1000)  # what 'hw-dq build --onnx mine.onnx --board Pynq-Z1' runs
    bare = tmp_path / "build_mine_Pynq-Z1"
    assert not (bare / "config.json").exists()
    ok = run_cli("faults", str(bare), "--rate", "0,0.05", "--trials", "2", "--n", "32", "--target", "all", "--quiet")
    assert ok.returncode == 0, ok.stderr
    saved = json.loads((bare / "faults" / "faults-random-all.json").read_text())
    # the same QONNX gives the same accelerator as the run's own build: same outputs, same clean accuracy
    x, y = (t.numpy() for t in load_split("sample", "test").take(32, seed=0).tensors())
    xu = uint8_grid(x)
    assert np.array_equal(_fb(build).clean(xu).numpy(), FaultyBuild(bare).clean(xu).numpy())
    assert saved["clean_acc"] == float((predict(_fb(build).clean, xu) == y).mean())
    assert saved["model"] == "qonnx:build_mine_Pynq-Z1" and (saved["wbits"], saved["abits"]) == (2, 2)
    rates = saved["random"]["rates"]
    assert rates[0]["acc_mean"] == saved["clean_acc"] and rates[1]["mean_flips_memory"] > 0
    from hw_dq.robust import results as res

    res.validate(saved)
    assert "| qonnx:build_mine_Pynq-Z1 | VQ | w2a2 | ? | unknown |" in tabulate_faults([saved])
    assert_one_line_error(run_cli_here("faults", str(bare), "--mode", "targeted"), "no PyTorch model", "--mode random")


def test_bad_requests_raise_fault_errors(build, images):
    if "w2a2" not in build.name:
        pytest.skip("one bit width is enough")
    fb = _fb(build)
    x, y = images
    with pytest.raises(FaultError, match="probability in"):
        random_faults(fb, fb.select(("weights",)), [-0.1], x, y, trials=1)
    with pytest.raises(FaultError, match="probability in"):
        evaluate_faults(build, rates=[float("nan")])
    with pytest.raises(FaultError, match="layer 7 does not exist"):
        fb.select(("weights",), [7])
    with pytest.raises(FaultError, match="at least 1 flip"):
        bit_flip_attack(fb, load_model(build)[0], x[:2] / 255.0, y[:2], x, y, 0)
