"""Attacks on the accelerator's own arithmetic (the bit-exact simulation of a FINN build).

A deployed accelerator takes UINT8 images and computes in integers; what matters is whether
*it* is as robust as the PyTorch model said. Three threat models, all from ART:

* ``transfer`` - PGD / AutoAttack examples crafted on the PyTorch model (white-box through
  the straight-through estimator), rounded to the UINT8 grid, then run on the simulation;
* ``square``   - score-based black-box (Square, Linf) on the simulation's logits;
* ``hsj``      - decision-based (HopSkipJump, Linf) on the simulation's top-1 label only,
  which is all a finn-examples style board (TopK head) returns.

Every query is rounded to the UINT8 grid first (the accelerator's input), so an eps of
k/255 around a clean image stays within k/255. Software/hardware disagreements are located
layer by layer: the first quantized activation where Brevitas and the accelerator differ.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hw_dq.errors import HwDqError
from hw_dq.fpga.sim import HwSimulator, SimulationError

HW_ATTACKS = ("transfer-pgd", "transfer-autoattack", "square", "hsj")
PARENT, DATAFLOW = "dataflow_parent.onnx", "dataflow_model.onnx"


def find_build(path: str | Path, board: str | None = None) -> Path:
    """A build folder: ``path`` itself, or ``RUN_DIR/build/<board>`` (the only one if no board)."""
    p = Path(path)
    if (p / PARENT).is_file() or (p / DATAFLOW).is_file():
        return p
    builds = sorted(d for d in (p / "build").glob("*") if (d / DATAFLOW).is_file()) if (p / "build").is_dir() else []
    if board is not None:
        builds = [d for d in builds if d.name == board]
    if not builds:
        raise HwDqError(
            f"no FINN build in {p}" + (f" for board {board}" if board else "")
            + f"; run 'hw-dq build {p} --board NAME' first"
        )  # fmt: skip
    if len(builds) > 1:
        raise HwDqError(f"{p} has builds for {', '.join(d.name for d in builds)}; choose one with --board")
    return builds[0]


def _reference_partition(build: Path, parent) -> str | None:
    """The pre-specialisation partition FINN can execute in python (moved builds included)."""
    for node in parent.graph.node:
        if node.op_type == "StreamingDataflowPartition":
            from onnx import helper

            path = next(helper.get_attribute_value(a) for a in node.attribute if a.name == "model").decode()
            if Path(path).is_file():
                return path
            local = build / "finn" / "intermediate_models" / "supported_op_partitions" / Path(path).name
            return str(local) if local.is_file() else None
    return None


def finn_reference(build: Path, x_uint8: np.ndarray) -> np.ndarray:
    """FINN's own node-by-node python execution of the build's graph (one image at a time)."""
    from hw_dq.fpga import finn_compat

    finn_compat.prepare_finn()
    from finn.core.onnx_exec import execute_onnx
    from qonnx.core.modelwrapper import ModelWrapper

    parent = ModelWrapper(str(build / PARENT))
    ref = _reference_partition(build, parent)
    if ref is None:
        raise SimulationError(f"{build}: FINN's python-executable partition is missing; rebuild with 'hw-dq build'")
    for node in parent.graph.node:
        if node.op_type == "StreamingDataflowPartition":
            for a in node.attribute:
                if a.name == "model":
                    a.s = ref.encode()
    iname, oname = parent.graph.input[0].name, parent.graph.output[0].name
    return np.concatenate([execute_onnx(parent, {iname: x_uint8[i : i + 1]})[oname] for i in range(len(x_uint8))])


def load_simulator(build: str | Path, verify: int = 8) -> HwSimulator:
    """Simulate the folded build; first check it against FINN's execution on the build's samples."""
    b = Path(build)
    if not (b / PARENT).is_file() or not (b / DATAFLOW).is_file():
        raise HwDqError(f"{b} is not a FINN build folder (needs {PARENT} and {DATAFLOW}); run 'hw-dq build' first")
    try:
        sim = HwSimulator(b / PARENT, partition=b / DATAFLOW)
    except SimulationError:
        raise
    except Exception as e:
        raise SimulationError(f"{b}: the FINN model cannot be read ({type(e).__name__}: {e})") from None
    if verify:
        sample = b / "sample_input.npy"
        if not sample.is_file():
            raise SimulationError(f"{sample} is missing; rebuild with 'hw-dq build'")
        x = np.load(sample)[:verify].astype(np.float32)
        ref = finn_reference(b, x)
        got = sim(x).numpy().reshape(ref.shape)
        bad = int((np.abs(got - ref).reshape(len(x), -1).max(1) > 0).sum())
        if bad:
            raise SimulationError(
                f"the simulation of {b} differs from FINN's execution on {bad} of {len(x)} sample images; "
                "the build folder may be altered or from another finn-plus version"
            )
    return sim


def uint8_grid(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """[0, 1] images -> the accelerator's UINT8 pixel values (as float32, NCHW)."""
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    return np.clip(np.rint(arr * 255.0), 0, 255).astype(np.float32)


