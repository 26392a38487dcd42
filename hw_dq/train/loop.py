"""Training stage: Lipschitz-regularised QAT for FP, VQ and DQ through one code path.

loss = cross-entropy + (beta / 2) * sum_l ||W_l^T W_l - I||_F^2. FP is the model with
quantizers off, VQ is beta = 0, DQ is beta > 0; nothing else differs between them.

Resumable and deterministic: batch order, augmentation and adversarial random starts are
functions of (seed, epoch, step), the optimizer's momentum is checkpointed, and the
learning rate is a function of the step, so a killed run resumed with ``--resume`` ends
with exactly the weights of an uninterrupted one. Runs under ``torchrun`` with DDP.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from hw_dq import run as rd
from hw_dq.data import ArrayDataset, iterate_batches, load_split, seeded_generator
from hw_dq.errors import CheckpointError, ConfigError
from hw_dq.nn import lipschitz
from hw_dq.nn.models import MODELS, ModelConfig, model_from_config
from hw_dq.nn.quant import parse_bits

SCHEDULES = ("cosine", "step")
ADV_TRAIN = ("none", "pgd", "fgsm")


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved as config.json in the run directory)."""

    model: str = "cnv"
    wbits: int | None = 2
    abits: int | None = 2
    width: float | None = None
    depth: int = 28
    residual_lambda: float = 0.5
    beta: float = 0.0
    lipschitz_target: str = "weight"
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    milestones: list[float] = field(default_factory=lambda: [0.3, 0.6, 0.8])
    lr_gamma: float = 0.2
    warmup_epochs: float = 0.0
    seed: int = 0
    data: str = "sample"
    data_dir: str | None = None
    download: bool = False
    train_subset: int | None = None
    test_subset: int | None = None
    adv_train: str = "none"
    adv_eps: float = 8.0
    adv_steps: int = 7
    adv_alpha: float | None = None
    init_from: str | None = None
    checkpoint_every: int = 0
    grad_clip: float = 0.0  # max global gradient norm (0 = off); the same for FP, VQ and DQ
    device: str = "auto"

    def __post_init__(self) -> None:
        self.wbits = parse_bits(self.wbits, "weight bit width (--wbits)")
        self.abits = parse_bits(self.abits, "activation bit width (--abits)")
        checks = [
            (self.model in MODELS, f"unknown model {self.model!r}; choose one of {', '.join(MODELS)}"),
            (self.beta >= 0 and math.isfinite(self.beta), f"invalid beta {self.beta}: must be >= 0"),
            (self.lipschitz_target in lipschitz.TARGETS,
             f"unknown Lipschitz target {self.lipschitz_target!r}; choose one of {', '.join(lipschitz.TARGETS)}"),
            (self.epochs >= 1, f"invalid epochs {self.epochs}: must be >= 1"),
            (self.batch_size >= 1, f"invalid batch size {self.batch_size}: must be >= 1"),
            (self.lr > 0, f"invalid learning rate {self.lr}: must be > 0"),
            (self.schedule in SCHEDULES, f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}"),
            (self.adv_train in ADV_TRAIN,
             f"unknown adversarial training {self.adv_train!r}; choose one of {', '.join(ADV_TRAIN)}"),
            (0 <= self.adv_eps <= 255, f"invalid --adv-eps {self.adv_eps}: use 0..255 (units of 1/255)"),
            (self.adv_steps >= 1, f"invalid adv steps {self.adv_steps}: must be >= 1"),
            (self.checkpoint_every >= 0, "checkpoint_every must be >= 0"),
            (self.grad_clip >= 0, f"invalid grad_clip {self.grad_clip}: must be >= 0 (0 = off)"),
        ]  # fmt: skip
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)

    @property
    def mode(self) -> str:
        """FP (quantizers off), VQ (beta = 0) or DQ (beta > 0)."""
        if self.wbits is None and self.abits is None:
            return "FP"
        return "DQ" if self.beta > 0 else "VQ"

    def model_config(self) -> ModelConfig:
        return ModelConfig(
            name=self.model, wbits=self.wbits, abits=self.abits, width=self.width,
            depth=self.depth, residual_lambda=self.residual_lambda,
        )  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown config key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(known))}")
        return cls(**d)


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


