"""``hw-dq reproduce``: the Defensive Quantization experiment at CPU scale, resumable.

Plan (``cpu`` scale; ``smoke`` is the same plan shrunk to minutes for tests), built in
:mod:`.plan` as typed :class:`RunSpec` entries, run by :mod:`.runner`, judged by :mod:`.claims`:

1. train FP (full precision) on a CIFAR-10 subset; every quantized run is fine-tuned from
   it (the recipe the method notes recommend for low-bit ReLU6): VQ (beta = 0) and DQ at each
   of the scale's betas, at each of its bit widths; adversarially trained (``adv_recipe``,
   N-FGSM by default) FP, VQ and DQ (largest beta) at the ``at_abits`` widths (2 and 4), the
   quantized ones fine-tuned per width by ``at_finetune`` (at 4 bits the shipped ``robust_cpu``
   recipe: 2 epochs of PGD-3 at lr 0.0005; VQ+AT and DQ+AT always share one recipe);
2. attack every model on the same ``n_eval`` test images: FGSM and PGD-10 at the scale's eps,
   and at ``judged_eps`` (2 and 8) the reference AutoAttack (standard), BPDA, temperature PGD
   and PGD transferred from the FP twin; the headline is their per-image worst case, with the
   gradient-masking checks; the quantized runs' accelerators get ``hw_attacks`` (AutoAttack
   transferred, Square 5,000, HopSkipJump) at the same eps;
3. feature squeezing (bit depth as the input quantizer; median) on FP, and on VQ and DQ
   (largest beta) at the ``adv_abits`` widths;
4. the error-amplification table and plot for FP, VQ and DQ (largest beta) at 2 bits or fewer;
5. ``summary.md``: the table of every result and a verdict per claim of the paper, computed
   from the numbers by the rules written next to each verdict.
"""

from hw_dq.experiments.reproduce.claims import claims
from hw_dq.experiments.reproduce.plan import SCALES, Plan, RunSpec, Scale, load_scale, plan
from hw_dq.experiments.reproduce.runner import DEFAULT_OUT, add_timing, reproduce, summarise

__all__ = [
    "DEFAULT_OUT",
    "SCALES",
    "Plan",
    "RunSpec",
    "Scale",
    "add_timing",
    "claims",
    "load_scale",
    "plan",
    "reproduce",
    "summarise",
]
