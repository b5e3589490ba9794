"""Processes and parallelism: one process runs plain; under torchrun, FSDP2.

`init()` starts the process group when torchrun's environment is present (NCCL on GPU, gloo on
CPU) and returns a `Dist` describing this process. `parallelize(model, dist, ...)` applies the
transforms to a built model, always in this order:

1. activation checkpointing around decoder layers (optional: `none`, `full` or `selective`,
   every k-th layer),
2. regional torch.compile of each decoder layer and the loss head (optional, r7b_fast.compile),
3. FSDP2 `fully_shard` on each decoder layer, then on the root model (only when world_size > 1),
   with bf16 parameters and fp32 gradient reduction on GPU (`MixedPrecisionPolicy`).

Kernel patching (`r7b_fast.model.apply_kernels`) happens before all three, on the plain model. The
training loss is computed inside the root module's forward (the patched forward returns token
log-probs), so FSDP has unsharded `lm_head.weight` (tied to the embedding) when it is used.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist
from torch import nn


@dataclass
class Dist:
    rank: int = 0
    """Global rank of this process."""
    world_size: int = 1
    """Number of processes."""
    local_rank: int = 0
    """Rank on this machine (selects the GPU)."""
    device: torch.device = torch.device("cpu")
    """Device this process computes on."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init(device: str = "auto", cpu_threads: int = 0) -> Dist:
    """Start the process group if launched by torchrun; pick this process's device.

    `device`: `auto` (CUDA if available), `cpu` or `cuda`. Backend: NCCL on CUDA, gloo on CPU.
    `cpu_threads`: torch intra-op threads (0: the default split over this machine's processes).
    """
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("run.device=cuda but no CUDA device is available")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if cpu_threads or local_world > 1:
        torch.set_num_threads(cpu_threads or max(1, torch.get_num_threads() // local_world))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not torch_dist.is_initialized():
        torch_dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            timeout=datetime.timedelta(minutes=30),
            device_id=dev if use_cuda else None,
        )
    return Dist(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def shutdown() -> None:
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def barrier(dist: Dist) -> None:
    if dist.distributed:
        torch_dist.barrier()


def all_reduce_sum(x: torch.Tensor, dist: Dist) -> torch.Tensor:
    """Sum of `x` over all processes (a new tensor; `x` unchanged on one process)."""
    x = x.clone()
    if dist.distributed:
        torch_dist.all_reduce(x, op=torch_dist.ReduceOp.SUM)
    return x


def all_reduce_max(x: torch.Tensor, dist: Dist) -> torch.Tensor:
    x = x.clone()
    if dist.distributed:
        torch_dist.all_reduce(x, op=torch_dist.ReduceOp.MAX)
    return x


def broadcast_object(obj, dist: Dist):
    """`obj` from rank 0 on every process."""
    if not dist.distributed:
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of an HF causal LM (`model.model.layers`)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError("expected an HF causal LM with model.model.layers")
    return layers


AC_MODES = ("none", "full", "selective")
# Selective checkpointing saves these ops' outputs (the costly ones to recompute: matmuls and
# attention, ours included) and recomputes everything else (norms, activations, rotary,
# elementwise, casts: cheap, and most of the activation memory).
_SAC_SAVE = ("mm", "addmm", "bmm", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_efficient_attention",
             "_scaled_dot_product_cudnn_attention")  # fmt: skip


def _sac_saved_ops() -> set:
    ops = {getattr(torch.ops.aten, name).default for name in _SAC_SAVE
           if hasattr(torch.ops.aten, name)}  # fmt: skip
    import r7b_fast.kernels.attention  # noqa: F401  (registers r7b_fast::varlen_attention_fwd)

    ops.add(torch.ops.r7b_fast.varlen_attention_fwd.default)
    return ops


def _sac_context():
    """Fresh (forward, recompute) contexts of the selective policy, one pair per checkpoint call."""
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    saved = _sac_saved_ops()

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in saved else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def apply_activation_checkpointing(model: nn.Module, mode: str | bool = "full", *,
                                   every: int = 1) -> None:  # fmt: skip
    """Wrap decoder layers 0, every, 2*every, ... so their activations are recomputed in backward
    (non-reentrant `torch.utils.checkpoint`; HF parameter names kept via unwrap_layer_names).

    mode: `none` (nothing), `full` (the layer's forward runs again in backward: only its input is
    kept) or `selective` (op-level: the outputs of matmuls and attention, `_SAC_SAVE` and our
    varlen attention op, are saved, the rest is recomputed); True/False mean full/none. Gradients
    are those of `none` (the same ops on the same inputs). Apply before torch.compile (the compiled
    layer then contains the checkpointed region) and FSDP2 (`parallelize` does)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    mode = {True: "full", False: "none"}[mode] if isinstance(mode, bool) else mode
    if mode not in AC_MODES:
        raise ValueError(f"activation checkpointing must be one of {AC_MODES}, got {mode!r}")
    if every < 1:
        raise ValueError(f"activation checkpointing every: must be >= 1, got {every}")
    if mode == "none":
        return
    extra = {"context_fn": _sac_context} if mode == "selective" else {}
    layers = decoder_layers(model)
    for i in range(0, len(layers), every):
        layers[i] = checkpoint_wrapper(layers[i], preserve_rng_state=False, **extra)


def apply_fsdp(model: nn.Module, dist: Dist, *, mixed_precision: bool, options=None) -> None:
    """FSDP2: `fully_shard` each decoder layer, then the root (embeddings, final norm, tied head).

    With `mixed_precision`, parameters are gathered in bf16 and gradients reduced in fp32; the
    sharded master weights keep the dtype the model was built in. `options`: an
    `r7b_fast.config.FSDPConfig` (None = its defaults); its `reshard_after_forward` picks what
    each decoder layer keeps gathered after forward (`layer_reshard` documents the values), and
    its `grad_accumulation` is applied per micro-batch by r7b_fast.train.accumulate_gradients.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy()
    if mixed_precision:
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    layers = decoder_layers(model)
    raf = "auto" if options is None else options.reshard_after_forward
    for i, layer in enumerate(layers):
        fully_shard(
            layer, mp_policy=mp, reshard_after_forward=layer_reshard(raf, i, len(layers), dist)
        )
    fully_shard(model, mp_policy=mp)  # the root stays gathered after forward (FSDP's default)


def layer_reshard(choice, index: int, n_layers: int, dist: Dist) -> bool | int:
    """`fully_shard`'s reshard_after_forward for decoder layer `index` of `n_layers` under
    `fsdp.reshard_after_forward` = `choice`: `auto` -> every layer but the last (its parameters
    are needed again at once in backward); a bool -> that, for every layer; an int N -> N for
    every layer (reshard to groups of N ranks; N must divide the world size, 1 < N < world:
    ConfigError otherwise, since torch refuses other values with a less clear message)."""
    if choice == "auto":
        return index < n_layers - 1
    if isinstance(choice, bool):
        return choice
    if not (1 < choice < dist.world_size and dist.world_size % choice == 0):
        from r7b_fast.config import ConfigError

        raise ConfigError(
            f"fsdp.reshard_after_forward: {choice} must divide the world size {dist.world_size} "
            "and lie strictly between 1 and it"
        )
    return choice


def parallelize(
    model: nn.Module,
    dist: Dist,
    *,
    activation_checkpointing: str | bool,
    mixed_precision: bool,
    fsdp=None,
    activation_checkpointing_every: int = 1,
    compile: bool = False,
) -> nn.Module:
    """Apply the transforms in the documented order (see the module docstring); returns `model`.
    `fsdp`: the `fsdp` config section (apply_fsdp's options; None = defaults).
    activation_checkpointing(_every): apply_activation_checkpointing's mode and every; compile:
    regional torch.compile of the layers and the loss head (r7b_fast.compile.compile_model)."""
    apply_activation_checkpointing(
        model, activation_checkpointing, every=activation_checkpointing_every
    )
    if compile:
        from r7b_fast.compile import compile_model

        compile_model(model)
    if dist.distributed:
        apply_fsdp(model, dist, mixed_precision=mixed_precision, options=fsdp)
    return model


def materialize(model: nn.Module, dist: Dist, full_state_dict, buffers: dict) -> None:
    """Give a model built on the meta device (then sharded) real storage on `dist.device` and
    its weights: rank 0 passes `full_state_dict` (every tensor, CPU), other ranks `{}`; rank 0
    broadcasts and every rank keeps its shards, so the host holds one copy of the weights, not
    one per process. `buffers`: the non-persistent buffers by HF name (model.fresh_buffers)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    model.to_empty(device=dist.device)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            buf.copy_(buffers[unwrap_layer_names(name)])
    if dist.is_main and getattr(model.config, "tie_word_embeddings", False):
        full_state_dict.setdefault("lm_head.weight", full_state_dict["model.embed_tokens.weight"])
    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, full_state_dict, options=opts)


def unwrap_layer_names(name: str) -> str:
    """A parameter name without activation-checkpoint wrapper prefixes (HF names)."""
    return name.replace("_checkpoint_wrapped_module.", "")
