"""varlen_attention's torch path without host reads: the banded path (`attention._banded`) that
torch.compile traces (and tensors off the CPU run), and the debug-mode value checks.

- `torch.compile(fullgraph=True)` of a function calling varlen_attention(backend="torch") over
  ragged packed sequences: any host read of cu_seqlens (.tolist(), .item(), a data-dependent
  branch) is a graph break, which fullgraph turns into an error, so compiling at all is the proof
  of "no host sync"; forward and backward then match `varlen_attention_reference`.
- The banded path in eager against the reference on test_attention_torch's cases (tile edges at,
  inside and across sequence and window boundaries) and in float64.
- Value checks (cu_seqlens monotone, ending at T, max_seqlen >= longest) run on CPU tensors and,
  in debug mode, on any device; never under torch.compile.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_attention_torch import CASES, assert_close_to_truth, make, run

import r7b_fast.kernels._backend as backend_mod
import r7b_fast.kernels.attention as attn
from r7b_fast.kernels.attention import varlen_attention, varlen_attention_reference

LENS = [1, 7, 33, 2]  # a 1-token sequence, one crossing the 32-query tile edge, a short tail


def banded(q, k, v, cu, max_seqlen, *, causal=True, window=None):
    """The banded path in eager (on CPU tensors varlen_attention runs the planner instead)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    return attn._banded(q, k, v, cu, max_seqlen, causal, window, scale)


@pytest.mark.parametrize("causal,window", [(True, None), (True, 5), (False, None)])
def test_fullgraph_compile_matches_reference(causal, window):
    q, k, v, do, cu = make(LENS, 4, 2, 16, torch.float32, seed=5)
    kw = dict(causal=causal, window=window)

    def fn(q, k, v, cu):
        return varlen_attention(q, k, v, cu, max(LENS), backend="torch", **kw)

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    got = run(lambda q, k, v, cu, _m, **_: compiled(q, k, v, cu), q, k, v, do, cu, 0)
    ref = run(varlen_attention_reference, q, k, v, do, cu, max(LENS), **kw)
    truth = run(varlen_attention_reference, *(x.double() for x in (q, k, v)), do, cu, 33, **kw)
    assert_close_to_truth(got, ref, truth, torch.float32)


@pytest.mark.slow
def test_inductor_compile_matches_reference():
    """One real inductor compile (CPU C++ codegen), windowed as R7B's sliding layers. Slow: 108 s
    wall on the shared 2-core machine (compiling forward and backward kernels in C++)."""
    q, k, v, do, cu = make(LENS, 4, 2, 16, torch.float32, seed=6)
    fn = lambda q, k, v, cu: varlen_attention(q, k, v, cu, 33, window=5, backend="torch")
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="inductor", fullgraph=True)
    got = run(lambda q, k, v, cu, _m: compiled(q, k, v, cu), q, k, v, do, cu, 0)
    ref = run(varlen_attention_reference, q, k, v, do, cu, 33, window=5)
    truth = run(varlen_attention_reference, *(x.double() for x in (q, k, v)), do, cu, 33, window=5)
    assert_close_to_truth(got, ref, truth, torch.float32)


@pytest.mark.parametrize("lens,hq,hk,d,dtype,causal,window", CASES)
def test_banded_eager_matches_float64(lens, hq, hk, d, dtype, causal, window):
    q, k, v, do, cu = make(lens, hq, hk, d, dtype)
    kw = dict(causal=causal, window=window)
    got = run(banded, q, k, v, do, cu, max(lens), **kw)
    ref = run(varlen_attention_reference, q, k, v, do, cu, max(lens), **kw)
    truth = run(varlen_attention_reference, *(x.double() for x in (q, k, v)), do, cu, max(lens),
                **kw)  # fmt: skip
    assert_close_to_truth(got, ref, truth, dtype)


@pytest.mark.parametrize("causal,window", [(True, None), (True, 2), (True, 33), (False, None)])
@pytest.mark.parametrize("slack", [0, 7, 200])
def test_banded_float64_equals_reference(causal, window, slack, monkeypatch):
    """float64, exact to ~1e-15: a masking or band slip shows as O(1). max_seqlen above the
    longest sequence (slack) only widens the band; a small gather budget splits the tiles over
    several SDPA calls (slack 0) and slack 200 covers the row with one tile (no band)."""
    lens = [0, 1, 2, 31, 32, 33, 0, 65, 100, 1]
    q, k, v, do, cu = make(lens, 4, 2, 16, torch.float64, seed=1)
    kw = dict(causal=causal, window=window)
    if slack == 0:
        monkeypatch.setattr(attn, "GATHER_BUDGET", 1)  # one tile per SDPA call
    got = run(banded, q, k, v, do, cu, max(lens) + slack, **kw)
    ref = run(varlen_attention_reference, q, k, v, do, cu, max(lens), **kw)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_band_shape():
    """The key span is the reach the contract allows, never more: back = min(max_seqlen, window)
    - 1, ahead = max_seqlen - 1 when not causal; one tile over the row when the band covers it."""
    assert attn._band(4096, 512, True, None) == (attn.TILE, 511, 0)
    assert attn._band(4096, 512, True, 32) == (attn.TILE, 31, 0)
    assert attn._band(4096, 512, False, None) == (attn.TILE, 511, 511)
    assert attn._band(100, 4096, True, None) == (128, 0, 0)  # 4 tiles, band wider than the row


BAD = [
    (torch.tensor([0, 5, 3, 8], dtype=torch.int32), 8, "monotonic"),
    (torch.tensor([0, 5, 7], dtype=torch.int32), 8, "end at total tokens 8"),
    (torch.tensor([0, 2, 8], dtype=torch.int32), 5, "max_seqlen 5 < longest sequence 6"),
]


@pytest.mark.parametrize("cu,max_seqlen,msg", BAD)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_debug_value_checks_raise(cu, max_seqlen, msg, backend, monkeypatch):
    q = torch.randn(8, 2, 16)
    monkeypatch.setattr(backend_mod, "DEBUG", True)
    with pytest.raises(ValueError, match=msg):
        varlen_attention(q, q[:, :1], q[:, :1], cu, max_seqlen, backend=backend)


def test_value_checks_gate(monkeypatch):
    """CPU tensors: always checked (a host read is no sync); other devices only in debug mode;
    never while compiling. (A meta tensor stands in for CUDA: off the CPU, no data to read.)"""
    cpu, meta = torch.zeros(3, dtype=torch.int32), torch.zeros(3, dtype=torch.int32, device="meta")
    monkeypatch.setattr(backend_mod, "DEBUG", False)
    assert backend_mod.host_value_checks(cpu) and not backend_mod.host_value_checks(meta)
    q = torch.empty(8, 2, 16, device="meta")  # bad cu_seqlens, yet no check and no host read
    bad = torch.tensor([0, 5, 3, 8], dtype=torch.int32, device="meta")
    attn._check_inputs(q, q[:, :1], q[:, :1], bad, 8, True, None)
    monkeypatch.setattr(backend_mod, "DEBUG", True)
    assert backend_mod.host_value_checks(meta)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not backend_mod.host_value_checks(cpu)


def test_max_seqlen_must_be_an_int():
    q, k, v, _, cu = make([3, 4], 2, 1, 16, torch.float32)
    for bad in (-1, 2.5):
        with pytest.raises(ValueError, match="max_seqlen must be a non-negative int"):
            varlen_attention(q, k, v, cu, bad, backend="torch")
