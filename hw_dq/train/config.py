"""The training run configuration: one typed dataclass, JSON files that fill it, CLI flags generated from it."""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import MISSING, dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any

from hw_dq.data import DATASETS
from hw_dq.errors import ConfigError
from hw_dq.nn import ibp, lipschitz
from hw_dq.nn.models import MODELS, ModelConfig, is_custom
from hw_dq.nn.quant import bits_label, parse_bits
from hw_dq.train.adversarial import RECIPES, AdvRecipe

SCHEDULES = ("cosine", "step")
OPTIMIZERS = ("sgd", "adam")
ADV_TRAIN = tuple(RECIPES)
# the ModelConfig fields a TrainConfig carries (name -> TrainConfig field)


def _f(default: Any, help: str, group: str = "recipe", **meta: Any) -> Any:  # noqa: A002
    """A dataclass field that also describes its command-line flag."""
    kw = {"default_factory": default} if callable(default) else {"default": default}
    return field(metadata={"help": help, "group": group, **meta}, **kw)


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved as config.json in the run directory).

    Bit widths are parsed once, here, into ``int`` (1..8) or ``None`` (full precision).
    """

    model: str = _f("cnv", f"architecture: {', '.join(MODELS)}, or your own nn.Module as package.module:ClassName "
                    "(imported by name; constructor arguments from the config's model_args)", "model",
                    metavar="MODEL")  # fmt: skip
    model_args: dict[str, Any] | None = _f(None, "constructor keyword arguments of a package.module:ClassName model",
                                           "model", cli=False)  # fmt: skip
    wbits: int | None = _f(2, "weight bits 1..8 or 'float'", "model", bits=True)
    abits: int | None = _f(2, "activation bits 1..8 or 'float'", "model", bits=True)
    width: float | None = _f(None, "channel multiplier (cnv/tiny; default 1) or widening factor (wrn; default 10)",
                             "model")  # fmt: skip
    depth: int = _f(28, "WRN depth (6n+4)", "model")
    residual_lambda: float = _f(0.5, "WRN convex-combination weight of the residual branch", "model")
    act_range: str = _f("learned", "activation clipping range: learned (PACT-style, per tensor) or fixed (ReLU6 "
                        "[0, 6], the scheme of runs before v2)", "model", choices=("learned", "fixed"))  # fmt: skip
    end_bits: int | None = _f(None, "weight bits of the first and last layer (mixed precision; default: --wbits)",
                              "model", bits=True)  # fmt: skip
    bn_gain_max: float | None = _f(None, "bound BatchNorm's inference gain gamma/sqrt(var+eps) to [0, G]",
                                   "defensive quantization", metavar="G")  # fmt: skip
    beta: float = _f(0.0, "Lipschitz regularisation strength (0 = vanilla quantization)", "defensive quantization")
    lipschitz_target: str = _f("weight", "regularise W ('weight') or the BN-folded operator ('bn_folded')",
                               "defensive quantization", choices=lipschitz.TARGETS)  # fmt: skip
    lipschitz_project: float = _f(0.0, "after each step, rescale every layer whose operator norm (--lipschitz-target) "
                                  "exceeds this bound (0 = off)", "defensive quantization", metavar="C")  # fmt: skip
    lipschitz_norm: str = _f("2", "norm --lipschitz-project bounds: 2 (spectral, power iteration) or inf (each row's "
                             "l1 norm, exact: how much an interval's radius can grow, for certified training)",
                             "defensive quantization", choices=("2", "inf"))  # fmt: skip
    epochs: int = _f(10, "training epochs")
    batch_size: int = _f(128, "global batch size")
    optimizer: str = _f("sgd", "sgd (with --momentum, --nesterov) or adam (certified training's usual choice)",
                        choices=OPTIMIZERS)  # fmt: skip
    lr: float = _f(0.05, "peak learning rate")
    momentum: float = _f(0.9, "SGD momentum")
    nesterov: bool = _f(True, "Nesterov momentum")
    weight_decay: float = _f(5e-4, "L2 weight decay")
    schedule: str = _f("cosine", "learning-rate schedule", choices=SCHEDULES)
    milestones: list[float] = _f(lambda: [0.3, 0.6, 0.8], "step schedule: fractions of training", cli=False)
    lr_gamma: float = _f(0.2, "step schedule: factor at each milestone", cli=False)
    warmup_epochs: float = _f(0.0, "linear learning-rate warm-up (epochs)")
    seed: int = _f(0, "seed of initialisation, batch order, augmentation and attack starts")
    data: str = _f("sample", "dataset (sample = the embedded CIFAR-10 sample)", "data", choices=DATASETS)
    data_dir: str | None = _f(None, "local copy of the dataset", "data")
    download: bool = _f(False, "download the dataset if missing", "data")
    train_subset: int | None = _f(None, "train on N examples only", "data", metavar="N")
    test_subset: int | None = _f(None, "evaluate each epoch on N test examples", "data", metavar="N")
    adv_train: str = _f("none", "adversarial training recipe: " + "; ".join(f"{k}: {v}" for k, v in RECIPES.items()),
                        "adversarial training", choices=ADV_TRAIN)  # fmt: skip
    adv_eps: float = _f(8.0, "Linf eps of the training attack, in units of 1/255", "adversarial training")
    adv_steps: int = _f(7, "attack steps (pgd, apgd, trades, rslad)", "adversarial training")
    adv_alpha: float | None = _f(None, "attack step size in 1/255 (default: the recipe's own)", "adversarial training")
    trades_beta: float = _f(6.0, "TRADES robustness weight", "adversarial training")
    act_margin: float = _f(0.0, "weight of the threshold-margin penalty: quantized activations' inputs kept "
                           "away from their rounding thresholds (hw_dq.train.margin; 0 = off)",
                           "adversarial training")  # fmt: skip
    act_noise: float = _f(0.0, "threshold noise: in training, quantized activations round their input plus "
                          "uniform noise of up to TAU steps (hw_dq.train.margin; 0 = off)", "adversarial training",
                          metavar="TAU")  # fmt: skip
    ibp_kappa: float = _f(0.5, "ibp: the clean-loss weight at the end of the ramp", "adversarial training")
    ibp_reg: float = _f(
        0.0,
        "ibp: weight of the warm-up regularisers of Shi et al. 2021 (bound tightness, "
        "balanced activation states), fading to 0 as eps reaches its maximum",
        "adversarial training",
    )
    ibp_schedule: str = _f("linear", "ibp: the eps ramp's shape: linear (Gowal et al. 2018) or smooth (t^4 for "
                           "its first quarter, then linear: Shi et al. 2021)", "adversarial training",
                           choices=ibp.SCHEDULES)  # fmt: skip
    ibp_warmup: float = _f(0.1, "ibp: fraction of the training steps with eps 0 before the ramp",
                           "adversarial training")  # fmt: skip
    ibp_ramp: float = _f(0.5, "ibp: fraction of the training steps over which eps rises to --adv-eps",
                         "adversarial training")  # fmt: skip
    ibp_relax_input: bool = _f(False, "ibp: train on the box before the 8-bit input quantizer rounds it to whole "
                               "1/255 levels (without it an eps ramp is a staircase of whole levels; "
                               "certificates always use the rounded box)", "adversarial training")  # fmt: skip
    ibp_relu_grad: bool = _f(False, "ibp: the bounds get a ReLU's gradient through each clipped activation (the "
                             "clip's own is zero above its range, so an interval covering the whole range "
                             "could never shrink); values unchanged", "adversarial training")  # fmt: skip
    ibp_init: bool = _f(False, "ibp: IBP initialisation (Shi et al. 2021) of a run that starts from scratch",
                        "adversarial training")  # fmt: skip
    robust_eval_n: int = _f(512, "held-out training images for the per-epoch PGD-10 check of robust runs "
                            "(taken out of training; 0 = off)", "adversarial training", metavar="N")  # fmt: skip
    keep_best: bool = _f(True, "robust runs end with the weights of the epoch with the best held-out PGD accuracy",
                         "adversarial training")  # fmt: skip
    teacher: str | None = _f(None, "rslad: the robust run to distil from (e.g. the FP twin of --init-from)",
                             "adversarial training", metavar="RUN_DIR")  # fmt: skip
    init_from: str | None = _f(None, "start from another run's weights (e.g. a robust FP run)", metavar="RUN_DIR")
    checkpoint_every: int = _f(0, "also checkpoint every STEPS steps (0 = once per epoch)", metavar="STEPS")
    grad_clip: float = _f(0.0, "clip the global gradient norm (0 = off); the same for FP, VQ and DQ", metavar="NORM")
    device: str = _f("auto", "auto (the GPU where PyTorch sees one), cpu, cuda, cuda:1, ...")

    def __post_init__(self) -> None:
        self.wbits = parse_bits(self.wbits, "weight bit width (--wbits)")
        self.abits = parse_bits(self.abits, "activation bit width (--abits)")
        self.end_bits = parse_bits(self.end_bits, "first/last layer weight bit width (--end-bits)")
        finite = all(
            isinstance(v, int | float) and math.isfinite(v)
            for v in (
                self.beta,
                self.lr,
                self.adv_eps,
                self.trades_beta,
                self.adv_alpha or 0.0,
                self.weight_decay,
                self.ibp_reg,
                self.ibp_warmup,
                self.ibp_ramp,
                self.act_margin,
                self.act_noise,
            )
        )
        checks = [
            (finite, "a numeric option (beta, lr, adv_eps, adv_alpha, trades_beta, weight_decay, act_margin, "
             "act_noise) is not finite"),
            (isinstance(self.model, str) and (self.model in MODELS or is_custom(self.model)),
             f"unknown model {self.model!r} (--model); choose one of {', '.join(MODELS)} or package.module:ClassName"),
            (self.model_args is None or isinstance(self.model_args, dict),
             "model_args must be a JSON object of constructor keyword arguments"),
            (not self.model_args or is_custom(str(self.model)),
             f"model_args is for a package.module:ClassName model, not {self.model!r}"),
            (self.beta >= 0, f"invalid beta {self.beta}: must be >= 0"),
            (self.lipschitz_target in lipschitz.TARGETS,
             f"unknown Lipschitz target {self.lipschitz_target!r}; choose one of {', '.join(lipschitz.TARGETS)}"),
            (self.epochs >= 1, f"invalid epochs {self.epochs}: must be >= 1"),
            (self.batch_size >= 1, f"invalid batch size {self.batch_size}: must be >= 1"),
            (self.lr > 0, f"invalid learning rate {self.lr}: must be > 0"),
            (self.schedule in SCHEDULES, f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}"),
            (self.adv_train in ADV_TRAIN,
             f"unknown adversarial training {self.adv_train!r}; choose one of {', '.join(ADV_TRAIN)}"),
            (self.adv_train == "none" or 0 < self.adv_eps <= 255,
             f"invalid --adv-eps {self.adv_eps}: use a value in (0, 255] (units of 1/255; 8 means 8/255)"),
            (self.adv_steps >= 1, f"invalid --adv-steps {self.adv_steps}: must be >= 1"),
            (self.adv_alpha is None or self.adv_alpha > 0, f"invalid --adv-alpha {self.adv_alpha}: must be > 0"),
            (self.trades_beta >= 0, f"invalid --trades-beta {self.trades_beta}: must be >= 0"),
            (self.act_margin >= 0, f"invalid --act-margin {self.act_margin}: must be >= 0 (0 = off)"),
            (not self.act_margin or self.abits is not None,
             "--act-margin keeps quantized activations off their thresholds: it needs --abits"),
            (0 <= self.act_noise <= 1, f"invalid --act-noise {self.act_noise}: use a value in [0, 1] (steps)"),
            (not self.act_noise or self.abits is not None,
             "--act-noise perturbs quantized activations' inputs: it needs --abits"),
            (0 <= self.ibp_kappa <= 1, f"invalid --ibp-kappa {self.ibp_kappa}: must lie in [0, 1]"),
            (self.ibp_reg >= 0, f"invalid --ibp-reg {self.ibp_reg}: must be >= 0"),
            (self.ibp_schedule in ibp.SCHEDULES,
             f"unknown --ibp-schedule {self.ibp_schedule!r}; choose one of {', '.join(ibp.SCHEDULES)}"),
            (0 <= self.ibp_warmup < 1 and 0 < self.ibp_ramp <= 1 and self.ibp_warmup + self.ibp_ramp <= 1,
             f"invalid IBP ramp: --ibp-warmup {self.ibp_warmup} and --ibp-ramp {self.ibp_ramp} are fractions of "
             "training with warm-up >= 0, ramp > 0 and warm-up + ramp <= 1"),
            (not (self.ibp_reg or self.ibp_init or self.ibp_relax_input or self.ibp_relu_grad)
             or self.adv_train == "ibp",
             "--ibp-reg, --ibp-init, --ibp-relax-input and --ibp-relu-grad belong to certified training: "
             "add --adv-train ibp"),
            (not (self.ibp_init and self.init_from),
             "--ibp-init initialises a run from scratch; drop it or --init-from"),
            (self.adv_train != "rslad" or bool(self.teacher),
             "--adv-train rslad distils from a robust run: add --teacher RUN_DIR"),
            (not self.teacher or self.adv_train == "rslad", "--teacher belongs to --adv-train rslad"),
            (self.optimizer in OPTIMIZERS,
             f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}"),
            (self.adv_train != "ibp" or self.model in ("cnv", "tiny"),
             f"--adv-train ibp supports the chain models cnv and tiny, not {self.model!r}"),
            (self.robust_eval_n >= 0, f"invalid --robust-eval-n {self.robust_eval_n}: must be >= 0"),
            (self.act_range in ("learned", "fixed"), f"unknown act_range {self.act_range!r}; use learned or fixed"),
            (self.bn_gain_max is None or (math.isfinite(self.bn_gain_max) and self.bn_gain_max > 0),
             f"invalid --bn-gain-max {self.bn_gain_max}: must be a positive number"),
            (math.isfinite(self.lipschitz_project) and self.lipschitz_project >= 0,
             f"invalid --lipschitz-project {self.lipschitz_project}: must be >= 0 (0 = off)"),
            (self.lipschitz_norm in ("2", "inf"),
             f"unknown --lipschitz-norm {self.lipschitz_norm!r}: use 2 (spectral) or inf (row l1 norms)"),
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

    @property
    def tag(self) -> str:
        """``fp`` or ``w<bits>a<bits>``: the one way bit widths are written in names and tables."""
        if self.wbits is None and self.abits is None:
            return "fp"
        return f"w{bits_label(self.wbits)}a{bits_label(self.abits)}"

    @property
    def adv(self) -> AdvRecipe:
        return AdvRecipe(
            self.adv_train, self.adv_eps, self.adv_steps, self.adv_alpha, self.trades_beta, self.ibp_kappa,
            self.ibp_reg, self.ibp_schedule, self.ibp_warmup, self.ibp_ramp, self.ibp_relax_input,
            self.ibp_relu_grad,
        )  # fmt: skip

    def model_config(self, in_channels: int = 3, num_classes: int = 10) -> ModelConfig:
        """The model section; channels and classes come from the training data."""
        return ModelConfig(
            name=self.model, wbits=self.wbits, abits=self.abits, width=self.width, depth=self.depth,
            residual_lambda=self.residual_lambda, in_channels=in_channels, num_classes=num_classes,
            act_range=self.act_range, end_bits=self.end_bits, bn_gain_max=self.bn_gain_max,
            model_args=self.model_args,
        )  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "config") -> TrainConfig:
        """A config from a JSON object: every field's type and range checked, errors naming it."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(
                f"{where}: unknown config key(s) {', '.join(map(repr, unknown))[:200]}; "
                f"valid keys: {', '.join(sorted(known))}"
            )
        for f in fields(cls):
            if f.name in d:
                _check_type(f, d[f.name], where)
        try:
            return cls(**d)
        except (TypeError, ValueError, OverflowError) as e:
            raise ConfigError(f"{where}: invalid config: {e}") from None


