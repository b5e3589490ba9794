"""The Triton half of `linear_logprobs` (see fused_logprobs.py for the API): kernels, launchers,
GPU/interpreter tile configs and the sm_90 AOT specs. Imported only when the Triton path runs
(fused_logprobs.py's custom ops import it on first use), so `r7b_fast.kernels` imports and the
torch twin runs where triton is not installed.

Schedule (DESIGN.md §3):
- Forward, `_llp_fwd_kernel`: 1-D grid of (token tile, vocab split) programs in grouped order
  (`_grouped`): the token tiles of one launch group (hidden rows filling L2_HIDDEN_BYTES of L2)
  take turns fastest, so the programs running at once share those hidden tiles from L2 and read
  each weight tile about once per group (token-fastest order re-streamed all of hidden, 67 MB >
  L2, at every vocab step: ~75 GB per forward at N=8192, H=4096, V=256000). Each program loops
  over the vocab tiles of its split, computes the logit tile (fp32 accumulation over H), keeps an
  online max and sum-exp in fp32 and picks the target logit. Each split writes a partial
  (max, sum-exp) pair per token; a tiny torch reduction merges the splits into lse[N], the only
  thing saved for backward. The split count (`_fwd_splits`) fills whole waves of the device's SMs.
- Backward, one vocabulary chunk of `Vc` rows at a time (`_chunk_rows`: 3072 rows whatever N, so
  the dlogits budget grows with N and the dW GEMM always fills the GPU):
  1. `_llp_dlogits_kernel` (grouped order too) recomputes the logit tiles of the chunk and writes
     dlogits = g * scale * (onehot - p), computed in fp32 (p is never rounded before the
     subtraction), stored in the GEMM operand dtype (bf16 for bf16 inputs, fp32 otherwise).
  2. `_matmul_kernel`: dW[chunk] = dlogits.T @ H, one large GEMM with K = N (all tokens) and
     fp32 accumulation, written once in the weight's dtype: each vocab row belongs to exactly one
     chunk, so dW needs no accumulation across chunks and no atomics.
  3. `_matmul_kernel`: dH += dlogits @ W[chunk] into an fp32 [N, H] accumulator (read-modify-write
     once per chunk; no atomics: each program owns its output tile).
- Tiles: on the GPU triton.autotune picks among the `_GPU` candidates per (H, dtypes) (128x256
  tiles among them; each one AOT-checked, see AOT_SPECS); the interpreter runs `_INTERP`.
  Work: 8·N·H·V FLOPs in all (forward, recompute, dH, dW); extra memory: the dlogits chunk, the
  fp32 dH accumulator (gradient-sized) and O(N) vectors. Nothing of size N×V exists.
- Interpreter (TRITON_INTERPRET=1): bf16/fp16 tiles are cast to fp32 right after loading (the
  interpreter's bf16 dot is wrong); on the GPU the dot operands stay bf16 for the tensor cores.
  fp32 inputs use `input_precision="ieee"` (no tf32).
"""

from __future__ import annotations

import functools
import warnings

import torch
import triton
import triton.language as tl

from r7b_fast.kernels._backend import interpreting

# Backward chunking (see _chunk_rows for the arithmetic).
DLOGITS_TARGET_ROWS = 3072  # vocab rows per chunk: [8192, 3072] bf16 = 48 MiB at N=8192
DLOGITS_MIN_ROWS = 1024  # never fewer (the dW GEMM's row tiles; dH's fp32 RMW per chunk)
DLOGITS_FREE_FRACTION = 0.25  # of the device's free memory the dlogits chunk may take
L2_HIDDEN_BYTES = 24 << 20  # hidden rows a launch group keeps in L2 (H100/H200 L2: 50 MB)
_INTERP_GROUP_ROWS = 32  # interpreter: groups of 2 token tiles, so the group edges are tested

