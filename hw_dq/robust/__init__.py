"""Robustness stage: attacks, the evaluation record, gradient-masking checks, squeezing, analysis."""
