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
