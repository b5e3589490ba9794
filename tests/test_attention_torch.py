"""The fast plain-torch varlen attention (`varlen_attention_torch`, what backend="torch" and
"auto" on CPU run) against the per-sequence loop `varlen_attention_reference` and a float64
truth (that loop in float64: code independent of the fast path's tiles, groups and masks).

The fast path cuts the row into 32-query tiles (attention.TILE) grouped by how far back (and,
non-causal, ahead) their keys reach; lengths 0, 1, 31-33, 65 and 100 with windows 1/5/33/None
put tile edges inside, at and across sequence and window boundaries, and give several groups.
"""

from __future__ import annotations

import pytest
import torch

import r7b_fast.kernels.attention as attn
from r7b_fast.kernels.attention import (
    varlen_attention,
    varlen_attention_reference,
    varlen_attention_torch,
)

EPS = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def make(lens, hq, hk, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = sum(lens)
    cu = torch.tensor([0, *torch.tensor(lens, dtype=torch.long).cumsum(0).tolist()])
    q, k, v = (torch.randn(T, h, d, generator=g).to(dtype) for h in (hq, hk, hk))
    do = torch.randn(T, hq, d, generator=g).to(dtype)
    return q, k, v, do, cu.to(torch.int32)


def run(fn, q, k, v, do, cu, max_len, **kw):
    """(out, dq, dk, dv) of fn on fresh leaves."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves, cu, max_len, **kw)
    return (out, *torch.autograd.grad(out, leaves, do.to(out.dtype)))


def assert_close_to_truth(got, ref, truth, dtype):
    """(out, dq, dk, dv) of a path vs the reference in the same dtype and the float64 truth.

    Bound: the reference's own error in this dtype (same input roundings; it rounds the
    products, the fast paths' SDPA accumulates in fp32) x2 for another summation order, plus two
    roundings of the largest entry, plus 1e-5 for fp32 sums of O(1) terms where the truth is
    exactly 0 (window 1: dS = P * (dP - Delta) = 0 up to rounding)."""
    for name, a, b, t in zip(("out", "dq", "dk", "dv"), got, ref, truth):
        assert a.dtype == dtype and a.shape == t.shape, name
        err, err_ref = ((x.double() - t).abs().max().item() for x in (a, b))
        bound = 2 * err_ref + 2 * EPS[dtype] * t.abs().max().item() + 1e-5
        assert err <= bound, f"{name}: err {err:.3g} > {bound:.3g}"


CASES = [
    # lens, Hq, Hk, D, dtype, causal, window
    ([0, 1, 33, 100, 0, 31], 4, 4, 16, torch.float32, True, None),  # GQA 1, zero-length seqs
    ([1, 4, 5, 6, 65], 4, 2, 32, torch.bfloat16, True, 5),  # GQA 2, lengths w-1, w, w+1
    ([1, 40, 3], 4, 1, 16, torch.float16, True, 1),  # GQA 4, window 1: each row sees itself
    ([7, 0, 45, 1], 2, 1, 64, torch.bfloat16, False, None),  # not causal, head dim 64
    ([70, 2, 32], 2, 1, 16, torch.float32, True, 33),  # window 33 > tile: two tiles back
    ([3, 17], 2, 2, 128, torch.float16, True, None),  # head dim 128 (R7B's), one tile
]


@pytest.mark.parametrize("lens,hq,hk,d,dtype,causal,window", CASES)
def test_fast_path_matches_float64_as_well_as_the_reference(lens, hq, hk, d, dtype, causal, window):
    q, k, v, do, cu = make(lens, hq, hk, d, dtype)
    kw = dict(causal=causal, window=window)
    fast = run(varlen_attention_torch, q, k, v, do, cu, max(lens), **kw)
    ref = run(varlen_attention_reference, q, k, v, do, cu, max(lens), **kw)
    truth = run(varlen_attention_reference, q.double(), k.double(), v.double(), do, cu, max(lens),
                **kw)  # fmt: skip
    assert_close_to_truth(fast, ref, truth, dtype)


@pytest.mark.parametrize("causal,window", [(True, None), (True, 2), (True, 33), (False, None)])
def test_float64_fast_equals_reference(causal, window):
    """In float64 both are exact to ~1e-15: any masking or gathering slip shows as O(1)."""
    lens = [0, 1, 2, 31, 32, 33, 0, 65, 100, 1]
    q, k, v, do, cu = make(lens, 4, 2, 16, torch.float64, seed=1)
    kw = dict(causal=causal, window=window)
    fast = run(varlen_attention_torch, q, k, v, do, cu, max(lens) + 5, **kw)  # loose max: fine
    ref = run(varlen_attention_reference, q, k, v, do, cu, max(lens), **kw)
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_split_calls_equal_one_call(monkeypatch):
    """The gather budget splits a group of tiles over several SDPA calls (long rows): same
    result, tiles computed independently either way."""
    lens = [130, 5, 90]
    q, k, v, do, cu = make(lens, 2, 1, 16, torch.float32, seed=2)
    whole = run(varlen_attention_torch, q, k, v, do, cu, 130)
    monkeypatch.setattr(attn, "GATHER_BUDGET", 1)  # one tile per call
    split = run(varlen_attention_torch, q, k, v, do, cu, 130)
    for a, b in zip(whole, split):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_no_leakage_across_sequences():
    """Other sequences' K/V can be anything (even inf-scale): a sequence's output and gradients
    do not move, and equal the sequence run alone."""
    lens = [40, 21, 1, 50]
    q, k, v, do, cu = make(lens, 4, 2, 16, torch.float32, seed=3)
    packed = run(varlen_attention_torch, q, k, v, do, cu, 50, window=7)
    k2, v2 = k.clone(), v.clone()
    k2[:40], v2[:40], k2[61:], v2[61:] = 9.0, -1e4, -9.0, 1e4
    again = run(varlen_attention_torch, q, k2, v2, do, cu, 50, window=7)
    one = torch.tensor([0, 21], dtype=torch.int32)
    alone = run(varlen_attention_torch, q[40:61], k[40:61], v[40:61], do[40:61], one, 21, window=7)
    for a, b, c in zip(packed[:2], again[:2], alone[:2]):  # out, dq
        torch.testing.assert_close(b[40:61], a[40:61], rtol=0, atol=0)
        torch.testing.assert_close(a[40:61], c, rtol=1e-6, atol=1e-6)
    for a, c in zip(packed[2:], alone[2:]):  # dk, dv of the middle sequence
        torch.testing.assert_close(a[40:61], c, rtol=1e-6, atol=1e-6)


def test_empty_row_and_backend_torch():
    q, k, v, do, cu = make([0, 0], 2, 1, 16, torch.float32)
    out, dq, dk, dv = run(varlen_attention_torch, q, k, v, do, cu, 0)
    assert out.shape == (0, 2, 16) and dq.shape == (0, 2, 16) and dk.shape == (0, 1, 16)
    q, k, v, do, cu = make([5, 9], 2, 1, 32, torch.float32)
    via = varlen_attention(q, k, v, cu, 9, window=3, backend="torch")
    assert torch.equal(via, varlen_attention_torch(q, k, v, cu, 9, window=3))
    with pytest.raises(ValueError, match="window"):
        varlen_attention_torch(q, k, v, cu, 9, window=0)
