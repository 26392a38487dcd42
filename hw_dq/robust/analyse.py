"""Error amplification (Lin, Gan, Han 2019, Fig. 1/4): how far adversarial noise travels.

For clean/adversarial pairs (x, x') and each layer l, the relative distance
``||f_l(x') - f_l(x)||_2 / ||f_l(x)||_2`` per example, averaged over the examples whose
``f_l(x)`` is not all zero (the count of those skipped is reported). ``f_l`` is the
output of the l-th activation (conv/linear + BatchNorm + quantized ReLU6), and the last
layer is the logits. The BN-folded operator norm of the conv/linear layer feeding each
activation (from :mod:`hw_dq.nn.lipschitz`) is shown beside it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import brevitas.nn as qnn
import torch
from torch import nn

ACTIVATIONS = (qnn.QuantReLU, nn.Hardtanh, nn.ReLU, nn.ReLU6)


def taps(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The activation modules in execution order, then the last conv/linear (the logits)."""
    acts, last = [], None
    for name, m in model.named_modules():
        if acts and name.startswith(acts[-1][0] + "."):
            continue  # Brevitas' inner modules of a quantized activation
        if isinstance(m, ACTIVATIONS):
            acts.append((name, m))
        elif isinstance(m, nn.Conv2d | nn.Linear):
            last = (name, m)
    return acts + ([last] if last is not None and (not acts or last[0] != acts[-1][0]) else [])


@torch.no_grad()
def layer_outputs(model: nn.Module, x: torch.Tensor, points: Sequence[tuple[str, nn.Module]]) -> list[torch.Tensor]:
    """Output of each tap module (flattened per example) for input ``x``."""
    outs: list[torch.Tensor] = [torch.empty(0)] * len(points)
    hooks = []
    for i, (_, m) in enumerate(points):

        def hook(_m: nn.Module, _inp: Any, out: Any, i: int = i) -> None:
            t = out.value if hasattr(out, "value") else out
            outs[i] = t.detach().flatten(1).float()

        hooks.append(m.register_forward_hook(hook))
    was = model.training
    model.eval()
    try:
        model(x.to(next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    return outs


def amplification(
    model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, points: Sequence[tuple[str, nn.Module]] | None = None
) -> list[dict[str, Any]]:
    """Per layer: name, mean relative distance, examples skipped (zero clean output)."""
    points = list(points) if points is not None else taps(model)
    clean = layer_outputs(model, x, points)
    adv = layer_outputs(model, x_adv, points)
    rows = []
    for (name, _), a, b in zip(points, clean, adv, strict=True):
        na = a.norm(dim=1)
        keep = na > 0
        rel = ((b - a).norm(dim=1)[keep] / na[keep]).mean().item() if bool(keep.any()) else float("nan")
        rows.append({"layer": name, "rel_dist": rel, "n_zero": int((~keep).sum())})
    return rows


def _label(cfg: dict[str, Any]) -> str:
    m, t = cfg.get("model", {}), cfg.get("train", {})
    bits = "fp32" if m.get("wbits") is None and m.get("abits") is None else f"w{m.get('wbits')}a{m.get('abits')}"
    label = f"{cfg.get('mode', '?')} {bits}"
    if t.get("beta"):
        label += f" b={t['beta']:g}"
    if t.get("adv_train", "none") != "none":
        label += f" +{t['adv_train']}AT"
    return label


def analyse_model(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: str = "pgd", eps: float = 8.0, seed: int = 0
) -> dict[str, Any]:
    """White-box adversarial examples on ``model`` and its amplification rows."""
    from hw_dq.robust.attacks import generate

    x_adv, _, _ = generate(model, x, y, attack, eps, seed=seed)
    return {"rows": amplification(model, x, torch.from_numpy(x_adv))}


def analyse_runs(
    run_dirs: Sequence[str | Path],
    out: str | Path,
    attack: str = "pgd",
    eps: float = 8.0,
    n: int = 256,
    seed: int = 0,
    data_dir: str | None = None,
    device: str = "auto",
) -> dict[str, Any]:
    """Amplification of several runs side by side; writes amplification.json/.md/.png to ``out``."""
    from hw_dq import run as rd
    from hw_dq.data import load_split
    from hw_dq.errors import ConfigError
    from hw_dq.nn import lipschitz
    from hw_dq.robust.attacks import check_attack

    check_attack(attack, eps)
    if n <= 0:
        raise ConfigError(f"invalid --n {n}: must be positive")
    runs = []
    for rdir in run_dirs:
        model, cfg = rd.load_model(rdir, device=device)
        tr = cfg.get("train", {})
        x, y = load_split(tr.get("data", "sample"), "test", data_dir or tr.get("data_dir")).take(n, seed).tensors()
        res = analyse_model(model, x, y, attack, eps, seed)
        lip_path = Path(rdir) / "lipschitz.json"
        lip = rd.read_json(lip_path) if lip_path.is_file() else lipschitz.report(model, tuple(x.shape[1:]))
        norms = [row["norm_folded"] for row in lip["layers"]]
        runs.append({"run_dir": str(rdir), "label": _label(cfg), "rows": res["rows"], "op_norms": norms,
                     "lipschitz_bound": lip["network_bound"]})  # fmt: skip
    rep = {"attack": attack, "eps": eps, "n_examples": n, "seed": seed, "runs": runs}
    rep["table"] = table(rep)
    out = Path(out)
    rd.write_json(out / "amplification.json", rep)
    rd.write_text(out / "amplification.md", rep["table"] + "\n")
    plot(rep, out / "amplification.png")
    return rep


def table(rep: dict[str, Any]) -> str:
    """Markdown: one row per layer; per run the relative distance and the BN-folded norm."""
    runs = rep["runs"]
    head = ["layer #"]
    for r in runs:
        head += [f"{r['label']} rel. dist", f"{r['label']} ||BN(W)||"]
    lines = [
        f"Error amplification: {rep['attack']} at {rep['eps']:g}/255, white-box on each model, "
        f"{rep['n_examples']} test images (seed {rep['seed']}).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    depth = max(len(r["rows"]) for r in runs)
    for i in range(depth):
        cells = [str(i + 1) + (" (logits)" if i == depth - 1 else "")]
        for r in runs:
            row = r["rows"][i] if i < len(r["rows"]) else None
            norm = r["op_norms"][i] if i < len(r["op_norms"]) and len(r["op_norms"]) == len(r["rows"]) else None
            cells.append("-" if row is None else f"{row['rel_dist']:.3f}")
            cells.append("-" if norm is None else f"{norm:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("| Lipschitz bound | " + " | ".join(f" | {r['lipschitz_bound']:.3g}" for r in runs) + " |")
    return "\n".join(lines)


def plot(rep: dict[str, Any], path: Path) -> None:
    """Two panels: relative distance per layer (log scale) and BN-folded operator norm per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for r in rep["runs"]:
        xs = range(1, len(r["rows"]) + 1)
        a1.plot(xs, [row["rel_dist"] for row in r["rows"]], marker="o", label=r["label"])
        a2.plot(range(1, len(r["op_norms"]) + 1), r["op_norms"], marker="s", label=r["label"])
    a1.set(xlabel="layer", ylabel="||f(x') - f(x)|| / ||f(x)||", yscale="log",
           title=f"error amplification ({rep['attack']} {rep['eps']:g}/255)")  # fmt: skip
    a2.set(xlabel="layer", ylabel="BN-folded operator norm", yscale="log", title="Lipschitz diagnostic")
    for ax in (a1, a2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
