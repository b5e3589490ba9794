"""The Triton half of `linear_logprobs` (see fused_logprobs.py for the API): kernels, launchers,
GPU/interpreter tile configs and the sm_90 AOT specs. Imported only when the Triton path runs
(fused_logprobs.py's custom ops import it on first use), so `r7b_fast.kernels` imports and the
torch twin runs where triton is not installed.

Schedule (DESIGN.md §3):
- Forward, `_llp_fwd_kernel`: grid (token tiles, vocab splits). Each program loops over the vocab
  tiles of its split, computes the logit tile (fp32 accumulation over H), keeps an online max and
  sum-exp in fp32 and picks the target logit. Each split writes a partial (max, sum-exp) pair per
  token; a tiny torch reduction merges the splits into lse[N], the only thing saved for backward.
  Splitting the vocabulary gives enough programs to fill the GPU at N=8192 (64 token tiles only).
- Backward, one vocabulary chunk of `Vc` rows at a time (Vc chosen so that the chunk's dlogits
  buffer [N, Vc] stays under `DLOGITS_BUDGET_BYTES`):
  1. `_llp_dlogits_kernel` recomputes the logit tiles of the chunk and writes
     dlogits = g * scale * (onehot - p), computed in fp32 (p is never rounded before the
     subtraction), stored in the GEMM operand dtype (bf16 for bf16 inputs, fp32 otherwise).
  2. `_matmul_kernel`: dW[chunk] = dlogits.T @ H, one large GEMM with K = N (all tokens) and
     fp32 accumulation, written once in the weight's dtype: each vocab row belongs to exactly one
     chunk, so dW needs no accumulation across chunks and no atomics.
  3. `_matmul_kernel`: dH += dlogits @ W[chunk] into an fp32 [N, H] accumulator (read-modify-write
     once per chunk; no atomics: each program owns its output tile).
  Work: 8·N·H·V FLOPs in all (forward, recompute, dH, dW); extra memory: the dlogits chunk, the
  fp32 dH accumulator (gradient-sized) and O(N) vectors. Nothing of size N×V exists.
- Interpreter (TRITON_INTERPRET=1): bf16/fp16 tiles are cast to fp32 right after loading (the
  interpreter's bf16 dot is wrong); on the GPU the dot operands stay bf16 for the tensor cores.
  fp32 inputs use `input_precision="ieee"` (no tf32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from r7b_fast.kernels._backend import interpreting

DLOGITS_BUDGET_BYTES = 48 << 20  # backward's dlogits chunk: 48 MiB ([8192, 3072] bf16)


# Tile configurations. GPU: bf16 wgmma tiles checked ahead of time for sm_90 (AOT_SPECS below).
# Interpreter: the smallest tiles tl.dot accepts, so tiny ragged test shapes cross tile edges.
_GPU = dict(
    fwd=dict(BLOCK_N=128, BLOCK_V=128, BLOCK_K=64, num_warps=8, num_stages=3),
    mm=dict(BLOCK_M=128, BLOCK_P=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
)
_INTERP = dict(
    fwd=dict(BLOCK_N=16, BLOCK_V=32, BLOCK_K=16, num_warps=4, num_stages=1),
    mm=dict(BLOCK_M=16, BLOCK_P=32, BLOCK_K=16, GROUP_M=2, num_warps=4, num_stages=1),
)


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
def _llp_fwd_kernel(h_ptr, w_ptr, t_ptr, m_ptr, s_ptr, tgt_ptr, N, V, K, stride_h, stride_w,
                    v_per_split, scale,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):  # fmt: skip
    """Program (token tile, vocab split): partial max m and sum-exp s over the split's vocab rows
    -> m[split, n], s[split, n]; the scaled target logit -> tgt[n] if the target is in the split."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    tgt = tl.load(t_ptr + rn, mask=n_ok, other=-1)
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
                        stride_h, stride_w, stride_dl, scale,
                        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                        UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):  # fmt: skip
    """dl[n, j] = coef[n] * (onehot(t[n] == v_start + j) - exp(logit[n, v_start + j] - lse[n]))
    for one [BLOCK_N, BLOCK_V] tile of the chunk (w_ptr points at the chunk's first row)."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rv = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
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


def _cfg(kind: str) -> dict:
    return (_INTERP if interpreting() else _GPU)[kind]


def _dot_prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # tf32 is ignored for 16-bit operands


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # interpreter: still split the vocabulary, so the merge of splits is tested


def _forward(hidden, weight, targets, scale: float, ignore_index: int):
    """(logp fp32[N], lse fp32[N]) with the Triton forward kernel; inputs already validated."""
    (N, K), V = hidden.shape, weight.shape[0]
    cfg = _cfg("fwd")
    bn, bv = cfg["BLOCK_N"], cfg["BLOCK_V"]
    n_tiles, v_tiles = triton.cdiv(N, bn), triton.cdiv(V, bv)
    # enough programs for ~8 waves; every split holds at least one vocab tile
    splits = max(1, min(v_tiles, triton.cdiv(8 * _num_sms(hidden.device), n_tiles)))
    v_per_split = triton.cdiv(v_tiles, splits) * bv
    splits = triton.cdiv(V, v_per_split)
    part_m = torch.empty(splits, N, device=hidden.device, dtype=torch.float32)
    part_s = torch.empty_like(part_m)
    picked = torch.zeros(N, device=hidden.device, dtype=torch.float32)
    _llp_fwd_kernel[(n_tiles, splits)](
        hidden, weight, targets, part_m, part_s, picked, N, V, K, hidden.stride(0),
        weight.stride(0), v_per_split, scale, UPCAST=interpreting(),
        DOT_PREC=_dot_prec(hidden.dtype), **cfg,
    )  # fmt: skip
    m = part_m.max(dim=0).values
    lse = m + torch.log((part_s * torch.exp(part_m - m)).sum(dim=0))
    logp = torch.where(targets == ignore_index, 0.0, picked - lse)
    return logp, lse


def _matmul(a, b, c, *, a_trans: bool, accumulate: bool):
    """c (+)= (a.T if a_trans else a) @ b with the Triton GEMM (row-major b, c; see the kernel)."""
    M, P = c.shape
    K = a.shape[0] if a_trans else a.shape[1]
    cfg = _cfg("mm")
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(P, cfg["BLOCK_P"]),)
    f32 = interpreting() or a.dtype != b.dtype
    _matmul_kernel[grid](
        a, b, c, M, P, K, a.stride(0), b.stride(0), c.stride(0), A_TRANS=a_trans,
        ACCUMULATE=accumulate, F32=f32, DOT_PREC=_dot_prec(torch.float32 if f32 else a.dtype),
        INTERP=interpreting(),
        **cfg,
    )  # fmt: skip


def _chunk_rows(N: int, V: int, itemsize: int, tile: int) -> int:
    """Vocab rows per backward chunk: the dlogits buffer [N, Vc] within DLOGITS_BUDGET_BYTES."""
    rows = DLOGITS_BUDGET_BYTES // max(1, N * itemsize)
    return min(V, max(tile, rows // tile * tile))


def _backward(grad, hidden, weight, targets, lse, scale: float, ignore_index: int,
              need_h: bool, need_w: bool):  # fmt: skip
    """(dH, dW) (None where not needed) for d(sum grad * logp); see the module docstring."""
    (N, K), V = hidden.shape, weight.shape[0]
    cfg = _cfg("fwd")
    coef = torch.where(targets == ignore_index, 0.0, grad.float() * scale)
    dl_dtype = torch.bfloat16 if hidden.dtype == torch.bfloat16 else torch.float32
    vc = _chunk_rows(N, V, dl_dtype.itemsize, cfg["BLOCK_V"])
    dl = torch.empty(N, vc, device=hidden.device, dtype=dl_dtype)
    dh = torch.empty(N, K, device=hidden.device, dtype=torch.float32) if need_h else None
    dw = torch.empty_like(weight) if need_w else None
    for v0 in range(0, V, vc):
        rows = min(vc, V - v0)
        w_c = weight[v0 : v0 + rows]
        grid = (triton.cdiv(N, cfg["BLOCK_N"]), triton.cdiv(rows, cfg["BLOCK_V"]))
        _llp_dlogits_kernel[grid](
            hidden, w_c, targets, lse, coef, dl, N, rows, K, v0, hidden.stride(0),
            weight.stride(0), dl.stride(0), scale, UPCAST=interpreting(),
            DOT_PREC=_dot_prec(hidden.dtype), **cfg,
        )  # fmt: skip
        dl_c = dl[:, :rows]
        if need_w:
            _matmul(dl_c, hidden, dw[v0 : v0 + rows], a_trans=True, accumulate=False)
        if need_h:
            _matmul(dl_c, w_c, dh, a_trans=False, accumulate=v0 > 0)
    return (dh.to(hidden.dtype) if need_h else None), dw


# ----------------------------------------------------------------------------- AOT (sm_90)


def _aot_specs() -> list:
    """The bf16 GPU configurations. At N=8192, H=4096, V=256000 every pointer is 16-byte aligned
    and every size, stride and offset is a multiple of 16, so the JIT specialises all of them as
    divisible by 16; the specs say the same (`divisible`), or Triton would not pipeline."""
    from r7b_fast.kernels.aot import AotSpec

    mod = "r7b_fast.kernels._fused_logprobs_triton"
    fwd, mm = _GPU["fwd"], _GPU["mm"]
    tiles = {k: fwd[k] for k in ("BLOCK_N", "BLOCK_V", "BLOCK_K")}
    mm_tiles = {k: mm[k] for k in ("BLOCK_M", "BLOCK_P", "BLOCK_K", "GROUP_M")}
    ints = dict.fromkeys(("N", "V", "K", "stride_h", "stride_w"), "i32")
    const = dict(UPCAST=False, DOT_PREC="tf32")
    fwd_sig = {
        **dict(h_ptr="*bf16", w_ptr="*bf16", t_ptr="*i64"),
        **dict(m_ptr="*fp32", s_ptr="*fp32", tgt_ptr="*fp32"),
        **ints, "v_per_split": "i32", "scale": "fp32",
        **dict.fromkeys((*tiles, *const), "constexpr"),
    }  # fmt: skip
    dl_sig = {
        **dict(h_ptr="*bf16", w_ptr="*bf16", t_ptr="*i64", lse_ptr="*fp32", coef_ptr="*fp32"),
        "dl_ptr": "*bf16", "N": "i32", "Vc": "i32", "K": "i32", "v_start": "i32",
        "stride_h": "i32", "stride_w": "i32", "stride_dl": "i32", "scale": "fp32",
        **dict.fromkeys((*tiles, *const), "constexpr"),
    }  # fmt: skip
    launch = dict(num_warps=fwd["num_warps"], num_stages=fwd["num_stages"])
    mm_launch = dict(num_warps=mm["num_warps"], num_stages=mm["num_stages"])
    div = lambda sig: [k for k, t in sig.items() if t not in ("constexpr", "fp32")]
    specs = [
        AotSpec(f"{mod}:_llp_fwd_kernel", fwd_sig, {**tiles, **const}, **launch, label="llp_fwd",
                divisible=div(fwd_sig)),
        AotSpec(f"{mod}:_llp_dlogits_kernel", dl_sig, {**tiles, **const}, **launch,
                label="llp_dlogits", divisible=div(dl_sig)),
    ]  # fmt: skip
    for label, c_type, a_trans, accumulate in (("dW", "*bf16", True, False),
                                               ("dH", "*fp32", False, True)):  # fmt: skip
        sig = {
            "a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": c_type,
            **dict.fromkeys(("M", "P", "K", "stride_a", "stride_b", "stride_c"), "i32"),
            **dict.fromkeys(("A_TRANS", "ACCUMULATE", *mm_tiles, "F32", "DOT_PREC", "INTERP"),
                            "constexpr"),
        }  # fmt: skip
        consts = dict(
            A_TRANS=a_trans, ACCUMULATE=accumulate, F32=False, DOT_PREC="tf32", INTERP=False
        )
        specs.append(AotSpec(f"{mod}:_matmul_kernel", sig, {**mm_tiles, **consts}, **mm_launch,
                             label=f"llp_matmul_{label}", divisible=div(sig)))  # fmt: skip
    return specs


AOT_SPECS = _aot_specs()
