"""Training stage: Lipschitz-regularised QAT for FP, VQ and DQ through one code path.

loss = cross-entropy + (beta / 2) * sum_l ||W_l^T W_l - I||_F^2. FP is the model with
quantizers off, VQ is beta = 0, DQ is beta > 0; nothing else differs between them.

Resumable and deterministic: batch order, augmentation and adversarial random starts are
functions of (seed, epoch, step), the optimizer's momentum is checkpointed, and the
learning rate is a function of the step, so a killed run resumed with ``--resume`` ends
with exactly the weights of an uninterrupted one. Runs under ``torchrun`` with DDP.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hw_dq import run as rd
from hw_dq.data import ArrayDataset, iterate_batches, load_split, to_float
from hw_dq.errors import CheckpointError, ConfigError
from hw_dq.nn import lipschitz
from hw_dq.nn.ibp import certified_fraction, ibp_init_, project_rows_
from hw_dq.nn.models import model_from_config
from hw_dq.nn.quant import check_ranges
from hw_dq.train import adversarial as adv
from hw_dq.train.checkpoint import (
    checkpoint_tensors,
    init_from,
    restore_model,
    restore_optimizer,
    teacher_model,
)
from hw_dq.train.config import ADV_TRAIN, SCHEDULES, TrainConfig, stored_config
from hw_dq.train.step import training_loss

__all__ = ["ADV_TRAIN", "SCHEDULES", "TrainConfig", "evaluate", "fit", "lr_at", "train"]


def lr_at(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Learning rate at a global step (stateless, so resuming needs no scheduler state)."""
    total = cfg.epochs * steps_per_epoch
    warm = cfg.warmup_epochs * steps_per_epoch
    if warm and step < warm:
        return cfg.lr * (step + 1) / warm
    if cfg.schedule == "cosine":
        return 0.5 * cfg.lr * (1 + math.cos(math.pi * step / max(1, total)))
    epoch = step / steps_per_epoch
    return cfg.lr * cfg.lr_gamma ** sum(epoch >= m * cfg.epochs for m in cfg.milestones)


@torch.no_grad()
def evaluate(model: nn.Module, ds: ArrayDataset, batch_size: int = 256, device: str = "cpu") -> float:
    """Top-1 accuracy (fraction) in eval mode."""
    was = model.training
    model.eval()
    correct = 0
    for xb, yb in iterate_batches(ds, batch_size, train=False):
        correct += int((model(xb.to(device)).argmax(1).cpu() == yb).sum())
    model.train(was)
    return correct / max(1, len(ds))


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_dist(device: str) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def _resolve_device(cfg: TrainConfig, d: _Dist) -> str:
    """The one device resolver (:func:`hw_dq.run.resolve_device`), plus the local rank under torchrun."""
    if cfg.device == "auto" and d.world > 1 and torch.cuda.is_available():
        return f"cuda:{d.local_rank}"
    return rd.resolve_device(cfg.device)


def _prepare_run_dir(run: Path, cfg: TrainConfig, resume: bool) -> TrainConfig:
    ckpt = run / rd.CHECKPOINT
    if resume:
        if (run / rd.CONFIG).is_file():
            try:
                return stored_config(rd.read_json(run / rd.CONFIG), str(run / rd.CONFIG))
            except ConfigError as e:
                raise CheckpointError(str(e)) from None
        return cfg
    if ckpt.exists() or (run / rd.MODEL).exists():
        raise ConfigError(f"{run} already holds a training run; pass --resume to continue it or choose another --out")
    return cfg


def run_config(cfg: TrainConfig, in_channels: int = 3, num_classes: int = 10) -> dict[str, Any]:
    """The config.json content: the model section (for every later stage) and the recipe."""
    from hw_dq.provenance import provenance
    from hw_dq.version import __version__

    mcfg = cfg.model_config(in_channels, num_classes)
    return {
        "hw_dq_version": __version__,
        "quant_scheme": mcfg.quant_scheme,
        "mode": cfg.mode,
        "model": mcfg.to_dict(),
        "train": asdict(cfg),
        "provenance": provenance(cfg.device if cfg.device != "auto" else rd.resolve_device("auto"), cfg.seed),
    }


