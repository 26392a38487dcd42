"""Run by test_train.py under torchrun: train with DDP (gloo), dump this rank's weights."""

import sys
from pathlib import Path

import torch.distributed as dist
from safetensors.torch import save_file

from hw_dq.train.loop import TrainConfig, fit

out = Path(sys.argv[1])
cfg = TrainConfig(
    model="tiny", wbits=2, abits=2, beta=1e-3, epochs=2, batch_size=64,
    train_subset=256, test_subset=64, device="cpu",
)  # fmt: skip
model, _ = fit(cfg, out / "run", progress=False)
state = {k: v.contiguous() for k, v in model.state_dict().items()}
save_file(state, str(out / f"rank{dist.get_rank()}.safetensors"))
dist.barrier()
dist.destroy_process_group()
