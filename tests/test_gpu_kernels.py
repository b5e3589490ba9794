"""GPU correctness of the Triton kernels at real shapes (`gpu` marker: run by
`benchmarks/gpu_suite.sh --with-gpu-tests` or `pytest -m gpu` on a CUDA machine).

What the CPU tests cannot show: the GPU build (bf16 `tl.dot` on tensor cores, P and dS rounded to
bf16, the JIT's divisible-by-16 specialisation, pipelined loads) at Command R7B's shapes. Each
kernel is compared with a float64 truth by relative Frobenius error, and must be no worse than
PyTorch's own path in the same dtype against that truth, times 2 plus a small floor: the factor
covers a different summation order, the floor bf16's resolution on O(1) results (2^-8 = 4e-3
per element, ~1e-3 on a norm of many independent roundings).

Without CUDA the same tests run at tiny shapes through the Triton interpreter when
`R7B_GPU_TESTS_ON_CPU=1` (tests/conftest.py then does not skip them), so the test code itself is
checked here: `R7B_GPU_TESTS_ON_CPU=1 pytest -m gpu tests/test_gpu_kernels.py`.
"""

from __future__ import annotations

import pytest
import torch

from r7b_fast.kernels import linear_logprobs, linear_logprobs_torch, varlen_attention
from r7b_fast.kernels.attention import varlen_attention_reference

pytestmark = pytest.mark.gpu

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"


def _rel(x: torch.Tensor, truth: torch.Tensor) -> float:
    return ((x.double() - truth).norm() / truth.norm().clamp(min=1e-30)).item()


def _bound(torch_err: float, floor: float) -> float:
    return 2 * torch_err + floor


# ----------------------------------------------------------------------------- linear_logprobs

# (N, H, V): ragged N; R7B's hidden and vocab; the full 256k vocab at a small N.
LLP_SHAPES = [(2085, 4096, 32003), (515, 4096, 256000)] if CUDA else [(37, 48, 301)]


@pytest.mark.parametrize("N,H,V", LLP_SHAPES)
def test_linear_logprobs_bf16_real_shapes(N, H, V):
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(N, H, generator=g) * 0.5).to(DEV, torch.bfloat16)
    w = (torch.randn(V, H, generator=g) * H**-0.5).to(DEV, torch.bfloat16)
    t = torch.randint(0, V, (N,), generator=g).to(DEV)
    t[::7] = -100
    scale, dy = 0.25, torch.randn(N, generator=g).to(DEV)

    def run(fn, hh, ww, **kw):
        hh, ww = hh.detach().clone().requires_grad_(), ww.detach().clone().requires_grad_()
        out = fn(hh, ww, t, scale=scale, **kw)
        dh, dw = torch.autograd.grad(out, (hh, ww), dy.to(out.dtype))
        return out, dh, dw

    truth = run(linear_logprobs_torch, h.double(), w.double())
    ours = run(linear_logprobs, h, w, backend="triton")
    ref = run(linear_logprobs_torch, h, w)  # PyTorch, fp32 logits from the bf16 inputs
    assert ours[0].dtype == torch.float32
    assert torch.all(ours[0][::7] == 0)
    for name, a, r, tr in zip(("logp", "dh", "dw"), ours, ref, truth):
        assert torch.isfinite(a).all(), name
        # the floor: bf16 gradients carry bf16 rounding (4e-3 relative per element)
        floor = 1e-5 if name == "logp" else 5e-3
        assert _rel(a, tr) <= _bound(_rel(r, tr), floor), (name, _rel(a, tr), _rel(r, tr))


# ----------------------------------------------------------------------------- varlen attention

if CUDA:
    ATT = dict(hq=32, hk=8, d=128)
    # ragged packed lengths; windows: none, R7B's 4096, and residues mod 16 that the CPU tile
    # sizes hide (an off-by-one in the backward's query-tile bound shows only at 2 mod 16)
    LENS = [1, 17, 300, 1000, 2049, 4500]
    WINDOWS = [None, 18, 34, 33, 4096]
else:
    ATT = dict(hq=4, hk=2, d=16)
    LENS = [1, 7, 40]
    WINDOWS = [None, 18]


@pytest.mark.parametrize("window", WINDOWS)
def test_varlen_attention_bf16_real_shapes(window):
    g = torch.Generator().manual_seed(1)
    T = sum(LENS)
    q, k, v = (
        torch.randn(T, n, ATT["d"], generator=g).to(DEV, torch.bfloat16)
        for n in (ATT["hq"], ATT["hk"], ATT["hk"])
    )
    do = torch.randn(T, ATT["hq"], ATT["d"], generator=g).to(DEV, torch.bfloat16)
    cu = torch.tensor([0, *torch.tensor(LENS).cumsum(0).tolist()], dtype=torch.int32, device=DEV)

    def run(fn, dtype, **kw):
        leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
        out = fn(*leaves, cu, max(LENS), window=window, **kw)
        return (out, *torch.autograd.grad(out, leaves, do.to(dtype)))

    truth = run(varlen_attention_reference, torch.float64)
    ours = run(varlen_attention, torch.bfloat16, backend="triton")
    ref = run(varlen_attention_reference, torch.bfloat16)
    for name, a, r, tr in zip(("out", "dq", "dk", "dv"), ours, ref, truth):
        assert a.dtype == torch.bfloat16 and torch.isfinite(a).all(), name
        assert _rel(a, tr) <= _bound(_rel(r, tr), 2e-3), (name, _rel(a, tr), _rel(r, tr))
