"""Rebuild zoo/ from the robust runs: python zoo/build_zoo.py [--sample WORK] [--cpu WORK] (either or both).

WORK defaults: runs/robust-sample (benchmarks.robust_gpu --arm sample), runs/robust-cpu (--arm cpu).

Writes, per model, model.safetensors (the weights; metadata with the portable config),
config.json (no machine paths: the sample needs no data folder, init_from names the zoo twin)
and result.json (the figures of benchmarks/results/robust_sample.json for that model).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hw_dq.run import CONFIG, MODEL, REPO_ROOT, load_tensors, read_json, save_tensors, write_json

NAMES = ("sm-fp-at", "sm-vq-w4a4-at", "sm-dq-w4a4-at", "sm-vq-w2a2-at", "sm-dq-w2a2-at", "sm-vq-w2a1-at")
SOURCE = "benchmarks/results/robust_sample.md"
# the CPU-scale models (CIFAR-10, AutoAttack standard on 1,000 images): pass --data-dir to use them
CPU_NAMES = ("cpu-fp-at", "cpu-vq-w4a4-short-at", "cpu-vq-w4a4-pgd3-at", "cpu-vq-w2a2e8-at", "cpu-dq-w2a2e8-at")
CPU_SOURCE = "benchmarks/results/robust_cpu.md"


def portable(cfg: dict) -> dict:
    """The config without the producing machine's paths."""
    cfg = dict(cfg)
    train = dict(cfg.get("train", {}))
    train["data_dir"] = None  # the embedded sample needs no folder; CIFAR-10 takes the user's --data-dir
    if train.get("init_from"):
        train["init_from"] = f"../{Path(train['init_from']).name}"  # the zoo twin, relative to this folder
    cfg["train"] = train
    return cfg


def result(name: str, bench: dict, source: str = SOURCE) -> dict:
    """The model's figures in the committed benchmark, and where they come from."""
    evals = {k.split("@")[1]: v for k, v in bench["eval"].items() if k.split("@")[0] == name}
    any_eval = next(iter(evals.values()))
    tr = bench["train"][name]
    return {
        "name": name, "source": source, "source_json": source.replace(".md", ".json"),
        "dataset": tr["config"].get("data", "sample"), "n_examples": any_eval["n"], "seed": any_eval["seed"],
        "clean_acc": any_eval["clean"],
        "robust": {eps: e["worst_case"] for eps, e in sorted(evals.items())},
        "attack_set": any_eval["attack_set"], "each_attack": {eps: e["robust"] for eps, e in sorted(evals.items())},
        "train": {"epochs": tr["epochs"], "best_epoch": tr.get("best_epoch"), "time_s": round(tr["time_s"], 1)},
    }  # fmt: skip


def main(groups: dict[str, Path]) -> None:
    out = REPO_ROOT / "zoo"
    for group, src in groups.items():
        names, source = (NAMES, SOURCE) if group == "sample" else (CPU_NAMES, CPU_SOURCE)
        bench = read_json(REPO_ROOT / source.replace(".md", ".json"))
        for name in names:
            cfg = portable(read_json(src / name / CONFIG))
            tensors, meta = load_tensors(src / name / MODEL)
            meta = {**meta, "config": cfg} if "config" in meta else meta
            (out / name).mkdir(parents=True, exist_ok=True)
            save_tensors(out / name / MODEL, {k: v for k, v in tensors.items() if k.startswith("model.")}, meta)
            write_json(out / name / CONFIG, cfg)
            write_json(out / name / "result.json", result(name, bench, source))
            print(name, "ok")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sample", type=Path, nargs="?", const=REPO_ROOT / "runs" / "robust-sample")
    ap.add_argument("--cpu", type=Path, nargs="?", const=REPO_ROOT / "runs" / "robust-cpu")
    a = ap.parse_args()
    chosen = {k: v for k, v in (("sample", a.sample), ("cpu", a.cpu)) if v is not None}
    main(chosen or {"sample": REPO_ROOT / "runs" / "robust-sample", "cpu": REPO_ROOT / "runs" / "robust-cpu"})
