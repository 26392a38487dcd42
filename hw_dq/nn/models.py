"""Model zoo on Brevitas layers, behind :func:`create_model`.

* ``cnv``  - the FINN-friendly VGG-like CNV of Brevitas' bnn_pynq examples: six 3x3
  convolutions (64, 64, 128, 128, 256, 256 channels x ``width``, no padding, max-pool
  after the 2nd and 4th) and three fully connected layers (512, 512, classes).
* ``wrn``  - Wide ResNet (depth 6n+4, widening factor ``width``) whose residual blocks are
  the convex combination ``lam * shortcut(x) + (1 - lam) * f(x)`` (as in Parseval networks),
  so a block is non-expansive whenever both branches are.
* ``tiny`` - two convolutions and one classifier, for fast tests.

Every conv/linear is directly followed by its BatchNorm (or nothing), which is what
:mod:`hw_dq.nn.lipschitz` relies on to fold BatchNorm into the layer's operator.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from hw_dq.errors import CheckpointError, ConfigError
from hw_dq.nn.quant import SCHEME_FIXED, QuantSpec, act_range_of_scheme, parse_bits, quant_scheme

MODELS = ("cnv", "wrn", "tiny")


def _ch(c: int, width: float) -> int:
    return max(1, round(c * width))


class CNV(nn.Module):
    """Brevitas bnn_pynq CNV topology with a width multiplier."""

    CONV = (64, 64, 128, 128, 256, 256)
    POOL_AFTER = (1, 3)
    FC = (512, 512)

    def __init__(
        self, spec: QuantSpec, num_classes: int = 10, width: float = 1.0, in_ch: int = 3, end_bits: int | None = None
    ):
        super().__init__()
        self.input_quant = spec.input_quant()
        layers: list[nn.Module] = []
        cin = in_ch
        for i, c in enumerate(self.CONV):
            cout = _ch(c, width)
            layers += [(spec.with_wbits(end_bits) if i == 0 else spec).conv(cin, cout, 3), spec.bn(cout), spec.act()]
            if i in self.POOL_AFTER:
                layers.append(nn.MaxPool2d(2))
            cin = cout
        self.features = nn.Sequential(*layers)
        fc: list[nn.Module] = []
        for f in self.FC:
            fout = _ch(f, width)
            fc += [spec.linear(cin, fout), spec.bn(fout, 1), spec.act()]
            cin = fout
        fc.append(spec.with_wbits(end_bits).linear(cin, num_classes))
        self.classifier = nn.Sequential(*fc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.input_quant(x))
        return self.classifier(torch.flatten(x, 1))


class Tiny(nn.Module):
    """Two 3x3 convolutions with max-pooling and one classifier (fast tests)."""

    def __init__(
        self, spec: QuantSpec, num_classes: int = 10, width: float = 1.0, in_ch: int = 3, end_bits: int | None = None
    ):
        super().__init__()
        c1, c2 = _ch(16, width), _ch(32, width)
        self.input_quant = spec.input_quant()
        self.features = nn.Sequential(
            spec.with_wbits(end_bits).conv(in_ch, c1, 3), spec.bn(c1), spec.act(), nn.MaxPool2d(2),
            spec.conv(c1, c2, 3), spec.bn(c2), spec.act(), nn.MaxPool2d(2),
        )  # fmt: skip
        self.classifier = nn.Sequential(spec.with_wbits(end_bits).linear(c2 * 6 * 6, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.input_quant(x))
        return self.classifier(torch.flatten(x, 1))


RESIDUAL_BITS = 8  # the shared signed quantizer of both residual terms: step 2 * 6 / 254


def residual_quant(spec: QuantSpec) -> nn.Module:
    """Signed 8-bit quantizer on [-6, 6] with a constant scale (identity when activations are float).

    One instance quantizes both terms of a residual sum, so that they reach the add as integers
    on the same grid: FINN can then move the common scale past the add (an integer AddStreams).
    """
    if spec.abits is None:
        return nn.Identity()
    import brevitas.nn as qnn

    from hw_dq.nn.quant import ACT_MAX, FixedRangeActQuant

    return qnn.QuantIdentity(
        act_quant=FixedRangeActQuant, bit_width=RESIDUAL_BITS, min_val=-ACT_MAX, max_val=ACT_MAX,
        signed=True, narrow_range=True, return_quant_tensor=False,
    )  # fmt: skip


class ConvexBlock(nn.Module):
    """``act(q(lam * shortcut(x)) + q((1 - lam) * bn2(conv2(act(bn1(conv1(x)))))))``, one shared ``q``."""

    def __init__(self, spec: QuantSpec, cin: int, cout: int, stride: int, lam: float):
        super().__init__()
        self.lam = lam
        self.branch = nn.Sequential(
            spec.conv(cin, cout, 3, stride, 1), spec.bn(cout), spec.act(),
            spec.conv(cout, cout, 3, 1, 1), spec.bn(cout),
        )  # fmt: skip
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(spec.conv(cin, cout, 1, stride, 0), spec.bn(cout))
        self.merge = residual_quant(spec)
        self.act = spec.act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.merge(self.lam * self.shortcut(x)) + self.merge((1.0 - self.lam) * self.branch(x)))


class WideResNet(nn.Module):
    """WRN-depth-width with convex-combination residual blocks and post-activation."""

    def __init__(
        self,
        spec: QuantSpec,
        num_classes: int = 10,
        width: float = 10,
        depth: int = 28,
        in_ch: int = 3,
        lam: float = 0.5,
        end_bits: int | None = None,
    ):
        super().__init__()
        if (depth - 4) % 6 or depth < 10:
            raise ConfigError(f"invalid WRN depth {depth}: use 6n+4 with n >= 1 (10, 16, 22, 28, ...)")
        if not 0.0 < lam < 1.0:
            raise ConfigError(f"invalid residual lambda {lam}: use a value in (0, 1)")
        n = (depth - 4) // 6
        widths = [16, _ch(16, width), _ch(32, width), _ch(64, width)]
        self.input_quant = spec.input_quant()
        stem = spec.with_wbits(end_bits).conv(in_ch, widths[0], 3, 1, 1)
        self.stem = nn.Sequential(stem, spec.bn(widths[0]), spec.act())
        blocks: list[nn.Module] = []
        cin = widths[0]
        for stage, stride in zip(range(1, 4), (1, 2, 2), strict=True):
            for i in range(n):
                blocks.append(ConvexBlock(spec, cin, widths[stage], stride if i == 0 else 1, lam))
                cin = widths[stage]
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(spec.with_wbits(end_bits).linear(cin, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(self.input_quant(x)))
        return self.classifier(torch.flatten(self.pool(x), 1))

    def lipschitz_bound(self, norms: dict[str, float]) -> float:
        """Compose per-layer norms: chain through stem and blocks, convex sum per block."""
        bound = norms["stem.0"]
        for i, block in enumerate(self.blocks):
            pre = f"blocks.{i}."
            branch = norms[pre + "branch.0"] * norms[pre + "branch.3"]
            sc = norms.get(pre + "shortcut.0", 1.0) if not isinstance(block.shortcut, nn.Identity) else 1.0
            bound *= block.lam * sc + (1.0 - block.lam) * branch
        return bound * norms["classifier.0"]


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model (stored in each run directory)."""

    name: str = "cnv"
    wbits: int | None = 2
    abits: int | None = 2
    width: float | None = None
    depth: int = 28
    residual_lambda: float = 0.5
    num_classes: int = 10
    in_channels: int = 3
    act_range: str = "learned"  # "fixed": ReLU6 [0, 6] (scheme 1); "learned": per-tensor learned range
    end_bits: int | None = None  # weight bits of the first and last layer (mixed precision), None = wbits
    bn_gain_max: float | None = None  # bound BatchNorm's inference gain to [0, bn_gain_max]
    model_args: dict | None = None  # constructor keyword arguments of a user's own model (name 'module:Class')

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def quant_scheme(self) -> str:
        """The scheme stamp to store with a run of this model."""
        return quant_scheme(self.act_range)

    @classmethod
    def from_stored(cls, model: dict, stamp: str | None, where: object = "this run") -> ModelConfig:
        """The model section of a run's config.json under its scheme stamp (no stamp: scheme 1).

        Runs written before ``act_range`` existed carry no such key: their stamp says which it is.
        """
        act_range = act_range_of_scheme(stamp or SCHEME_FIXED, where)
        if not isinstance(model, dict):
            raise CheckpointError(f"{where} has no valid 'model' section")
        stored = model.get("act_range", act_range)
        if stored != act_range:
            raise CheckpointError(f"{where}: model act_range {stored!r} contradicts its quantizer scheme '{stamp}'")
        try:
            return cls(**{**model, "act_range": act_range})
        except (TypeError, ConfigError) as e:
            raise CheckpointError(f"{where} has no valid 'model' section ({e})") from None