# Autotune candidates (triton.autotune picks one per key on the GPU; AOT_SPECS holds one sm_90
# spec per candidate, so each is checked for spills, smem and pipelining before it can be
# picked). All forward/dlogits candidates share BLOCK_N: the launcher sizes the vocab split
# count for it. Interpreter: one config (no tuning), the smallest tiles tl.dot accepts, so tiny
# ragged test shapes cross tile edges.
_MM = dict(BLOCK_M=128, BLOCK_K=64, GROUP_M=8, num_warps=8)
# The 128x256 tiles sit at the 255-register limit; the K depths and stage counts below are the
# ones that compile with no stack frame under both Triton 3.6 (GPU image) and 3.9 (venv):
# fwd 128x256x64 and dH-accumulate 128x256x32 get a stack frame under 3.9, dlogits 128x256x64
# and dH-accumulate 128x256x64 (the old dH config) under 3.6.
_GPU = dict(
    fwd=[
        dict(BLOCK_N=128, BLOCK_V=128, BLOCK_K=64, num_warps=8, num_stages=3),
        dict(BLOCK_N=128, BLOCK_V=256, BLOCK_K=32, num_warps=8, num_stages=3),
    ],
    dl=[
        dict(BLOCK_N=128, BLOCK_V=128, BLOCK_K=64, num_warps=8, num_stages=3),
        dict(BLOCK_N=128, BLOCK_V=256, BLOCK_K=32, num_warps=8, num_stages=4),
    ],
    dw=[dict(_MM, BLOCK_P=256, num_stages=3), dict(_MM, BLOCK_P=128, num_stages=4)],
    dh=[dict(_MM, BLOCK_P=128, num_stages=4), dict(_MM, BLOCK_P=256, BLOCK_K=16, num_stages=5)],
)
_INTERP_LOGITS = [dict(BLOCK_N=16, BLOCK_V=32, BLOCK_K=16, num_warps=4, num_stages=1)]
_INTERP_MM = [dict(BLOCK_M=16, BLOCK_P=32, BLOCK_K=16, GROUP_M=2, num_warps=4, num_stages=1)]
_INTERP = dict(fwd=_INTERP_LOGITS, dl=_INTERP_LOGITS, dw=_INTERP_MM, dh=_INTERP_MM)
_warned_chunk = False


@triton.jit
def _cast_out(x, dtype: tl.constexpr, INTERP: tl.constexpr):
    """fp32 x -> dtype rounding to nearest even, as the GPU does. The interpreter truncates
    fp32 -> bf16 (twice the error), so there the fp32 bits are rounded first."""
    if INTERP:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _logits_tile(h_ptr, w_ptr, rn, rv, N, V, K, stride_h, stride_w, scale,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                 UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):  # fmt: skip
    """scale * hidden[rn] @ weight[rv].T as an fp32 [BLOCK_N, BLOCK_V] tile (0 outside N, V)."""
    rk = tl.arange(0, BLOCK_K)
    h_ptrs = h_ptr + rn.to(tl.int64)[:, None] * stride_h + rk[None, :]
    w_ptrs = w_ptr + rv.to(tl.int64)[:, None] * stride_w + rk[None, :]
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + rk)[None, :] < K
        h = tl.load(h_ptrs, mask=(rn[:, None] < N) & k_ok, other=0.0)
        w = tl.load(w_ptrs, mask=(rv[:, None] < V) & k_ok, other=0.0)
        if UPCAST:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PREC)
        h_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    return acc * scale


