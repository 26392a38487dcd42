"""``hw-dq reproduce``: the Defensive Quantization experiment at CPU scale, resumable.

Plan (``cpu`` scale; ``smoke`` is the same plan shrunk to minutes for tests), built in
:mod:`.plan` as typed :class:`RunSpec` entries, run by :mod:`.runner`, judged by :mod:`.claims`:

1. train FP (full precision) on a CIFAR-10 subset; every quantized run is fine-tuned from
   it (the recipe the method notes recommend for low-bit ReLU6): VQ (beta = 0) and DQ at each
   of the scale's betas, at each of its bit widths; adversarially trained (FGSM with random
   start) FP, VQ and DQ (largest beta) at the ``adv_abits`` widths;
2. attack every model: FGSM and PGD-10 at the scale's eps and AutoAttack (APGD-CE, APGD-T,
   Square) at 8, plus PGD transferred from the FP twin, on ``n_eval`` test images, with the
   gradient-masking checks;
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
