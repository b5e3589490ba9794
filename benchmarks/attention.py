"""Varlen attention: ours vs torch SDPA, FlexAttention and flash-attn (when importable).

GPU suite commands (repo root; each exits non-zero on failure):

    python -m benchmarks.attention --check    # correctness at the real shapes vs an fp32 reference
    python -m benchmarks.attention            # timing vs peers (stops adding rows after --budget s)

Without CUDA both run tiny shapes (fp32, Triton interpreter when TRITON_INTERPRET=1) as a smoke
test.

Workloads (GPU; head dim 128, 32 query / 8 kv heads, bf16, Command R7B's attention):
  causal_8k  one 8192-token causal sequence
  packed_16k one 16384-token row packed from lognormal SFT lengths (median ~500), causal
  window_16k one 16384-token sequence, sliding window 4096
Peers on the same inputs: SDPA (dense causal via its flash backend; a boolean [T, T] mask for
packed/windowed), FlexAttention (compiled, document + sliding-window block mask), flash-attn's
varlen function. TFLOP/s count attended (query, key) pairs only: 4*P*D*Hq flops forward,
+10*P*D*Hq backward. Timing: benchmarks._common.bench (median of CUDA-event times). Results: a
table on stdout, JSON + markdown via benchmarks._common.write_results ($R7B_RESULTS_DIR, else
$OUT, else benchmarks/results/), with the issue's goals as summary rows.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time

import torch

from benchmarks._common import (
    arg_parser,
    attended_pairs,
    bench,
    env_info,
    goal_row,
    markdown_table,
    write_results,
)
from r7b_fast.kernels.attention import varlen_attention

GPU_SHAPES = dict(hq=32, hk=8, d=128, dtype=torch.bfloat16)
CPU_SHAPES = dict(hq=4, hk=2, d=16, dtype=torch.float32)


def lognormal_lengths(total: int, median: float, sigma: float = 0.9, seed: int = 0) -> list[int]:
    """Sequence lengths ~ lognormal(ln median, sigma), clipped to [8, total], summing to total."""
    g = torch.Generator().manual_seed(seed)
    lens, left = [], total
    while left > 0:
        n = int(math.exp(math.log(median) + sigma * torch.randn(1, generator=g).item()))
        n = min(max(n, 8), left)
        lens.append(n)
        left -= n
    return lens


def workloads(smoke: bool) -> dict[str, tuple[list[int], int | None]]:
    """name -> (sequence lengths, window)."""
    if smoke:
        return {
            "causal": ([48], None),
            "packed": (lognormal_lengths(64, 8), None),
            "window": ([64], 16),
        }
    return {
        "causal_8k": ([8192], None),
        "packed_16k": (lognormal_lengths(16384, 500), None),
        "window_16k": ([16384], 4096),
    }


def make_inputs(lens, hq, hk, d, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    T = sum(lens)
    q, k, v, do = (torch.randn(T, h, d, generator=g).to(device, dtype) for h in (hq, hk, hk, hq))
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    return q, k, v, do, cu


def dense_mask(lens, window, device):
    """[T, T] bool: same sequence, causal, inside the window."""
    doc = torch.repeat_interleave(
        torch.arange(len(lens), device=device), torch.tensor(lens, device=device)
    )
    pos = torch.cat([torch.arange(n, device=device) for n in lens])
    m = (doc[:, None] == doc[None, :]) & (pos[None, :] <= pos[:, None])
    if window is not None:
        m &= pos[None, :] > pos[:, None] - window
    return m


def implementations(lens, window, q, k, v, cu):
    """name -> (f, inputs): f(*inputs) -> [T, Hq, D]; inputs are q, k, v in flash-attn's layout
    (SDPA gets K/V already repeated to Hq heads, outside the timed region)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    ALL_SDPA = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

    T, hq, d = q.shape
    rep = hq // k.shape[1]
    max_len, dense = max(lens), len(lens) == 1 and window is None
    qkv = (q, k, v)
    ours = lambda q, k, v: varlen_attention(q, k, v, cu, max_len, window=window)
    impls = {"ours": (ours, qkv), "ours_atomic": (ours, qkv)}  # see BWD_SCHEDULE
    to4 = lambda x: x.transpose(0, 1)[None]  # (1, H, T, D)
    mask = None if dense else dense_mask(lens, window, q.device)

    def sdpa(q, k, v):
        # dense causal: pin SDPA's flash backend (the goal's baseline); masked: SDPA's choice
        backends = [SDPBackend.FLASH_ATTENTION] if dense and q.is_cuda else ALL_SDPA
        with sdpa_kernel(backends):
            o = torch.nn.functional.scaled_dot_product_attention(
                to4(q), to4(k), to4(v), attn_mask=mask, is_causal=dense
            )
        return o[0].transpose(0, 1)

    mha = (q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1))
    impls["sdpa_flash" if dense else "sdpa_mask"] = (sdpa, mha)
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        doc = torch.repeat_interleave(
            torch.arange(len(lens), device=q.device), torch.tensor(lens, device=q.device)
        )
        pos = torch.cat([torch.arange(n, device=q.device) for n in lens])

        def mask_mod(b, h, i, j):
            ok = (doc[i] == doc[j]) & (pos[j] <= pos[i])
            return ok & (pos[j] > pos[i] - window) if window is not None else ok

        block = create_block_mask(mask_mod, None, None, T, T, device=q.device)
        flex = torch.compile(flex_attention) if q.is_cuda else flex_attention
        run_flex = lambda q, k, v: flex(to4(q), to4(k), to4(v), block_mask=block, enable_gqa=True)
        impls["flex"] = (lambda q, k, v: run_flex(q, k, v)[0].transpose(0, 1), qkv)
    except Exception as e:  # noqa: BLE001 - a peer that cannot run is reported, not fatal
        print(f"flex attention unavailable: {type(e).__name__}: {e}", file=sys.stderr)
    try:
        from flash_attn import flash_attn_varlen_func

        ws = (-1, -1) if window is None else (window - 1, 0)
        fa = lambda q, k, v: flash_attn_varlen_func(
            q, k, v, cu, cu, max_len, max_len, causal=True, window_size=ws
        )
        impls["flash_attn"] = (fa, qkv)
    except ImportError:
        pass
    return impls