_JSON_TYPES: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}
RANGES: dict[str, tuple[float, float]] = {  # what each number may be, beyond its type (checked on every load)
    "depth": (1, 1000), "epochs": (1, 100_000), "batch_size": (1, 1 << 20), "seed": (0, 2**63 - 1),
    "train_subset": (1, 1 << 40), "test_subset": (1, 1 << 40), "adv_steps": (1, 100_000),
    "momentum": (0, 1), "lr_gamma": (0, 1e6), "warmup_epochs": (0, 100_000), "residual_lambda": (0, 1),
    "width": (1e-3, 1e3), "checkpoint_every": (0, 1 << 40), "robust_eval_n": (0, 1 << 40),
}  # fmt: skip


def _check_type(f: Any, v: Any, where: str) -> None:
    """One field of a config file against its annotation and range (one line naming the field)."""
    ann = str(f.type).replace(" ", "")
    if v is None and "None" in ann:
        return
    if f.metadata.get("bits"):
        ok = (isinstance(v, int) and not isinstance(v, bool)) or isinstance(v, str)
        want = "an integer bit width or 'float'"
    elif ann.startswith("list"):
        ok = isinstance(v, list) and all(isinstance(x, int | float) and not isinstance(x, bool) for x in v)
        ok = ok and all(math.isfinite(x) and 0 < x < 1 for x in v)
        want = "a list of fractions in (0, 1)"
    elif ann.startswith("dict"):
        ok, want = isinstance(v, dict), "a JSON object"
    else:
        base = ann.split("|")[0]
        types = _JSON_TYPES.get(base, (object,))
        ok = isinstance(v, types) and (base == "bool" or not isinstance(v, bool))
        ok = ok and not (isinstance(v, float) and not math.isfinite(v))
        want = {"int": "an integer", "float": "a finite number", "str": "a string", "bool": "true or false"}.get(
            base, base
        )
        lo, hi = RANGES.get(f.name, (-math.inf, math.inf))
        if ok and base in ("int", "float") and not lo <= v <= hi:
            raise ConfigError(f"{where}: field {f.name!r} = {v!r} is out of range [{lo:g}, {hi:g}]")
    if not ok:
        raise ConfigError(f"{where}: field {f.name!r} must be {want}, got {str(v)[:60]!r}")


