"""The reproduction's plan: its scale and one typed RunSpec per model to train and evaluate."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from hw_dq.errors import ConfigError
from hw_dq.train.loop import TrainConfig


@dataclass
class Scale:
    """Everything that sets the size of the reproduction."""

    data: str = "cifar10"
    train_subset: int | None = 10000
    width: float = 0.5
    fp_epochs: int = 8
    q_epochs: int = 4
    batch_size: int = 128
    lr: float = 0.05
    q_lr: float = 0.02
    abits: list[int] = field(default_factory=lambda: [1, 2, 4])
    wbits: dict[str, int] = field(default_factory=lambda: {"1": 2, "2": 2, "4": 4})
    # bn_folded: the only target that bounds the BN-folded operator (benchmarks/results/lipschitz_target.md);
    # its penalty is ~100x the raw-weight one, and 3e-3 diverged at lr 0.05, so the betas are smaller
    betas: list[float] = field(default_factory=lambda: [1e-4, 3e-4])
    lipschitz_target: str = "bn_folded"
    grad_clip: float = 5.0  # for every run (FP, VQ, DQ alike)
    # the bit widths studied in depth: feature squeezing and the accelerator columns of the clean arm
    adv_abits: list[int] = field(default_factory=lambda: [2])
    adv_train: bool = True
    # the adversarial-training arm: FP+AT, and VQ+AT and DQ+AT (largest beta) at each of these widths
    at_abits: list[int] = field(default_factory=lambda: [2, 4])
    # N-FGSM (de Jorge et al. 2022): single-step AT that does not collapse on quantized models,
    # where FGSM-AT did (benchmarks/results/robust_sample.md)
    adv_recipe: str = "nfgsm"
    # the adversarial-training arm's quantized fine-tune, per activation width: TrainConfig fields that
    # replace the FP twin's recipe and q_epochs / q_lr there. At 4 bits, the shipped robust_cpu recipe:
    # fine-tune as little as possible (benchmarks/results/finetune_screen.md, robust_cpu.md); at 2 bits
    # the longer N-FGSM fine-tune measured better, so it keeps the defaults.
    at_finetune: dict[str, dict] = field(
        default_factory=lambda: {"4": {"adv_train": "pgd", "adv_steps": 3, "epochs": 2, "lr": 0.0005}}
    )
    adv_eps: float = 8.0
    # every attack on the PyTorch model runs on the same n_eval images, so the per-image worst
    # case covers all of them (sized so that the cpu scale stays within 2.5 h on 2 cores)
    n_eval: int = 500
    eps: list[float] = field(default_factory=lambda: [2.0, 4.0, 8.0])  # the FGSM / PGD-10 curve
    judged_eps: list[float] = field(default_factory=lambda: [2.0, 8.0])  # the strong set and the verdicts
    # "standard": the reference AutoAttack (APGD-CE, APGD-T 9, FAB-T 9, Square 5,000);
    # "reduced": its components APGD-CE, APGD-T, Square at the aa_* budgets (labelled as such)
    aa_version: str = "standard"
    aa_iters: int = 50
    aa_targets: int = 3
    aa_queries: int = 1000
    n_probe: int = 100
    squeezers: list[str] = field(default_factory=lambda: ["bits:4", "median:2"])
    n_amplification: int = 256
    hw_board: str | None = "Pynq-Z1"  # None: no hardware columns
    hw_target_fps: float = 1000.0  # one FINN folding (the attacks do not depend on it)
    # on the simulated accelerator: AutoAttack's examples transferred, Square on its logits and
    # HopSkipJump on its labels, at judged_eps; the per-image worst case is its headline
    hw_attacks: list[str] = field(default_factory=lambda: ["transfer-autoattack", "square", "hsj"])
    n_hw: int = 200
    hw_queries: int = 5000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.aa_version not in ("standard", "reduced"):
            raise ConfigError(f"scale: aa_version {self.aa_version!r} is not 'standard' or 'reduced'")
        missing = sorted({str(a) for a in [*self.abits, *self.at_abits]} - set(self.wbits))
        if missing:
            raise ConfigError(f"scale: no weight bits for activation widths {', '.join(missing)}; add them to 'wbits'")
        if self.adv_recipe not in ("fgsm", "nfgsm", "pgd", "apgd", "trades"):
            raise ConfigError(f"scale: adv_recipe {self.adv_recipe!r} is not one of fgsm, nfgsm, pgd, apgd, trades")
        for a, over in self.at_finetune.items():
            if not isinstance(over, dict) or not str(a).isdigit():  # a width not in at_abits is not trained
                raise ConfigError(f"scale: at_finetune[{a!r}] must map an activation width to a dict of train settings")
            unknown = sorted(set(over) - set(TrainConfig.__dataclass_fields__))
            if unknown:
                raise ConfigError(f"scale: at_finetune[{a!r}] has unknown train settings {', '.join(unknown)}")

    @property
    def strong_attacks(self) -> list[str]:
        """The attacks of the per-image worst case on the PyTorch model (transfer added for quantized runs)."""
        aa = ["autoattack"] if self.aa_version == "standard" else ["apgd-ce", "apgd-t", "square"]
        return [*aa, "bpda", "pgd-temp"]


SCALES: dict[str, Scale] = {
    "cpu": Scale(),
    "smoke": Scale(
        data="sample",
        train_subset=1024,
        width=0.25,
        fp_epochs=2,
        q_epochs=1,
        batch_size=64,
        abits=[1, 2],
        at_abits=[2],
        n_eval=64,
        aa_version="reduced",
        aa_iters=5,
        aa_targets=1,
        aa_queries=30,
        n_probe=32,
        squeezers=["bits:4"],
        n_amplification=32,
        hw_attacks=["transfer-pgd", "square"],
        n_hw=32,
        hw_queries=30,
    ),  # fmt: skip
}


def load_scale(scale: str | Scale) -> Scale:
    """A named scale (``cpu``, ``smoke``) or a JSON file of :class:`Scale` fields."""
    if isinstance(scale, Scale):
        return scale
    if scale in SCALES:
        return SCALES[scale]
    path = Path(scale)
    if not path.is_file():
        raise ConfigError(f"unknown scale {scale!r}; use {', '.join(SCALES)} or a JSON file of Scale fields")
    try:
        return Scale(**json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as e:
        raise ConfigError(f"{path}: not a valid scale ({e})") from None


@dataclass(frozen=True)
class RunSpec:
    """One model of the plan: what it is (typed fields) and the training config that makes it.

    ``name`` is only a directory name; nothing reads meaning back out of it.
    """

    name: str
    mode: str  # "FP", "VQ" or "DQ"
    wbits: int | None  # None: full precision
    abits: int | None
    beta: float  # 0 for FP and VQ
    beta_rank: int  # 1-based position of beta in Scale.betas (0: no regulariser)
    lipschitz_target: str
    adv_train: str  # "none" or the adversarial-training recipe (Scale.adv_recipe)
    init_from: str | None  # the name of the run it is fine-tuned from
    train: TrainConfig
    squeeze: bool = False  # feature squeezing is evaluated on it
    hardware: bool = False  # it gets the hardware (FINN build + simulator) columns
    amplification: bool = False  # it is in the error-amplification table

    @property
    def adversarial(self) -> bool:
        return self.adv_train != "none"

    @property
    def twin(self) -> str:
        """The full-precision model with the same recipe (the transfer-attack source)."""
        return "fp-at" if self.adversarial else "fp"

    @property
    def bits_label(self) -> str:
        return "fp" if self.wbits is None and self.abits is None else f"w{self.wbits}a{self.abits}"


@dataclass(frozen=True)
class Plan:
    """Every run of a scale in dependency order (FP first), with typed look-ups."""

    scale: Scale
    runs: tuple[RunSpec, ...]

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.runs]

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.runs)

    def get(self, name: str) -> RunSpec | None:
        return next((r for r in self.runs if r.name == name), None)

    def find(self, mode: str, abits: int | None = None, beta_rank: int = 0, adversarial: bool = False) -> str:
        """The name of the run with these fields; a name absent from the plan (its results are then
        missing, which the claims report as such) when there is none. ``beta_rank=-1``: the largest beta."""
        rank = len(self.scale.betas) if beta_rank == -1 else beta_rank
        for r in self.runs:
            same_bits = mode == "FP" or r.abits == abits
            if r.mode == mode and r.adversarial == adversarial and same_bits and (mode != "DQ" or r.beta_rank == rank):
                return r.name
        return f"<no {mode} a{abits} beta#{rank}{' AT' if adversarial else ''} in the plan>"

    @property
    def low_abits(self) -> list[int]:
        """Activation widths at which the paper's low-bit claims are judged (2 bits or fewer)."""
        return [a for a in self.scale.abits if a <= 2]


