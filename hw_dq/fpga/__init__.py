"""FPGA stage: boards, QONNX export, FINN build and folding, the bit-exact simulator, attacks on it."""
