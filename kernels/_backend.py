"""Backend choice shared by every kernel: Triton on CUDA or under the interpreter, torch elsewhere."""

from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "triton", "torch")


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1).

    `@triton.jit` reads the variable when it decorates, so it must be set before the kernel
    modules are imported (tests/conftest.py does it once)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend: str, *tensors: torch.Tensor) -> str:
    """'auto' -> 'triton' when every tensor is on CUDA or the interpreter is on, else 'torch'."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        if backend == "triton" and not interpreting() and not all(t.is_cuda for t in tensors):
            raise ValueError(
                "backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter)"
            )
        return backend
    if all(t.is_cuda for t in tensors) or interpreting():
        return "triton"
    return "torch"
