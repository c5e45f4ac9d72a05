"""Test-wide settings. Triton kernels run in its CPU interpreter when no GPU is present; the
variable must be set before any `triton.jit` decorator runs, i.e. before kernels are imported."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
