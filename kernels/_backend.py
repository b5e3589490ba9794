"""Backend choice shared by every kernel: Triton on CUDA or under the interpreter, torch elsewhere."""

from __future__ import annotations

import collections
import contextlib
import os
import threading

import torch

BACKENDS = ("auto", "triton", "torch")


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1).

    `@triton.jit` reads the variable when it decorates, so it must be set before the kernel
    modules are imported (tests/conftest.py does it once)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_counting = threading.local()


@contextlib.contextmanager
def kernel_calls():
    """Count the calls of our kernels' dispatchers inside the block, per kernel and backend:

        with kernel_calls() as calls:
            loss = model(...)
        assert calls["linear_logprobs"] > 0       # also calls["linear_logprobs:torch"] etc.

    The proof that a patched model (or a trainer) really ran our path rather than falling back
    silently. Counts are per thread; blocks nest (each sees the calls made inside it)."""
    counters = getattr(_counting, "stack", None)
    if counters is None:
        counters = _counting.stack = []
    calls: collections.Counter = collections.Counter()
    counters.append(calls)
    try:
        yield calls
    finally:
        counters.remove(calls)


def record_call(kernel: str, backend: str) -> None:
    """Called by each dispatcher with the backend it resolved to (see `kernel_calls`)."""
    for calls in getattr(_counting, "stack", ()):
        calls[kernel] += 1
        calls[f"{kernel}:{backend}"] += 1


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
