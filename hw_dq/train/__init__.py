"""Training stage: the run configuration and the QAT loop (FP, VQ and DQ through one code path)."""

from hw_dq.train.loop import TrainConfig, train

__all__ = ["TrainConfig", "train"]
