"""The ``hw-dq`` command line: one verb per pipeline stage.

Every user error (bad flag, unknown model, missing data, corrupt checkpoint) is printed as
one line ``hw-dq: error: ...`` and exits with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence

from hw_dq.errors import HwDqError

EXIT_USAGE = 2
# Each later pipeline stage adds its verbs in its own module: register(subparsers) adds
# sub-parsers whose ``func(args) -> int`` raises HwDqError for user errors.
VERB_MODULES: tuple[str, ...] = (
    "hw_dq.cli.fpga", "hw_dq.cli.eval", "hw_dq.cli.faults", "hw_dq.cli.certify", "hw_dq.cli.sweep",
)  # fmt: skip


def _no_default(action: argparse.Action) -> bool:
    """Nothing worth showing: no default, or a flag's False (0 is a default worth showing)."""
    return action.default is None or action.default is False or action.default == argparse.SUPPRESS


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default in ``--help``, except where there is none to show (None, False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        d = action.default[0] if isinstance(action.default, list) and len(action.default) == 1 else action.default
        said = {f"default: {d}", f"default {d}"} | (
            {f"default {d:g}", f"default: {d:g}"} if isinstance(d, float) else set()
        )
        if _no_default(action) or "%(default)" in text or any(s in text for s in said):
            return text  # nothing to show, or the help already states it
        return super()._get_help_string(action) or text

    def _format_action(self, action: argparse.Action) -> str:
        if action.help is None and action.option_strings and not _no_default(action):
            action.help = "default: %(default)s"  # an option without help text still shows its default
        return super()._format_action(action)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (what is wrong and where to look), and every
    ``--help`` shows the defaults."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"hw-dq: error: {message} (see '{self.prog} --help')\n")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    from hw_dq.train.config import add_arguments

    p.add_argument("--config", help="JSON config file or shipped config name (see 'hw-dq configs'); flags override it")
    p.add_argument(
        "--out", required=True, metavar="RUN_DIR", help="run directory to create (or continue with --resume)"
    )
    p.add_argument("--resume", action="store_true", help="continue a killed run from its last checkpoint")
    add_arguments(p)  # one flag per TrainConfig field, generated from the dataclass
    p.add_argument("--quiet", action="store_true", help="no progress output")


def cmd_train(a: argparse.Namespace) -> int:
    from hw_dq.train.config import load_config, overrides_from
    from hw_dq.train.loop import train

    cfg = load_config(a.config, **overrides_from(a))
    row = train(cfg, a.out, resume=a.resume, progress=not a.quiet)
    if row:
        print(f"done: {a.out} (test accuracy {100 * row.get('test_acc', 0):.2f}%)")
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from hw_dq.experiments.demo import run_demo

    run_demo(a.out, epochs=a.epochs, n_eval=a.n, seed=a.seed, progress=not a.quiet, fpga=not a.no_fpga, device=a.device)
    return 0


def cmd_lipschitz(a: argparse.Namespace) -> int:
    from hw_dq.nn import lipschitz
    from hw_dq.run import load_model

    model, _ = load_model(a.run_dir)
    print(lipschitz.table(lipschitz.report(model)))
    return 0


def cmd_configs(_a: argparse.Namespace) -> int:
    from hw_dq.train.config import shipped_configs

    for name, about in shipped_configs().items():
        print(f"{name:18s} {about}")
    return 0


def cmd_zoo(_a: argparse.Namespace) -> int:
    from hw_dq.zoo import table

    print(table())
    return 0


def build_parser() -> argparse.ArgumentParser:
    from hw_dq.version import __version__

    p = _Parser(prog="hw-dq", description="Defensive Quantization for FPGAs: train, attack, export, build.")
    p.add_argument("--version", action="version", version=f"hw-dq {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    t = sub.add_parser("train", help="quantization-aware training (FP / VQ / DQ)")
    _add_train_args(t)
    t.set_defaults(func=cmd_train)
    d = sub.add_parser("demo", help="VQ vs DQ on the embedded CIFAR-10 sample (a few minutes on a CPU)")
    d.add_argument("--out", default="runs/demo", help="directory for the two run directories")
    d.add_argument("--epochs", type=int, help="epochs per model (default: the demo config's)")
    d.add_argument("--n", type=int, default=500, help="test images to evaluate")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--no-fpga", action="store_true", help="skip the QONNX export, FINN build and hardware attacks")
    d.add_argument("--device", default="auto", help="auto (the GPU where PyTorch sees one), cpu, cuda, cuda:1 ...")
    d.add_argument("--quiet", action="store_true", help="no progress output")
    d.set_defaults(func=cmd_demo)
    lp = sub.add_parser("lipschitz", help="per-layer operator norms (BN folded) of a trained run")
    lp.add_argument("run_dir")
    lp.set_defaults(func=cmd_lipschitz)
    c = sub.add_parser("configs", help="list the shipped training configs")
    c.set_defaults(func=cmd_configs)
    z = sub.add_parser("zoo", help="list the model zoo's trained models (use one as zoo:NAME in any verb)")
    z.set_defaults(func=cmd_zoo)
    for module in VERB_MODULES:
        importlib.import_module(module).register(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        from hw_dq.zoo import resolve_args  # every zoo:NAME run argument -> its writable copy under runs/zoo/

        resolve_args(args)
        from hw_dq.run import guard_verb  # the run directory's lock; a full disk is one line

        with guard_verb(args):
            return func(args)
    except HwDqError as e:
        print(f"hw-dq: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        how = ("run the same command again to continue it" if args.cmd in ("sweep", "reproduce", "attack", "faults")
               else "a training run continues with --resume")  # fmt: skip
        print(f"hw-dq: interrupted ({how})", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
