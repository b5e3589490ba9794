"""Varlen flash-attention forward: one Triton kernel and its launcher (see attention.py for the API).

Layout (flash-attn's varlen): q[T, Hq, D], k/v[T, Hk, D]; sequence b owns rows
cu_seqlens[b]:cu_seqlens[b+1]. One program = one query block of BLOCK_M rows of one sequence and
one query head; it reads the K/V of its kv head (h // (Hq // Hk)) in place, never a repeated copy.

Tile skipping: positions are relative to the sequence start, so a query block [q0, q0+BM) only
visits key tiles in [lo, hi): hi = min(L, q0 + BM) when causal (nothing above the diagonal),
lo = q0 - window + 1 rounded down to the tile when windowed (nothing left of the band), and the
other sequences of the row are never touched. [lo, hi) runs as three loops: the window-edge
tiles and the diagonal/sequence-end tiles build a mask and keep their loads in bounds (keys past
the sequence end clamped to its last), the interior tiles (wholly visible to every row of the
block) do neither. So work grows with attended pairs, not T^2.

Grid: axis 0 = query blocks x sequences (sequence fastest, heaviest blocks first), axis 1 = query
heads; axis 0 holds up to 2^31 - 1 programs, so any number of sequences runs (grid z, 65,535 at
most on CUDA, is not used). The launcher reads no tensor on the host: max_seqlen is the caller's.
Offsets: sequence starts and heads in int64; offsets inside one sequence in int32, so one
sequence may hold up to 2^31 / (H * D) tokens (524,288 at 32 heads x 128).
On the GPU the tile config is chosen by triton.autotune among AOT-checked candidates
(`FWD_CANDIDATES`, `autotuned_configs()` in attention.py reports the choice); under the
interpreter the kernel runs untuned INTERP_BLOCK tiles, P rounded to the input dtype (ROUND).

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
# Under the interpreter 16-bit inputs are upcast to fp32 (CAST), so its dots would keep P and dS
# in fp32; with ROUND they are rounded to the input dtype exactly where the GPU's dots take them
# in it (p.to(bf16) before P @ V, ...), so the interpreter's error is the GPU's. On by default;
# tests switch it off to show what it changes.
ROUND_IN_INTERPRETER = True


@triton.jit
def seq_and_block(B):
    """(sequence, block) of this program on the folded grid axis 0 = blocks x B sequences:
    sequence fastest, blocks in reverse (the heaviest, last blocks of every sequence first)."""
    pid = tl.program_id(0)
    n_blocks = tl.num_programs(0) // B
    return pid % B, n_blocks - 1 - pid // B


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
def _fwd_tiles(acc, m_i, l_i, q, k_base, v_base, stride_kt, rows, offs_d, lo, hi, L, window,
               qk_scale, MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
               CAST: tl.constexpr, ROUND: tl.constexpr, DOT_PREC: tl.constexpr,
               BLOCK_N: tl.constexpr):  # fmt: skip
    """Key tiles [lo, hi) of one query block: MASKED (edge tiles: diagonal, window edge, sequence
    end) builds the visibility mask and keeps its loads in bounds; interior tiles do neither."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        kv_off = cols[:, None] * stride_kt + offs_d[None, :]
        if MASKED:  # keys past the sequence end clamped to its last (in bounds, then masked):
            # masked loads here put 40 B per thread on the stack at 128x128 (sm_90, Triton 3.6)
            kv_in = tl.minimum(cols, L - 1)[:, None] * stride_kt + offs_d[None, :]
            k = tl.load(k_base + kv_in)
            v = tl.load(v_base + kv_in)
        else:
            k = tl.load(k_base + kv_off)
            v = tl.load(v_base + kv_off)
        if CAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # (BM, BN), base 2
        if MASKED:
            s = tl.where(visible(rows, cols, L, window, CAUSAL, HAS_WINDOW), s, NEG)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if ROUND:  # interpreter: P rounded to the operand dtype, as the GPU's p.to(bf16) does
            p = p.to(k_base.dtype.element_ty).to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def attn_fwd_kernel(Q, K, V, Out, LSE, CU, stride_qt, stride_qh, stride_kt, stride_kh, stride_ot,
                    stride_oh, T, window, qk_scale, B, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                    HAS_WINDOW: tl.constexpr, CAST: tl.constexpr, ROUND: tl.constexpr,
                    DOT_PREC: tl.constexpr):  # fmt: skip
    # grid axis 0 = query blocks x B sequences (sequence fastest; axis z would cap B at 65,535),
    # heaviest (last) query blocks first: causal work grows with the block index
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
    # [lo, a): window-edge tiles (masked); [a, c): interior (unmasked); [c, hi): diagonal and
    # sequence-end tiles (masked). Every row sees its own key, in the last part at the latest.
    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, k_base, v_base, stride_kt, rows, offs_d, lo, a, L,
                               window, qk_scale, True, CAUSAL, HAS_WINDOW, CAST, ROUND, DOT_PREC,
                               BLOCK_N)  # fmt: skip
    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, k_base, v_base, stride_kt, rows, offs_d, a, c, L,
                               window, qk_scale, False, CAUSAL, HAS_WINDOW, CAST, ROUND, DOT_PREC,
                               BLOCK_N)  # fmt: skip
    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, k_base, v_base, stride_kt, rows, offs_d, c, hi, L,
                               window, qk_scale, True, CAUSAL, HAS_WINDOW, CAST, ROUND, DOT_PREC,
                               BLOCK_N)  # fmt: skip
    acc = acc / l_i[:, None]
    o_ptrs = Out + start64 * stride_ot + h * stride_oh + rows[:, None] * stride_ot + offs_d[None, :]
    tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + h.to(tl.int64) * T + start64 + rows, m_i + tl.log2(l_i), mask=row_ok)


