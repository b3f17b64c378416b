"""Fused ops: one module per op, each with its Triton kernel, PyTorch path and autograd glue."""

from mmdgen.kernels.backend import BACKENDS, resolve_backend
from mmdgen.kernels.mmd import DEFAULT_BANDWIDTHS, naive_rbf_mmd, rbf_mmd

__all__ = ["BACKENDS", "DEFAULT_BANDWIDTHS", "naive_rbf_mmd", "rbf_mmd", "resolve_backend"]
