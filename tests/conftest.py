"""Test infrastructure shared by the whole suite.

- Triton on the CPU: without a CUDA GPU, TRITON_INTERPRET=1 is set here, before any kernel
  module is imported (`@triton.jit` reads it when it decorates). Tests that launch Triton kernels
  carry the `triton_interpret` marker (or use the `triton_interpret` fixture) so they can be
  selected or deselected as a group.
- `gpu` marker: the test needs CUDA; skipped here, run by benchmarks/gpu_suite.sh
  (`--with-gpu-tests`). `R7B_GPU_TESTS_ON_CPU=1` runs them anyway, at the tiny shapes they pick
  without CUDA, through the interpreter: a check of the tests' own code.
"""

from __future__ import annotations

import os
import shutil

import pytest

HAS_CUDA = False
try:
    import torch

    HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover - torch is a hard dependency
    pass

if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run by benchmarks/gpu_suite.sh)")
    if os.environ.get("R7B_GPU_TESTS_ON_CPU") == "1":  # check the GPU tests' code at tiny shapes
        return
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture
def triton_interpret():
    """Guarantees Triton kernels can run here: on CUDA natively, else through the interpreter."""
    from r7b_fast.kernels._backend import interpreting

    if not HAS_CUDA and not interpreting():
        pytest.fail("TRITON_INTERPRET must be set before kernel modules are imported")
    return not HAS_CUDA


@pytest.fixture
def cuobjdump_available():
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(path) and shutil.which("cuobjdump") is None:
        pytest.fail("Triton's bundled cuobjdump is missing: cannot check kernels for sm_90")
    return path