# GPU candidates (BLOCK_M, BLOCK_N, num_warps, num_stages) for 16-bit inputs, chosen on the GPU by
# triton.autotune (`tuned` below); every head-dim-128 candidate is in AOT_SPECS (attention.py) and
# compiles for sm_90 without spills at the JIT's divisible-by-16 specialisation. fp32 inputs
# (exact 'ieee' dots, no tensor cores: a correctness path) take one smaller tile so that D=128
# fits shared memory. The interpreter runs INTERP_BLOCK tiles, untuned.
FWD_CANDIDATES = {
    128: [(128, 64, 8, 3), (128, 128, 8, 2), (128, 128, 8, 3)],
    64: [(128, 64, 4, 3)], 32: [(128, 64, 4, 3)], 16: [(128, 64, 4, 3)],
}  # fmt: skip
FWD_CONFIG_FP32 = (64, 32, 4, 2)
INTERP_BLOCK = 16
TUNE_KEY = ["HEAD_DIM", "GROUP", "CAUSAL", "HAS_WINDOW", "DOT_PREC"]  # + the tensors' dtypes
# (Triton adds those to the key itself); never T or the lengths: one tuning per layer shape


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get exact fp32 products ('ieee'); 16-bit inputs ignore it (tensor cores)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def tuned(kernel, candidates: dict, fp32: tuple, **autotune_kw):
    """`kernel` under triton.autotune over the candidates of every head dim (and the fp32 one),
    each call pruned to those of its HEAD_DIM (or to `fp32` when DOT_PREC is 'ieee')."""
    as_config = lambda c: triton.Config(dict(BLOCK_M=c[0], BLOCK_N=c[1]), num_warps=c[2],
                                        num_stages=c[3])  # fmt: skip
    groups = {d: [as_config(c) for c in cs] for d, cs in candidates.items()}
    groups["fp32"] = [as_config(fp32)]

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        group = groups["fp32" if args["DOT_PREC"] == "ieee" else args["HEAD_DIM"]]
        return [c for c in configs if any(c is g for g in group)]

    configs = [c for cs in groups.values() for c in cs]
    return triton.autotune(configs, key=TUNE_KEY, prune_configs_by={"early_config_prune": prune},
                           **autotune_kw)(kernel)  # fmt: skip


attn_fwd_tuned = tuned(attn_fwd_kernel, FWD_CANDIDATES, FWD_CONFIG_FP32)  # writes only: no reset


def launch(kernel, tuned_kernel, grid_blocks, args, consts):
    """Run `kernel` with INTERP_BLOCK tiles under the interpreter, else its autotuned twin;
    grid = (grid_blocks(BLOCK) x sequences, heads) with grid_blocks taking the launch's meta."""
    if interpreting():
        meta = dict(BLOCK_M=INTERP_BLOCK, BLOCK_N=INTERP_BLOCK)
        kernel[grid_blocks(meta)](*args, **consts, **meta)
    else:
        tuned_kernel[grid_blocks](*args, **consts)


def attn_fwd(q, k, v, cu_seqlens, max_seqlen, causal, window, scale):
    """Launch the forward on validated inputs: returns (out[T, Hq, D], lse fp32[Hq, T]).
    No host read: B is a shape, max_seqlen the caller's int."""
    T, Hq, D = q.shape
    B = cu_seqlens.numel() - 1
    out = torch.empty_like(q)
    lse = torch.empty((Hq, T), device=q.device, dtype=torch.float32)
    if B == 0 or T == 0:
        return out, lse
    interp = interpreting()
    args = (
        q, k, v, out, lse, cu_seqlens,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), out.stride(0), out.stride(1),
        T, int(window or 0), float(scale * LOG2E), B,
    )  # fmt: skip
    consts = dict(
        GROUP=Hq // k.shape[1], HEAD_DIM=D, CAUSAL=bool(causal), HAS_WINDOW=window is not None,
        CAST=interp and q.dtype != torch.float32,
        ROUND=interp and q.dtype != torch.float32 and ROUND_IN_INTERPRETER,
        DOT_PREC=dot_precision(q.dtype),
    )  # fmt: skip
    grid = lambda meta: (triton.cdiv(max_seqlen, meta["BLOCK_M"]) * B, Hq)
    launch(attn_fwd_kernel, attn_fwd_tuned, grid, args, consts)
    return out, lse