def _name(mode: str, abits: int | None, beta_rank: int, adv: str) -> str:
    tag = "" if adv == "none" else "-at"
    if mode == "FP":
        return f"fp{tag}"
    return f"{'vq' if mode == 'VQ' else f'dq{beta_rank}'}-a{abits}{tag}"


def plan(s: Scale, data_dir: str | None = None) -> Plan:
    """Every run of the reproduction, in dependency order (FP first)."""
    base = TrainConfig(
        model="cnv", width=s.width, wbits=None, abits=None, epochs=s.fp_epochs, batch_size=s.batch_size,
        lr=s.lr, data=s.data, data_dir=data_dir, train_subset=s.train_subset, test_subset=min(1000, s.n_eval),
        seed=s.seed, lipschitz_target=s.lipschitz_target, grad_clip=s.grad_clip,
    )  # fmt: skip
    top = len(s.betas)
    runs: list[RunSpec] = []
    for adv in ("none", s.adv_recipe) if s.adv_train else ("none",):
        clean = adv == "none"
        fp_cfg = replace(base, adv_train=adv, adv_eps=s.adv_eps)
        fp_name = _name("FP", None, 0, adv)
        runs.append(RunSpec(fp_name, "FP", None, None, 0.0, 0, s.lipschitz_target, adv, None, fp_cfg,
                            squeeze=clean, amplification=clean))  # fmt: skip
        for a in s.abits if clean else s.at_abits:
            w = s.wbits[str(a)]
            q = replace(fp_cfg, wbits=w, abits=a, epochs=s.q_epochs, lr=s.q_lr, init_from=fp_name)
            if not clean:  # VQ+AT and DQ+AT at one width share this recipe and budget
                q = replace(q, **s.at_finetune.get(str(a), {}))
            focus = clean and a in s.adv_abits
            runs.append(RunSpec(_name("VQ", a, 0, adv), "VQ", w, a, 0.0, 0, s.lipschitz_target, q.adv_train, fp_name, q,
                                squeeze=focus, hardware=True,
                                amplification=clean and a <= 2))  # fmt: skip
            for rank, b in enumerate(s.betas, start=1):
                if clean or rank == top:  # adversarial training: the largest beta only
                    runs.append(RunSpec(
                        _name("DQ", a, rank, adv), "DQ", w, a, b, rank, s.lipschitz_target, q.adv_train, fp_name,
                        replace(q, beta=b), squeeze=focus and rank == top, hardware=True,
                        amplification=clean and a <= 2 and rank == top,
                    ))  # fmt: skip
    return Plan(s, tuple(runs))