@contextlib.contextmanager
def frozen_bn_stats(model: nn.Module) -> Iterator[None]:
    """Use batch statistics but leave BatchNorm's running statistics untouched."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in bns]
    for m in bns:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (mom, nbt) in zip(bns, saved, strict=True):
            m.momentum = mom
            m.num_batches_tracked.copy_(nbt)


def perturb(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, gen: torch.Generator) -> torch.Tensor:
    """Adversarial examples for training: PGD-k or FGSM with random start (Wong et al. 2020).

    Written here rather than taken from ART: it runs inside the training step on the
    model's own device with BatchNorm in batch-statistics mode, with no numpy round trip.
    """
    eps = cfg.adv_eps / 255.0
    if cfg.adv_train == "fgsm":
        steps, alpha = 1, (cfg.adv_alpha / 255.0 if cfg.adv_alpha else 1.25 * eps)
    else:
        steps, alpha = cfg.adv_steps, (cfg.adv_alpha / 255.0 if cfg.adv_alpha else 2.5 * eps / cfg.adv_steps)
    delta = (torch.rand(x.shape, generator=gen) * 2 - 1).to(x) * eps
    delta = (x + delta).clamp(0, 1) - x
    with frozen_bn_stats(model):
        for _ in range(steps):
            delta.requires_grad_(True)
            loss = F.cross_entropy(model(x + delta), y)
            (g,) = torch.autograd.grad(loss, delta)
            delta = (delta.detach() + alpha * g.sign()).clamp(-eps, eps)
            delta = (x + delta).clamp(0, 1) - x
    return (x + delta).detach()


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
    if cfg.device == "auto":
        if torch.cuda.is_available():
            return f"cuda:{d.local_rank}" if d.world > 1 else "cuda"
        return "cpu"
    return cfg.device


def _checkpoint_tensors(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    t = {f"model.{k}": v for k, v in model.state_dict().items()}
    for i, p in enumerate(opt.param_groups[0]["params"]):
        buf = opt.state.get(p, {}).get("momentum_buffer")
        if buf is not None:
            t[f"optim.{i}.momentum_buffer"] = buf
    return t


def _restore(model: nn.Module, opt: torch.optim.Optimizer, path: Path) -> dict[str, Any]:
    tensors, meta = rd.load_tensors(path)
    state = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    rd.load_state(model, state, path)
    params = opt.param_groups[0]["params"]
    for i, p in enumerate(params):
        buf = tensors.get(f"optim.{i}.momentum_buffer")
        if buf is not None:
            opt.state[p]["momentum_buffer"] = buf.to(p.device).clone()
    return meta


def _init_from(model: nn.Module, src: str) -> None:
    path = Path(src)
    path = path / rd.MODEL if path.is_dir() else path
    tensors, _ = rd.load_tensors(path)
    state = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    rd.load_state(model, state, path)


def _prepare_run_dir(run: Path, cfg: TrainConfig, resume: bool) -> TrainConfig:
    ckpt = run / rd.CHECKPOINT
    if resume:
        if (run / rd.CONFIG).is_file():
            stored = rd.read_json(run / rd.CONFIG)
            try:
                return TrainConfig.from_dict(stored["train"])
            except (KeyError, TypeError) as e:
                raise CheckpointError(f"{run / rd.CONFIG} has no valid 'train' section ({e})") from None
        return cfg
    if ckpt.exists() or (run / rd.MODEL).exists():
        raise ConfigError(f"{run} already holds a training run; pass --resume to continue it or choose another --out")
    return cfg


def run_config(cfg: TrainConfig) -> dict[str, Any]:
    """The config.json content: the model section (for every later stage) and the recipe."""
    import hw_dq
    from hw_dq.nn.quant import QUANT_SCHEME

    return {
        "hw_dq_version": hw_dq.__version__,
        "quant_scheme": QUANT_SCHEME,
        "mode": cfg.mode,
        "model": cfg.model_config().to_dict(),
        "train": asdict(cfg),
    }


def train(cfg: TrainConfig, out: str | Path, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train into run directory ``out``; returns the final metrics row."""
    return fit(cfg, out, resume, progress)[1]


