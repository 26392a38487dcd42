"""CLI verbs of the FPGA flow: ``export``, ``build``, ``boards``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def cmd_export(a: argparse.Namespace) -> int:
    from hw_dq.fpga.export import export_run

    r = export_run(a.run_dir, head=a.head, qcdq=a.qcdq, n=a.n, out=a.out)
    eq = r.equivalence
    print(
        f"exported {r.qonnx} ({eq['head']} head, UINT8 input): max |logit diff| {eq['max_abs_logit_diff']:.3g}, "
        f"top-1 agreement {100 * eq['top1_agreement']:.1f}% on {eq['n_images']} test images"
    )
    if r.qcdq:
        print(f"QCDQ ONNX: {r.qcdq}")
    return 0


def cmd_build(a: argparse.Namespace) -> int:
    from hw_dq.errors import ConfigError
    from hw_dq.fpga.build import build_run

    if (a.run_dir is None) == (a.onnx is None):
        raise ConfigError("give a run directory or --onnx FILE (one of the two)")
    if a.onnx is not None and not (a.onnx.endswith(".onnx") and Path(a.onnx).is_file()):
        raise ConfigError(f"--onnx {a.onnx}: not an existing .onnx file (a QONNX model, e.g. exported by Brevitas)")
    r = build_run(
        a.run_dir or a.onnx, a.board, target_fps=a.target_fps, fit=a.fit, clock_mhz=a.clock_mhz, out=a.out,
        boards_dir=a.boards_dir, progress=not a.quiet, folding_config=a.folding_config,
    )  # fmt: skip
    util = ", ".join(f"{k} {100 * v:.0f}%" for k, v in r["utilisation"].items())
    print(
        f"{r['board']['name']} @ {r['clock_mhz']:.0f} MHz ({r['folding']}): est. {r['fps']:,.0f} FPS, latency "
        f"{r['latency_us']:,.0f} us, bottleneck {r['bottleneck']}; {util}; "
        f"{'fits' if r['fits'] else 'does NOT fit'} FINN's recommended limits"
    )
    print(f"report: {r['build_dir']}/report.md")
    print(r["tools_line"])
    if not r["tools"]["has_vivado"]:
        print(f"bitstream on a machine with Vivado: {r['bitstream_command']}")
    return 0


def cmd_boards(a: argparse.Namespace) -> int:
    from hw_dq.fpga.boards import boards_table, load_boards

    print(boards_table(load_boards(a.boards_dir)))
    return 0


def register(sub: Any) -> None:
    """Add the export / build / boards verbs to the ``hw-dq`` sub-parsers."""
    e = sub.add_parser("export", help="QONNX export of a run, with an equivalence check vs PyTorch")
    e.add_argument("run_dir")
    e.add_argument("--head", choices=("logits", "label"), default="logits", help="logits, or the top-1 label (TopK)")
    e.add_argument("--qcdq", action="store_true", help="also write QCDQ ONNX (onnxruntime)")
    e.add_argument("--n", type=int, default=32, help="test images for the equivalence check")
    e.add_argument("--out", metavar="DIR", help="export folder (default: RUN_DIR/export, where build looks)")
    e.set_defaults(func=cmd_export)

    b = sub.add_parser("build", help="FINN dataflow build for a board: folding, estimates, bitstream-ready folder")
    b.add_argument("run_dir", nargs="?", help="run directory (exported if needed) or a QONNX .onnx file")
    b.add_argument("--onnx", metavar="FILE", help="your own QONNX model (e.g. exported by Brevitas) instead of a run; "
                   "default --out: FILE's folder/build_<stem>_<board>")  # fmt: skip
    b.add_argument("--board", required=True, help="board name (see 'hw-dq boards')")
    g = b.add_mutually_exclusive_group()
    g.add_argument("--target-fps", type=float, help="fold for this throughput (FINN SetFolding)")
    g.add_argument("--fit", action="store_true", help="highest throughput within FINN's utilisation limits (default)")
    g.add_argument(
        "--folding-config", metavar="FILE",
        help="a FINN folding JSON (e.g. an edited BUILD/folding_config.json) instead of the folding search",
    )  # fmt: skip
    b.add_argument("--clock-mhz", type=float, help="override the board's default clock")
    b.add_argument("--out", help="build folder (default: RUN_DIR/build/BOARD, the board's catalogue spelling)")
    b.add_argument("--boards-dir", help="extra folder of board JSON files")
    b.add_argument("--quiet", action="store_true", help="no progress output (the result line is still printed)")
    b.set_defaults(func=cmd_build)

    s = sub.add_parser("boards", help="list the known boards and their resources")
    s.add_argument("--boards-dir", help="extra folder of board JSON files")
    s.set_defaults(func=cmd_boards)