def hw_logits(sim: HwSimulator, x01: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Simulated accelerator output for [0, 1] images (rounded to UINT8 first)."""
    out = [sim(uint8_grid(x01[i : i + batch_size])).numpy() for i in range(0, len(x01), batch_size)]
    return np.concatenate(out).reshape(len(x01), -1)


def hw_labels(sim: HwSimulator, x01: np.ndarray, batch_size: int = 256) -> np.ndarray:
    out = hw_logits(sim, x01, batch_size)
    return out[:, 0].astype(np.int64) if out.shape[1] == 1 else out.argmax(1)


def sw_labels(model: nn.Module, x01: np.ndarray, batch_size: int = 256) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return np.concatenate(
            [model(torch.from_numpy(x01[i : i + batch_size])).argmax(1).numpy() for i in range(0, len(x01), batch_size)]
        )


# ------------------------------------------------------------------ layer-by-layer location
def _sw_activations(model: nn.Module, x01: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """Integer codes of every quantized activation of the Brevitas model (input quantizer first)."""
    from brevitas.nn import QuantIdentity, QuantReLU

    acts: list[tuple[str, np.ndarray]] = []
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, QuantIdentity | QuantReLU):

            def hook(mod, _i, out, name=name):
                scale = float(mod.act_quant.scale())
                acts.append((name, np.rint(out.detach().numpy() / scale)))

            hooks.append(m.register_forward_hook(hook))
    model.eval()
    try:
        with torch.no_grad():
            model(torch.from_numpy(x01))
    finally:
        for h in hooks:
            h.remove()
    return acts


def _hw_activations(sim: HwSimulator, x01: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """The accelerator's thresholded (integer) activations in graph order, as NCHW."""
    xin = uint8_grid(x01)
    ctx = sim.run(xin, keep=True)
    acts = [("input", xin)]
    for st in sim.steps:
        base = st.op.removesuffix("_hls").removesuffix("_rtl")
        thresholded = base in ("Thresholding", "MultiThreshold") or (base == "MVAU" and len(st.inputs) > 2)
        if thresholded:
            v = ctx[st.outputs[0]].numpy()
            acts.append((st.name, v.transpose(0, 3, 1, 2) if v.ndim == 4 else v))
    return acts


def locate_disagreement(model: nn.Module, sim: HwSimulator, x01: np.ndarray) -> list[dict[str, Any]]:
    """For each image, the first quantized activation where software and accelerator differ.

    Layers are matched in order (the k-th Brevitas quantized activation with the k-th
    thresholding node of the FINN graph). Returns one dict per image with ``layer`` (index),
    the two layer names and the fraction of differing values, or ``layer = None``.
    """
    sw, hw = _sw_activations(model, x01), _hw_activations(sim, x01)
    rows = []
    for i in range(len(x01)):
        row: dict[str, Any] = {"index": i, "layer": None}
        for k, ((sn, sa), (hn, ha)) in enumerate(zip(sw, hw, strict=False)):
            a, b = sa[i], ha[i]
            if a.size != b.size:
                break
            diff = (
                a.reshape(-1) != b.reshape(a.shape).reshape(-1)
                if a.shape == b.shape
                else a.reshape(-1) != b.reshape(-1)
            )
            if diff.any():
                row.update(layer=k, sw_layer=sn, hw_node=hn, fraction=float(diff.mean()))
                break
        rows.append(row)
    return rows


# ------------------------------------------------------------------ attacks
@dataclass
class HwAttackResult:
    attack: str
    eps: float  # in 1/255
    n_examples: int
    seed: int
    robust_acc_hw: float  # accuracy of the accelerator on the adversarial inputs
    robust_acc_sw: float  # accuracy of the PyTorch model on the same (UINT8-rounded) inputs
    disagreement_adv: float  # fraction of adversarial inputs where the two top-1 labels differ
    max_linf_255: float  # largest perturbation actually used, in 1/255
    params: dict
    wall_s: float
    first_diff_layers: dict  # layer index -> count, over the disagreeing adversarial inputs

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _blackbox(sim: HwSimulator, labels_only: bool, shape: tuple[int, ...], nb_classes: int = 10):
    from art.estimators.classification import BlackBoxClassifier
    from art.estimators.classification.blackbox import BlackBoxClassifierNeuralNetwork

    def predict(x: np.ndarray) -> np.ndarray:
        logits = hw_logits(sim, x.astype(np.float32))
        if labels_only or logits.shape[1] == 1:
            lab = logits[:, 0].astype(np.int64) if logits.shape[1] == 1 else logits.argmax(1)
            return np.eye(nb_classes, dtype=np.float32)[lab]
        return logits

    if labels_only:  # decision-based: HopSkipJump needs only a ClassifierMixin
        return BlackBoxClassifier(predict, input_shape=shape, nb_classes=nb_classes, clip_values=(0.0, 1.0))
    # score-based: Square asks for a "neural network" estimator; it only calls predict()
    return BlackBoxClassifierNeuralNetwork(predict, input_shape=shape, nb_classes=nb_classes, clip_values=(0.0, 1.0))


def craft(
    attack: str,
    model: nn.Module,
    sim: HwSimulator,
    x: np.ndarray,
    y: np.ndarray,
    eps_255: float,
    seed: int = 0,
    steps: int = 20,
    queries: int = 1000,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Adversarial examples (on the UINT8 grid, in [0, 1]) for one hardware threat model."""
    from art.attacks.evasion import HopSkipJump, SquareAttack

    from hw_dq.robust.attacks import AttackParams, art_classifier, autoattack, make_attack

    eps = eps_255 / 255.0
    np.random.seed(seed)
    torch.manual_seed(seed)
    shape = tuple(x.shape[1:])
    if attack == "transfer-pgd":
        clf = art_classifier(model, shape)
        atk, p = make_attack("pgd", clf, eps, p=AttackParams(pgd_steps=steps))
        params = {"source": "PyTorch model (STE gradients)", "steps": p["steps"], "restarts": p["restarts"],
                  "step_size_255": p["step_size"] * 255}  # fmt: skip
        adv = atk.generate(x)
    elif attack == "transfer-autoattack":
        clf = art_classifier(model, shape)
        ap = AttackParams(apgd_iters=max(steps, 10), apgd_targets=3, square_queries=queries)
        adv, sub, breakdown = autoattack(clf, x, y, eps, 128, ap)
        params = {"source": "PyTorch model", "suite": "APGD-CE -> APGD-T -> Square (hw_dq.robust.attacks.autoattack)",
                  "components": sub, "breakdown_on_pytorch": breakdown}  # fmt: skip
    elif attack == "square":
        bb = _blackbox(sim, False, shape)
        adv = SquareAttack(bb, norm=np.inf, eps=eps, max_iter=queries, nb_restarts=1, verbose=False).generate(x, y=y)
        params = {"queries": queries, "on": "simulated accelerator logits"}
    elif attack == "hsj":
        bb = _blackbox(sim, True, shape)
        atk = HopSkipJump(bb, norm=np.inf, max_iter=max(1, queries // 100), max_eval=100, init_eval=20, verbose=False)
        adv = atk.generate(x)
        params = {"max_iter": max(1, queries // 100), "max_eval": 100, "on": "simulated accelerator labels"}
    else:
        raise HwDqError(f"unknown hardware attack {attack!r}; choose one of {', '.join(HW_ATTACKS)}")
    adv = np.clip(adv, x - eps, x + eps) if attack != "hsj" else adv
    return uint8_grid(adv) / 255.0, params


def attack_hw(
    attack: str,
    model: nn.Module,
    sim: HwSimulator,
    x: np.ndarray,
    y: np.ndarray,
    eps_255: float,
    seed: int = 0,
    steps: int = 20,
    queries: int = 1000,
    locate: int = 32,
) -> HwAttackResult:
    """Robust accuracy of the accelerator under one threat model at Linf ``eps_255``/255."""
    if eps_255 < 0:
        raise HwDqError(f"invalid eps {eps_255}: must be >= 0 (units of 1/255)")
    t0 = time.time()
    x = uint8_grid(x) / 255.0
    adv, params = craft(attack, model, sim, x, y, eps_255, seed, steps, queries)
    linf = np.abs(adv - x).reshape(len(x), -1).max(1) * 255.0
    hw, sw = hw_labels(sim, adv), sw_labels(model, adv)
    # robust = right on the clean image and on its adversarial one (as hw_dq.robust.attacks counts it)
    hw_clean, sw_clean = hw_labels(sim, x) == y, sw_labels(model, x) == y
    if attack == "hsj":  # minimal-perturbation attack: an example beyond eps does not count
        within = linf <= eps_255 + 1e-6
        hw_ok = hw_clean & ((hw == y) | ~within)
        sw_ok = sw_clean & ((sw == y) | ~within)
    else:
        hw_ok, sw_ok = hw_clean & (hw == y), sw_clean & (sw == y)
    disagree = np.nonzero(hw != sw)[0]
    hist: dict[str, int] = {}
    if len(disagree):
        for r in locate_disagreement(model, sim, adv[disagree[:locate]].astype(np.float32)):
            hist[str(r["layer"])] = hist.get(str(r["layer"]), 0) + 1
    return HwAttackResult(
        attack=attack, eps=eps_255, n_examples=len(y), seed=seed,
        robust_acc_hw=float(hw_ok.mean()), robust_acc_sw=float(sw_ok.mean()),
        disagreement_adv=float(len(disagree) / max(1, len(y))), max_linf_255=float(linf.max(initial=0.0)),
        params=params, wall_s=time.time() - t0, first_diff_layers=hist,
    )  # fmt: skip


def agreement(model: nn.Module, sim: HwSimulator, x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """Clean accuracy of both, their top-1 disagreement rate, and where they first differ."""
    x = uint8_grid(x) / 255.0
    hw, sw = hw_labels(sim, x), sw_labels(model, x)
    dis = np.nonzero(hw != sw)[0]
    where = locate_disagreement(model, sim, x[dis[:32]].astype(np.float32)) if len(dis) else []
    return {
        "n_examples": len(y),
        "clean_acc_hw": float((hw == y).mean()),
        "clean_acc_sw": float((sw == y).mean()),
        "disagreement_clean": float(len(dis) / max(1, len(y))),
        "first_diff": where,
    }


def run_dir_build(run_dir: str | Path, board: str | None = None) -> tuple[nn.Module, Path]:
    """The PyTorch model of a run directory and its FINN build folder."""
    from hw_dq.run import load_model

    model, _ = load_model(run_dir)
    return model, find_build(run_dir, board)


HW_KIND = {"transfer-pgd": "transfer", "transfer-autoattack": "transfer", "square": "black", "hsj": "black"}


def evaluate_hw(
    run_dir: str | Path,
    attacks: list[str],
    eps: list[float],
    *,
    board: str | None = None,
    n: int | None = None,
    seed: int = 0,
    steps: int = 20,
    queries: int = 1000,
    name: str = "robustness-hw",
    data: str | None = None,
    data_dir: str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Attack the simulated accelerator of a run's FINN build; writes ``RUN_DIR/attacks/<name>.json``.

    Same schema as the software results (:mod:`hw_dq.robust.results`), with ``target = "hw"``, the
    build folder, the software/hardware agreement on clean inputs, and per evaluation the
    PyTorch model's accuracy on the same inputs and where the two first disagree.
    """
    import hw_dq
    from hw_dq import run as rd
    from hw_dq.data import load_split
    from hw_dq.errors import ConfigError
    from hw_dq.robust import results as res

    bad = [a for a in attacks if a not in HW_ATTACKS]
    if bad:
        raise ConfigError(f"unknown hardware attack {bad[0]!r}; choose from {', '.join(HW_ATTACKS)}")
    if any(e < 0 for e in eps):
        raise ConfigError(f"invalid eps {min(eps)}: must be >= 0 (units of 1/255)")
    if n is not None and n <= 0:
        raise ConfigError(f"invalid --n {n}: must be positive")
    run = Path(run_dir)
    model, cfg = rd.load_model(run)
    build = find_build(run, board)
    sim = load_simulator(build)
    tr, mc = cfg.get("train", {}), cfg.get("model", {})
    ds = load_split(data or tr.get("data", "sample"), "test", data_dir or tr.get("data_dir")).take(n, seed)
    x, y = (t.numpy() for t in ds.tensors())
    agree = agreement(model, sim, x, y)
    evals = []
    for a in attacks:
        for e in eps:
            r = attack_hw(a, model, sim, x, y, e, seed=seed, steps=steps, queries=queries)
            evals.append({
                "attack": a, "kind": HW_KIND[a], "norm": "Linf", "eps": float(e), "robust_acc": r.robust_acc_hw,
                "n_examples": r.n_examples, "seed": seed, "wall_s": round(r.wall_s, 3),
                "max_perturbation": r.max_linf_255, "params": r.params,
                "breakdown": {"robust_acc_sw_same_inputs": r.robust_acc_sw, "disagreement_adv": r.disagreement_adv,
                              "first_diff_layers": r.first_diff_layers},
            })  # fmt: skip
            if progress:
                print(f"  hw {a} @ {e:g}/255: accelerator {100 * r.robust_acc_hw:.1f}%, "
                      f"PyTorch {100 * r.robust_acc_sw:.1f}% ({r.wall_s:.1f} s)", flush=True)  # fmt: skip
    adv = tr.get("adv_train", "none")
    result = {
        "schema": res.SCHEMA, "name": name, "created": res.now(), "hw_dq_version": hw_dq.__version__,
        "run_dir": str(run), "model": mc.get("name", "?"), "width": mc.get("width"), "mode": cfg.get("mode", "FP"),
        "wbits": mc.get("wbits"), "abits": mc.get("abits"), "beta": float(tr.get("beta", 0.0)),
        "lipschitz_target": tr.get("lipschitz_target", "weight"), "adv_train": adv,
        "adv_eps": tr.get("adv_eps") if adv != "none" else None, "defense": None, "dataset": ds.name,
        "split": "test", "n_examples": len(ds), "seed": seed, "threat_model": "Linf", "eps_units": "1/255",
        "clean_acc": agree["clean_acc_hw"], "evaluations": evals, "headline": res.headline(evals),
        "sanity": {"verdict": "incomplete", "checks": [{"name": "gradient masking", "status": "skip",
                   "evidence": "see the software results; the accelerator has no gradients"}]},
        "target": "hw", "build_dir": str(build), "simulator": "hw_dq.fpga.sim (checked bit-exact against FINN)",
        "agreement": {k: v for k, v in agree.items() if k != "first_diff"},
        "first_diff_clean": agree["first_diff"],
    }  # fmt: skip
    res.validate(json.loads(json.dumps(result)), name)
    rd.write_json(run / "attacks" / f"{name}.json", result)
    rd.write_text(run / "attacks" / f"{name}.md", res.describe(result))
    return result
