"""FSDP2 gradient-accumulation memory: `fsdp.grad_accumulation` reduce_scatter vs unsharded.

    python -m benchmarks.fsdp_memory                      # 2 gloo ranks, ~100M Cohere2, fp32
    python -m benchmarks.fsdp_memory --layers 4 --steps 1 # quicker

Launches `torchrun --nproc_per_node 2` once per scheme (same model, same data, same seed), each
running the trainer's own pieces: `distributed.parallelize` (FSDP2, the scheme's options),
`optim.build_optimizer`, `train.accumulate_gradients` with the SFT loss over `--accum`
micro-batches of `--tokens` packed tokens. Measured per rank:
- gradient bytes held after each micro-batch's backward (`r7b_fast.memory.gradient_bytes`:
  sharded `.grad` shards vs FSDP2's unsharded accumulated gradients),
- the resident set (/proc/self/statm) at the same points, and the peak RSS (ru_maxrss),
- AdamW state bytes on the rank (sharded like the parameters),
- seconds per optimizer step (median of `--steps` after one warm-up step), and the final loss
  (both schemes must agree to fp32 rounding).
Results: `<results dir>/cpu_fsdp_memory.{json,md}` (see benchmarks/_common.py).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

SCHEMES = ("reduce_scatter", "unsharded")
MiB = 1 << 20


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def make_batch(tokens: int, vocab: int, seed: int) -> dict:
    """One packed micro-batch: sequences of 64..256 tokens filling `tokens`, every token trained."""
    import torch

    g = torch.Generator().manual_seed(seed)
    lens, left = [], tokens
    while left > 0:
        n = min(left, int(torch.randint(64, 257, (), generator=g)))
        lens.append(n)
        left -= n
    ids = torch.randint(5, vocab, (tokens,), generator=g)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    return {
        "input_ids": ids[None],
        "position_ids": torch.cat([torch.arange(n) for n in lens])[None],
        "cu_seqlens": cu,
        "max_seqlen": max(lens),
        "targets": torch.roll(ids, -1)[None],
        "seq_ids": torch.cat([torch.full((n,), i) for i, n in enumerate(lens)])[None],
        "num_seqs": len(lens),
    }


def model_config(args):
    from r7b_fast.model import tiny_config

    return tiny_config(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
        num_key_value_heads=max(1, args.hidden // 256), sliding_window=128,
    )  # fmt: skip


def worker(args) -> None:
    """One rank of one scheme (under torchrun): build, shard, train `steps + 1` steps, measure."""
    import torch

    from r7b_fast import distributed
    from r7b_fast.config import load_config
    from r7b_fast.memory import gradient_bytes, optimizer_state_bytes
    from r7b_fast.model import apply_kernels, build_model
    from r7b_fast.optim import build_optimizer
    from r7b_fast.train import accumulate_gradients
    from r7b_fast.train_loss import sft_count, sft_loss

    dist = distributed.init("cpu", cpu_threads=1)
    cfg = load_config("sft_tiny", ["run.output_dir=unused", "optim.lr=1e-4",
                                   f"fsdp.grad_accumulation={args.scheme}"])  # fmt: skip
    model = build_model(model_config(args), torch.float32, seed=0)
    apply_kernels(model, attention=True, loss=True, backend="torch")
    distributed.parallelize(model, dist, activation_checkpointing=False, mixed_precision=False,
                            fsdp=cfg.fsdp)  # fmt: skip
    optimizer, _ = build_optimizer(cfg, model, total_steps=args.steps + 1)
    s = SimpleNamespace(cfg=cfg, dist=dist, model=model, mixed=False)
    trace: list[dict] = []

    def measured_loss(model_, batch, denom, cfg_):  # before each forward = after the last backward
        trace.append({**gradient_bytes(model_), "rss": rss_bytes()})
        return sft_loss(model_, batch, denom, cfg_)

    times, traces, losses = [], [], []
    for step in range(args.steps + 1):
        micro = [make_batch(args.tokens, args.vocab, 1000 * step + 10 * i + dist.rank)
                 for i in range(args.accum)]  # fmt: skip
        denom = distributed.all_reduce_sum(torch.stack([sft_count(b) for b in micro]).sum(), dist)
        trace.clear()
        t0 = time.perf_counter()
        # 1-based like the trainer (debug.nan_at_step=0 means never)
        loss, _ = accumulate_gradients(s, micro, denom.float(), measured_loss, step + 1)
        trace.append({**gradient_bytes(model), "rss": rss_bytes()})  # after the last backward
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        traces.append(trace[1:])  # after backward 1..accum
        losses.append(distributed.all_reduce_sum(loss, dist).item())
    result = {
        "rank": dist.rank, "scheme": args.scheme, "step_s": times[1:], "losses": losses,
        "grads_after_backward": traces[-1], "optimizer_state_bytes": optimizer_state_bytes(optimizer),
        "param_shard_bytes": sum(p.to_local().numel() * 4 for p in model.parameters()),
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }  # fmt: skip
    with open(f"{args.out}.{dist.rank}", "w") as f:
        json.dump(result, f)
    distributed.shutdown()


def launch(args, scheme: str, out: str) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(29700 + os.getpid() % 200), "-m", "benchmarks.fsdp_memory",
           "--worker", "--scheme", scheme, "--out", out,
           *(f"--{k}={getattr(args, k)}" for k in ("hidden", "intermediate", "layers", "vocab",
                                                    "tokens", "accum", "steps"))]  # fmt: skip
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return [json.load(open(f"{out}.{r}")) for r in range(2)]


def summarize(args, runs: dict[str, list[dict]]) -> tuple[dict, str]:
    from r7b_fast.memory import parameter_count

    rows = []
    for scheme, ranks in runs.items():
        r0 = ranks[0]
        for i, t in enumerate(r0["grads_after_backward"]):
            rows.append({"scheme": scheme, "after backward": i + 1,
                         "sharded grads MiB": t["sharded"] / MiB,
                         "unsharded grads MiB": t["unsharded"] / MiB, "RSS MiB": t["rss"] / MiB})  # fmt: skip
    med = {k: statistics.median(v[0]["step_s"]) for k, v in runs.items()}
    peak = {k: max(r["peak_rss"] for r in v) / MiB for k, v in runs.items()}
    params = parameter_count(model_config(args))
    payload = {
        "config": vars(args) | {"parameters": params},
        "machine": "this 2-core CPU, shared with other jobs",
        "runs": runs, "median_step_s": med, "peak_rss_mib": peak,
        "step_time_ratio_unsharded_over_reduce_scatter": med["unsharded"] / med["reduce_scatter"],
    }  # fmt: skip
    from benchmarks._common import markdown_table

    md = (
        f"# FSDP2 gradient accumulation, 2 gloo ranks, CPU (this 2-core CPU, shared with other "
        f"jobs)\n\nCohere2 {params / 1e6:.1f}M parameters (hidden {args.hidden}, {args.layers} "
        f"layers, vocab {args.vocab}), fp32, {args.accum} micro-batches of {args.tokens} tokens "
        f"per rank. Rank 0, measured after each micro-batch's backward:\n\n"
        + markdown_table(rows)
        + "\n\n"
        + markdown_table(
            [
                {
                    "scheme": k,
                    "median step s": med[k],
                    "peak RSS MiB (max rank)": peak[k],
                    "Adam state MiB (rank 0)": runs[k][0]["optimizer_state_bytes"] / MiB,
                    "final loss": runs[k][0]["losses"][-1],
                }
                for k in runs
            ]
        )  # fmt: skip
        + f"\n\nstep time unsharded / reduce_scatter: "
        f"{payload['step_time_ratio_unsharded_over_reduce_scatter']:.3f}\n"
    )
    return payload, md


def main(argv=None) -> int:
    from benchmarks._common import arg_parser

    p = arg_parser(__doc__)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--intermediate", type=int, default=2048)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--tokens", type=int, default=256, help="tokens per micro-batch per rank")
    p.add_argument("--accum", type=int, default=4)
    p.add_argument("--steps", type=int, default=2, help="timed steps (after one warm-up)")
    p.add_argument("--worker", action="store_true", help=argparse_hidden())
    p.add_argument("--scheme", choices=SCHEMES)
    p.add_argument("--out")
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        runs = {s: launch(args, s, os.path.join(tmp, s)) for s in SCHEMES}
    args_public = SimpleNamespace(**{k: v for k, v in vars(args).items()
                                     if k not in ("worker", "scheme", "out")})  # fmt: skip
    payload, md = summarize(args_public, runs)
    from benchmarks._common import write_results

    for path in write_results("cpu_fsdp_memory", payload, md):
        print(path)
    print(md)
    return 0


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    sys.exit(main())
