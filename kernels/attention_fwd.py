"""Varlen flash-attention forward: one Triton kernel and its launcher (see attention.py for the API).

Layout (flash-attn's varlen): q[T, Hq, D], k/v[T, Hk, D]; sequence b owns rows
cu_seqlens[b]:cu_seqlens[b+1]. One program = one query block of BLOCK_M rows of one sequence and
one query head; it reads the K/V of its kv head (h // (Hq // Hk)) in place, never a repeated copy.

Tile skipping: positions are relative to the sequence start, so a query block [q0, q0+BM) only
visits key tiles in [lo, hi): hi = min(L, q0 + BM) when causal (nothing above the diagonal),
lo = q0 - window + 1 rounded down to the tile when windowed (nothing left of the band), and the
other sequences of the row are never touched. Inside [lo, hi) the tiles that are wholly visible
run without a mask (a runtime branch in the one loop; on sm_90 three separate loops cost
registers); only the edge tiles (diagonal, window edge, sequence end) build one. So work grows
with attended pairs, not T^2.

Softmax runs in base 2: scores are multiplied by softmax_scale * log2(e) and the saved `lse` is
log2-sum-exp2 of those scaled scores, fp32, laid out [Hq, T] (rows of a head contiguous).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._backend import interpreting

LOG2E = 1.4426950408889634
# Finite "minus infinity": a fully masked row gives exp2(0) garbage instead of NaN; valid rows
# always see their own key, so their first real tile wipes the garbage (alpha = exp2(-1e30) = 0).
NEG = tl.constexpr(-1.0e30)


@triton.jit
def key_tile_bounds(q0, L, window, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """Key range of query block [q0, q0+BLOCK_M) split as [lo, a) masked, [a, b) unmasked,
    [b, hi) masked; a and b are multiples of BLOCK_N (unless the unmasked part is empty)."""
    lo = q0 * 0
    hi = q0 * 0 + L
    full_lo = q0 * 0
    full_hi = (L // BLOCK_N) * BLOCK_N
    if CAUSAL:
        hi = tl.minimum(L, q0 + BLOCK_M)
        full_hi = (tl.minimum(q0 + 1, L) // BLOCK_N) * BLOCK_N  # tiles wholly <= every row
    if HAS_WINDOW:
        lo = (tl.maximum(q0 - window + 1, 0) // BLOCK_N) * BLOCK_N
        # wholly inside the band of the last row q0+BM-1: key >= q0 + BM - window
        full_lo = tl.cdiv(tl.maximum(q0 + BLOCK_M - window, 0), BLOCK_N) * BLOCK_N
    a = tl.minimum(tl.maximum(full_lo, lo), hi)
    b = tl.maximum(full_hi, a)
    return lo, a, b, hi


@triton.jit
def visible(rows, cols, L, window, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """[len(rows), len(cols)] bool: query row i sees key col j (positions within the sequence)."""
    ok = (cols[None, :] < L) & (rows[:, None] < L)
    if CAUSAL:
        ok = ok & (cols[None, :] <= rows[:, None])
    if HAS_WINDOW:
        ok = ok & (cols[None, :] > rows[:, None] - window)
    return ok


@triton.jit
def _fwd_tiles(acc, m_i, l_i, q, k_base, v_base, stride_kt, rows, offs_d, lo, a, c, hi, L, window,
               qk_scale, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
               CAST: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        kv_off = cols[:, None] * stride_kt + offs_d[None, :]
        k = tl.load(k_base + kv_off, mask=cols[:, None] < L, other=0.0)
        v = tl.load(v_base + kv_off, mask=cols[:, None] < L, other=0.0)
        if CAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # (BM, BN), base 2
        if (start_n < a) | (start_n >= c):  # edge tile: diagonal, window edge, sequence end
            s = tl.where(visible(rows, cols, L, window, CAUSAL, HAS_WINDOW), s, NEG)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def attn_fwd_kernel(Q, K, V, Out, LSE, CU, stride_qt, stride_qh, stride_kt, stride_kh, stride_ot,
                    stride_oh, T, window, qk_scale, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                    HAS_WINDOW: tl.constexpr, CAST: tl.constexpr, DOT_PREC: tl.constexpr):  # fmt: skip
    # heaviest (last) query blocks first: causal work grows with the block index
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    start = tl.load(CU + b)
    L = tl.load(CU + b + 1) - start
    q0 = pid_m * BLOCK_M
    if q0 >= L:
        return
    rows = q0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = rows < L
    # int64 only in scalar base pointers; tile offsets stay int32 (int64 tiles cost registers)
    start64 = start.to(tl.int64)
    q_ptrs = Q + start64 * stride_qt + h * stride_qh + rows[:, None] * stride_qt + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
    if CAST:
        q = q.to(tl.float32)
    kv_head = h // GROUP
    k_base = K + start64 * stride_kt + kv_head * stride_kh
    v_base = V + start64 * stride_kt + kv_head * stride_kh

    m_i = tl.full([BLOCK_M], NEG, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    lo, a, c, hi = key_tile_bounds(q0, L, window, CAUSAL, HAS_WINDOW, BLOCK_M, BLOCK_N)
    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, k_base, v_base, stride_kt, rows, offs_d, lo, a, c,
                               hi, L, window, qk_scale, CAUSAL, HAS_WINDOW, CAST, DOT_PREC,
                               BLOCK_N)  # fmt: skip
    acc = acc / l_i[:, None]
    o_ptrs = Out + start64 * stride_ot + h * stride_oh + rows[:, None] * stride_ot + offs_d[None, :]
    tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + h.to(tl.int64) * T + start64 + rows, m_i + tl.log2(l_i), mask=row_ok)


# GPU configs: (BLOCK_M, BLOCK_N, num_warps, num_stages) by head dim for 16-bit inputs; fp32
# inputs (exact 'ieee' dots, no tensor cores: a correctness path) take smaller tiles so that
# D=128 fits shared memory (AOT: 128x64 needs 225 KB and spills). The interpreter uses 16x16.
FWD_CONFIGS = {16: (128, 64, 4, 3), 32: (128, 64, 4, 3), 64: (128, 64, 4, 3), 128: (128, 64, 8, 3)}
FWD_CONFIG_FP32 = (64, 32, 4, 2)
INTERP_BLOCK = 16


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get exact fp32 products ('ieee'); 16-bit inputs ignore it (tensor cores)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def attn_fwd(q, k, v, cu_seqlens, max_seqlen, causal, window, scale):
    """Launch the forward on validated inputs: returns (out[T, Hq, D], lse fp32[Hq, T])."""
    T, Hq, D = q.shape
    B = cu_seqlens.numel() - 1
    out = torch.empty_like(q)
    lse = torch.empty((Hq, T), device=q.device, dtype=torch.float32)
    interp = interpreting()
    if interp:
        bm = bn = INTERP_BLOCK
        extra = {}
    else:
        bm, bn, warps, stages = FWD_CONFIG_FP32 if q.dtype == torch.float32 else FWD_CONFIGS[D]
        extra = {"num_warps": warps, "num_stages": stages}
    if B == 0 or T == 0:
        return out, lse
    grid = (triton.cdiv(max_seqlen, bm), Hq, B)
    attn_fwd_kernel[grid](
        q, k, v, out, lse, cu_seqlens,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), out.stride(0), out.stride(1),
        T, int(window or 0), float(scale * LOG2E),
        GROUP=Hq // k.shape[1], HEAD_DIM=D, BLOCK_M=bm, BLOCK_N=bn, CAUSAL=bool(causal),
        HAS_WINDOW=window is not None, CAST=interp and q.dtype != torch.float32,
        DOT_PREC=dot_precision(q.dtype), **extra,
    )  # fmt: skip
    return out, lse
