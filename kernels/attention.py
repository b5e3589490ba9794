"""Varlen (packed-sequence) flash attention with GQA and sliding window: the public API.

    out = varlen_attention(q, k, v, cu_seqlens, max_seqlen, causal=True, window=4096)

Triton kernels live in attention_fwd.py (forward, saves lse) and attention_bwd.py (a dK/dV
kernel and a dQ kernel, no atomics), imported only when the Triton path runs (triton is
optional: without it this module imports and the torch paths run). They are wrapped here as
torch custom ops with a registered autograd, registered at import (torch.compile traces through
them). `backend="auto"` picks Triton on CUDA or under TRITON_INTERPRET=1, else torch.

Torch paths (`varlen_attention_torch`, backend="torch"), same signature and result:
- the planner (`_tiled`): eager on the CPU; reads cu_seqlens on the host (free there) to give
  each query tile only the keys it needs. Fastest on the CPU.
- the banded path (`_banded`): under torch.compile and for tensors off the CPU; no host read of
  any tensor value (no graph break, no device sync): every tile gets the static key span that
  max_seqlen and window allow.
`varlen_attention_reference` is the slow per-sequence loop the tests trust.
`AOT_SPECS`: every bf16 head-dim-128 config the GPU's autotuner may pick, at the JIT's
specialisation, for `python -m r7b_fast.kernels.aot`; `autotuned_configs()`: what it picked.
"""

from __future__ import annotations

import itertools
import math

import torch

from ._backend import host_value_checks, record_call, resolve_backend, triton_module
from .aot import AotSpec

