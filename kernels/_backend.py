"""Backend choice shared by every kernel: Triton on CUDA or under the interpreter, torch elsewhere.

Triton is optional: it is imported only when a Triton path runs (`triton_module`). Where it is not
importable (macOS, Windows, a minimal venv), "auto" picks torch (warning once, with the
ImportError: at the first eager call, or at import on a CUDA machine since a compiled model
cannot warn), and "triton" raises ImportError quoting it.
"""

from __future__ import annotations

import collections
import contextlib
import importlib
import importlib.util
import os
import threading
import warnings

import torch

BACKENDS = ("auto", "triton", "torch")

# Debug mode (R7B_FAST_DEBUG=1 in the environment, or set this flag at run time): input checks
# that read tensor values on the host (cu_seqlens monotone and ending at T, max_seqlen >= the
# longest sequence, targets in range) also run for tensors off the CPU, at one device sync per
# call. Off by default: on CUDA the kernels then never sync; CPU tensors are always checked (a
# host read there is no sync). Never under torch.compile (a host read breaks the graph).
DEBUG = os.environ.get("R7B_FAST_DEBUG", "0") not in ("", "0")


def host_value_checks(t: torch.Tensor) -> bool:
    """Whether to run the input checks that read `t`'s values on the host (see DEBUG)."""
    if torch.compiler.is_compiling():
        return False
    return DEBUG or t.device.type == "cpu"


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
        # by identity: list.remove compares Counters by content, and a nested block with the
        # same counts as an outer one would remove the outer one
        del counters[next(i for i, c in enumerate(counters) if c is calls)]


def record_call(kernel: str, backend: str) -> None:
    """Called by each dispatcher with the backend it resolved to (see `kernel_calls`)."""
    for calls in getattr(_counting, "stack", ()):
        calls[kernel] += 1
        calls[f"{kernel}:{backend}"] += 1


def _find_triton() -> ImportError | None:
    """Whether triton is installed, without importing it (cheap: a path lookup)."""
    try:
        found = importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError) as e:  # a finder refusing it; sys.modules["triton"] = None
        return e if isinstance(e, ImportError) else ImportError(str(e))
    return None if found else ModuleNotFoundError("No module named 'triton'", name="triton")


_triton_error: ImportError | None = _find_triton()  # refined by the first real import
_triton_imported = False
_warned_no_triton = False


def triton_import_error() -> ImportError | None:
    """None if triton is importable here, else its ImportError. Outside torch.compile the first
    call imports triton (cached); while compiling, where an import cannot be traced, the
    answer is that import's if it ran, else whether triton is installed (`_find_triton`)."""
    global _triton_error, _triton_imported
    if not _triton_imported and not torch.compiler.is_compiling():
        _triton_imported = True
        if _triton_error is None:
            try:
                importlib.import_module("triton")
            except ImportError as e:
                _triton_error = e
    return _triton_error


def _no_triton_message(err: ImportError) -> str:
    return f"triton is not importable ({type(err).__name__}: {err})"


def triton_module(name: str):
    """Import the Triton half of a kernel (`name`, a module that imports triton at its top); an
    ImportError naming the missing triton, with its own message, if triton is not importable."""
    err = triton_import_error()
    if err is not None:
        raise ImportError(
            f"{name} needs triton, but {_no_triton_message(err)}; use backend='torch'"
        ) from err
    return importlib.import_module(name)


def resolve_backend(backend: str, *tensors: torch.Tensor) -> str:
    """'auto' -> 'triton' when every tensor is on CUDA or the interpreter is on, and triton is
    importable (else 'torch', warning once why), else 'torch'. 'triton' raises ValueError without
    CUDA tensors or the interpreter, ImportError (quoting triton's) if triton is not importable."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return backend
    wants_triton = interpreting() or all(t.is_cuda for t in tensors)
    if backend == "triton" and not wants_triton:
        raise ValueError(
            "backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter)"
        )
    if not wants_triton:
        return "torch"
    err = triton_import_error()
    if err is None:
        return "triton"
    if backend == "triton":
        raise ImportError(f"backend='triton' but {_no_triton_message(err)}") from err
    if not torch.compiler.is_compiling():  # dynamo cannot trace warnings.warn (see _warn_once)
        _warn_once(err, stacklevel=4)
    return "torch"


def _warn_once(err: ImportError, stacklevel: int = 2) -> None:
    global _warned_no_triton
    if not _warned_no_triton:
        _warned_no_triton = True
        warnings.warn(
            f"r7b_fast.kernels: backend='auto' runs the torch twins: {_no_triton_message(err)}",
            stacklevel=stacklevel,
        )


# A CUDA machine without triton: say so once now, so that a model that only ever runs compiled
# (where resolve_backend cannot warn) is told too. CPU-only machines lose nothing: no warning.
if _triton_error is not None and torch.cuda.is_available():
    _warn_once(_triton_error)