def fit(
    cfg: TrainConfig, out: str | Path, resume: bool = False, progress: bool = True
) -> tuple[nn.Module, dict[str, Any]]:
    """Like :func:`train`, and also returns the trained model (this process's copy)."""
    from tqdm.auto import tqdm

    run = Path(out)
    cfg = _prepare_run_dir(run, cfg, resume)
    dist_ = _init_dist(cfg.device)
    device = _resolve_device(cfg, dist_)
    train_ds = load_split(cfg.data, "train", cfg.data_dir, cfg.download).take(cfg.train_subset, cfg.seed)
    test_ds = load_split(cfg.data, "test", cfg.data_dir, cfg.download).take(cfg.test_subset, cfg.seed)
    if dist_.world > 1 and cfg.batch_size % dist_.world:
        raise ConfigError(f"batch size {cfg.batch_size} is not divisible by the {dist_.world} processes")

    torch.manual_seed(cfg.seed)
    model = model_from_config(cfg.model_config()).to(device)
    if cfg.init_from and not (resume and (run / rd.CHECKPOINT).exists()):
        _init_from(model, cfg.init_from)
    opt = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
        nesterov=cfg.nesterov and cfg.momentum > 0, weight_decay=cfg.weight_decay,
    )  # fmt: skip
    start_epoch, start_step, sums = 0, 0, {}
    if resume and (run / rd.CHECKPOINT).exists():
        meta = _restore(model, opt, run / rd.CHECKPOINT)
        start_epoch, start_step, sums = meta["epoch"], meta["step"], meta.get("sums", {})
        if meta.get("done"):
            model.eval()
            return model, (rd.read_jsonl(run / rd.METRICS) or [{}])[-1]
    if dist_.main:
        run.mkdir(parents=True, exist_ok=True)
        rd.write_json(run / rd.CONFIG, run_config(cfg))
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
            rd.save_tensors(run / rd.CHECKPOINT, _checkpoint_tensors(model, opt), meta)

    reg_layers = lipschitz.lipschitz_layers(model)  # found once, not on every step
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
            if cfg.adv_train != "none":
                xb = perturb(net, xb, yb, cfg, seeded_generator(cfg.seed, epoch, step, 31))
            logits = net(xb)
            ce = F.cross_entropy(logits, yb)
            reg = lipschitz.regulariser(model, cfg.beta, cfg.lipschitz_target, reg_layers).to(ce)
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
        rep = lipschitz.report(model, _sample_shape(train_ds), iters=60)  # per-epoch estimate
        seen = max(1.0, s["seen"])
        row = {
            "epoch": epoch,
            "lr": lr_at(cfg, epoch * steps + steps - 1, steps),
            "loss": s["loss"] / seen,
            "ce": s["ce"] / seen,
            "reg": s["reg"] / seen,
            "train_acc": s["correct"] / seen,
            "test_acc": evaluate(model, test_ds, device=device),
            "mean_op_norm": rep["mean_norm_folded"],
            "lipschitz_bound": rep["network_bound"],
            "time_s": time.time() - t0,
        }
        sums = {}
        if dist_.main:
            rd.append_jsonl(run / rd.METRICS, row)
            save(epoch + 1, 0, {}, done=epoch + 1 == cfg.epochs)
            if progress:
                print(
                    f"[{cfg.mode} {cfg.model} w{cfg.wbits or 'f'}a{cfg.abits or 'f'} beta={cfg.beta:g}] "
                    f"epoch {epoch + 1}/{cfg.epochs} loss {row['loss']:.3f} train {row['train_acc']:.3f} "
                    f"test {row['test_acc']:.3f} op-norm {row['mean_op_norm']:.3f} ({row['time_s']:.1f}s)",
                    flush=True,
                )
    if dist_.main:
        finish(model, cfg, run, _sample_shape(train_ds))
    model.eval()
    return model, row


def _sample_shape(ds: ArrayDataset) -> tuple[int, int, int]:
    _, h, w, c = ds.x.shape
    return (c, h, w)


def finish(model: nn.Module, cfg: TrainConfig, run: Path, sample_shape: tuple[int, ...]) -> None:
    """Write the final weights and the Lipschitz diagnostic into the run directory."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    rd.save_tensors(run / rd.MODEL, tensors, {"config": run_config(cfg)})
    rep = lipschitz.report(model, sample_shape)
    rd.write_json(run / "lipschitz.json", rep)
    rd.write_text(run / "lipschitz.md", lipschitz.table(rep) + "\n")