HEAD_DIMS = (16, 32, 64, 128)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_inputs(q, k, v, cu_seqlens, max_seqlen, causal, window, dtypes=DTYPES) -> None:
    """Raise ValueError naming the bad argument. Shapes, dtypes, devices: always. Values of
    cu_seqlens (and max_seqlen against them) need a host read: only where `host_value_checks`
    says (CPU tensors, or debug mode; never under torch.compile)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"{name} must be a 3-D tensor [total_tokens, heads, head_dim]")
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError("cu_seqlens must be a 1-D tensor [num_seqs + 1]")
    if cu_seqlens.dtype != torch.int32:
        raise ValueError(f"cu_seqlens must be int32, got {cu_seqlens.dtype}")
    if q.dtype not in dtypes:
        raise ValueError(f"q dtype must be one of {dtypes}, got {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    devices = {t.device for t in (q, k, v, cu_seqlens)}
    if len(devices) != 1:
        raise ValueError(
            f"q, k, v, cu_seqlens must be on one device, got {sorted(map(str, devices))}"
        )
    T, Hq, D = q.shape
    if k.shape != v.shape or k.shape[0] != T or k.shape[2] != D:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must be [{T}, Hk, {D}]")
    if D not in HEAD_DIMS:
        raise ValueError(f"head_dim {D} not supported; use one of {HEAD_DIMS}")
    if k.shape[1] == 0 or Hq % k.shape[1]:
        raise ValueError(f"q heads ({Hq}) must be a multiple of k/v heads ({k.shape[1]})")
    if window is not None:
        if not causal:
            raise ValueError("window needs causal=True (query i sees keys i-window < j <= i)")
        if int(window) != window or window < 1:
            raise ValueError(f"window must be a positive int or None, got {window!r}")
    if int(max_seqlen) != max_seqlen or max_seqlen < 0:
        raise ValueError(f"max_seqlen must be a non-negative int, got {max_seqlen!r}")
    if not host_value_checks(cu_seqlens):
        return  # the value checks below read cu_seqlens on the host: a sync / a graph break
    lens = torch.diff(cu_seqlens)
    first, last, min_len, max_len = torch.stack(
        [cu_seqlens[0], cu_seqlens[-1], lens.min() if lens.numel() else cu_seqlens[0] * 0,
         lens.max() if lens.numel() else cu_seqlens[0] * 0]
    ).tolist()  # fmt: skip
    if first != 0 or last != T:
        raise ValueError(f"cu_seqlens must start at 0 and end at total tokens {T}: {first}..{last}")
    if min_len < 0:
        raise ValueError("cu_seqlens must be non-decreasing (monotonic)")
    if int(max_seqlen) < max_len:
        raise ValueError(f"max_seqlen {max_seqlen} < longest sequence {max_len}")


def varlen_attention_reference(q, k, v, cu_seqlens, max_seqlen, *, causal=True, window=None,
                               softmax_scale=None):  # fmt: skip
    """Slow, obviously correct `varlen_attention` (same arguments and result): a Python loop over
    the sequences, each with an explicit [L, L] boolean mask, products in the input dtype,
    softmax in fp32 (as HF eager). Also accepts float64 (softmax then in float64): the tests'
    truth, independent of the fast torch path (`varlen_attention_torch`)."""
    _check_inputs(q, k, v, cu_seqlens, max_seqlen, causal, window, (*DTYPES, torch.float64))
    T, Hq, D = q.shape
    Hk = k.shape[1]
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else float(softmax_scale)
    outs = [q.new_zeros(0, Hq, D)]
    bounds = cu_seqlens.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        L = e - s
        if L == 0:
            continue
        qs = q[s:e].reshape(L, Hk, Hq // Hk, D)  # (L, Hk, G, D): query head h = kv*G + g
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        scores = torch.einsum("ikgd,jkd->kgij", qs, k[s:e]).to(acc) * scale
        i = torch.arange(L, device=q.device)
        seen = torch.ones(L, L, dtype=torch.bool, device=q.device)
        if causal:
            seen &= i[None, :] <= i[:, None]
        if window is not None:
            seen &= i[None, :] > i[:, None] - window
        p = scores.masked_fill(~seen, float("-inf")).softmax(-1).to(q.dtype)
        outs.append(torch.einsum("kgij,jkd->ikgd", p, v[s:e]).reshape(L, Hq, D))
    return torch.cat(outs)


# Fast torch path: the packed row cut into query tiles of TILE tokens; each tile attends, in one
# batched SDPA call per group of alike tiles, to the keys it can need (back to its first query's
# sequence start, at most window - 1 back; non-causal, on to its last query's sequence end), under
# a boolean (same sequence & causal & window) mask. GQA folds a kv head's G query heads into the
# query axis, so K/V are never repeated. Work ~ T * (TILE + lookback), not T^2 or per-sequence.
TILE = 32  # queries per tile: the fastest of 16/32/64/128 measured on a 2-core CPU
GATHER_BUDGET = 1 << 24  # K (and V) elements gathered per SDPA call: bounds memory for long rows


def _round_up(need: torch.Tensor, cap: int) -> torch.Tensor:
    """Key counts rounded up to TILE * 2**k (k >= 0), capped: few distinct sizes, so few SDPA
    calls, at most ~2x the keys needed (a tile at a sequence start still takes TILE keys back)."""
    tiles = ((need + TILE - 1) // TILE).clamp(min=1)
    return (2 ** torch.ceil(torch.log2(tiles.double()))).long().mul(TILE).clamp(max=cap)


def _tile_groups(cu_seqlens, T, causal, window) -> list[tuple[int, int, torch.Tensor]]:
    """Tiles t = [t*TILE, (t+1)*TILE) grouped by the keys they need: [(before, after, tiles)],
    keys [t*TILE - before, (t+1)*TILE + after) covering every key their queries may see."""
    cu = cu_seqlens.to("cpu", torch.int64)
    first = torch.arange(0, T, TILE)
    last = (first + TILE).clamp(max=T) - 1
    start = cu[torch.searchsorted(cu, first, right=True) - 1]  # first query's sequence start
    reach = T if window is None else int(window)
    before = _round_up((first - start).clamp(max=reach - 1), reach - 1)
    after = torch.zeros_like(before)
    if not causal:  # keys up to the last query's sequence end
        end = cu[torch.searchsorted(cu, last, right=True)]
        after = _round_up((end - first - TILE).clamp(min=0), T)
    key = before * (T + TILE + 1) + after
    groups = []
    for kv in torch.unique(key).tolist():
        tiles = torch.nonzero(key == kv).flatten()
        groups.append((int(before[tiles[0]]), int(after[tiles[0]]), tiles))
    return groups


def _attend_tiles(qt, k, v, sid, tiles, before, after, causal, window, scale):
    """Attention of query tiles `tiles` of qt [n_tiles, TILE, Hk, G, D] (padded past T) to keys
    [t*TILE - before, (t+1)*TILE + after) of k, v [T, Hk, D] under the mask; sid [T]: each
    token's sequence id. Returns [len(tiles), TILE, Hk * G, D]."""
    n, C, Hk, G, D = len(tiles), *qt.shape[1:]
    T, S, dev = k.shape[0], before + C + after, k.device
    tiles = tiles.to(dev)
    qs = qt.index_select(0, tiles).permute(0, 2, 3, 1, 4).reshape(n, Hk, G * C, D)  # row g*C+i:
    # query head kv*G + g. index_select (backward: index_add), not k[idx] (serial index_put)
    i = (tiles * C)[:, None] + torch.arange(C, device=dev)  # (n, C) query token index
    j = (tiles * C - before)[:, None] + torch.arange(S, device=dev)  # (n, S) key token index
    jc, ic = j.clamp(0, T - 1), i.clamp(max=T - 1)
    ks, vs = (x.index_select(0, jc.flatten()).view(n, S, Hk, D).transpose(1, 2) for x in (k, v))
    seen = (sid[ic][:, :, None] == sid[jc][:, None, :]) & ((j >= 0) & (j < T))[:, None, :]
    offset = torch.arange(S, device=dev)[None] - before - torch.arange(C, device=dev)[:, None]
    if causal:  # offset = key index - query index
        seen &= offset <= 0
    if window is not None:
        seen &= offset > -window
    seen |= (i >= T)[:, :, None]  # padding queries see all (no empty softmax row); dropped later
    mask = seen[:, None].expand(n, G, C, S).reshape(n, 1, G * C, S)
    o = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale)
    return o.view(n, Hk, G, C, D).permute(0, 3, 1, 2, 4).reshape(n, C, Hk * G, D)


