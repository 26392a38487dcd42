"""Interval certification is sound, on the accelerator and on the PyTorch model: no point or attack escapes it."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from qonnx.core.datatype import DataType
from qonnx.core.modelwrapper import ModelWrapper

from hw_dq.data import load_split
from hw_dq.fpga.build import build_run
from hw_dq.fpga.certify import CertifyError, IntervalCertifier
from hw_dq.fpga.hwattack import craft, find_build, load_simulator, uint8_grid
from hw_dq.fpga.sim import HwSimulator
from hw_dq.robust.attacks import craft as craft_sw
from hw_dq.robust.certified import certify_model
from hw_dq.run import load_model
from hw_dq.train.loop import TrainConfig, train
from tests.conftest import assert_one_line_error, run_cli, run_cli_here

N = 200
COMMON = dict(model="tiny", train_subset=4000, test_subset=200, batch_size=64)


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory) -> Path:
    """A w2a2 tiny model fine-tuned from a short float run (from scratch it stays near chance,
    which would leave almost nothing to certify), built through FINN for the Pynq-Z1."""
    root = tmp_path_factory.mktemp("cert")
    train(TrainConfig(**COMMON, wbits=None, abits=None, epochs=3, lr=0.05), root / "fp", progress=False)
    run = root / "w2a2"
    train(TrainConfig(**COMMON, wbits=2, abits=2, epochs=2, lr=0.01, init_from=str(root / "fp")), run, progress=False)
    build_run(run, "Pynq-Z1", target_fps=1000)
    return run


@pytest.fixture(scope="module")
def setup(tiny_build):
    sim = load_simulator(find_build(tiny_build))
    x, y = (t.numpy() for t in load_split("sample", "test").take(N, seed=1).tensors())
    return sim, IntervalCertifier(sim), uint8_grid(x), y


def _labels(sim: HwSimulator, xu: np.ndarray) -> np.ndarray:
    return sim(xu.astype(np.float32)).numpy().reshape(len(xu), -1).argmax(1)


def test_eps0_certifies_exactly_the_correct_images(setup):
    sim, cert, xu, y = setup
    correct = _labels(sim, xu) == y
    assert correct.sum() >= 40, "the fixture model should classify a fair share correctly"
    assert np.array_equal(cert.certify(xu, y, 0).certified, correct)


def test_certified_sets_shrink_with_eps_and_differences_help(setup):
    _, cert, xu, y = setup
    sets = [cert.certify(xu, y, e).certified for e in (0, 1, 2, 4)]
    for big, small in zip(sets, sets[1:], strict=False):
        assert not (small & ~big).any(), "a larger box certified an image a smaller one did not"
    assert sets[1].sum() > 0, "nothing certified at 1/255: the soundness tests below would be vacuous"
    tail, cert.tail = cert.tail, None  # per-logit bounds only
    try:
        plain = cert.certify(xu, y, 1).certified
    finally:
        cert.tail = tail
    assert tail is not None and not (plain & ~sets[1]).any() and plain.sum() <= sets[1].sum()


def test_random_points_and_corners_never_break_a_certified_image(setup):
    sim, cert, xu, y = setup
    eps = 2
    ok = cert.certify(xu, y, eps).certified
    idx = np.nonzero(ok)[0]
    assert len(idx) >= 5
    rng = np.random.default_rng(0)
    reps = 24
    base = np.repeat(xu[idx], reps, axis=0)
    noise = rng.integers(-eps, eps + 1, size=base.shape)
    corner = rng.choice([-eps, eps], size=base.shape)  # box corners: where linear bounds are attained
    for delta in (noise, corner):
        pts = np.clip(base + delta, 0, 255).astype(np.float32)
        assert (_labels(sim, pts) == np.repeat(y[idx], reps)).all()


def test_attacks_on_the_accelerator_never_break_a_certified_image(setup, tiny_build):
    sim, cert, xu, y = setup
    eps, xu, y = 2, xu[:96], y[:96]
    x01 = xu / 255.0
    ok = cert.certify(xu, y, eps).certified
    model, _ = load_model(tiny_build)
    clean = _labels(sim, xu) == y
    for attack in ("square", "transfer-pgd"):
        adv, _ = craft(attack, model, sim, x01.astype(np.float32), y, float(eps), seed=0, steps=10, queries=100)
        adv_u = uint8_grid(adv)
        assert np.abs(adv_u - xu).max() <= eps
        robust = clean & (_labels(sim, adv_u) == y)
        assert not (ok & ~robust).any(), f"{attack} broke a certified image"
        assert ok.mean() <= robust.mean()


def test_bounds_contain_the_simulators_values_at_every_layer(setup):
    sim, cert, xu, _ = setup
    eps, n = 3, 16
    bounds = cert.bounds(xu[:n], eps, keep=True)
    rng = np.random.default_rng(1)
    checked = set()
    for _ in range(3):
        pts = np.clip(xu[:n] + rng.integers(-eps, eps + 1, size=xu[:n].shape), 0, 255).astype(np.float32)
        ctx = sim.run(pts, keep=True)
        for name, (lo, hi) in bounds.items():
            if name not in ctx:
                continue
            v = ctx[name].reshape(lo.shape)
            assert (lo <= v).all() and (v <= hi).all(), f"{name} escapes its bounds"
            checked.add(name)
    thresholded = [s.name for s in sim.steps if len(s.inputs) > 2]
    assert len(checked) >= 6 and all(s.outputs[0] in checked for s in sim.steps if s.name in thresholded)
    lo, hi = bounds[sim.output_name]
    assert (hi > lo).any(), "the output bounds collapsed to points: the check would be vacuous"


def _tiny_graph(op: str, second_is_const: bool) -> ModelWrapper:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    inits = [helper.make_tensor("c", TensorProto.FLOAT, [1, 4], [1.0, -2.0, 0.5, 3.0])] if second_is_const else []
    node = helper.make_node(op, ["x", "c" if second_is_const else "x"], ["y"], name=f"{op}_0")
    m = ModelWrapper(helper.make_model(helper.make_graph([node], "g", [x], [out], initializer=inits)))
    m.set_tensor_datatype("x", DataType["UINT8"])
    return m


def test_uncovered_op_and_bad_eps_are_one_line_errors(setup):
    with pytest.raises(CertifyError, match=r"Mul_0 \(Mul\) has no interval semantics"):
        IntervalCertifier(HwSimulator(_tiny_graph("Mul", second_is_const=False)))
    # the same op by a constant of either sign is covered, and exact at the box's ends
    cert = IntervalCertifier(HwSimulator(_tiny_graph("Mul", second_is_const=True)))
    lo, hi = cert.bounds(np.array([[10.0, 10.0, 0.0, 255.0]], np.float32), 2)["y"]
    assert lo.tolist() == [[8.0, -24.0, 0.0, 759.0]] and hi.tolist() == [[12.0, -16.0, 1.0, 765.0]]
    _, c, xu, _ = setup
    for bad in (-1, 256, float("nan")):
        with pytest.raises(CertifyError, match="invalid eps"):
            c.box(xu[:2], bad)


def test_cli_certify_writes_a_schema_result(tiny_build):
    from hw_dq.robust.results import load

    ok = run_cli("certify", str(tiny_build), "--board", "Pynq-Z1", "--eps", "0,1,2", "--n", "48", "--quiet")
    assert ok.returncode == 0, ok.stderr
    path = tiny_build / "attacks" / "certified-hw.json"
    (r,) = load([path])
    assert r["target"] == "hw-certified" and r["sanity"]["verdict"] == "pass"
    accs = [b["certified_acc"] for b in r["certified"]]
    assert accs[0] == r["clean_acc"] and accs[0] >= accs[1] >= accs[2]
    # per image: which were certified, so an attack result on the same images can be checked against it
    assert [e["robust_mask"].count("1") for e in r["evaluations"]] == [b["n_certified"] for b in r["certified"]]
    assert all(len(e["robust_mask"]) == 48 for e in r["evaluations"])
    layers = {row["layer"]: row for row in r["certified"][2]["layers"]}
    assert len(layers) == 2 and all(row["mean_width"] > 0 and row["growth"] is not None for row in layers.values())
    assert (tiny_build / "attacks" / "certified-hw.md").is_file()


def test_cli_certify_bad_input_is_one_line(tiny_build, tmp_path):
    for bad in ("--eps=-1", "--eps=256"):
        assert_one_line_error(run_cli_here("certify", str(tiny_build), bad, "--n", "4"), "invalid eps")
    assert_one_line_error(
        run_cli_here("certify", str(tiny_build), "--board", "ZCU104", "--n", "4"), "no FINN build", "ZCU104"
    )
    # a build whose graph multiplies two variable streams: an op the interval semantics does not cover
    broken = tmp_path / "run"
    shutil.copytree(tiny_build, broken)
    model = broken / "build" / "Pynq-Z1" / "dataflow_model.onnx"
    g = onnx.load(str(model))
    node = next(nd for nd in g.graph.node if nd.op_type.startswith("ElementwiseMul"))
    node.input[1] = node.input[0]
    onnx.save(g, str(model))
    assert_one_line_error(run_cli_here("certify", str(broken), "--n", "4"), node.name, "no interval semantics")


def test_a_label_head_is_certified_on_its_scores():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    idx = helper.make_tensor_value_info("idx", TensorProto.INT64, [1, 1])
    k = helper.make_tensor("k", TensorProto.INT64, [1], [1])
    top = helper.make_node("TopK", ["x", "k"], ["vals", "idx"], name="TopK_0")
    m = ModelWrapper(helper.make_model(helper.make_graph([top], "g", [x], [idx], initializer=[k])))
    m.set_tensor_datatype("x", DataType["UINT8"])
    sim = HwSimulator(m)
    cert = IntervalCertifier(sim)
    img, y = np.array([[10.0, 200.0, 3.0, 50.0], [7.0, 7.0, 1.0, 0.0]], np.float32), np.array([1, 0])
    assert sim(img).reshape(-1).tolist() == [1, 0]  # ties go to the lower index
    assert cert.certify(img, y, 0).certified.tolist() == [True, True]
    assert cert.certify(img, y, 40).certified.tolist() == [True, False]
    # at 75 levels class 1 can fall to 125 and class 3 rise to 125: a tie, which the lower index (1) wins
    assert cert.certify(img, y, 75).certified.tolist() == [True, False]
    assert cert.certify(img, y, 76).certified.tolist() == [False, False]


def test_the_models_float_certificate_is_sound(setup, tiny_build):
    """``certify --on sw``'s bounds: at eps 0 exactly the model's correct images, shrinking with eps, and no
    point of the box (random, corners) and no attack through the quantizers breaks an image they certify."""
    _, _, xu, y = setup
    model, _ = load_model(tiny_build)
    x, yt = torch.from_numpy(xu / 255.0).float(), torch.from_numpy(y)
    with torch.no_grad():
        correct = model(x).argmax(1) == yt
    sets = [certify_model(model, x, yt, e) for e in (0, 1, 2)]
    assert torch.equal(sets[0], correct)
    for big, small in zip(sets, sets[1:], strict=False):
        assert not (small & ~big).any(), "a larger box certified an image a smaller one did not"
    ok = sets[2]
    idx = torch.nonzero(ok).flatten()
    assert len(idx) >= 5, "nothing certified at 2/255: the soundness checks would be vacuous"
    gen = torch.Generator().manual_seed(0)
    base = xu[idx.numpy()].repeat(24, axis=0)
    for delta in (
        torch.randint(-2, 3, base.shape, generator=gen),
        2 * (2 * torch.randint(0, 2, base.shape, generator=gen) - 1),
    ):
        pts = torch.from_numpy(np.clip(base + delta.numpy(), 0, 255) / 255.0).float()
        with torch.no_grad():
            assert (model(pts).argmax(1) == yt[idx].repeat_interleave(24)).all()
    adv = craft_sw(model, x, yt, "apgd-ce", 2.0, seed=0).x_adv
    assert (adv - x).abs().max() <= 2 / 255 + 1e-6
    with torch.no_grad():
        robust = correct & (model(adv).argmax(1) == yt)
    assert not (ok & ~robust).any(), "APGD-CE broke an image the float bounds certify"
    assert ok.float().mean() <= robust.float().mean()


def test_cli_certify_on_sw_certifies_a_float_run(tmp_path):
    """A float run has no FINN build: ``--on hw`` refuses it in one line, ``--on sw`` certifies it; bad input
    gets one line, exit 2."""
    from hw_dq.robust.results import load

    run = tmp_path / "fp"
    train(TrainConfig(model="tiny", wbits=None, abits=None, epochs=1, batch_size=64, train_subset=512,
                      test_subset=32), run, progress=False)  # fmt: skip
    assert_one_line_error(run_cli_here("certify", str(run), "--n", "4"), "no FINN build")
    ok = run_cli_here("certify", str(run), "--on", "sw", "--eps", "0,1,8", "--n", "64", "--quiet")
    assert ok.returncode == 0, ok.stderr
    (r,) = load([run / "attacks" / "certified-sw.json"])
    assert r["target"] == "sw-certified" and r["sanity"]["verdict"] == "pass" and r["wbits"] is None
    accs = [b["certified_acc"] for b in r["certified"]]
    assert accs[0] == r["clean_acc"] > 0 and accs[0] >= accs[1] >= accs[2]
    assert [e["robust_mask"].count("1") for e in r["evaluations"]] == [b["n_certified"] for b in r["certified"]]
    assert r["headline"]["robust_acc"] == accs[2] and "worst_case" not in r
    for bad, needle in (("--eps=-1", "invalid eps"), ("--eps=nan", "invalid eps"), ("--n=0", "invalid --n")):
        assert_one_line_error(run_cli_here("certify", str(run), "--on", "sw", bad), needle)
    assert_one_line_error(run_cli_here("certify", str(run), "--on", "sw", "--board", "Pynq-Z1"), "drop --board")
    assert_one_line_error(run_cli_here("certify", str(tmp_path / "nope"), "--on", "sw"), "not a run directory")
    model, _ = load_model(run)
    x, y = load_split("sample", "test").take(8, seed=0).tensors()
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    with pytest.raises(CertifyError, match="not finite"):
        certify_model(model, x, y, 1.0)