def is_custom(name: str) -> bool:
    """Whether ``name`` names a user's own model class (``package.module:ClassName``)."""
    return ":" in name


def import_model_class(path: str) -> type[nn.Module]:
    """The ``nn.Module`` subclass named ``package.module:ClassName``, or a one-line ConfigError.

    The module is imported by name from ``sys.path`` (never from a file path): the name comes from
    the user's own command line or config file, and importing it runs that module's code, as
    ``python -c 'import package.module'`` would. Never pass a name taken from untrusted data.
    """
    import importlib

    module_name, _, cls_name = path.partition(":")
    if not module_name or not cls_name or not all(p.isidentifier() for p in module_name.split(".") + [cls_name]):
        raise ConfigError(
            f"invalid model {path!r}: use a shipped name ({', '.join(MODELS)}) or package.module:ClassName"
        )
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - any failure of the user's module is reported in one line
        raise ConfigError(f"cannot import model module {module_name!r} ({type(e).__name__}: {e})") from None
    cls = getattr(module, cls_name, None)
    if cls is None:
        raise ConfigError(f"module {module_name!r} has no class {cls_name!r}")
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ConfigError(f"model {path!r} is not a torch.nn.Module subclass")
    return cls


def _create_custom(
    path: str, wbits: int | None, abits: int | None, num_classes: int, in_channels: int, model_args: dict | None
) -> nn.Module:
    """A user's own model: ``num_classes``/``in_channels``/``wbits``/``abits`` are passed where the
    constructor names them (or takes ``**kwargs``), then ``model_args`` (which wins)."""
    import inspect

    cls = import_model_class(path)
    if model_args is not None and not isinstance(model_args, dict):
        raise ConfigError(f"model_args must be a JSON object of constructor arguments, not {type(model_args).__name__}")
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        params = {}
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    given = {"num_classes": num_classes, "in_channels": in_channels, "wbits": wbits, "abits": abits}
    kwargs = {k: v for k, v in given.items() if k in params or var_kw} | dict(model_args or {})
    try:
        model = cls(**kwargs)
    except Exception as e:  # noqa: BLE001 - a bad argument of the user's class is a one-line error
        raise ConfigError(f"cannot construct model {path} with {sorted(kwargs)} ({type(e).__name__}: {e})") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model {path!r} did not construct a torch.nn.Module")
    return model


