"""Resume checkpoints (torch.distributed.checkpoint) and the HF export.

Layout under `output_dir/checkpoints/`:

    step_00000040/            a complete checkpoint (only complete ones carry this name)
        .metadata, *.distcp   DCP: model + optimizer state, sharded as trained (FSDP2 or not)
        state_rank{r}.pt      per process: step, scheduler, data-iterator position, RNG states
    step_00000050.tmp/        being written; renamed to step_00000050 when every rank is done

A checkpoint is written into a `.tmp` directory and renamed once all ranks have finished, so a
kill at any moment leaves the previous complete checkpoint intact and `latest()` never returns a
half-written one. The HF export (`export_hf`) is written the same way (`hf.tmp` -> `hf`), with
`use_cache: true` in its config and generation config (the trainer itself runs without a cache).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from r7b_fast.distributed import Dist, barrier, broadcast_object, unwrap_layer_names

_STEP_DIR = re.compile(r"^step_(\d{8})$")


def rng_state() -> dict:
    """Python, NumPy, torch CPU and (if present) CUDA RNG states of this process."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def step_dir(root: str | os.PathLike, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def latest(root: str | os.PathLike) -> Path | None:
    """The complete checkpoint with the highest step under `root`, or None."""
    root = Path(root)
    if not root.is_dir():
        return None
    steps = [
        int(m.group(1))
        for p in root.iterdir()
        if (m := _STEP_DIR.match(p.name)) and (p / ".metadata").is_file()
    ]
    return step_dir(root, max(steps)) if steps else None


def save(
    root: str | os.PathLike,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict,
    dist: Dist,
    *,
    keep_last: int = 2,
) -> Path:
    """Write checkpoint `step` atomically; `trainer_state` (picklable) is saved per rank.

    `trainer_state` should hold the step, scheduler state and data-iterator position; the RNG
    states of this process are added here. Keeps the newest `keep_last` complete checkpoints.
    """
    final = step_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    if dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(dist)
    state = {
        "model": get_model_state_dict(model),
        "optimizer": get_optimizer_state_dict(model, optimizer),
    }
    with _single_process_quiet(dist):
        dcp.save(state, checkpoint_id=str(tmp))
    torch.save({**trainer_state, "rng": rng_state()}, tmp / f"state_rank{dist.rank}.pt")
    barrier(dist)
    if dist.is_main:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _prune(Path(root), keep_last)
    barrier(dist)
    return final


@contextlib.contextmanager
def _single_process_quiet(dist: Dist):
    """DCP warns that it assumes one process when no process group exists: that is intended."""
    with warnings.catch_warnings():
        if not dist.distributed:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _prune(root: Path, keep_last: int) -> None:
    done = sorted(p for p in root.iterdir() if _STEP_DIR.match(p.name))
    for p in done[: len(done) - keep_last]:
        shutil.rmtree(p, ignore_errors=True)


def prune(root: str | os.PathLike, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints under `root` (0: delete them all, and any
    half-written `.tmp` one); for a finished run, once its export and done.json exist."""
    root = Path(root)
    if not root.is_dir():
        return
    if keep == 0:
        shutil.rmtree(root, ignore_errors=True)
        return
    for p in root.iterdir():
        if p.name.endswith(".tmp"):
            shutil.rmtree(p, ignore_errors=True)
    _prune(root, keep)


def load(
    path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer, dist: Dist
) -> dict:
    """Restore model + optimizer (in place) and this rank's RNG; returns its trainer state."""
    path = Path(path)
    state = {
        "model": get_model_state_dict(model),
        "optimizer": get_optimizer_state_dict(model, optimizer),
    }
    with _single_process_quiet(dist):
        dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optimizer"])
    rank_file = path / f"state_rank{dist.rank}.pt"
    if not rank_file.is_file():
        raise ValueError(f"{path}: no {rank_file.name}: was it written with another world size?")
    trainer_state = torch.load(rank_file, weights_only=False)
    set_rng_state(trainer_state.pop("rng"))
    return trainer_state


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's parameters and buffers as plain CPU tensors, on rank 0 (empty elsewhere).

    Collective under FSDP: every rank must call it. Names are HF names (wrappers stripped)."""
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    sd = get_model_state_dict(model, options=opts)
    return {unwrap_layer_names(k): v for k, v in sd.items()}


def export_hf(
    model: nn.Module,
    out_dir: str | os.PathLike,
    dist: Dist,
    *,
    tokenizer=None,
    dtype: torch.dtype | None = None,
    max_shard_size: str = "5GB",
) -> Path | None:
    """Write a `from_pretrained`-loadable directory: sharded safetensors + config (+ tokenizer).

    Collective (every rank calls it); rank 0 writes into `out_dir.tmp` and renames it. Tied
    embeddings are respected: `lm_head.weight` is not written when the config ties it.
    `dtype`: tensor dtype in the files (default: as trained).
    """
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    sd = full_state_dict(model)
    out = Path(out_dir)
    if dist.is_main:
        config = model.config
        if getattr(config, "tie_word_embeddings", False):
            sd.pop("lm_head.weight", None)
        if dtype is not None:
            sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        split = split_torch_state_dict_into_shards(sd, max_shard_size=max_shard_size)
        for filename, names in split.filename_to_tensors.items():
            shard = {n: sd[n].contiguous() for n in names}
            save_file(shard, tmp / filename, metadata={"format": "pt"})
        if split.is_sharded:
            index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        saved_dtype = next(iter(sd.values())).dtype
        config = config.__class__.from_dict(config.to_dict())
        config.dtype = saved_dtype
        config.architectures = [_hf_class_name(model)]
        # training runs without a KV cache (packed rows); an export is for generation, where
        # use_cache=false makes every new token re-run the whole prefix
        config.use_cache = True
        config.save_pretrained(tmp)
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen = copy.deepcopy(gen)
            gen.use_cache = True
            gen.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    barrier(dist)
    return out if dist.is_main else None


def _hf_class_name(model: nn.Module) -> str:
    """The HF class name behind FSDP's dynamic subclass (FSDPCohere2ForCausalLM -> Cohere2...)."""
    return next(c.__name__ for c in type(model).__mro__ if not c.__name__.startswith("FSDP"))


def agree_on_latest(root: str | os.PathLike, dist: Dist) -> Path | None:
    """`latest(root)` as seen by rank 0, on every rank."""
    found = latest(root) if dist.is_main else None
    return broadcast_object(found, dist)
