"""Rebuild zoo/ from the robust sample runs (python zoo/build_zoo.py [WORK], WORK default runs/robust-sample).

Writes, per model, model.safetensors (the weights; metadata with the portable config),
config.json (no machine paths: the sample needs no data folder, init_from names the zoo twin)
and result.json (the figures of benchmarks/results/robust_sample.json for that model).
"""

from __future__ import annotations

import sys
from pathlib import Path

from hw_dq.run import CONFIG, MODEL, REPO_ROOT, load_tensors, read_json, save_tensors, write_json

NAMES = ("sm-fp-at", "sm-vq-w4a4-at", "sm-dq-w4a4-at", "sm-vq-w2a2-at", "sm-dq-w2a2-at", "sm-vq-w2a1-at")
SOURCE = "benchmarks/results/robust_sample.md"


def portable(cfg: dict) -> dict:
    """The config without the producing machine's paths."""
    cfg = dict(cfg)
    train = dict(cfg.get("train", {}))
    if train.get("data") == "sample":
        train["data_dir"] = None  # the embedded sample needs no folder
    if train.get("init_from"):
        train["init_from"] = f"../{Path(train['init_from']).name}"  # the zoo twin, relative to this folder
    cfg["train"] = train
    return cfg


def result(name: str, bench: dict) -> dict:
    """The model's figures in the committed benchmark, and where they come from."""
    evals = {k.split("@")[1]: v for k, v in bench["eval"].items() if k.split("@")[0] == name}
    any_eval = next(iter(evals.values()))
    tr = bench["train"][name]
    return {
        "name": name, "source": SOURCE, "source_json": SOURCE.replace(".md", ".json"),
        "dataset": "sample", "n_examples": any_eval["n"], "seed": any_eval["seed"], "clean_acc": any_eval["clean"],
        "robust": {eps: e["worst_case"] for eps, e in sorted(evals.items())},
        "attack_set": any_eval["attack_set"], "each_attack": {eps: e["robust"] for eps, e in sorted(evals.items())},
        "train": {"epochs": tr["epochs"], "best_epoch": tr.get("best_epoch"), "time_s": round(tr["time_s"], 1)},
    }  # fmt: skip


def main(work: Path) -> None:
    bench = read_json(REPO_ROOT / SOURCE.replace(".md", ".json"))
    out = REPO_ROOT / "zoo"
    for name in NAMES:
        cfg = portable(read_json(work / name / CONFIG))
        tensors, meta = load_tensors(work / name / MODEL)
        meta = {**meta, "config": cfg} if "config" in meta else meta
        (out / name).mkdir(parents=True, exist_ok=True)
        save_tensors(out / name / MODEL, {k: v for k, v in tensors.items() if k.startswith("model.")}, meta)
        write_json(out / name / CONFIG, cfg)
        write_json(out / name / "result.json", result(name, bench))
        print(name, "ok")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else REPO_ROOT / "runs" / "robust-sample")