def varlen_attention_torch(q, k, v, cu_seqlens, max_seqlen, *, causal=True, window=None,
                           softmax_scale=None):  # fmt: skip
    """Plain-torch `varlen_attention` (same arguments and result), fast on CPU: a few batched
    `scaled_dot_product_attention` calls over query tiles (see above), no per-sequence loop;
    differentiable through torch ops. In eager on the CPU the tiles are planned from cu_seqlens
    (read on the host; max_seqlen only checked); under torch.compile or off the CPU the banded
    path sizes them from max_seqlen and window, with no host read (see `_torch_path`). Also
    accepts float64. `backend="torch"` runs it."""
    _check_inputs(q, k, v, cu_seqlens, max_seqlen, causal, window, (*DTYPES, torch.float64))
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    return _torch_path(q, k, v, cu_seqlens, max_seqlen, causal, window, scale)


def _torch_path(q, k, v, cu_seqlens, max_seqlen, causal, window, scale):
    """The planner (`_tiled`) in eager on the CPU, where reading cu_seqlens costs no sync and it
    is up to 2.7x faster without a window; the banded path (`_banded`, no host reads) under
    torch.compile and for tensors off the CPU."""
    if torch.compiler.is_compiling() or cu_seqlens.device.type != "cpu":
        return _banded(q, k, v, cu_seqlens, max_seqlen, causal, window, scale)
    return _tiled(q, k, v, cu_seqlens, causal, window, scale)


