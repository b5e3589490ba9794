"""varlen_attention: Triton (interpreter here) and the per-sequence reference against a float64
truth (the reference in float64). The fast torch path has its own tests: test_attention_torch.py.

Shapes are tiny but ragged; the interpreter runs 16x16 tiles, so lengths 1, 13, 16, 17, 37 and
windows around them hit every tile kind: masked diagonal/window edges, unmasked interior tiles,
partial last tiles, sequences shorter than a tile.
"""

from __future__ import annotations

import pytest
import torch

from r7b_fast.kernels.attention import (
    varlen_attention,
    varlen_attention_reference,
    varlen_attention_torch,
)

pytestmark = pytest.mark.triton_interpret
EPS = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def make(lens, hq, hk, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = sum(lens)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    q, k, v = (torch.randn(T, h, d, generator=g).to(dtype) for h in (hq, hk, hk))
    do = torch.randn(T, hq, d, generator=g).to(dtype)
    return q, k, v, do, cu


def run(fn, q, k, v, do, cu, max_len, **kw):
    """(out, dq, dk, dv) of fn on fresh leaves (same values, q/k/v dtype unchanged)."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves, cu, max_len, **kw)
    return (out, *torch.autograd.grad(out, leaves, do.to(out.dtype)))


CASES = [
    # lens, Hq, Hk, D, dtype, causal, window
    ([1, 13, 37, 16], 4, 4, 16, torch.float32, True, None),  # GQA 1, partial and full tiles
    ([1, 4, 5, 6, 13], 4, 2, 32, torch.bfloat16, True, 5),  # GQA 2, lengths w-1, w, w+1
    ([1, 17, 3], 4, 1, 16, torch.float16, True, 1),  # GQA 4, window 1: each row sees itself
    ([7, 19], 2, 1, 16, torch.bfloat16, False, None),  # not causal
    ([50, 70], 2, 1, 16, torch.float32, True, 33),  # window spanning > 2 tiles: unmasked interior
    ([5, 0, 12], 4, 2, 64, torch.float16, True, 4),  # head dim 64, an empty sequence
    ([3, 17], 2, 1, 128, torch.bfloat16, True, None),  # head dim 128 (R7B's)
]


@pytest.mark.parametrize("lens,hq,hk,d,dtype,causal,window", CASES)
def test_triton_and_twin_match_float64(lens, hq, hk, d, dtype, causal, window):
    q, k, v, do, cu = make(lens, hq, hk, d, dtype)
    kw = dict(causal=causal, window=window)
    ours = run(varlen_attention, q, k, v, do, cu, max(lens), backend="triton", **kw)
    twin = run(varlen_attention_reference, q, k, v, do, cu, max(lens), **kw)
    truth = run(
        varlen_attention_reference, q.double(), k.double(), v.double(), do, cu, max(lens), **kw
    )
    for name, a, b, t in zip(("out", "dq", "dk", "dv"), ours, twin, truth):
        assert a.dtype == dtype and a.shape == t.shape
        err_ours = (a.double() - t).abs().max().item()
        err_twin = (b.double() - t).abs().max().item()
        # Bound: PyTorch's own error in this dtype (same roundings of inputs, probabilities and
        # result) x2 for a different summation order, plus two roundings of the largest entry,
        # plus 1e-5 for fp32 accumulation of O(1) products where the truth is exactly 0
        # (window 1: dS = P * (dP - Delta) = 0, and dP, Delta are summed in different orders).
        bound = 2 * err_twin + 2 * EPS[dtype] * t.abs().max().item() + 1e-5
        assert err_ours <= bound, (
            f"{name}: triton err {err_ours:.3g} > {bound:.3g} (twin {err_twin:.3g})"
        )


def test_packed_row_equals_each_sequence_alone():
    lens = [5, 21, 1, 18]
    q, k, v, do, cu = make(lens, 4, 2, 16, torch.float32, seed=1)
    kw = dict(causal=True, window=7, backend="triton")
    packed = run(varlen_attention, q, k, v, do, cu, max(lens), **kw)
    s = 0
    for L in lens:
        one = torch.tensor([0, L], dtype=torch.int32)
        alone = run(
            varlen_attention, q[s : s + L], k[s : s + L], v[s : s + L], do[s : s + L], one, L, **kw
        )
        for a, b in zip(packed, alone):
            torch.testing.assert_close(a[s : s + L], b, rtol=1e-6, atol=1e-6)
        s += L
    # the other sequences' K/V can be anything: the second sequence does not move
    k2, v2 = k.clone(), v.clone()
    k2[:5], v2[:5], k2[26:], v2[26:] = 9.0, -1e4, -9.0, 1e4
    again = run(varlen_attention, q, k2, v2, do, cu, max(lens), **kw)
    torch.testing.assert_close(again[0][5:26], packed[0][5:26], rtol=0, atol=0)
    torch.testing.assert_close(again[1][5:26], packed[1][5:26], rtol=0, atol=0)


def test_masked_tiles_are_never_loaded():
    """NaN planted in a key tile that a block must skip stays out of that block; a loaded but
    masked tile would spread it (p = 0, but 0 * NaN = NaN). Window 16, 16x16 tiles, L = 64:
    query blocks from 32 on start at key tile 16, so key 0 must never be read for them."""
    L, w = 64, 16
    q, k, v, do, cu = make([L], 2, 1, 16, torch.float32, seed=2)
    truth = run(varlen_attention_reference, q.double(), k.double(), v.double(), do, cu, L, window=w)
    k[0], v[0] = float("nan"), float("nan")
    out, dq, dk, dv = run(varlen_attention, q, k, v, do, cu, L, window=w, backend="triton")
    assert out[:16].isnan().any()  # blocks that do load key tile 0 show the poison
    for got, want in ((out, truth[0]), (dq, truth[1]), (dk, truth[2]), (dv, truth[3])):
        torch.testing.assert_close(got[32:].double(), want[32:], rtol=1e-5, atol=1e-5)


def test_backend_dispatch():
    q, k, v, do, cu = make([3, 9], 2, 1, 16, torch.float32)
    auto = varlen_attention(q, k, v, cu, 9, window=4)  # interpreter on: Triton
    tri = varlen_attention(q, k, v, cu, 9, window=4, backend="triton")
    tor = varlen_attention(q, k, v, cu, 9, window=4, backend="torch")
    assert torch.equal(auto, tri)
    torch.testing.assert_close(tor, varlen_attention_torch(q, k, v, cu, 9, window=4))
    with pytest.raises(ValueError, match="backend"):
        varlen_attention(q, k, v, cu, 9, backend="cuda")


def _bad(**over):
    q, k, v, _, cu = make([3, 5], 4, 2, 16, torch.float32)
    args = dict(q=q, k=k, v=v, cu_seqlens=cu, max_seqlen=5)
    args.update(over)
    kw = {n: args.pop(n) for n in ("causal", "window") if n in args}
    return lambda: varlen_attention(*args.values(), **kw)


@pytest.mark.parametrize(
    "over,msg",
    [
        (dict(cu_seqlens=torch.tensor([0, 3, 8])), "int32"),
        (dict(cu_seqlens=torch.tensor([0, 5, 3, 8], dtype=torch.int32)), "monotonic"),
        (dict(cu_seqlens=torch.tensor([0, 3, 7], dtype=torch.int32)), "end at total tokens 8"),
        (dict(cu_seqlens=torch.tensor([1, 3, 8], dtype=torch.int32)), "start at 0"),
        (dict(max_seqlen=4), "max_seqlen"),
        (dict(k=torch.zeros(8, 3, 16), v=torch.zeros(8, 3, 16)), "multiple of k/v heads"),
        (
            dict(q=torch.zeros(8, 4, 24), k=torch.zeros(8, 2, 24), v=torch.zeros(8, 2, 24)),
            "head_dim 24",
        ),
        (dict(k=torch.zeros(8, 2, 16, dtype=torch.bfloat16)), "dtypes differ"),
        (dict(q=torch.zeros(8, 4, 16, dtype=torch.float64)), "q dtype"),
        (dict(v=torch.zeros(8, 2, 16, device="meta")), "one device"),
        (dict(v=torch.zeros(8, 3, 16)), "must be \\[8, Hk, 16\\]"),
        (dict(window=0), "window"),
        (dict(window=4, causal=False), "causal=True"),
    ],
)
def test_bad_inputs_raise_clear_errors(over, msg):
    with pytest.raises(ValueError, match=msg):
        _bad(**over)()


def test_torch_compile_traces_without_graph_breaks():
    """The Triton path is a torch custom op with fake shapes and registered autograd, so a model
    around it compiles as one graph (fullgraph=True raises on a break)."""
    q, k, v, do, cu = make([3, 9], 2, 1, 16, torch.float32, seed=3)

    def f(q, k, v):
        return varlen_attention(q * 2, k, v, cu, 9, window=4).sin()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = compiled(*leaves)
    grads = torch.autograd.grad(out, leaves, do)
    leaves_e = [t.clone().requires_grad_() for t in (q, k, v)]
    out_e = f(*leaves_e)
    grads_e = torch.autograd.grad(out_e, leaves_e, do)
    torch.testing.assert_close(out, out_e, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads, grads_e):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[3], CASES[4]], ids=str)
def test_atomic_dq_schedule_matches_float64(case, monkeypatch):
    """The second backward schedule (dQ added by fp32 atomics in the dK/dV kernel) meets the
    same float64 bound as the default; the dQ kernel must not run (a stub that raises)."""
    from r7b_fast.kernels import attention_bwd

    class NoDqKernel:
        def __getitem__(self, grid):
            raise AssertionError("the atomic schedule launched the dQ kernel")

    monkeypatch.setattr(attention_bwd, "SCHEDULE", "atomic")
    monkeypatch.setattr(attention_bwd, "attn_bwd_dq_kernel", NoDqKernel())
    test_triton_and_twin_match_float64(*case)


def test_unknown_backward_schedule_raises(monkeypatch):
    from r7b_fast.kernels import attention_bwd

    monkeypatch.setattr(attention_bwd, "SCHEDULE", "fused")
    with pytest.raises(ValueError, match="SCHEDULE"):
        run(varlen_attention, *make([3, 5], 2, 1, 16, torch.float32), 5, backend="triton")