# The peer each workload's goal is measured against: timed right after ours, before the rest.
GOAL_PEER = {"causal_8k": "sdpa_flash", "packed_16k": "flex", "window_16k": "flex"}


# Our backward's second schedule (dQ by fp32 atomics inside the dK/dV kernel), timed side by side
# with the default ("split": a dK/dV kernel and a dQ kernel); the forward is the same kernel.
BWD_SCHEDULE = {"ours": "split", "ours_atomic": "atomic"}


@contextlib.contextmanager
def bwd_schedule(impl: str):
    """Run our Triton backward with `impl`'s schedule inside the block (no-op for peers)."""
    if impl not in BWD_SCHEDULE:
        yield
        return
    from r7b_fast.kernels import attention_bwd

    before = attention_bwd.SCHEDULE
    attention_bwd.SCHEDULE = BWD_SCHEDULE[impl]
    try:
        yield
    finally:
        attention_bwd.SCHEDULE = before


def time_one(name, impl, f, inputs, do, lens, window, shapes, device) -> list[dict]:
    """Rows for fwd and fwd+bwd of one implementation on one workload."""
    pairs = sum(attended_pairs(n, window) for n in lens)
    unit = pairs * shapes["d"] * shapes["hq"]
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    fwd = lambda: f(*inputs)
    fwd_bwd = lambda: torch.autograd.grad(f(*leaves), leaves, do)
    rows = []
    for mode, fn, flops in (("fwd", fwd, 4 * unit), ("fwd+bwd", fwd_bwd, 14 * unit)):
        row = dict(workload=name, impl=impl, mode=mode, tokens=sum(lens), seqs=len(lens),
                   window=window, pairs=pairs)  # fmt: skip
        try:
            reps = 10 if device == "cuda" else 2
            with bwd_schedule(impl):
                ms = bench(fn, device, warmup=3, reps=reps, max_seconds=3)["median_ms"]
            rows.append({**row, "ms": round(ms, 4), "tflops": round(flops / ms / 1e9, 2)})
        except Exception as e:  # noqa: BLE001 - a peer that fails (OOM, no backward) is a row
            rows.append({**row, "error": f"{type(e).__name__}: {e}"[:160]})
    return rows


