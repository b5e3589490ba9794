"""On-policy sampling throughput on CPU: FSDP2 parameters gathered per forward vs once per phase
(2 gloo ranks), and DynamicCache vs StaticCache (one process).

    python -m benchmarks.sampling                    # defaults below, ~2 minutes on 2 cores
    python -m benchmarks.sampling --reps 5 --max-new-tokens 48

Model: a small random Cohere2 (`r7b_fast.model.tiny_config`: hidden --hidden, 4 layers, 3 of
them sliding with window 32, vocab 1024; initializer_range 0.3 so samples vary); fp32. Work:
--prompts prompts of lengths 16..(16 + 3 * prompts) tokens (random ids, seed 0), --samples
completions each, temperature 1, --max-new-tokens, --batch-size rows per forward, one thread
per process. Every variant samples the same completions (checked: `same_tokens`).

- fsdp (2 ranks, fork, gloo): each decoder layer and the root `fully_shard`ed as the trainer
  does (the last layer kept after forward). `per_forward`: `generate` as before this change
  (FSDP all-gathers each layer in every forward, ranks kept in step with an all-reduce per
  step and dummy batches); `gathered`: inside `r7b_fast.sampling.gathered` (one all-gather per
  module at entry, reshard at exit, both inside the timing) with `sync=False`. Rank r samples
  prompts r, r+2, ...; time = the slowest rank's (a barrier before and after).
- cache (1 process): `generate(cache="dynamic")` vs `generate(cache="static")`.

Variants alternate within each of --reps rounds (the first round is a warm-up, not counted);
tokens/s = completion tokens (stop tokens included) / median wall time. Results:
`<results dir>/cpu_sampling.{json,md}` (see benchmarks/_common.py).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

import torch

from benchmarks._common import arg_parser, env_info, markdown_table, write_results
from r7b_fast.generate import generate
from r7b_fast.model import build_model, tiny_config


def _model(args):
    cfg = tiny_config(hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                      num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3)  # fmt: skip
    return build_model(cfg, seed=0)


def _prompts(args) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [
        torch.randint(8, 1024, (16 + 3 * i,), generator=g).tolist() for i in range(args.prompts)
    ]


def _run(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, num_samples=args.samples, temperature=1.0,
                seed=1, batch_size=args.batch_size)  # fmt: skip


def _timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _summary(times: list[float], tokens: int) -> dict:
    med = statistics.median(times)
    return {"tokens": tokens, "median_s": med, "min_s": min(times), "reps": len(times),
            "tokens_per_s": tokens / med}  # fmt: skip


def _fsdp_worker(rank, world, init_file, args, out_path):
    """One rank: both variants, alternating; rank 0 writes the timings."""
    import json

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from r7b_fast.sampling import gathered

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = _model(args)
        for i, layer in enumerate(model.model.layers):
            fully_shard(layer, reshard_after_forward=i < len(model.model.layers) - 1)
        fully_shard(model)
        prompts = _prompts(args)
        keys = list(range(rank, len(prompts), world))
        mine, run = [prompts[i] for i in keys], dict(_run(args), prompt_keys=keys)

        def per_forward():
            return generate(model, None, mine, **run)

        def once():
            with gathered(model):
                return generate(model, None, mine, sync=False, **run)

        times, outs = {"per_forward": [], "gathered": []}, {}
        for rep in range(args.reps + 1):
            order = [("per_forward", per_forward), ("gathered", once)]
            for name, fn in order if rep % 2 == 0 else order[::-1]:
                dist.barrier()
                dt, outs[name] = _timed(lambda fn=fn: (fn(), dist.barrier())[0])
                if rep:  # round 0 warms up
                    times[name].append(dt)
        parts = [None] * world
        dist.all_gather_object(parts, outs)
        if rank == 0:
            tokens = sum(len(c) for p in parts for per in p["gathered"] for c in per)
            same = all(p["gathered"] == p["per_forward"] for p in parts)
            res = {name: _summary(t, tokens) for name, t in times.items()}
            with open(out_path, "w") as f:
                json.dump({**res, "same_tokens": same}, f)
    finally:
        dist.destroy_process_group()


def fsdp_variants(args) -> dict:
    import json

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "result.json")
        # fork: the children inherit the imports; each computes with one thread
        mp.start_processes(_fsdp_worker, args=(2, os.path.join(d, "init"), args, out), nprocs=2,
                           join=True, start_method="fork")  # fmt: skip
        with open(out) as f:
            return json.load(f)


def cache_variants(args) -> dict:
    torch.set_num_threads(1)
    model, prompts, run = _model(args), _prompts(args), _run(args)
    times, outs = {"dynamic": [], "static": []}, {}
    for rep in range(args.reps + 1):
        for name in ("dynamic", "static") if rep % 2 == 0 else ("static", "dynamic"):
            dt, outs[name] = _timed(
                lambda name=name: generate(model, None, prompts, cache=name, **run)
            )
            if rep:
                times[name].append(dt)
    tokens = sum(len(c) for per in outs["static"] for c in per)
    res = {name: _summary(t, tokens) for name, t in times.items()}
    return {**res, "same_tokens": outs["static"] == outs["dynamic"]}


def main(argv=None) -> int:
    p = arg_parser(__doc__)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args(argv)
    env = env_info("cpu")
    fsdp = fsdp_variants(args)
    cache = cache_variants(args)
    ratios = {
        "gathered_vs_per_forward": fsdp["gathered"]["tokens_per_s"]
        / fsdp["per_forward"]["tokens_per_s"],
        "static_vs_dynamic": cache["static"]["tokens_per_s"] / cache["dynamic"]["tokens_per_s"],
    }
    rows = [{"part": part, "variant": name, **res[name]}
            for part, res in (("fsdp 2 ranks", fsdp), ("1 process", cache))
            for name in res if name != "same_tokens"]  # fmt: skip
    md = (f"On-policy sampling, CPU ({env['cpu_count']} cores, shared with other jobs; "
          f"{env['utc']}, git {env['git']}), `python -m benchmarks.sampling` {vars(args)}\n\n"
          + markdown_table(rows, ["part", "variant", "tokens_per_s", "median_s", "min_s", "reps",
                                  "tokens"])
          + "\n\n" + markdown_table([{**ratios, "same_tokens_fsdp": fsdp["same_tokens"],
                                      "same_tokens_cache": cache["same_tokens"]}]))  # fmt: skip
    payload = {"args": vars(args), "fsdp": fsdp, "cache": cache, "ratios": ratios, "env": env}
    for path in write_results("cpu_sampling", payload, md):
        print(path)
    print(md)
    return 0 if fsdp["same_tokens"] and cache["same_tokens"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
