"""varlen_attention (Triton; the interpreter here) swept over every residue of its tile size.

The interpreter runs 16x16 tiles (INTERP_BLOCK), and the tile bounds (first/last key tile of a
query block, first/last query tile of a key block, which of them are interior and unmasked)
are integer arithmetic on positions, windows and lengths modulo 16. An off-by-one there is
wrong only at one residue (e.g. a query-tile bound one short loses the last query tile exactly
when window = 2 mod 16), so these tests try every window 1..33 (= 2 * 16 + 1) over one packed
row whose sequence lengths sit on both sides of the tile multiples, and every length 1..33.
Inputs are fp32 (exact 'ieee' dots): out, dq, dk, dv must match the float64 reference to
fp32 accumulation error. D = 16, 2 query heads on 1 kv head (GQA): tiny, so the fast half runs
in well under a minute; the windows past one tile are marked slow.

The bf16 test checks the interpreter's GPU-rounding mode: P and dS rounded to bf16 where the
GPU's dots take them in bf16 (ROUND_IN_INTERPRETER), and the result still within bf16's bound.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from r7b_fast.kernels import attention_bwd, attention_fwd
from r7b_fast.kernels.attention import varlen_attention, varlen_attention_reference

pytestmark = pytest.mark.triton_interpret
BLOCK = attention_fwd.INTERP_BLOCK  # 16
_real_bounds = attention_bwd.query_tile_bounds  # kept: the mutant test below wraps it
# lengths below, at and past one tile, and partial 3rd and 4th tiles (for windows past a tile)
LENS = [1, BLOCK - 1, BLOCK, BLOCK + 1, 2 * BLOCK + 2, 3 * BLOCK + 2]


def make(lens, dtype, seed=0, hq=2, hk=1, d=16):
    g = torch.Generator().manual_seed(seed)
    T = sum(lens)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    q, k, v = (torch.randn(T, h, d, generator=g).to(dtype) for h in (hq, hk, hk))
    return q, k, v, torch.randn(T, hq, d, generator=g).to(dtype), cu


def run(fn, q, k, v, do, cu, max_len, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves, cu, max_len, **kw)
    return (out, *torch.autograd.grad(out, leaves, do.to(out.dtype)))


def check_fp32(lens, causal, window, seed=0):
    q, k, v, do, cu = make(lens, torch.float32, seed)
    kw = dict(causal=causal, window=window)
    ours = run(varlen_attention, q, k, v, do, cu, max(lens), backend="triton", **kw)
    truth = run(varlen_attention_reference, *(t.double() for t in (q, k, v)), do, cu, max(lens),
                **kw)  # fmt: skip
    for name, a, t in zip(("out", "dq", "dk", "dv"), ours, truth):
        # fp32 products and sums of O(1) terms over <= 50 keys (and, for dk/dv, <= 2 x 50
        # queries): a few hundred ulps of fp32 at most; a lost or extra tile is O(0.1).
        err = (a.double() - t).abs().max().item()
        assert err <= 2e-5 * (1 + t.abs().max().item()), (name, causal, window, err)


@pytest.mark.parametrize("window", range(1, BLOCK + 2))
def test_windows_within_a_tile(window):
    check_fp32(LENS, True, window)


@pytest.mark.slow
@pytest.mark.parametrize("window", range(BLOCK + 2, 2 * BLOCK + 2))
def test_windows_past_a_tile(window):
    check_fp32(LENS, True, window)


@pytest.mark.parametrize("causal", [True, False])
def test_every_length_up_to_two_tiles_plus_one(causal):
    """Sequences of every length 1..33 packed in one row (each starting at a different residue
    of the row's tiles), causal and not."""
    check_fp32(list(range(1, 2 * BLOCK + 2)), causal, None, seed=1)


def test_bf16_rounds_p_and_ds_as_the_gpu_and_stays_within_bf16_bound(monkeypatch):
    """bf16 inputs: with P and dS rounded to bf16 before their dots (the GPU's operands), out and
    the gradients stay within bf16's bound of the float64 truth: twice the bf16 reference's own
    error (it rounds its probabilities and products in bf16 too) plus two roundings of the
    largest entry. Under the interpreter the rounding must change the result (else the mode
    did nothing): switched off, P and dS stay fp32 and the bits differ."""
    lens = [5, BLOCK + 2, 2 * BLOCK + 3]
    q, k, v, do, cu = make(lens, torch.bfloat16, seed=2, hq=4, hk=2)
    kw = dict(causal=True, window=BLOCK + 2)
    ours = run(varlen_attention, q, k, v, do, cu, max(lens), backend="triton", **kw)
    twin = run(varlen_attention_reference, q, k, v, do, cu, max(lens), **kw)
    truth = run(varlen_attention_reference, *(t.double() for t in (q, k, v)), do, cu, max(lens),
                **kw)  # fmt: skip
    eps = 2.0**-8
    for name, a, b, t in zip(("out", "dq", "dk", "dv"), ours, twin, truth):
        err = (a.double() - t).abs().max().item()
        bound = 2 * (b.double() - t).abs().max().item() + 2 * eps * t.abs().max().item()
        assert err <= bound, (name, err, bound)
    if not attention_fwd.interpreting():
        return  # on a GPU the dots round P and dS themselves: nothing to switch
    monkeypatch.setattr(attention_fwd, "ROUND_IN_INTERPRETER", False)
    unrounded = run(varlen_attention, q, k, v, do, cu, max(lens), backend="triton", **kw)
    for name, a, u in zip(("out", "dq", "dk", "dv"), ours, unrounded):
        assert not torch.equal(a, u), f"{name}: rounding P/dS to bf16 changed nothing"


@triton.jit
def _bounds_one_short(k0, L, window, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """attention_bwd.query_tile_bounds with issue 15's off-by-one: the windowed query bound one
    row short (k0 + BLOCK_N - 2 + window), which loses a query tile only at window = 2 mod 16."""
    lo, a, b, hi = _real_bounds(k0, L, window, CAUSAL, HAS_WINDOW, BLOCK_M, BLOCK_N)
    if HAS_WINDOW:
        hi = tl.minimum(L, k0 + BLOCK_N - 2 + window)
        a = tl.minimum(a, hi)
        b = tl.minimum(tl.maximum(b, a), hi)
    return lo, a, b, hi


@pytest.mark.skipif(not attention_fwd.interpreting(), reason="swaps a jit helper: interpreter")
def test_the_sweep_catches_the_query_bound_off_by_one(monkeypatch):
    """The sweep's power: with the off-by-one planted, window 2 (in the fast half) fails on dK
    while window 3 still passes (the mutant is invisible off its residue, as in issue 15)."""
    monkeypatch.setattr(attention_bwd, "query_tile_bounds", _bounds_one_short)
    check_fp32(LENS, True, 3)
    with pytest.raises(AssertionError, match="'dk'"):
        check_fp32(LENS, True, 2)