def train(
    cfg: TrainConfig,
    out: str | Path,
    resume: bool = False,
    progress: bool = True,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train into run directory ``out``; returns the final metrics row."""
    return fit(cfg, out, resume, progress, on_epoch)[1]


@dataclass
class _Data:
    train: ArrayDataset
    test: ArrayDataset
    holdout: ArrayDataset | None  # robust runs: training images kept out for the per-epoch PGD check

    @property
    def shape(self) -> tuple[int, int, int]:
        _, h, w, c = self.train.x.shape
        return (c, h, w)

    @property
    def num_classes(self) -> int:
        return max(self.train.num_classes, self.test.num_classes)


def _load_data(cfg: TrainConfig) -> _Data:
    train_ds = load_split(cfg.data, "train", cfg.data_dir, cfg.download).take(cfg.train_subset, cfg.seed)
    test_ds = load_split(cfg.data, "test", cfg.data_dir, cfg.download).take(cfg.test_subset, cfg.seed)
    holdout = None
    if cfg.adv.active and cfg.robust_eval_n:
        if cfg.robust_eval_n >= len(train_ds) // 2:
            raise ConfigError(
                f"--robust-eval-n {cfg.robust_eval_n} would hold out half or more of the {len(train_ds)} training "
                "images; lower it (or 0 to switch the per-epoch robust check off)"
            )
        idx = np.random.default_rng(cfg.seed + 7919).permutation(len(train_ds))
        keep, held = np.sort(idx[cfg.robust_eval_n :]), np.sort(idx[: cfg.robust_eval_n])
        holdout = ArrayDataset(train_ds.x[held], train_ds.y[held], f"{train_ds.name} (held out)")
        train_ds = ArrayDataset(train_ds.x[keep], train_ds.y[keep], train_ds.name)
    return _Data(train_ds, test_ds, holdout)


def _robust_check(model: nn.Module, holdout: ArrayDataset, cfg: TrainConfig, device: str) -> float:
    x = to_float(torch.from_numpy(holdout.x))
    y = torch.from_numpy(holdout.y)
    model.to(device)
    return adv.robust_accuracy(model, x, y, cfg.adv_eps, steps=10, seed=cfg.seed)


def _certified_check(model: nn.Module, holdout: ArrayDataset, cfg: TrainConfig, device: str) -> float:
    """Held-out fraction IBP certifies at ``adv_eps`` (eval mode: BatchNorm's running statistics)."""
    was = model.training
    model.eval()
    x, y = to_float(torch.from_numpy(holdout.x)), torch.from_numpy(holdout.y).long()
    try:
        fracs = [certified_fraction(model, x[i : i + 250].to(device), y[i : i + 250].to(device), cfg.adv_eps / 255.0)
                 * len(y[i : i + 250]) for i in range(0, len(y), 250)]  # fmt: skip
    finally:
        model.train(was)
    return sum(fracs) / max(1, len(y))


_LABEL = {"holdout_pgd_acc": "PGD", "holdout_certified_acc": "certified"}


def selection_key(cfg: TrainConfig) -> str:
    """The held-out metric the kept epoch is chosen by: for certified training (IBP) the fraction IBP
    certifies, the quantity the recipe optimises and a sound bound; otherwise PGD-10 accuracy."""
    return "holdout_certified_acc" if cfg.adv_train == "ibp" else "holdout_pgd_acc"


def fit(
    cfg: TrainConfig,
    out: str | Path,
    resume: bool = False,
    progress: bool = True,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Like :func:`train`, and also returns the trained model (this process's copy).

    ``on_epoch(row)`` is called with each epoch's metrics row once it and the checkpoint are
    written; an exception it raises stops training there (the run stays resumable).
    """
    from tqdm.auto import tqdm

    run = Path(out)
    cfg = _prepare_run_dir(run, cfg, resume)
    dist_ = _init_dist(cfg.device)
    device = _resolve_device(cfg, dist_)
    data = _load_data(cfg)
    train_ds = data.train
    if dist_.world > 1 and cfg.batch_size % dist_.world:
        raise ConfigError(f"batch size {cfg.batch_size} is not divisible by the {dist_.world} processes")

    torch.manual_seed(cfg.seed)
    mcfg = cfg.model_config(data.shape[0], data.num_classes)
    model = model_from_config(mcfg).to(device)
    if cfg.init_from and not (resume and (run / rd.CHECKPOINT).exists()):
        init_from(model, cfg.init_from, mcfg.to_dict(), mcfg.quant_scheme)
    start_epoch, start_step, sums = 0, 0, {}
    resumed: dict[str, torch.Tensor] | None = None
    if resume and (run / rd.CHECKPOINT).exists():
        resumed, meta = rd.load_tensors(run / rd.CHECKPOINT)
        # the model first: Brevitas may re-create a quantizer's parameter while loading, and the
        # optimizer must hold the parameters the forward pass uses
        restore_model(model, resumed, run / rd.CHECKPOINT)
        start_epoch, start_step, sums = meta["epoch"], meta["step"], meta.get("sums", {})
        if meta.get("done"):
            if dist_.main and not (run / rd.MODEL).is_file():  # killed between the last checkpoint and the weights
                _finish_best(model, cfg, run, data)
            model.eval()
            return model, (rd.read_jsonl(run / rd.METRICS) or [{}])[-1]
    teacher = teacher_model(cfg.teacher, data.num_classes, device) if cfg.teacher else None
    if cfg.ibp_init and resumed is None:
        ibp_init_(model)
    if cfg.optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.SGD(
            model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
            nesterov=cfg.nesterov and cfg.momentum > 0, weight_decay=cfg.weight_decay,
        )  # fmt: skip
    if resumed is not None:
        restore_optimizer(opt, resumed)
    if dist_.main:
        run.mkdir(parents=True, exist_ok=True)
        rd.write_json(run / rd.CONFIG, run_config(cfg, data.shape[0], data.num_classes))
        rd.truncate_metrics(run / rd.METRICS, start_epoch)

    net: nn.Module = model
    if dist_.world > 1:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[dist_.local_rank] if device.startswith("cuda") else None
        )
    steps = len(train_ds) // cfg.batch_size
    if steps == 0:
        raise ConfigError(f"{len(train_ds)} training examples is fewer than one batch of {cfg.batch_size}")

    def save(epoch: int, step: int, sums: dict, done: bool = False) -> None:
        if dist_.main:
            meta = {"epoch": epoch, "step": step, "sums": sums, "done": done, "config": asdict(cfg)}
            rd.save_tensors(run / rd.CHECKPOINT, checkpoint_tensors(model, opt), meta)

    reg_layers = lipschitz.lipschitz_layers(model)  # found once, not on every step
    key = selection_key(cfg)
    history = [r[key] for r in rd.read_jsonl(run / rd.METRICS) if key in r]
    row: dict[str, Any] = {}
    for epoch in range(start_epoch, cfg.epochs):
        net.train()
        t0 = time.time() - sums.get("time", 0.0)
        s = {k: sums.get(k, 0.0) for k in ("loss", "ce", "reg", "correct", "seen", "time")}
        bar = tqdm(total=steps, initial=start_step, desc=f"{cfg.mode} epoch {epoch + 1}/{cfg.epochs}",
                   disable=True if not (progress and dist_.main) else None, leave=False)  # fmt: skip
        batches = iterate_batches(
            train_ds, cfg.batch_size, train=True, seed=cfg.seed, epoch=epoch,
            start_step=start_step, rank=dist_.rank, world_size=dist_.world,
        )  # fmt: skip
        for step, (xb, yb) in enumerate(batches, start=start_step):
            lr = lr_at(cfg, epoch * steps + step, steps)
            for g in opt.param_groups:
                g["lr"] = lr
            xb, yb = xb.to(device), yb.to(device)
            ce, reg, logits = training_loss(
                net, model, xb, yb, cfg, (cfg.seed, epoch, step), epoch * steps + step, cfg.epochs * steps,
                teacher, reg_layers,
            )  # fmt: skip
            loss = ce + reg
            if not torch.isfinite(loss.detach()):
                raise ConfigError(
                    f"training diverged (loss {float(loss.detach())}, regulariser {float(reg.detach())}) at epoch "
                    f"{epoch + 1} step {step + 1}; lower --beta or --lr (the last checkpoint in {run} is intact)"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                # the orthogonality penalty's gradient is cubic in W: one large step can blow it up
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            if cfg.lipschitz_project and cfg.lipschitz_norm == "inf":
                project_rows_(model, cfg.lipschitz_project, target=cfg.lipschitz_target, layers=reg_layers)
            elif cfg.lipschitz_project:
                lipschitz.project_(model, cfg.lipschitz_project, target=cfg.lipschitz_target, sample_shape=data.shape)
            n = yb.shape[0]
            s["loss"] += float(loss.detach()) * n
            s["ce"] += float(ce.detach()) * n
            s["reg"] += float(reg.detach()) * n
            s["correct"] += float((logits.argmax(1) == yb).sum())
            s["seen"] += n
            bar.update(1)
            bar.set_postfix(loss=f"{s['loss'] / s['seen']:.3f}", acc=f"{s['correct'] / s['seen']:.3f}")
            if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < steps:
                save(epoch, step + 1, {**s, "time": time.time() - t0})
        bar.close()
        start_step = 0
        if dist_.world > 1:
            import torch.distributed as dist

            for b in model.buffers():
                dist.broadcast(b, 0)
        check_ranges(model)  # a learned activation range that collapsed stops the run (checkpoint intact)
        rep = lipschitz.report(model, data.shape, iters=60)  # per-epoch estimate
        seen = max(1.0, s["seen"])
        row = {
            "epoch": epoch,
            "lr": lr_at(cfg, epoch * steps + steps - 1, steps),
            "loss": s["loss"] / seen,
            "ce": s["ce"] / seen,
            "reg": s["reg"] / seen,
            "train_acc": s["correct"] / seen,  # on the adversarial examples for a robust recipe
            "test_acc": evaluate(model, data.test, device=device),
            "mean_op_norm": rep["mean_norm_folded"],
            "lipschitz_bound": rep["network_bound"],
        }
        if data.holdout is not None:
            row["holdout_pgd_acc"] = _robust_check(model, data.holdout, cfg, device)
            if key != "holdout_pgd_acc":
                row[key] = _certified_check(model, data.holdout, cfg, device)
            acc = row[key]
            row["collapse"] = adv.collapsed(history, acc)
            if dist_.main and cfg.keep_best and acc > max(history, default=-1.0):
                tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
                rd.save_tensors(run / BEST, tensors, {"epoch": epoch, key: acc})
            history.append(acc)
        row["time_s"] = time.time() - t0
        sums = {}
        if dist_.main:
            rd.append_jsonl(run / rd.METRICS, row)
            save(epoch + 1, 0, {}, done=epoch + 1 == cfg.epochs)
            if progress:
                rob = f" held-out PGD-10 {row['holdout_pgd_acc']:.3f}" if "holdout_pgd_acc" in row else ""
                rob += f" certified {row['holdout_certified_acc']:.3f}" if "holdout_certified_acc" in row else ""
                print(
                    f"[{cfg.mode} {cfg.model} {cfg.tag} beta={cfg.beta:g} {cfg.adv_train}] "
                    f"epoch {epoch + 1}/{cfg.epochs} loss {row['loss']:.3f} train {row['train_acc']:.3f} "
                    f"test {row['test_acc']:.3f}{rob} op-norm {row['mean_op_norm']:.3f} ({row['time_s']:.1f}s)",
                    flush=True,
                )
                if row.get("collapse"):
                    print(
                        f"hw-dq: warning: held-out {_LABEL[key]} accuracy collapsed to {row[key]:.3f} "
                        f"(best {max(history):.3f}): catastrophic overfitting; the best epoch's weights are kept",
                        flush=True,
                    )
            if on_epoch is not None:
                on_epoch(row)
    if dist_.main:
        _finish_best(model, cfg, run, data)
    model.eval()
    return model, row


def _finish_best(model: nn.Module, cfg: TrainConfig, run: Path, data: _Data) -> None:
    """The final weights: the best held-out epoch's when kept (robust training), else the last."""
    if data.holdout is not None and cfg.keep_best and (run / BEST).is_file():
        tensors, _ = rd.load_tensors(run / BEST)
        rd.load_state(model, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, run / BEST)
    finish(model, cfg, run, data)


BEST = "best_robust.safetensors"


def finish(model: nn.Module, cfg: TrainConfig, run: Path, data: _Data) -> None:
    """Write the final weights and the Lipschitz diagnostic into the run directory."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    rd.save_tensors(run / rd.MODEL, tensors, {"config": run_config(cfg, data.shape[0], data.num_classes)})
    rep = lipschitz.report(model, data.shape)
    rd.write_json(run / "lipschitz.json", rep)
    rd.write_text(run / "lipschitz.md", lipschitz.table(rep) + "\n")
