"""Varlen flash-attention backward: a dK/dV kernel and a dQ kernel, no atomics (see attention.py);
a second schedule ("atomic", see SCHEDULE) adds dQ with fp32 atomics in the dK/dV kernel instead.

With P = exp2(S * scale*log2e - lse) recomputed from the saved lse and Delta_i = sum_d dO_id O_id:
    dV = P^T dO,  dP = dO V^T,  dS = P * (dP - Delta),  dQ = scale * dS K,  dK = scale * dS^T Q.
- dK/dV: one program owns a key block of one sequence and one kv head; it loops over the GROUP
  query heads that share that kv head and over the query tiles that can see the block, so the GQA
  sum happens in registers and every dK/dV row is written once.
- dQ: one program owns a query block of one query head and loops over the key tiles it sees,
  exactly as the forward does; every dQ row is written once.
Both use the forward's tile skipping (sequence, diagonal, window): only tiles a block can see are
visited, and only edge tiles build a mask: dQ in three loops as the forward (edge, interior, edge),
dK/dV in one loop with a runtime branch (three loops spill to the stack there; see _dkdv_tiles).
Delta comes from a small kernel of its own (no fp32 copies of dO and O). Grids, tuning and the
interpreter's rounding mode (ROUND) are the forward's (attention_fwd.py).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import attention_fwd as _fwd
from ._backend import interpreting
from .attention_fwd import (
    INTERP_BLOCK,
    LOG2E,
    dot_precision,
    key_tile_bounds,
    launch,
    seq_and_block,
    tuned,
    visible,
)


@triton.jit
def query_tile_bounds(k0, L, window, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """Query rows that can see key block [k0, k0+BLOCK_N): [lo, hi), of which [a, b) (multiples
    of BLOCK_M unless empty) see every key of the block, so their tiles need no mask."""
    lo = k0 * 0
    hi = k0 * 0 + L
    full_lo = k0 * 0
    full_hi = (L // BLOCK_M) * BLOCK_M
    if CAUSAL:
        lo = (k0 // BLOCK_M) * BLOCK_M
        full_lo = tl.cdiv(k0 + BLOCK_N - 1, BLOCK_M) * BLOCK_M  # rows >= every key of the block
    if HAS_WINDOW:
        hi = tl.minimum(L, k0 + BLOCK_N - 1 + window)  # row i sees key j iff i < j + window
        full_hi = (tl.minimum(k0 + window, L) // BLOCK_M) * BLOCK_M
    a = tl.minimum(tl.maximum(full_lo, lo), hi)
    b = tl.maximum(full_hi, a)
    return lo, a, b, hi


@triton.jit
def _dkdv_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base, stride_qt,
                stride_ot, cols, offs_d, lo, a, c, hi, L, window, qk_scale, CAUSAL: tl.constexpr,
                HAS_WINDOW: tl.constexpr, CAST: tl.constexpr, ROUND: tl.constexpr,
                DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, ATOMIC_DQ: tl.constexpr):  # fmt: skip
    """Query tiles [lo, hi) against one key block; those outside the interior [a, c) are edge
    tiles (diagonal, window edge, sequence end) and mask P. One loop with a runtime branch, not
    the forward's three loops: on sm_90 (Triton 3.6, AOT) three loops inside the GQA loop put
    48-264 B per thread on the stack. Rows past the sequence end are clamped to its last row
    (always in bounds, no load masks) and their P masked to 0. ATOMIC_DQ (the "atomic" schedule)
    also adds dS K (unscaled) into the fp32 dQ accumulator at dq_base with atomics."""
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        rows_in = tl.minimum(rows, L - 1)
        r = rows_in[:, None]
        q = tl.load(q_base + r * stride_qt + offs_d[None, :])
        do = tl.load(do_base + r * stride_ot + offs_d[None, :])
        lse = tl.load(lse_base + rows_in)
        delta = tl.load(delta_base + rows_in)
        if CAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale  # (BN, BM)
        p_t = tl.exp2(s_t - lse[None, :])
        if (start_m < a) | (start_m >= c):  # edge tile
            p_t = tl.where(tl.trans(visible(rows, cols, L, window, CAUSAL, HAS_WINDOW)), p_t, 0.0)
        p_op = p_t  # the dot operand; dS below takes the unrounded fp32 P, as on the GPU
        if ROUND:  # interpreter: P rounded to the operand dtype, as the GPU's dot takes it
            p_op = p_t.to(q_base.dtype.element_ty).to(tl.float32)
        dv += tl.dot(p_op.to(do.dtype), do, input_precision=DOT_PREC)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        ds_t = p_t * (dp_t - delta[None, :])
        if ROUND:  # and dS likewise
            ds_t = ds_t.to(q_base.dtype.element_ty).to(tl.float32)
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PREC)
        if ATOMIC_DQ:  # 5 matmuls per tile pair instead of 7 (no dQ kernel recomputing S, dP)
            dq = tl.dot(tl.trans(ds_t.to(k.dtype)), k, input_precision=DOT_PREC)  # (BM, D)
            tl.atomic_add(dq_base + r * stride_qt + offs_d[None, :], dq, mask=(rows < L)[:, None])
    return dk, dv


@triton.jit
def attn_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, DQ_ACC, CU, stride_qt, stride_qh, stride_kt,
                         stride_kh, stride_ot, stride_oh, T, window, qk_scale, sm_scale, B,
                         GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                         CAST: tl.constexpr, ROUND: tl.constexpr, DOT_PREC: tl.constexpr,
                         ATOMIC_DQ: tl.constexpr):  # fmt: skip
    # Q, DQ_ACC (fp32 [T, Hq, D]; used only with ATOMIC_DQ) and DO share strides (stride_qt/qh),
    # K/V/DK/DV share (stride_kt/kh); DO is O-shaped.
    # Grid axis 0 = key blocks x B sequences (see seq_and_block), axis 1 = kv heads.
    b, pid_n = seq_and_block(B)
    kvh = tl.program_id(1)
    start = tl.load(CU + b)
    L = tl.load(CU + b + 1) - start
    k0 = pid_n * BLOCK_N
    if k0 >= L:
        return
    cols = k0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = cols < L
    # int64 only in scalar base offsets; tile offsets stay int32 (int64 tiles cost registers)
    start64 = start.to(tl.int64)
    kv_base = start64 * stride_kt + kvh * stride_kh
    kv_off = cols[:, None] * stride_kt + offs_d[None, :]
    k = tl.load(K + kv_base + kv_off, mask=col_ok[:, None], other=0.0)
    v = tl.load(V + kv_base + kv_off, mask=col_ok[:, None], other=0.0)
    if CAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    lo, a, c, hi = query_tile_bounds(k0, L, window, CAUSAL, HAS_WINDOW, BLOCK_M, BLOCK_N)
    for g in range(GROUP):  # the query heads sharing this kv head: GQA sum in registers
        h = kvh * GROUP + g
        q_base = Q + start64 * stride_qt + h * stride_qh
        do_base = DO + start64 * stride_ot + h * stride_oh
        lse_base = LSE + h.to(tl.int64) * T + start
        delta_base = DELTA + h.to(tl.int64) * T + start
        dq_base = DQ_ACC + start64 * stride_qt + h * stride_qh
        # [lo, a): diagonal tiles; [a, c): interior (no mask); [c, hi): window edge, end
        dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base,
                             stride_qt, stride_ot, cols, offs_d, lo, a, c, hi, L, window, qk_scale,
                             CAUSAL, HAS_WINDOW, CAST, ROUND, DOT_PREC, BLOCK_M,
                             ATOMIC_DQ)  # fmt: skip
    tl.store(DK + kv_base + kv_off, (dk * sm_scale).to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(DV + kv_base + kv_off, dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


@triton.jit
def _dq_tiles(dq, q, do, lse, delta, k_base, v_base, stride_kt, rows, offs_d, lo, hi, L, window,
              qk_scale, MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
              CAST: tl.constexpr, ROUND: tl.constexpr, DOT_PREC: tl.constexpr,
              BLOCK_N: tl.constexpr):  # fmt: skip
    """Key tiles [lo, hi) of one query block, masked (edge) or not (interior), as in the fwd."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        kv_off = cols[:, None] * stride_kt + offs_d[None, :]
        if MASKED:
            k = tl.load(k_base + kv_off, mask=cols[:, None] < L, other=0.0)
            v = tl.load(v_base + kv_off, mask=cols[:, None] < L, other=0.0)
        else:
            k = tl.load(k_base + kv_off)
            v = tl.load(v_base + kv_off)
        if CAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # (BM, BN)
        p = tl.exp2(s - lse[:, None])
        if MASKED:
            p = tl.where(visible(rows, cols, L, window, CAUSAL, HAS_WINDOW), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        if ROUND:  # interpreter: dS rounded to the operand dtype, as the GPU's dot takes it
            ds = ds.to(k_base.dtype.element_ty).to(tl.float32)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
    return dq


@triton.jit
def attn_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, CU, stride_qt, stride_qh, stride_kt,
                       stride_kh, stride_ot, stride_oh, T, window, qk_scale, sm_scale, B,
                       GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                       CAST: tl.constexpr, ROUND: tl.constexpr, DOT_PREC: tl.constexpr):  # fmt: skip
    # Q and DQ share strides (stride_qt/qh); DO uses stride_ot/oh. Grid as the forward's.
    b, pid_m = seq_and_block(B)
    h = tl.program_id(1)
    start = tl.load(CU + b)
    L = tl.load(CU + b + 1) - start
    q0 = pid_m * BLOCK_M
    if q0 >= L:
        return
    rows = q0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = rows < L
    # int64 only in scalar base offsets; tile offsets stay int32 (int64 tiles cost registers)
    start64 = start.to(tl.int64)
    q_off = start64 * stride_qt + h * stride_qh + rows[:, None] * stride_qt + offs_d[None, :]
    q = tl.load(Q + q_off, mask=row_ok[:, None], other=0.0)
    do_ptrs = DO + start64 * stride_ot + h * stride_oh + rows[:, None] * stride_ot + offs_d[None, :]
    do = tl.load(do_ptrs, mask=row_ok[:, None], other=0.0)
    lse = tl.load(LSE + h.to(tl.int64) * T + start64 + rows, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + h.to(tl.int64) * T + start64 + rows, mask=row_ok, other=0.0)
    if CAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    kv_head = h // GROUP
    k_base = K + start64 * stride_kt + kv_head * stride_kh
    v_base = V + start64 * stride_kt + kv_head * stride_kh
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    lo, a, c, hi = key_tile_bounds(q0, L, window, CAUSAL, HAS_WINDOW, BLOCK_M, BLOCK_N)
    # [lo, a): window-edge tiles (masked); [a, c): interior (unmasked); [c, hi): diagonal, end
    dq = _dq_tiles(dq, q, do, lse, delta, k_base, v_base, stride_kt, rows, offs_d, lo, a, L, window,
                   qk_scale, True, CAUSAL, HAS_WINDOW, CAST, ROUND, DOT_PREC, BLOCK_N)  # fmt: skip
    dq = _dq_tiles(dq, q, do, lse, delta, k_base, v_base, stride_kt, rows, offs_d, a, c, L, window,
                   qk_scale, False, CAUSAL, HAS_WINDOW, CAST, ROUND, DOT_PREC, BLOCK_N)  # fmt: skip
    dq = _dq_tiles(dq, q, do, lse, delta, k_base, v_base, stride_kt, rows, offs_d, c, hi, L, window,
                   qk_scale, True, CAUSAL, HAS_WINDOW, CAST, ROUND, DOT_PREC, BLOCK_N)  # fmt: skip
    tl.store(DQ + q_off, (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def attn_bwd_delta_kernel(Out, DO, DELTA, stride_ot, stride_oh, T, HEAD_DIM: tl.constexpr,
                          BLOCK_T: tl.constexpr):  # fmt: skip
    """DELTA[h, t] = sum_d Out[t, h, d] * DO[t, h, d] in fp32 (Out and DO share strides)."""
    h = tl.program_id(1)
    t0 = tl.program_id(0) * BLOCK_T
    rows = t0 + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, HEAD_DIM)
    # the block's base offset in int64: t0 * stride_ot reaches T * Hq * D, past 2^31 from
    # ~524k packed tokens at Hq=32, D=128; offsets inside the block stay int32
    base = t0.to(tl.int64) * stride_ot + h * stride_oh
    ptrs = base + tl.arange(0, BLOCK_T)[:, None] * stride_ot + offs_d[None, :]
    ok = rows[:, None] < T
    o = tl.load(Out + ptrs, mask=ok, other=0.0).to(tl.float32)
    do = tl.load(DO + ptrs, mask=ok, other=0.0).to(tl.float32)
    tl.store(DELTA + h.to(tl.int64) * T + rows, tl.sum(o * do, 1), mask=rows < T)


# GPU candidates (BLOCK_M, BLOCK_N, num_warps, num_stages) by head dim, BLOCK_M counting queries,
# chosen on the GPU by triton.autotune (see attention_fwd.tuned); every head-dim-128 candidate is
# in AOT_SPECS and compiles for sm_90 without spills at the JIT's divisible-by-16 specialisation.
# Both kernels write every output row once (no accumulation into outputs), so re-running one
# while tuning needs no reset_to_zero.
DKDV_CANDIDATES = {
    128: [(32, 64, 8, 2), (32, 128, 8, 2)],
    64: [(32, 64, 4, 2)], 32: [(32, 64, 4, 2)], 16: [(32, 64, 4, 2)],
}  # fmt: skip
DQ_CANDIDATES = {
    128: [(64, 64, 8, 2), (128, 64, 8, 2)],
    64: [(64, 64, 4, 2)], 32: [(64, 64, 4, 2)], 16: [(64, 64, 4, 2)],
}  # fmt: skip
BWD_CONFIG_FP32 = (32, 32, 4, 2)  # fp32 'ieee' dots (no tensor cores): fits shared memory
DELTA_BLOCK_T = 64  # as in AOT_SPECS

attn_bwd_dkdv_tuned = tuned(attn_bwd_dkdv_kernel, DKDV_CANDIDATES, BWD_CONFIG_FP32)
attn_bwd_dq_tuned = tuned(attn_bwd_dq_kernel, DQ_CANDIDATES, BWD_CONFIG_FP32)
# The atomic schedule's dK/dV kernel (ATOMIC_DQ) accumulates dQ into DQ_ACC, zeroed before every
# tuning run. At 32x128 it puts 24 B per thread on the stack (sm_90, Triton 3.6): 32x64 only.
ATOMIC_CANDIDATES = {**DKDV_CANDIDATES, 128: [(32, 64, 8, 2)]}
attn_bwd_atomic_tuned = tuned(attn_bwd_dkdv_kernel, ATOMIC_CANDIDATES, BWD_CONFIG_FP32,
                              reset_to_zero=["DQ_ACC"])  # fmt: skip

# Backward schedule: "split" (default) = the dK/dV kernel + the dQ kernel, 7 matmuls per tile
# pair, no atomics, deterministic; "atomic" = the dK/dV kernel also adds dS K into an fp32 dQ
# (atomics, 5 matmuls, no dQ kernel; summation order varies run to run). Set this attribute or
# R7B_ATTN_BWD_SCHEDULE; the benchmarks measure both side by side.
SCHEDULES = ("split", "atomic")
SCHEDULE = os.environ.get("R7B_ATTN_BWD_SCHEDULE", "split")


def attn_bwd(do, q, k, v, out, lse, cu_seqlens, max_seqlen, causal, window, scale):
    """Gradients (dq, dk, dv) for validated inputs; lse fp32[Hq, T] from attn_fwd. No host read."""
    T, Hq, D = q.shape
    Hk = k.shape[1]
    B = cu_seqlens.numel() - 1
    do = do.contiguous()  # same strides as out (contiguous from attn_fwd)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if B == 0 or T == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    interp = interpreting()
    # Delta_i = rowsum(dO * O) in fp32, laid out [Hq, T] like lse (no fp32 copies of dO and O)
    delta = torch.empty((Hq, T), device=q.device, dtype=torch.float32)
    block_t = INTERP_BLOCK if interp else DELTA_BLOCK_T
    attn_bwd_delta_kernel[(triton.cdiv(T, block_t), Hq)](
        out, do, delta, do.stride(0), do.stride(1), T, HEAD_DIM=D, BLOCK_T=block_t
    )
    cast = interp and q.dtype != torch.float32
    consts = dict(
        GROUP=Hq // Hk, HEAD_DIM=D, CAUSAL=bool(causal), HAS_WINDOW=window is not None,
        CAST=cast, ROUND=cast and _fwd.ROUND_IN_INTERPRETER, DOT_PREC=dot_precision(q.dtype),
    )  # fmt: skip
    tail = (
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), do.stride(0), do.stride(1),
        T, int(window or 0), float(scale * LOG2E), float(scale), B,
    )  # fmt: skip
    head = (q, k, v, do, lse, delta)
    grid = lambda meta: (triton.cdiv(max_seqlen, meta["BLOCK_N"]) * B, Hk)  # key blocks
    if SCHEDULE == "atomic":
        dq_acc = torch.zeros_like(q, dtype=torch.float32)  # q's strides (q is contiguous)
        args = (*head, dk, dv, dq_acc, cu_seqlens, *tail)
        launch(attn_bwd_dkdv_kernel, attn_bwd_atomic_tuned, grid, args,
               {**consts, "ATOMIC_DQ": True})  # fmt: skip
        return (dq_acc * scale).to(q.dtype), dk, dv
    if SCHEDULE != "split":
        raise ValueError(f"attention_bwd.SCHEDULE must be one of {SCHEDULES}, got {SCHEDULE!r}")
    launch(attn_bwd_dkdv_kernel, attn_bwd_dkdv_tuned, grid,
           (*head, dk, dv, dq, cu_seqlens, *tail), {**consts, "ATOMIC_DQ": False})  # fmt: skip
    grid = lambda meta: (triton.cdiv(max_seqlen, meta["BLOCK_M"]) * B, Hq)  # query blocks
    launch(attn_bwd_dq_kernel, attn_bwd_dq_tuned, grid, (*head, dq, cu_seqlens, *tail), consts)
    return dq, dk, dv
