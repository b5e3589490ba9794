"""Packing benchmark: ours (best-fit decreasing by room buckets) vs naive padding vs TRL's BFD.

    python -m benchmarks.packing                  # 1M lognormal lengths, max_tokens 8192
    python -m benchmarks.packing --n 100000 --reps 5

Lengths: lognormal with median 500 (sigma 1.0), rounded and clipped to [1, max_tokens], seed 0;
every contender gets the same lengths, in the same process.
- ours: `r7b_fast.data.packing.bfd_bins` (the packing plan: which row each sequence goes to).
- TRL: `trl.data_utils._pack_bfd`, the function behind `pack_dataset(strategy="bfd")`, on a
  pyarrow table whose `input_ids` column has these lengths, with 1-byte tokens (int8, to keep
  memory at ~0.8 GB for 1M): its time includes gathering that token buffer into packed order
  (a few hundred ms at 1M), ours is the plan alone; its efficiency is counted from its rows.
- naive padding: batches of `--batch` consecutive sequences padded to their longest (what a
  padding collator does), and every sequence padded to max_tokens.
Efficiency = real tokens / (rows x max_tokens). Times: median of `--reps` runs (TRL: 1 run by
default, it is slow), as CPU time of this process (`cpu_ms`, robust on a shared machine) and
wall clock (`median_ms`, `min_ms`). Results: `<results dir>/packing.{json,md}` (see benchmarks/_common.py).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from benchmarks._common import env_info, markdown_table, summarize_ms, write_results
from r7b_fast.data.packing import bfd_bins, naive_padding_efficiency, packing_efficiency


def lognormal_lengths(
    n: int, max_tokens: int, median: float = 500.0, sigma: float = 1.0, seed: int = 0
):
    rng = np.random.default_rng(seed)
    x = np.round(rng.lognormal(np.log(median), sigma, n))
    return np.clip(x, 1, max_tokens).astype(np.int64)


def _timed(fn, reps: int):
    """(last result, wall-clock summary + median CPU ms). CPU time (this process) is the
    robust figure on a shared machine: waiting for a core does not count."""
    times, cpu, out = [], [], None
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        times.append(1e3 * (time.perf_counter() - t0))
        cpu.append(1e3 * (time.process_time() - c0))
    return out, {**summarize_ms(times), "cpu_ms": round(sorted(cpu)[len(cpu) // 2], 1)}


def run_ours(lengths, max_tokens: int, reps: int) -> dict:
    (bins, n), t = _timed(lambda: bfd_bins(lengths, max_tokens), reps)
    loads = np.bincount(bins, weights=lengths, minlength=n)
    assert loads.max() <= max_tokens
    return {"name": "ours (bfd_bins)", "rows": int(n),
            "efficiency_%": 100 * packing_efficiency(lengths, n, max_tokens), **t}  # fmt: skip


def run_trl(lengths, max_tokens: int, reps: int) -> dict:
    import pyarrow as pa
    from trl.data_utils import _pack_bfd

    offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int64)
    values = pa.array(np.zeros(int(offsets[-1]), dtype=np.int8))  # 1-byte tokens: ~n*mean bytes
    col = pa.LargeListArray.from_arrays(pa.array(offsets), values)
    table = pa.table({"input_ids": col})
    packed, t = _timed(lambda: _pack_bfd(table, max_tokens), reps)
    row_lens = pa.compute.list_value_length(packed.column("input_ids")).to_numpy()
    assert row_lens.max() <= max_tokens and row_lens.sum() == lengths.sum()
    return {"name": "TRL _pack_bfd", "rows": int(packed.num_rows),
            "efficiency_%": 100 * packing_efficiency(lengths, packed.num_rows, max_tokens), **t}  # fmt: skip


def run_naive(lengths, max_tokens: int, batch: int) -> list[dict]:
    n = len(lengths)
    eff, t = _timed(lambda: naive_padding_efficiency(lengths, batch), 1)
    return [
        {"name": f"naive padding (batches of {batch})", "rows": -(-n // batch),
         "efficiency_%": 100 * eff, **t},
        {"name": "pad every sequence to max_tokens", "rows": n,
         "efficiency_%": 100 * packing_efficiency(lengths, n, max_tokens)},
    ]  # fmt: skip


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="number of sequences")
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--reps", type=int, default=3, help="timed runs of ours")
    ap.add_argument("--trl-reps", type=int, default=1, help="timed runs of TRL (0 skips it)")
    ap.add_argument("--batch", type=int, default=16, help="naive padding batch size")
    args = ap.parse_args(argv)
    lengths = lognormal_lengths(args.n, args.max_tokens)
    rows = [run_ours(lengths, args.max_tokens, args.reps)]
    if args.trl_reps:
        rows.append(run_trl(lengths, args.max_tokens, args.trl_reps))
    rows += run_naive(lengths, args.max_tokens, args.batch)
    for r in rows:
        r["efficiency_%"] = float(f"{r['efficiency_%']:.4f}")
    shown = [{**r, "efficiency_%": f"{r['efficiency_%']:.3f}"} for r in rows]
    setup = {"n": args.n, "max_tokens": args.max_tokens, "median_len": float(np.median(lengths)),
             "mean_len": float(lengths.mean()), "real_tokens": int(lengths.sum()),
             "loadavg_1min_at_end": os.getloadavg()[0]}  # fmt: skip
    md = (
        f"Packing {args.n:,} lognormal lengths (median {setup['median_len']:.0f}, mean "
        f"{setup['mean_len']:.0f}) into rows of {args.max_tokens}\n\n"
        + markdown_table(
            shown, ["name", "rows", "efficiency_%", "cpu_ms", "median_ms", "min_ms", "reps"]
        )
    )
    print(md)
    paths = write_results("packing", {"setup": setup, "rows": rows, "env": env_info("cpu")}, md)
    print("wrote", ", ".join(str(p) for p in paths))
    return {"setup": setup, "rows": rows}


if __name__ == "__main__":
    main()
