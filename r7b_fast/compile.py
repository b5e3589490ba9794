"""Regional `torch.compile`: each decoder layer and the fused loss head, compiled on their own.

    from r7b_fast.compile import compile_model
    compile_model(model)  # after apply_kernels and activation checkpointing, before FSDP2

What is compiled (`compile_model`):

- each decoder layer, in place (`nn.Module.compile`: the module keeps its type and its
  parameter names, so checkpoints and `distributed.unwrap_layer_names` are unchanged). Layers of
  one structure share one graph (dynamo inlines built-in modules, so the parameters are graph
  inputs, not guards): Command R7B compiles two, a sliding-window layer and a global one;
- the loss head, the `linear_logprobs` call of a kernel-patched model (`apply_kernels(loss=True)`),
  on the trained rows only (the row selection stays eager, as without compile).

The root forward (embeddings, rotary tables, the packing boundaries, the final norm) stays
eager: it is cheap, and a caller without the packer's `cu_seqlens`/`max_seqlen` makes it read the
device (position_ids -> boundaries), which would be a graph break anyway.
Our kernels are traced as what they are: the Triton paths are torch custom ops with fake
implementations (`r7b_fast::varlen_attention_fwd`, `r7b_fast::linear_logprobs_fwd`, opaque in the
graph, no guard on their int arguments), the torch twins trace without graph breaks.

Order (torchtitan's): kernels (`apply_kernels`) -> activation checkpointing -> compile -> FSDP2,
as `distributed.parallelize` applies them: compiling the checkpoint wrapper traces the
checkpointed region (full, or selective with its policy) into the graph; FSDP2's hooks stay
outside the compiled layer bodies (dynamo skips FSDP hooks).

Dynamic shapes: `dynamic=True` makes the token count, the number of packed sequences and
`max_seqlen` symbolic from the first compile, so packed rows of other lengths and compositions
reuse the graph. Limits:

- with the Triton kernels (CUDA; `kernel_backend=auto` there) nothing in a layer depends on a
  length: no recompilation across lengths (tests/test_compile.py counts them);
- the torch twins (CPU, `kernel_backend=torch`) specialise on a few length buckets: the banded
  attention loops over 32-token query tiles and branches on whether one tile covers the row,
  the head loops over logits chunks of `TORCH_CHUNK_ELEMENTS / vocab` tokens. A new bucket
  recompiles; past `torch._dynamo.config.recompile_limit` (8) graphs per layer dynamo runs that
  code eagerly (and logs it). Training rows are padded to `data.max_tokens`, so only the head
  (the trained-token count) varies there; `compile_model` warns once about it;
- the first step pays the compilation (minutes for Command R7B on a GPU host, most of it for
  the backward graph), see docs/performance.md. `model.compile=off` turns it off.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

MODES = ("auto", "on", "off")


def enabled(mode: str | bool, device: torch.device | str) -> bool:
    """Resolve `model.compile` (`auto`: on for CUDA, off on CPU; `on`/`off`; or a bool)."""
    if isinstance(mode, bool):
        return mode
    if mode not in MODES:
        raise ValueError(f"model.compile must be one of {MODES}, got {mode!r}")
    return mode == "on" or (mode == "auto" and torch.device(device).type == "cuda")


def compile_model(
    model: nn.Module, *, dynamic: bool = True, backend: str = "inductor"
) -> nn.Module:
    """Compile each decoder layer of `model` (an HF causal LM, possibly with activation-checkpoint
    wrappers around its layers) in place, and its fused loss head when `apply_kernels(loss=True)`
    patched it; returns `model`. See the module docstring for what, in which order and the limits.

    dynamic: symbolic shapes from the first compile (True), or dynamo's default (static first,
    dynamic after a size changes). backend: a `torch.compile` backend (`inductor`; `aot_eager` or
    `eager` compile faster, for tests). Raises ValueError for an already compiled layer (compiling
    twice would trace the compiled call) or a model without decoder layers."""
    from r7b_fast.distributed import decoder_layers
    from r7b_fast.kernels._backend import triton_import_error

    # import triton now (when installed): the kernels' dispatch reads whether it is imported, and
    # a first trace before the import would be invalidated by it (one needless recompile)
    triton_import_error()
    layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        if getattr(layer, "_compiled_call_impl", None) is not None:
            raise ValueError(f"compile_model: decoder layer {i} is already compiled")
        layer.compile(dynamic=dynamic, backend=backend)
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    state = lm.__dict__.get("_r7b_kernels")
    if state is not None and state.get("loss"):
        from r7b_fast.kernels.fused_logprobs import linear_logprobs

        state["head"] = torch.compile(linear_logprobs, dynamic=dynamic, backend=backend)
    _warn_torch_twins(lm, state)
    return model


def _warn_torch_twins(lm: nn.Module, state: dict | None) -> None:
    """Warn once when our kernels will run as torch twins under compile (length buckets)."""
    from r7b_fast.kernels._backend import interpreting

    if state is None or not (state.get("loss") or state.get("attention")):
        return
    backend, device = state.get("backend", "auto"), next(lm.parameters()).device.type
    # "auto" picks Triton on CUDA or the interpreter; a meta model becomes CUDA when materialised
    auto_torch = device not in ("cuda", "meta") and not interpreting()
    if backend == "torch" or (backend == "auto" and auto_torch):
        warnings.warn(
            "r7b_fast.compile: the kernels run as torch twins (CPU or kernel_backend=torch); "
            "their compiled graphs specialise on length buckets (32-token attention tiles, the "
            "head's logits chunks): new buckets recompile, up to torch._dynamo.config."
            "recompile_limit, then run eagerly (see r7b_fast.compile)",
            RuntimeWarning,
            stacklevel=3,
        )