def create_model(
    name: str,
    wbits: int | None,
    abits: int | None,
    *,
    width: float | None = None,
    depth: int = 28,
    num_classes: int = 10,
    in_channels: int = 3,
    residual_lambda: float = 0.5,
    act_range: str = "learned",
    end_bits: int | None = None,
    bn_gain_max: float | None = None,
    model_args: dict | None = None,
) -> nn.Module:
    """Build a model; ``wbits``/``abits`` = None for full precision (quantizers off).

    ``width`` defaults to 1.0 for ``cnv``/``tiny`` and 10 for ``wrn``. ``end_bits``: weight bits
    of the first and last layer (FINN takes 8-bit weights there), None = ``wbits`` everywhere.
    ``name`` may also be ``package.module:ClassName``, a user's own (Brevitas) model built with
    ``model_args`` (see :func:`import_model_class`); the shipped-model options do not apply to it.
    """
    if is_custom(name):
        return _create_custom(name, wbits, abits, num_classes, in_channels, model_args)
    if model_args:
        raise ConfigError(f"model_args is for a user's own model (package.module:ClassName), not {name!r}")
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; choose one of {', '.join(MODELS)} or package.module:ClassName")
    spec = QuantSpec(wbits, abits, act_range, bn_gain_max)
    end_bits = parse_bits(end_bits, "first/last layer weight bit width (end_bits)")
    if width is not None and width <= 0:
        raise ConfigError(f"invalid width {width}: must be positive")
    if name == "cnv":
        return CNV(spec, num_classes, 1.0 if width is None else width, in_channels, end_bits)
    if name == "tiny":
        return Tiny(spec, num_classes, 1.0 if width is None else width, in_channels, end_bits)
    w = 10 if width is None else width
    return WideResNet(spec, num_classes, w, depth, in_channels, residual_lambda, end_bits)


def model_from_config(cfg: ModelConfig) -> nn.Module:
    return create_model(
        cfg.name, cfg.wbits, cfg.abits, width=cfg.width, depth=cfg.depth,
        num_classes=cfg.num_classes, in_channels=cfg.in_channels,
        residual_lambda=cfg.residual_lambda, act_range=cfg.act_range, end_bits=cfg.end_bits,
        bn_gain_max=cfg.bn_gain_max, model_args=cfg.model_args,
    )  # fmt: skip
