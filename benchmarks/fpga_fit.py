"""CNV w1a1 / w2a2 at 200 MHz on Pynq-Z1 and ZCU104: hw-dq's --fit vs finn-examples' folding.

Untrained (random-init, seed 0) full-width CNV weights: FINN's throughput and resource
estimates depend on the topology, bit widths and folding, not on trained weight values.
Run: .venv/bin/python -m benchmarks.fpga_fit  (writes benchmarks/results/fpga_fit.json + .md)
"""

from __future__ import annotations

import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from hw_dq.boards import get_board
from hw_dq.build import build_model
from hw_dq.export import export_model, sample_images
from hw_dq.models import create_model

# FINN's estimate of the finn-examples folding configs (shared/data/finn-examples-bnn-pynq/README.md)
FINN_EXAMPLES = {
    "w1a1": {"fps": 6104, "LUT": 24559, "BRAM_18K": 147},
    "w2a2": {"fps": 1736, "LUT": 20650, "BRAM_18K": 202},
}
OUT = Path(__file__).resolve().parent / "results"


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for tag, (wb, ab) in {"w1a1": (1, 1), "w2a2": (2, 2)}.items():
            torch.manual_seed(0)
            exp = export_model(create_model("cnv", wb, ab).eval(), Path(tmp) / tag, sample_images({}, 4))
            for board in ("Pynq-Z1", "ZCU104"):
                t0 = time.time()
                r = build_model(exp.qonnx, get_board(board), Path(tmp) / tag / board, fit=True, clock_mhz=200,
                                sample_input=exp.sample_input, sample_output=exp.sample_output)  # fmt: skip
                rows.append({
                    "model": f"cnv-{tag}", "board": board, "clock_mhz": 200, "fit_fps": round(r["fps"], 1),
                    "fit_LUT": r["total"]["LUT"], "fit_BRAM_18K": r["total"]["BRAM_18K"], "fit_DSP": r["total"]["DSP"],
                    "fits": r["fits"], "bottleneck": r["bottleneck"], "build_wall_s": round(time.time() - t0, 1),
                    "finn_examples_fps": FINN_EXAMPLES[tag]["fps"], "finn_examples_LUT": FINN_EXAMPLES[tag]["LUT"],
                    "finn_examples_BRAM_18K": FINN_EXAMPLES[tag]["BRAM_18K"],
                })  # fmt: skip
                print(rows[-1], flush=True)
    machine = f"{platform.machine()}, {platform.processor() or 'cpu'}, {torch.get_num_threads()} threads, no GPU/Vivado"
    res = {"machine": machine, "weights": "untrained random-init full-width CNV (seed 0)", "rows": rows,
           "finn_examples_source": "FINN estimate of finn-examples build/bnn-pynq folding configs, "
           "Pynq-Z1 part, 200 MHz"}  # fmt: skip
    OUT.mkdir(exist_ok=True)
    (OUT / "fpga_fit.json").write_text(json.dumps(res, indent=2) + "\n")
    head = (
        "| model | board | --fit FPS | LUT | BRAM_18K | fits | bottleneck | finn-examples FPS / LUT / BRAM | wall s |"
    )
    lines = [f"# --fit vs finn-examples folding at 200 MHz ({machine})", "", res["weights"], "", head,
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['board']} | {r['fit_fps']:,.0f} | {r['fit_LUT']:,.0f} | {r['fit_BRAM_18K']:,.0f} "
            f"| {r['fits']} | {r['bottleneck']} | {r['finn_examples_fps']:,} / {r['finn_examples_LUT']:,} / "
            f"{r['finn_examples_BRAM_18K']} | {r['build_wall_s']} |"
        )
    (OUT / "fpga_fit.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