# Peers whose first call compiles (seconds to a minute per mask on a GPU): started only while at
# least this much of the budget is left, so a compile cannot eat the time of the rows after it.
COMPILE_RESERVE_S = {"flex": 25.0}


def bench_all(smoke: bool, budget_s: float, flush=None) -> list[dict]:
    """Every workload x implementation x mode: ours first, then each workload's goal peer, then
    the other peers; pairs started after `budget_s` seconds get 'skipped' rows, and a compiled
    peer is skipped when less than its COMPILE_RESERVE_S is left. `flush(rows)` is called after
    every (workload, implementation) pair, so a run killed mid-way keeps what it measured."""
    cuda = torch.cuda.is_available() and not smoke
    shapes, device = (GPU_SHAPES, "cuda") if cuda else (CPU_SHAPES, "cpu")
    setups = {}
    for name, (lens, window) in workloads(not cuda).items():
        q, k, v, do, cu = make_inputs(lens, device=device, **shapes)
        setups[name] = (lens, window, do, implementations(lens, window, q, k, v, cu))
    order = [(n, "ours") for n in setups] + [(n, GOAL_PEER.get(n)) for n in setups]
    order += [(n, "ours_atomic") for n in setups]
    order += [(n, i) for n, st in setups.items() for i in st[3] if (n, i) not in order]
    rank = {n: i for i, n in enumerate(setups)}
    rows, t0 = [], time.perf_counter()
    for name, impl in order:
        lens, window, do, impls = setups[name]
        if impl not in impls:
            continue
        left = budget_s - (time.perf_counter() - t0)
        need = COMPILE_RESERVE_S.get(impl, 0.0) if cuda else 0.0
        if left <= need:
            why = f"skipped: {left:.0f} s of the {budget_s:.0f} s budget left"
            why += f" (compile needs ~{need:.0f} s)" if need else ""
            rows += [dict(workload=name, impl=impl, mode=m, error=why) for m in ("fwd", "fwd+bwd")]
        else:
            f, inputs = impls[impl]
            rows += time_one(name, impl, f, inputs, do, lens, window, shapes, device)
        rows.sort(key=lambda r: rank[r["workload"]])  # stable: ours first per workload
        if flush is not None:
            flush(rows)
    return rows


def add_ratios(rows: list[dict]) -> None:
    """ours_speedup = peer ms / our ms (> 1: we are faster; for ours_atomic: > 1 means the
    default split schedule is faster), same workload and mode."""
    ours = {(r["workload"], r["mode"]): r["ms"] for r in rows if r["impl"] == "ours" and "ms" in r}
    for r in rows:
        key = (r["workload"], r["mode"])
        if r["impl"] != "ours" and "ms" in r and key in ours:
            r["ours_speedup"] = round(r["ms"] / ours[key], 3)


def summary(rows: list[dict]) -> list[dict]:
    """The issue's goals (H100): fwd >= 450 TFLOP/s on 8k causal; fwd+bwd >= 1.3x Flex on the
    packed and windowed rows, >= 1.0x SDPA's flash backend on dense causal."""
    get = lambda w, i, m, key: next(
        (r.get(key) for r in rows if (r["workload"], r["impl"], r["mode"]) == (w, i, m)), None
    )
    return [
        goal_row("attention fwd TFLOP/s (8k causal)", get("causal_8k", "ours", "fwd", "tflops"), 450),
        goal_row("attention fwd+bwd speed-up vs Flex (16k packed)",
                 get("packed_16k", "flex", "fwd+bwd", "ours_speedup"), 1.3),
        goal_row("attention fwd+bwd speed-up vs Flex (16k, window 4096)",
                 get("window_16k", "flex", "fwd+bwd", "ours_speedup"), 1.3),
        goal_row("attention fwd+bwd speed-up vs SDPA flash (8k causal)",
                 get("causal_8k", "sdpa_flash", "fwd+bwd", "ours_speedup"), 1.0),
    ]  # fmt: skip


def autotuned() -> dict:
    """The tile configs Triton's autotuner chose for our kernels in this process (empty on the
    CPU), or the error that prevented reading them."""
    try:
        from r7b_fast.kernels.attention import autotuned_configs

        return autotuned_configs()
    except Exception as e:  # noqa: BLE001 - e.g. no triton: the report says why
        return {"error": f"{type(e).__name__}: {e}"[:200]}