def _tiled(q, k, v, cu_seqlens, causal, window, scale):
    """varlen_attention_torch on checked inputs (varlen_attention checks them once itself)."""
    T, Hq, D = q.shape
    Hk = k.shape[1]
    if T == 0:  # an empty result, still in the graph of q, k and v (their gradients: empty)
        return q.clone() + 0 * (k.sum() + v.sum())
    n_tiles = -(-T // TILE)
    lens = torch.diff(cu_seqlens).long()
    seq_ids = torch.arange(len(lens), device=q.device, dtype=torch.int32)
    sid = torch.repeat_interleave(seq_ids, lens, output_size=T)  # (T,) each token's sequence
    qt = torch.nn.functional.pad(q, (0, 0, 0, 0, 0, n_tiles * TILE - T))
    qt = qt.view(n_tiles, TILE, Hk, Hq // Hk, D)
    outs, order = [], []
    for before, after, tiles in _tile_groups(cu_seqlens, T, causal, window):
        per_call = max(1, GATHER_BUDGET // ((before + TILE + after) * Hk * D))
        for part in tiles.split(per_call):
            outs.append(_attend_tiles(qt, k, v, sid, part, before, after, causal, window, scale))
            order.append(part)
    out = torch.cat(outs)  # tiles in `order`
    if len(outs) > 1:
        out = out.index_select(0, torch.argsort(torch.cat(order)).to(q.device))
    return out.reshape(n_tiles * TILE, Hq, D)[:T]


# Banded torch path (torch.compile, or tensors off the CPU): no host read of any tensor value, so
# no graph break and no device sync. Query tile t (TILE rows) attends to the static key span
# [t*TILE - back, (t+1)*TILE + ahead), back = min(max_seqlen, window) - 1 (ahead = max_seqlen - 1
# when not causal), gathered as a strided window (unfold) of the zero-padded K/V and masked by
# same-sequence (ids from cu_seqlens on device), causal and window. Shapes depend only on T,
# max_seqlen and window (python ints). Work ~ T * (TILE + back + ahead): as the planner's with a
# window; without one it pays max_seqlen for every tile, so on the CPU in eager the planner runs.


def _band(T: int, max_seqlen: int, causal: bool, window) -> tuple[int, int, int]:
    """(tile, back, ahead) of the banded path: one tile over the whole row when the band is as
    wide (a short row: a single masked SDPA call, nothing gathered twice)."""
    reach = max(1, min(int(max_seqlen), T)) - 1  # same-sequence keys are at most this far away
    back = reach if window is None else min(reach, int(window) - 1)
    ahead = 0 if causal else reach
    n_tiles = -(-T // TILE)
    if back + TILE + ahead >= n_tiles * TILE:
        return n_tiles * TILE, 0, 0
    return TILE, back, ahead


def _banded(q, k, v, cu_seqlens, max_seqlen, causal, window, scale):
    """varlen_attention_torch on checked inputs without host reads (see the comment above)."""
    T, Hq, D = q.shape
    Hk, G = k.shape[1], Hq // k.shape[1]
    if T == 0:  # an empty result, still in the graph of q, k and v (their gradients: empty)
        return q.clone() + 0 * (k.sum() + v.sum())
    C, back, ahead = _band(T, max_seqlen, causal, window)
    n, S, dev, pad = -(-T // C), back + C + ahead, q.device, torch.nn.functional.pad
    tail = n * C - T + ahead  # zero keys after the row: the last tile's span stays in range
    kw, vw = (pad(x, (0, 0, 0, 0, back, tail)).unfold(0, S, C) for x in (k, v))  # [n, Hk, D, S]
    # each token's sequence id (cu_seqlens[b] <= i < cu_seqlens[b+1] -> b + 1), on device
    sid = torch.bucketize(torch.arange(T, device=dev, dtype=cu_seqlens.dtype), cu_seqlens,
                          right=True)  # fmt: skip
    sid_k = pad(sid, (back, tail), value=-1).unfold(0, S, C)  # [n, S]; -1: padding keys
    sid_q = pad(sid, (0, n * C - T), value=-2).view(n, C)  # -2: padding queries
    seen = sid_q[:, :, None] == sid_k[:, None, :]  # [n, C, S]
    offset = torch.arange(S, device=dev)[None] - back - torch.arange(C, device=dev)[:, None]
    if causal:  # offset = key index - query index, the same for every tile
        seen = seen & (offset <= 0)
    if window is not None:
        seen = seen & (offset > -int(window))
    seen = seen | (sid_q < 0)[:, :, None]  # padding queries see all (no empty softmax row)
    qt = pad(q, (0, 0, 0, 0, 0, n * C - T)).view(n, C, Hk, G, D)
    qt = qt.permute(0, 2, 3, 1, 4).reshape(n, Hk, G * C, D)  # row g*C+i: query head kv*G + g
    per_call = max(1, GATHER_BUDGET // (S * Hk * D))
    outs = []
    for a in range(0, n, per_call):  # python ints: a static loop, unrolled by torch.compile
        b = min(n, a + per_call)
        mask = seen[a:b, None].expand(b - a, G, C, S).reshape(b - a, 1, G * C, S)
        ks, vs = (x[a:b].transpose(2, 3) for x in (kw, vw))  # [b - a, Hk, S, D]
        outs.append(torch.nn.functional.scaled_dot_product_attention(
            qt[a:b], ks, vs, attn_mask=mask, scale=scale))  # fmt: skip
    o = torch.cat(outs) if len(outs) > 1 else outs[0]
    return o.view(n, Hk, G, C, D).permute(0, 3, 1, 2, 4).reshape(n * C, Hq, D)[:T]


# The Triton path as torch custom ops (forward saving lse; backward = Delta, dK/dV, dQ kernels)
# with a registered autograd and fake (shape-only) implementations, so torch.compile can trace a
# model around the kernels without graph breaks. window <= 0 means no window (ops take no None).
@torch.library.custom_op("r7b_fast::varlen_attention_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
            max_seqlen: int, causal: bool, window: int, scale: float
            ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    attn_fwd = triton_module("r7b_fast.kernels.attention_fwd").attn_fwd  # imports triton
    return attn_fwd(q, k, v, cu_seqlens, max_seqlen, causal, window if window > 0 else None, scale)


@_fwd_op.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, causal, window, scale):
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("r7b_fast::varlen_attention_bwd", mutates_args=())
def _bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            out: torch.Tensor, lse: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
            causal: bool, window: int, scale: float
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    win = window if window > 0 else None
    attn_bwd = triton_module("r7b_fast.kernels.attention_bwd").attn_bwd  # imports triton
    return attn_bwd(do, q, k, v, out, lse, cu_seqlens, max_seqlen, causal, win, scale)


@_bwd_op.register_fake
def _(do, q, k, v, out, lse, cu_seqlens, max_seqlen, causal, window, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, *opts = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], cu_seqlens)
    ctx.opts = opts  # max_seqlen, causal, window, scale


def _backward(ctx, do, _dlse):
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = _bwd_op(do.contiguous(), q, k, v, out, lse, cu_seqlens, *ctx.opts)
    return dq, dk, dv, None, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def varlen_attention(q, k, v, cu_seqlens, max_seqlen, *, causal=True, window=None,
                     softmax_scale=None, backend="auto"):  # fmt: skip
    """Attention over sequences packed along the token axis (flash-attn's varlen layout).

    Args:
        q: [T, Hq, D] queries of all sequences back to back (T = total tokens).
        k, v: [T, Hk, D]; Hq must be a multiple of Hk (GQA: query head h reads kv head
            h // (Hq // Hk); e.g. Hq=32, Hk=8: heads 0-3 share kv head 0). K/V are never repeated.
        cu_seqlens: int32 [B+1], 0 = cu_seqlens[0] <= ... <= cu_seqlens[B] = T; sequence b is
            rows cu_seqlens[b]:cu_seqlens[b+1]. No token attends across a boundary.
        max_seqlen: a python int >= the longest sequence (a bound, not necessarily tight): it
            sizes the Triton grid and the banded torch path's key span, so no path reads
            cu_seqlens on the host to learn it. A value below the longest sequence gives wrong
            results where it is not checked (see below); a loose one only costs time.
        causal: query i sees keys j <= i (positions within its sequence).
        window: None, or an int w >= 1 with HF's meaning: query i sees key j iff
            i - w < j <= i (flash-attn's window_size=(w-1, 0)); needs causal=True.
            E.g. w=2, L=4 (rows = queries, x = attended):
                x . . .
                x x . .
                . x x .
                . . x x
        softmax_scale: default 1/sqrt(D).
        backend: "auto" (Triton on CUDA or under TRITON_INTERPRET=1, else torch), "triton",
            "torch".
    Head dims 16/32/64/128; dtypes fp32/bf16/fp16 (q, k, v alike, one device).
    Returns: [T, Hq, D] in q's dtype; differentiable w.r.t. q, k, v.
    Raises ValueError for bad shapes, dtypes, devices, window or max_seqlen (always), and for
    cu_seqlens values (not from 0 to T, decreasing, a sequence longer than max_seqlen) when they
    are on the CPU or in debug mode (R7B_FAST_DEBUG=1 or `r7b_fast.kernels._backend.DEBUG =
    True`; one device sync per call): otherwise no host sync happens here, on either backend.
    ImportError for backend="triton" where triton is not importable.
    """
    _check_inputs(q, k, v, cu_seqlens, max_seqlen, causal, window)
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    name = resolve_backend(backend, q, k, v)
    record_call("varlen_attention", name)
    if name == "torch":
        return _torch_path(q, k, v, cu_seqlens, max_seqlen, causal, window, scale)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    win = 0 if window is None else int(window)
    return _fwd_op(q, k, v, cu_seqlens, int(max_seqlen), bool(causal), win, scale)[0]


def _aot_specs() -> list[AotSpec]:
    """Every bf16, head-dim-128 config the GPU's autotuner may pick for the three attention
    kernels (causal, and causal + window), and the small Delta = rowsum(dO * O) kernel of the
    backward (the dK/dV kernel in both backward schedules: "split", and "atomic" whose label says
    +atomic_dq), at the JIT's specialisation for R7B's shapes: pointers 16-byte aligned and strides,
    T and the window multiples of 16 (`divisible`; T is any packed length, the GPU runs full
    multiples of 16 in training and benchmarks). B (the number of sequences) is not."""
    fwd = triton_module("r7b_fast.kernels.attention_fwd")
    bwd = triton_module("r7b_fast.kernels.attention_bwd")
    ptr, i32, f32 = "*bf16", "i32", "fp32"
    strides = dict.fromkeys(["stride_qt", "stride_qh", "stride_kt", "stride_kh"], i32)
    strides |= {"stride_ot": i32, "stride_oh": i32}
    fwd_sig = {"Q": ptr, "K": ptr, "V": ptr, "Out": ptr, "LSE": "*fp32", "CU": "*i32"}
    fwd_sig |= {**strides, "T": i32, "window": i32, "qk_scale": f32, "B": i32}
    bwd_sig = {"Q": ptr, "K": ptr, "V": ptr, "DO": ptr, "LSE": "*fp32", "DELTA": "*fp32"}
    tail = {**strides, "T": i32, "window": i32, "qk_scale": f32, "sm_scale": f32, "B": i32}
    dkdv_sig = {**bwd_sig, "DK": ptr, "DV": ptr, "DQ_ACC": ptr, "CU": "*i32", **tail}
    dq_sig = {**bwd_sig, "DQ": ptr, "CU": "*i32", **tail}
    consts = ["GROUP", "HEAD_DIM", "BLOCK_M", "BLOCK_N", "CAUSAL", "HAS_WINDOW", "CAST", "ROUND"]
    consts.append("DOT_PREC")
    specs = []
    atomic_sig = {**dkdv_sig, "DQ_ACC": "*fp32"}  # split schedule: DQ_ACC is dq, unused
    for name, sig, candidates in (
        ("attention_fwd:attn_fwd_kernel", fwd_sig, fwd.FWD_CANDIDATES[128]),
        ("attention_bwd:attn_bwd_dkdv_kernel", dkdv_sig, bwd.DKDV_CANDIDATES[128]),
        ("attention_bwd:attn_bwd_dkdv_kernel+atomic_dq", atomic_sig, bwd.ATOMIC_CANDIDATES[128]),
        ("attention_bwd:attn_bwd_dq_kernel", dq_sig, bwd.DQ_CANDIDATES[128]),
    ):
        divisible = [a for a, t in sig.items() if t not in (f32, "constexpr") and a != "B"]
        for (bm, bn, warps, stages), has_window in itertools.product(candidates, (False, True)):
            vals = dict(GROUP=4, HEAD_DIM=128, BLOCK_M=bm, BLOCK_N=bn, CAUSAL=True,
                        HAS_WINDOW=has_window, CAST=False, ROUND=False, DOT_PREC="tf32")  # fmt: skip
            names = consts
            if "DQ_ACC" in sig:  # dK/dV kernel: the split or the atomic-dQ schedule
                vals["ATOMIC_DQ"] = name.endswith("+atomic_dq")
                names = [*consts, "ATOMIC_DQ"]
            kind = "window" if has_window else "causal"
            specs.append(
                AotSpec(
                    target=f"r7b_fast.kernels.{name.split('+')[0]}",
                    signature={**sig, **dict.fromkeys(names, "constexpr")},
                    constexprs=vals,
                    num_warps=warps,
                    num_stages=stages,
                    label=f"{name.split(':')[1]}[bf16,d128,{kind},{bm}x{bn},w{warps},s{stages}]",
                    divisible=divisible,
                    pipelined=True,  # K/V (or Q/dO) tiles streamed: cp.async in the main loop
                )
            )
    delta_sig = {"Out": ptr, "DO": ptr, "DELTA": "*fp32", "stride_ot": i32, "stride_oh": i32}
    delta_sig |= {"T": i32, "HEAD_DIM": "constexpr", "BLOCK_T": "constexpr"}
    specs.append(
        AotSpec(
            target="r7b_fast.kernels.attention_bwd:attn_bwd_delta_kernel",
            signature=delta_sig,
            constexprs={"HEAD_DIM": 128, "BLOCK_T": bwd.DELTA_BLOCK_T},
            num_warps=4,
            num_stages=1,
            label="attn_bwd_delta_kernel[bf16,d128]",
            divisible=["Out", "DO", "DELTA", "stride_ot", "stride_oh", "T"],
        )
    )
    return specs


def autotuned_configs() -> dict[str, dict[str, str]]:
    """The tile configs triton.autotune chose in this process, per kernel ('attn_fwd',
    'attn_bwd_dkdv', 'attn_bwd_dq'; 'attn_bwd_atomic': the dK/dV kernel of the atomic-dQ
    backward schedule), as {str(tuning key): str(config)}; the key is (HEAD_DIM,
    GROUP, CAUSAL, HAS_WINDOW, DOT_PREC, the tensors' dtypes). Empty until the Triton path ran on a
    GPU (the interpreter runs fixed tiles, untuned). For the GPU suite to print with its results."""
    fwd = triton_module("r7b_fast.kernels.attention_fwd")
    bwd = triton_module("r7b_fast.kernels.attention_bwd")
    tuners = {"attn_fwd": fwd.attn_fwd_tuned, "attn_bwd_dkdv": bwd.attn_bwd_dkdv_tuned,
              "attn_bwd_dq": bwd.attn_bwd_dq_tuned,
              "attn_bwd_atomic": bwd.attn_bwd_atomic_tuned}  # fmt: skip
    return {name: {str(k): str(c) for k, c in t.cache.items()} for name, t in tuners.items()}


_aot_cache: list[AotSpec] = []


def __getattr__(name: str):
    if name == "AOT_SPECS":  # built on first use: the configs live with (and import) triton
        if not _aot_cache:
            _aot_cache.extend(_aot_specs())
        return _aot_cache
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
