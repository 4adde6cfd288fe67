"""Triton kernels of sparse_rl, installed as ``sparse_rl.kernels`` (never as a top-level ``kernels``)."""
