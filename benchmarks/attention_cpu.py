"""CPU varlen attention: the fast torch path vs the per-sequence reference loop, forward+backward.

    python -m benchmarks.attention_cpu             # -> benchmarks/results/attention_cpu.{json,md}

`varlen_attention_torch` (what backend="torch", and "auto" on the CPU, run: batched SDPA over
32-query tiles) against `varlen_attention_reference` (a Python loop over the sequences with an
[L, L] mask) on packed rows of lognormal lengths (sigma 1, as benchmarks/_e2e's SFT data), the
tiny model's attention shape (4 query / 2 kv heads, head dim 32, fp32, causal), without a
window and with the tiny model's window 32. The two run alternately (A B A B ...) so load drifts
on a shared machine hit both alike; medians of wall time, one thread by default (as
benchmarks.train_step). Each row also records the largest |fast - reference| of the output.
"""

from __future__ import annotations

import statistics
import sys
import time

import numpy as np
import torch

from benchmarks._common import arg_parser, env_info, markdown_table, write_results
from r7b_fast.kernels.attention import varlen_attention_reference, varlen_attention_torch

SHAPES = [(512, 48), (2048, 100)]  # (row tokens, median sequence length)
WINDOWS = [None, 32]


def packed_row(tokens: int, median: int, rng: np.random.Generator) -> list[int]:
    """Lognormal lengths (sigma 1, at least 1) filling exactly `tokens`."""
    lens: list[int] = []
    while sum(lens) < tokens:
        n = max(1, int(rng.lognormal(np.log(median), 1.0)))
        lens.append(min(n, tokens - sum(lens)))
    return lens


def measure(lens, window, reps: int, heads=(4, 2), head_dim=32, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    T = sum(lens)
    cu = torch.tensor([0, *np.cumsum(lens).tolist()], dtype=torch.int32)
    q, k, v = (
        torch.randn(T, h, head_dim, generator=g).requires_grad_() for h in (*heads, heads[1])
    )
    do = torch.randn(T, heads[0], head_dim, generator=g)
    fns = {"fast": varlen_attention_torch, "reference": varlen_attention_reference}
    outs, times = {}, {n: [] for n in fns}
    for rep in range(reps + 1):  # the first round is a warm-up
        for name, fn in fns.items():
            t0 = time.perf_counter()
            out = fn(q, k, v, cu, max(lens), window=window)
            torch.autograd.grad(out, (q, k, v), do)
            if rep:
                times[name].append(1e3 * (time.perf_counter() - t0))
            outs[name] = out.detach()
    fast, ref = (statistics.median(times[n]) for n in fns)
    return {"tokens": T, "seqs": len(lens), "max_len": max(lens), "window": window,
            "fast_ms": fast, "reference_ms": ref, "speedup": ref / fast,
            "max_abs_diff": (outs["fast"] - outs["reference"]).abs().max().item()}  # fmt: skip


def main(argv=None) -> int:
    ap = arg_parser(__doc__)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="attention_cpu", help="results file stem")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    rows = []
    for tokens, median in SHAPES:
        lens = packed_row(tokens, median, rng)
        for window in WINDOWS:
            rows.append({"median_len": median, **measure(lens, window, args.reps, seed=args.seed)})
            print(f"[attention_cpu] {rows[-1]}", flush=True)
    table = markdown_table(rows)
    write_results(args.name, {"args": vars(args), "rows": rows, "env": env_info("cpu")}, table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
