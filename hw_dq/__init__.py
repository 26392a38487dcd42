"""hw-dq: hardware-aware, adversarially robust (Defensive Quantization) QAT for FPGAs."""

import logging

# torch warns on every import on machines with a CUDA toolkit but no GPU (brevitas imports
# torch.utils.cpp_extension); it is noise for a CPU run and would break one-line errors.
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)

__version__ = "0.1.0"