def reference(q, k, v, cu, window, chunk=1024):
    """fp32 attention with autograd, per sequence and per query chunk, keys limited to what the
    chunk can see (so the 16k windowed case fits in memory); the check's truth."""
    q, k, v = (x.float() for x in (q, k, v))
    rep, scale, outs = q.shape[1] // k.shape[1], q.shape[-1] ** -0.5, []
    bounds = cu.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        for c0 in range(s, e, chunk):
            c1 = min(c0 + chunk, e)
            k0 = s if window is None else max(s, c0 - window + 1)
            qi = torch.arange(c0, c1, device=q.device)[:, None]
            kj = torch.arange(k0, c1, device=q.device)[None, :]
            seen = (kj <= qi) if window is None else (kj <= qi) & (kj > qi - window)
            kk, vv = (x[k0:c1].repeat_interleave(rep, 1) for x in (k, v))
            sc = torch.einsum("ihd,jhd->hij", q[c0:c1], kk) * scale
            p = sc.masked_fill(~seen, float("-inf")).softmax(-1)
            outs.append(torch.einsum("hij,jhd->ihd", p, vv))
    return torch.cat(outs)


def check() -> int:
    """Ours vs the fp32 reference, output and gradients, on every workload (tiny fp32 shapes
    without CUDA). Bound: relative Frobenius error <= 1e-2 in bf16 (8-bit mantissa: rounding
    q/k/v, P and the result gives ~3e-3; everything else accumulates in fp32), <= 1e-4 in fp32;
    and finite. Returns the exit code (1 on any mismatch)."""
    cuda = torch.cuda.is_available()
    shapes, device = (GPU_SHAPES, "cuda") if cuda else (CPU_SHAPES, "cpu")
    tol = 1e-2 if shapes["dtype"] == torch.bfloat16 else 1e-4
    rows = []
    for name, (lens, window) in workloads(not cuda).items():
        q, k, v, do, cu = make_inputs(lens, device=device, seed=1, **shapes)
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        out = varlen_attention(*leaves, cu, max(lens), window=window)
        got = (out, *torch.autograd.grad(out, leaves, do))
        ref_leaves = [x.detach().float().requires_grad_() for x in (q, k, v)]
        ref_out = reference(*ref_leaves, cu, window)
        want = (ref_out, *torch.autograd.grad(ref_out, ref_leaves, do.float()))
        for label, a, b in zip(("out", "dq", "dk", "dv"), got, want):
            rel = ((a.float() - b).norm() / b.norm()).item()
            ok = math.isfinite(rel) and rel <= tol and a.dtype == q.dtype
            rows.append(dict(workload=name, tensor=label, rel_err=rel, tol=tol, ok=ok))
            print(f"check {name:<11} {label:<3} rel_err={rel:.2e} {'ok' if ok else 'MISMATCH'}")
        del got, want, ref_out, out
        if cuda:
            torch.cuda.empty_cache()
    bad = sum(not r["ok"] for r in rows)
    write_results("attention_check", {"rows": rows, "env": env_info(device)}, markdown_table(rows))
    print("attention check:", f"FAILED ({bad} mismatches)" if bad else "passed")
    return 1 if bad else 0


def main(argv=None) -> int:
    ap = arg_parser(__doc__)
    ap.add_argument(
        "--check", action="store_true", help="correctness at real shapes, exit 1 on mismatch"
    )
    ap.add_argument("--smoke", action="store_true", help="tiny CPU shapes (default without CUDA)")
    ap.add_argument("--budget", type=float, default=75.0, help="seconds of timing before skipping")
    args = ap.parse_args(argv)
    if args.check:
        return check()
    cols = ["workload", "impl", "mode", "ms", "tflops", "ours_speedup", "error"]

    env = env_info()  # once: it runs git (and nvidia-smi on a GPU); flush runs after every pair

    def flush(rows: list[dict], final: bool = False) -> None:
        rows = [dict(r) for r in rows]
        add_ratios(rows)
        payload = {"rows": rows, "summary": summary(rows), "complete": final, "env": env}
        payload["autotuned"] = autotuned()
        write_results("attention", payload, markdown_table(rows, cols))
        if final:
            print(markdown_table(rows, cols))
            print(markdown_table(payload["summary"]))

    rows = bench_all(args.smoke or not torch.cuda.is_available(), args.budget, flush)
    flush(rows, final=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