def shipped_configs() -> dict[str, str]:
    """Names of the configs shipped in ``hw_dq/configs`` with their one-line description."""
    out = {}
    for f in sorted(resources.files("hw_dq").joinpath("configs").iterdir(), key=lambda p: p.name):
        if f.name.endswith(".json"):
            out[f.name[:-5]] = json.loads(f.read_text()).get("_about", "")
    return out


def _read(name_or_path: str | Path) -> dict[str, Any]:
    path = Path(name_or_path)
    if path.is_file():
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"config {name_or_path} cannot be read ({str(e)[:120]})") from None
    else:
        ref = resources.files("hw_dq").joinpath("configs", f"{name_or_path}.json")
        if not ref.is_file():
            raise ConfigError(
                f"config {name_or_path!r} is neither a file nor a shipped config ({', '.join(shipped_configs())})"
            )
        text = ref.read_text()
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise ConfigError(f"config {name_or_path} is not valid JSON: {str(e)[:120]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {name_or_path} must be a JSON object of TrainConfig fields")
    return {k: v for k, v in data.items() if not k.startswith("_")}


def load_config(name_or_path: str | Path | None = None, **overrides: Any) -> TrainConfig:
    """A TrainConfig from a config file (or the defaults), with the given overrides applied.

    ``None`` overrides are ignored (a flag that was not given); to set a field to ``None``
    (full precision bits) pass ``'float'``.
    """
    base = TrainConfig.from_dict(_read(name_or_path), f"config {name_or_path}") if name_or_path else TrainConfig()
    known = {f.name for f in fields(TrainConfig)}
    bad = sorted(set(overrides) - known)
    if bad:
        raise ConfigError(f"unknown option(s) {', '.join(bad)}")
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})