@triton.jit
def _grouped(pid, n_rows, n_cols, group_rows, BLOCK_N: tl.constexpr):
    """(row tile, column) of program `pid` in grouped order: `group_rows // BLOCK_N` token tiles
    (their hidden rows fit in L2) take turns fastest, then the column (vocab split or tile), so
    the programs running at once share a few hidden tiles and each weight tile is read from HBM
    about once per group instead of re-streaming all of hidden at every vocab step."""
    group = tl.maximum(group_rows // BLOCK_N, 1)
    per_group = group * n_cols
    first = (pid // per_group) * group
    size = tl.minimum(n_rows - first, group)
    return first + (pid % per_group) % size, (pid % per_group) // size


@triton.jit
def _llp_fwd_kernel(h_ptr, w_ptr, t_ptr, m_ptr, s_ptr, tgt_ptr, N, V, K, stride_h, stride_w,
                    n_splits, group_rows, scale,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):  # fmt: skip
    """Program (token tile, vocab split) of a 1-D grouped grid (see _grouped): partial max m and
    sum-exp s over the split's vocab rows -> m[split, n], s[split, n]; the scaled target logit ->
    tgt[n] if the target is in the split. Split j holds vocab tiles [j*c, (j+1)*c) with
    c = cdiv(cdiv(V, BLOCK_V), n_splits); a split past V writes m = -inf, s = 0."""
    pid_n, pid_s = _grouped(tl.program_id(0), tl.cdiv(N, BLOCK_N), n_splits, group_rows, BLOCK_N)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    tgt = tl.load(t_ptr + rn, mask=n_ok, other=-1)
    v_per_split = tl.cdiv(tl.cdiv(V, BLOCK_V), n_splits) * BLOCK_V
    v_lo = pid_s * v_per_split
    v_hi = tl.minimum(v_lo + v_per_split, V)
    m = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    s = tl.zeros([BLOCK_N], dtype=tl.float32)
    picked = tl.zeros([BLOCK_N], dtype=tl.float32)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        rv = v0 + tl.arange(0, BLOCK_V)
        x = _logits_tile(h_ptr, w_ptr, rn, rv, N, V, K, stride_h, stride_w, scale,
                         BLOCK_N, BLOCK_V, BLOCK_K, UPCAST, DOT_PREC)  # fmt: skip
        x = tl.where((rv < v_hi)[None, :], x, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), axis=1)
        m = m_new
        picked += tl.sum(tl.where(rv[None, :] == tgt[:, None], x, 0.0), axis=1)
    tl.store(m_ptr + pid_s * N + rn, m, mask=n_ok)
    tl.store(s_ptr + pid_s * N + rn, s, mask=n_ok)
    tl.store(tgt_ptr + rn, picked, mask=n_ok & (tgt >= v_lo) & (tgt < v_hi))


@triton.jit
def _llp_dlogits_kernel(h_ptr, w_ptr, t_ptr, lse_ptr, coef_ptr, dl_ptr, N, Vc, K, v_start,
                        stride_h, stride_w, stride_dl, group_rows, scale,
                        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                        UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):  # fmt: skip
    """dl[n, j] = coef[n] * (onehot(t[n] == v_start + j) - exp(logit[n, v_start + j] - lse[n]))
    for one [BLOCK_N, BLOCK_V] tile of the chunk (w_ptr points at the chunk's first row); 1-D
    grid in grouped order (see _grouped)."""
    pid_n, pid_v = _grouped(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(Vc, BLOCK_V),
                            group_rows, BLOCK_N)  # fmt: skip
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rv = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    n_ok = rn < N
    x = _logits_tile(h_ptr, w_ptr, rn, rv, N, Vc, K, stride_h, stride_w, scale,
                     BLOCK_N, BLOCK_V, BLOCK_K, UPCAST, DOT_PREC)  # fmt: skip
    lse = tl.load(lse_ptr + rn, mask=n_ok, other=0.0)
    coef = tl.load(coef_ptr + rn, mask=n_ok, other=0.0)
    tgt = tl.load(t_ptr + rn, mask=n_ok, other=-1)
    p = tl.exp(x - lse[:, None])
    onehot = tl.where((v_start + rv)[None, :] == tgt[:, None], 1.0, 0.0)
    dl = coef[:, None] * (onehot - p)  # fp32 throughout
    ptrs = dl_ptr + rn.to(tl.int64)[:, None] * stride_dl + rv[None, :]
    tl.store(
        ptrs,
        _cast_out(dl, dl_ptr.dtype.element_ty, UPCAST),
        mask=n_ok[:, None] & (rv < Vc)[None, :],
    )


@triton.jit
def _matmul_kernel(a_ptr, b_ptr, c_ptr, M, P, K, stride_a, stride_b, stride_c,
                   A_TRANS: tl.constexpr, ACCUMULATE: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
                   GROUP_M: tl.constexpr, F32: tl.constexpr, DOT_PREC: tl.constexpr,
                   INTERP: tl.constexpr):  # fmt: skip
    """C[M, P] (+)= A[M, K] @ B[K, P], fp32 accumulation, stored in C's dtype.

    Row-major B and C; A row-major, or (A_TRANS) A = X.T for a row-major X[K, M] with row stride
    stride_a. ACCUMULATE adds the existing C (an fp32 accumulator). F32 casts both operands to
    fp32 (interpreter, or fp32 dlogits against fp16 weights). Grouped tile order for L2 reuse."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_p = tl.cdiv(P, BLOCK_P)
    per_group = GROUP_M * num_p
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_p = (pid % per_group) // group_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rp = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    rk = tl.arange(0, BLOCK_K)
    if A_TRANS:
        a_ptrs = a_ptr + rk.to(tl.int64)[None, :] * stride_a + rm[:, None]
    else:
        a_ptrs = a_ptr + rm.to(tl.int64)[:, None] * stride_a + rk[None, :]
    b_ptrs = b_ptr + rk.to(tl.int64)[:, None] * stride_b + rp[None, :]
    c_ptrs = c_ptr + rm.to(tl.int64)[:, None] * stride_c + rp[None, :]
    c_mask = (rm[:, None] < M) & (rp[None, :] < P)
    if ACCUMULATE:  # start from C: no second [BLOCK_M, BLOCK_P] tile live in the epilogue
        acc = tl.load(c_ptrs, mask=c_mask, other=0.0).to(tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_P], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + rk) < K
        a = tl.load(a_ptrs, mask=(rm[:, None] < M) & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & (rp[None, :] < P), other=0.0)
        if F32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
        if A_TRANS:
            a_ptrs += BLOCK_K * stride_a
        else:
            a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_b
    tl.store(c_ptrs, _cast_out(acc, c_ptr.dtype.element_ty, INTERP), mask=c_mask)


# ----------------------------------------------------------------------------- launchers


def _cands(kind: str) -> list[dict]:
    return (_INTERP if interpreting() else _GPU)[kind]


@functools.cache
def _tuned(kind: str, interp: bool):
    """The autotuned launcher of one kernel: keyed on H (K for the logits kernels, P for the
    GEMMs) and, as triton.autotune always does, the tensor dtypes. The dH GEMM accumulates into
    its output, so every config timed is followed by restoring C (`restore_value`; zeroing it,
    as reset_to_zero does, would drop the earlier chunks). The forward and dlogits kernels only
    store (each target logit by the one split holding it), so a rerun overwrites the same values."""
    mm = (_matmul_kernel, ["P", "A_TRANS", "ACCUMULATE"], ["c_ptr"])
    fn, key, restore = {
        "fwd": (_llp_fwd_kernel, ["K"], None),
        "dl": (_llp_dlogits_kernel, ["K"], None),
        "dw": mm,
        "dh": mm,
    }[kind]
    cands = (_INTERP if interp else _GPU)[kind]
    configs = [
        triton.Config(
            {k: v for k, v in c.items() if k.isupper()},
            num_warps=c["num_warps"],
            num_stages=c["num_stages"],
        )
        for c in cands
    ]
    return triton.autotune(configs, key=key, restore_value=restore)(fn)


def _dot_prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # tf32 is ignored for 16-bit operands


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # interpreter: still split the vocabulary, so the merge of splits is tested


def _group_rows(K: int, itemsize: int) -> int:
    """Token rows per launch group (see _grouped): their hidden rows fill L2_HIDDEN_BYTES."""
    return _INTERP_GROUP_ROWS if interpreting() else max(1, L2_HIDDEN_BYTES // (K * itemsize))


@functools.lru_cache(maxsize=256)
def _fwd_splits(n_tiles: int, v_granules: int, sms: int, group_tiles: int) -> int:
    """Vocab splits of the forward: the count minimising the modelled time, waves x the time of
    one program = ceil(n_tiles * s / sms) * (ceil(v_granules / s) + 1) (a granule is the widest
    BLOCK_V; the +1 is a program's fixed cost: pipeline fill and epilogue, about one tile), the
    fewest splits among equals. A last wave only partly filled costs a whole one, so the minimum
    lands on counts that fill whole (or nearly whole) waves. At least ceil(sms / group_tiles)
    splits, so that one wave spans at most one launch group's token tiles (their hidden rows stay
    in L2, see _grouped). N=8192 (64 tiles of 128), V=256000 (1000 granules of 256), 132 SMs,
    groups of 24 tiles: s = 6, 384 programs in 3 waves (the last 91% full), modelled 4% above
    the perfect split; the old 8.24-wave launch lost 9% to its last wave alone. `sms` counts SMs,
    not resident programs (at these tiles' shared memory one or two per SM)."""
    lo = min(v_granules, -(-sms // max(1, group_tiles)))
    best_cost, best = None, lo
    for s in range(lo, v_granules + 1):
        cost = -(-n_tiles * s // sms) * (-(-v_granules // s) + 1)
        if best_cost is None or cost < best_cost:
            best_cost, best = cost, s
    return best


def _forward(hidden, weight, targets, scale: float, ignore_index: int):
    """(logp fp32[N], lse fp32[N]) with the Triton forward kernel; inputs already validated."""
    (N, K), V = hidden.shape, weight.shape[0]
    cands = _cands("fwd")
    bn = cands[0]["BLOCK_N"]
    assert all(c["BLOCK_N"] == bn for c in cands), "forward candidates must share BLOCK_N"
    n_tiles = triton.cdiv(N, bn)
    granule = max(c["BLOCK_V"] for c in cands)
    group_rows = _group_rows(K, hidden.element_size())
    splits = _fwd_splits(
        n_tiles, triton.cdiv(V, granule), _num_sms(hidden.device), max(1, group_rows // bn)
    )
    part_m = torch.empty(splits, N, device=hidden.device, dtype=torch.float32)
    part_s = torch.empty_like(part_m)
    picked = torch.zeros(N, device=hidden.device, dtype=torch.float32)
    _tuned("fwd", interpreting())[(n_tiles * splits,)](
        hidden, weight, targets, part_m, part_s, picked, N, V, K, hidden.stride(0),
        weight.stride(0), splits, group_rows, scale,
        UPCAST=interpreting(), DOT_PREC=_dot_prec(hidden.dtype),
    )  # fmt: skip
    m = part_m.max(dim=0).values
    lse = m + torch.log((part_s * torch.exp(part_m - m)).sum(dim=0))
    logp = torch.where(targets == ignore_index, 0.0, picked - lse)
    return logp, lse


def _matmul(a, b, c, *, a_trans: bool, accumulate: bool):
    """c (+)= (a.T if a_trans else a) @ b with the Triton GEMM (row-major b, c; see the kernel)."""
    M, P = c.shape
    K = a.shape[0] if a_trans else a.shape[1]
    f32 = interpreting() or a.dtype != b.dtype
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(P, meta["BLOCK_P"]),)  # noqa: E731
    _tuned("dw" if a_trans else "dh", interpreting())[grid](
        a, b, c, M, P, K, a.stride(0), b.stride(0), c.stride(0), A_TRANS=a_trans,
        ACCUMULATE=accumulate, F32=f32, DOT_PREC=_dot_prec(torch.float32 if f32 else a.dtype),
        INTERP=interpreting(),
    )  # fmt: skip


def _chunk_rows(N: int, V: int, H: int, itemsize: int, sms: int, free_bytes: int) -> int:
    """Vocab rows per backward chunk (the dlogits buffer is [N, rows] of `itemsize` bytes).

    The budget grows with N: DLOGITS_TARGET_ROWS rows whatever N (48 MiB at N=8192 bf16, 384 MiB
    at N=65536), so each chunk's dW GEMM (M = rows, P = H, K = N) keeps its rows/128 x H/256
    = 24 x 16 = 384 tiles (2.9 waves on 132 SMs; the old fixed 48 MiB gave 384 rows at N=65536:
    48 tiles, 0.36 of the GPU), and the fp32 dH read-modify-write (8*N*H bytes per chunk)
    happens V/3072 times (84 at V=256000: ~180 GB at N=65536, H=4096, not 1.4 TB). The floor,
    max(DLOGITS_MIN_ROWS, rows giving the dW GEMM two waves of tiles), holds whatever the
    memory; above it, the chunk takes at most DLOGITS_FREE_FRACTION of `free_bytes` (warning
    once when even the floor exceeds that). Rows are a multiple of the widest BLOCK_V."""
    global _warned_chunk
    mm = _cands("dw")[0]
    tile = max(c["BLOCK_V"] for c in _cands("fwd") + _cands("dl"))
    fill = triton.cdiv(2 * sms, triton.cdiv(H, mm["BLOCK_P"])) * mm["BLOCK_M"]
    floor = triton.cdiv(max(DLOGITS_MIN_ROWS, fill), tile) * tile
    cap = int(free_bytes * DLOGITS_FREE_FRACTION) // max(1, N * itemsize) // tile * tile
    if cap < floor and not _warned_chunk:
        _warned_chunk = True
        warnings.warn(
            f"linear_logprobs backward: a {floor}-row dlogits chunk ({N * floor * itemsize} B) "
            f"exceeds {DLOGITS_FREE_FRACTION} of the free device memory ({free_bytes} B); "
            "using it anyway (fewer rows would starve the dW GEMM)",
            stacklevel=3,
        )
    return min(V, max(floor, min(cap, triton.cdiv(DLOGITS_TARGET_ROWS, tile) * tile)))


def _free_bytes(device: torch.device) -> int:
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 1 << 62


def _backward(grad, hidden, weight, targets, lse, scale: float, ignore_index: int,
              need_h: bool, need_w: bool):  # fmt: skip
    """(dH, dW) (None where not needed) for d(sum grad * logp); see the module docstring."""
    (N, K), V = hidden.shape, weight.shape[0]
    coef = torch.where(targets == ignore_index, 0.0, grad.float() * scale)
    dl_dtype = torch.bfloat16 if hidden.dtype == torch.bfloat16 else torch.float32
    dev = hidden.device
    vc = _chunk_rows(N, V, K, dl_dtype.itemsize, _num_sms(dev), _free_bytes(dev))
    dl = torch.empty(N, vc, device=dev, dtype=dl_dtype)
    dh = torch.empty(N, K, device=dev, dtype=torch.float32) if need_h else None
    dw = torch.empty_like(weight) if need_w else None
    group_rows = _group_rows(K, hidden.element_size())
    for v0 in range(0, V, vc):
        rows = min(vc, V - v0)
        w_c = weight[v0 : v0 + rows]
        grid = lambda meta, rows=rows: (  # noqa: E731
            triton.cdiv(N, meta["BLOCK_N"]) * triton.cdiv(rows, meta["BLOCK_V"]),
        )
        _tuned("dl", interpreting())[grid](
            hidden, w_c, targets, lse, coef, dl, N, rows, K, v0, hidden.stride(0),
            weight.stride(0), dl.stride(0), group_rows, scale, UPCAST=interpreting(),
            DOT_PREC=_dot_prec(hidden.dtype),
        )  # fmt: skip
        dl_c = dl[:, :rows]
        if need_w:
            _matmul(dl_c, hidden, dw[v0 : v0 + rows], a_trans=True, accumulate=False)
        if need_h:
            _matmul(dl_c, w_c, dh, a_trans=False, accumulate=v0 > 0)
    return (dh.to(hidden.dtype) if need_h else None), dw


# ----------------------------------------------------------------------------- AOT (sm_90)


def _tiles(c: dict) -> str:
    order = ("BLOCK_M", "BLOCK_N", "BLOCK_P", "BLOCK_V", "BLOCK_K")
    tiles = "x".join(str(c[k]) for k in order if k in c)
    return f"{tiles}_w{c['num_warps']}s{c['num_stages']}"


def _aot_specs() -> list:
    """One bf16 sm_90 spec per autotune candidate of each kernel (the autotuner may pick any).
    At N=8192, H=4096, V=256000 every pointer is 16-byte aligned and every size, stride, offset
    and group_rows is a multiple of 16, so the JIT specialises all of them as divisible by 16;
    the specs say the same (`divisible`), or Triton would not pipeline. n_splits (33 there) is
    not. Every main loop must pipeline (`pipelined`: cp.async in the PTX)."""
    from r7b_fast.kernels.aot import AotSpec

    mod = "r7b_fast.kernels._fused_logprobs_triton"
    const = dict(UPCAST=False, DOT_PREC="tf32")
    tiles = ("BLOCK_N", "BLOCK_V", "BLOCK_K")
    ints = dict.fromkeys(("N", "V", "K", "stride_h", "stride_w"), "i32")
    fwd_sig = {
        **dict(h_ptr="*bf16", w_ptr="*bf16", t_ptr="*i64"),
        **dict(m_ptr="*fp32", s_ptr="*fp32", tgt_ptr="*fp32"),
        **ints, "n_splits": "i32", "group_rows": "i32", "scale": "fp32",
        **dict.fromkeys((*tiles, *const), "constexpr"),
    }  # fmt: skip
    dl_sig = {
        **dict(h_ptr="*bf16", w_ptr="*bf16", t_ptr="*i64", lse_ptr="*fp32", coef_ptr="*fp32"),
        "dl_ptr": "*bf16", "N": "i32", "Vc": "i32", "K": "i32", "v_start": "i32",
        "stride_h": "i32", "stride_w": "i32", "stride_dl": "i32", "group_rows": "i32",
        "scale": "fp32", **dict.fromkeys((*tiles, *const), "constexpr"),
    }  # fmt: skip

    def div(sig):
        return [k for k, t in sig.items() if t not in ("constexpr", "fp32") and k != "n_splits"]

    specs = []
    for kind, fn, sig in (
        ("fwd", "_llp_fwd_kernel", fwd_sig),
        ("dl", "_llp_dlogits_kernel", dl_sig),
    ):
        for c in _GPU[kind]:
            specs.append(AotSpec(
                f"{mod}:{fn}", sig, {**{k: c[k] for k in tiles}, **const},
                num_warps=c["num_warps"], num_stages=c["num_stages"], pipelined=True,
                label=f"llp_{'dlogits' if kind == 'dl' else kind}_{_tiles(c)}", divisible=div(sig),
            ))  # fmt: skip
    mm_cases = [("dW", "*bf16", True, False, c) for c in _GPU["dw"]] + [
        (f"dH{'_acc' if acc else ''}", "*fp32", False, acc, c)
        for c in _GPU["dh"]
        for acc in (False, True)  # the first chunk stores, the others accumulate
    ]
    for name, c_type, a_trans, accumulate, c in mm_cases:
        mm_tiles = {k: c[k] for k in ("BLOCK_M", "BLOCK_P", "BLOCK_K", "GROUP_M")}
        sig = {
            "a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": c_type,
            **dict.fromkeys(("M", "P", "K", "stride_a", "stride_b", "stride_c"), "i32"),
            **dict.fromkeys(("A_TRANS", "ACCUMULATE", *mm_tiles, "F32", "DOT_PREC",
                             "INTERP"), "constexpr"),
        }  # fmt: skip
        consts = dict(A_TRANS=a_trans, ACCUMULATE=accumulate, F32=False, DOT_PREC="tf32",
                      INTERP=False)  # fmt: skip
        specs.append(AotSpec(
            f"{mod}:_matmul_kernel", sig, {**mm_tiles, **consts}, num_warps=c["num_warps"],
            num_stages=c["num_stages"], label=f"llp_matmul_{name}_{_tiles(c)}",
            divisible=div(sig), pipelined=True,
        ))  # fmt: skip
    return specs


AOT_SPECS = _aot_specs()
