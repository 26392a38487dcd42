"""Do 1-bit activations train? Fixed ReLU6 range [0, 6] against the learned range, at w2a1, w1a1, w2a2.

On the embedded CIFAR-10 sample (4,000 train / 1,000 test), CNV width 0.5: FP trained from scratch
(``--fp-epochs``), then each quantized variant fine-tuned from that FP checkpoint (``init_from``,
``--q-epochs``, lr ``--q-lr``), the same recipe and seed for fixed and learned ranges. Reported: clean
accuracy on the 1,000 test images after the last epoch, its ratio to FP, the fraction of non-zero
activations of each quantized ReLU on 256 test images, and the learned ranges. The issue's bar: w2a1
and w1a1 at >= 70% of FP. Run directories live under ``runs/bench/low_bit_acts/`` and are reused.

    timeout 3000 .venv/bin/python -m benchmarks.low_bit_acts
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import REPO, machine, machine_line, md_table, write_results

RUNS = REPO / "runs" / "bench" / "low_bit_acts"
SEED = 0
VARIANTS = [(w, a, r) for w, a in ((2, 1), (1, 1), (2, 2)) for r in ("fixed", "learned")]


def config_class() -> type:
    """TrainConfig, with ``act_range`` added locally while the training stage does not have it yet."""
    from dataclasses import fields

    from hw_dq.train.loop import TrainConfig

    if "act_range" in {f.name for f in fields(TrainConfig)}:
        return TrainConfig

    @dataclass
    class WithActRange(TrainConfig):
        act_range: str = "learned"

        def model_config(self, *a: Any, **k: Any) -> Any:
            return replace(super().model_config(*a, **k), act_range=self.act_range)

    return WithActRange


def train_variant(name: str, **kw: Any) -> tuple[Path, float]:
    from hw_dq import run as rd
    from hw_dq.train.loop import TrainConfig, train

    out = RUNS / name
    wall = out / "bench_wall.json"
    if not wall.is_file():
        cls = config_class() if "act_range" in kw else TrainConfig
        cfg = cls(model="cnv", width=0.5, data="sample", batch_size=128, seed=SEED, **kw)
        resume = (out / rd.CHECKPOINT).is_file()
        if resume and cls is not TrainConfig:  # a local config class cannot be read back: start over
            shutil.rmtree(out)
            resume = False
        t0 = time.time()
        train(cfg, out, resume=resume, progress=False)
        rd.write_json(wall, {"train_wall_s": time.time() - t0})
        print(f"[{name}] trained in {time.time() - t0:.0f}s", flush=True)
    return out, json.loads(wall.read_text())["train_wall_s"]


def activity(name: str, act_range: str, wbits: int, abits: int, x: torch.Tensor) -> dict[str, Any]:
    """Fraction of non-zero outputs of each quantized ReLU, and the learned ranges, on ``x``."""
    import brevitas.nn as qnn

    from hw_dq import run as rd
    from hw_dq.nn.models import ModelConfig, model_from_config
    from hw_dq.nn.quant import learned_ranges

    out = RUNS / name
    cfg = json.loads((out / rd.CONFIG).read_text())
    # read the model section directly: the stamp of a locally-overridden config may not match yet
    model = model_from_config(ModelConfig(**{**cfg["model"], "act_range": act_range}))
    tensors, _ = rd.load_tensors(out / rd.MODEL)
    rd.load_state(model, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, out)
    model.eval()
    fired: list[float] = []
    hooks = [
        m.register_forward_hook(lambda _m, _i, o: fired.append(float((o > 0).float().mean())))
        for m in model.modules()
        if isinstance(m, qnn.QuantReLU)
    ]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return {
        "nonzero_frac_per_layer": [round(f, 4) for f in fired],
        "nonzero_frac_mean": sum(fired) / max(1, len(fired)),
        "ranges": {k: round(float(v.detach()), 4) for k, v in learned_ranges(model).items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fp-epochs", type=int, default=12)
    ap.add_argument("--q-epochs", type=int, default=4)
    ap.add_argument("--q-lr", type=float, default=0.02)
    ap.add_argument("--variants", nargs="*", default=None, help="only these (e.g. w2a1_learned); default all")
    args = ap.parse_args()
    torch.manual_seed(SEED)
    mach = machine()
    t_all = time.time()
    from hw_dq import run as rd
    from hw_dq.data import load_split

    x, _ = load_split("sample", "test").take(256, seed=SEED).tensors()
    fp_dir, fp_wall = train_variant("fp", wbits=None, abits=None, epochs=args.fp_epochs, lr=0.05)
    fp_acc = rd.read_jsonl(fp_dir / rd.METRICS)[-1]["test_acc"]
    rows: list[dict[str, Any]] = [
        {
            "variant": "fp",
            "wbits": None,
            "abits": None,
            "act_range": "-",
            "clean_acc": fp_acc,
            "ratio_to_fp": 1.0,
            "train_wall_s": fp_wall,
            "epochs": args.fp_epochs,
        }  # fmt: skip
    ]
    for wbits, abits, act_range in VARIANTS:
        name = f"w{wbits}a{abits}_{act_range}"
        if args.variants is not None and name not in args.variants:
            continue
        out, wall = train_variant(
            name, wbits=wbits, abits=abits, act_range=act_range, epochs=args.q_epochs, lr=args.q_lr,
            init_from=str(fp_dir),
        )  # fmt: skip
        metrics = rd.read_jsonl(out / rd.METRICS)
        acc = metrics[-1]["test_acc"]
        rows.append({
            "variant": name, "wbits": wbits, "abits": abits, "act_range": act_range, "clean_acc": acc,
            "ratio_to_fp": acc / fp_acc, "train_wall_s": wall, "epochs": args.q_epochs,
            "test_acc_per_epoch": [round(m["test_acc"], 4) for m in metrics],
            **activity(name, act_range, wbits, abits, x),
        })  # fmt: skip
    data = {
        "machine": mach,
        "setup": {
            "data": "embedded CIFAR-10 sample: 4,000 train (crop+flip), 1,000 test",
            "model": "cnv width 0.5",
            "fp": f"from scratch, {args.fp_epochs} epochs, SGD lr 0.05 cosine, batch 128, wd 5e-4, seed {SEED}",
            "quantized": f"fine-tuned from the FP run, {args.q_epochs} epochs, lr {args.q_lr} cosine, same recipe",
            "command": "timeout 3000 .venv/bin/python -m benchmarks.low_bit_acts "
            f"--fp-epochs {args.fp_epochs} --q-epochs {args.q_epochs} --q-lr {args.q_lr}"
            + (f" --variants {' '.join(args.variants)}" if args.variants is not None else ""),
        },  # fmt: skip
        "rows": rows,
        "total_wall_s": time.time() - t_all,
    }
    table = md_table(
        ["variant", "act range", "clean acc (%)", "x FP", ">= 70% of FP", "non-zero acts (mean)", "ranges", "train s"],
        [[r["variant"], r["act_range"], f"{100 * r['clean_acc']:.1f}", f"{r['ratio_to_fp']:.2f}",
          "-" if r["variant"] == "fp" else ("yes" if r["ratio_to_fp"] >= 0.7 else "no"),
          f"{r['nonzero_frac_mean']:.3f}" if "nonzero_frac_mean" in r else "-",
          ", ".join(f"{v:.2f}" for v in r.get("ranges", {}).values()) or "-", f"{r['train_wall_s']:.0f}"]
         for r in rows],
    )  # fmt: skip
    md = "\n".join([
        "# Low-bit activations: fixed ReLU6 range vs learned range",
        "",
        f"Machine: {machine_line(mach)}",
        "",
        "Setup: " + "; ".join(f"{k}: {v}" for k, v in data["setup"].items() if k != "command") + ".",
        "",
        table,
        "",
        "'non-zero acts': fraction of each quantized ReLU's outputs that are not 0 on 256 test images, averaged "
        "over layers. 'ranges': the learned clipping max r of each activation (levels r * i / (2^k - 1)).",
        "",
        f"Command: `{data['setup']['command']}` (total {data['total_wall_s']:.0f} s)",
    ])  # fmt: skip
    print(md)
    write_results("low_bit_acts", data, md + "\n")


if __name__ == "__main__":
    main()
