"""Shared settings for the trainer tests: a very small Cohere2 and one CPU thread per process
(import `one_thread` or `one_thread_module` into a test module: both are autouse fixtures)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

# 4 layers (3 sliding + 1 global) but 32 wide: a step on 2 x 128 tokens takes ~0.1 s on one core.
TINY = (
    "model.tiny_overrides={hidden_size: 32, intermediate_size: 64, num_attention_heads: 2, "
    "num_key_value_heads: 1}"
)
COMMON = [
    TINY,
    "model.kernel_backend=torch",  # the kernels' torch twins (the Triton interpreter is slow)
    "data.max_tokens=128",
    "data.synthetic_eval=1",
    "logging.progress_bar=false",
    "run.cpu_threads=1",
]


def metrics(out: Path) -> list[dict]:
    """The per-step records of out/metrics.jsonl."""
    lines = (Path(out) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "step" in r and "event" not in r]


def events(out: Path, name: str) -> list[dict]:
    lines = (Path(out) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("event") == name]


def length_reward(prompt_rows, completions) -> list[float]:
    """A `module:function` reward that rarely ties (an untrained policy fails every verifier)."""
    return [float(len(c)) for c in completions]


def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread (the CI machine's cores are shared; more threads are slower there)."""
    yield from _one_torch_thread()


@pytest.fixture(autouse=True, scope="module")
def one_thread_module():
    """One torch thread for a whole module, its module-scoped fixtures included (tiny matmuls:
    intra-op threads only add synchronisation, 10x slower on a loaded 2-core machine)."""
    yield from _one_torch_thread()


def latest_checkpoint_model(out: Path, build):
    """A model built from out/config.yaml by `build` (train.build_model, unpatched by the test)
    and loaded from out's latest complete checkpoint: what a resume would start from."""
    from r7b_fast import checkpoint, train
    from r7b_fast.config import load_config
    from r7b_fast.distributed import Dist
    from r7b_fast.optim import build_optimizer

    cfg = load_config(str(Path(out) / "config.yaml"))
    model = build(cfg, Dist(), train.load_tokenizer(cfg))
    opt, _ = build_optimizer(cfg, model, 1)
    checkpoint.load(checkpoint.latest(Path(out) / "checkpoints"), model, opt, Dist())
    return model


def run_two_ranks(worker, args: tuple, what: str, timeout: float = 120.0) -> None:
    """`worker(rank, *args)` on 2 forked processes (fork: the children inherit the imports;
    spawn re-imports torch/transformers, ~40 s here); fails the test after `timeout` seconds (a
    collective mismatch hangs instead of erroring) or when a rank raises."""
    import time

    import torch.multiprocessing as mp

    ctx = mp.start_processes(worker, args=args, nprocs=2, join=False, start_method="fork")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail(f"2-rank {what} did not finish in {timeout:.0f} s (ranks out of step?)")