def _bits_arg(text: str) -> str:
    """argparse type of --wbits/--abits: validated here, parsed by TrainConfig (so 'float' is not 'absent')."""
    try:
        parse_bits(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e).replace("invalid bit width ", "")) from None
    return text


def _flag_type(f: Any) -> Any:
    ann = str(f.type)
    if f.metadata.get("bits"):
        return _bits_arg
    if ann.startswith("int"):
        return int
    if ann.startswith("float"):
        return float
    return str


def add_arguments(p: argparse.ArgumentParser) -> None:
    """One ``--flag`` per TrainConfig field (absent flags leave the config file's value)."""
    groups: dict[str, Any] = {}
    for f in fields(TrainConfig):
        meta = f.metadata
        if not meta.get("cli", True):
            continue
        g = groups.setdefault(meta["group"], p.add_argument_group(meta["group"]))
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        flag = "--" + f.name.replace("_", "-")
        shown = "float" if meta.get("bits") and default is None else default
        help_ = f"{meta['help']} (default: {shown})"
        if str(f.type) == "bool":
            g.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_)
            continue
        kw: dict[str, Any] = {"type": _flag_type(f), "default": argparse.SUPPRESS, "help": help_}
        if "choices" in meta:
            kw["choices"] = meta["choices"]
        if "metavar" in meta:
            kw["metavar"] = meta["metavar"]
        g.add_argument(flag, **kw)


def overrides_from(ns: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig fields a parsed command line set explicitly."""
    return {f.name: getattr(ns, f.name) for f in fields(TrainConfig) if hasattr(ns, f.name)}


def stored_config(cfg_json: dict[str, Any], where: str = "config.json") -> TrainConfig:
    """The TrainConfig of a run directory's config.json (``train`` section)."""
    try:
        return TrainConfig.from_dict(cfg_json["train"], where)
    except (KeyError, TypeError) as e:
        raise ConfigError(f"{where} has no valid 'train' section ({e})") from None
