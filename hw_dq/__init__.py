"""hw-dq: hardware-aware, adversarially robust (Defensive Quantization) QAT for FPGAs."""

import logging
import warnings

# torch warns on every import on machines with a CUDA toolkit but no GPU (brevitas imports
# torch.utils.cpp_extension); it is noise for a CPU run and would break one-line errors.
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)

# brevitas' export imports an optional CUDA kernel package and warns on every CPU machine
warnings.filterwarnings("ignore", message="fast_hadamard_transform package not found")

__version__ = "0.1.0"
