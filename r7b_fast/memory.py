"""Per-GPU training memory: an estimate by component, and measurements of what FSDP2 holds.

`estimate(config, world_size, micro_batch_tokens, ...)` is the model of docs/memory.md: bytes
per rank for parameters (fp32 shards + the bf16 layers gathered at once), gradients (fp32
shards; plus an unsharded fp32 copy of the whole model under `fsdp.grad_accumulation=unsharded`),
AdamW states, activations (with or without activation checkpointing) and the loss head, for
a Cohere2 config (`r7b_fast.model.R7B_SHAPES` for Command R7B).

`parameter_count(config)` is the exact number of parameters of a Cohere2 model (tied head
counted once); `gradient_bytes(model)` and `optimizer_state_bytes(optimizer)` measure what a
live (possibly FSDP2-sharded) model and optimizer hold on this rank.
"""

from __future__ import annotations

import torch

GiB = 1 << 30


def attention_dims(config) -> tuple[int, int, int]:
    """(head_dim, query width heads*head_dim, key/value width kv_heads*head_dim)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return head_dim, config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim


def layer_parameter_count(config) -> int:
    """Parameters of one Cohere2 decoder layer: q/k/v/o projections (no bias), the gated MLP
    (gate, up, down) and the one LayerNorm weight of the parallel block."""
    h, i = config.hidden_size, config.intermediate_size
    _, q, kv = attention_dims(config)
    bias = q + 2 * kv + h if getattr(config, "attention_bias", False) else 0
    return h * q + 2 * h * kv + q * h + bias + 3 * h * i + h


def root_parameter_count(config) -> int:
    """The parameters outside the decoder layers: the embedding (the tied head shares it; an
    untied head adds its own matrix) and the final LayerNorm weight."""
    emb = config.vocab_size * config.hidden_size
    return emb * (1 if config.tie_word_embeddings else 2) + config.hidden_size


def parameter_count(config) -> int:
    """Every parameter of a Cohere2ForCausalLM built from `config` (tied head counted once)."""
    return config.num_hidden_layers * layer_parameter_count(config) + root_parameter_count(config)


# ----------------------------------------------------------------------------- the estimate

# Backward of the fused loss head (kernels/_fused_logprobs_triton.py `_chunk_rows`): dlogits
# chunks of DLOGITS_TARGET_ROWS vocabulary rows whatever the token count.
HEAD_CHUNK_ROWS = 3072
# FSDP2 layers gathered at once: the one computing and the one prefetched.
GATHERED_LAYERS = 2


def layer_activation_bytes(config, compute_bytes: int = 2) -> int:
    """Bytes per token one decoder layer saves for backward (no checkpointing), with our varlen
    attention kernel and `compute_bytes` activations (2: bf16). From the layer's autograd graph
    (tests/test_memory.py measures it with saved_tensors_hooks, exactly):
      gated MLP: gate and up outputs, silu(gate), their product (down's input): 4 x I
      parallel-block LayerNorm, computed in fp32: 3 fp32 [H] tensors + 1 fp32 statistic,
        and its output (the input of q/k/v/gate/up): H
      attention kernel: q, k, v (after rotary), its output (o_proj's input): 2 x Q + 2 x KV,
        and the fp32 log-sum-exp per head
    (Q = heads x head_dim, KV = kv_heads x head_dim; the rotary cos/sin are shared by every
    layer and counted once in `root_activation_bytes`)."""
    h, i = config.hidden_size, config.intermediate_size
    head_dim, q, kv = attention_dims(config)
    b = compute_bytes
    mlp = 4 * i * b
    norm = 3 * 4 * h + 4 + h * b
    attn = (2 * q + 2 * kv) * b + 4 * config.num_attention_heads
    return mlp + norm + attn


def root_activation_bytes(config, compute_bytes: int = 2) -> int:
    """Bytes per token saved outside the layers' own tensors: the input ids (int64, for the
    embedding's backward), the final LayerNorm (as in a layer: 3 fp32 [H] + a statistic, and its
    output, the loss head's input), the head's int64 targets (two copies) and fp32 log-sum-exp,
    and the rotary cos/sin (2 x head_dim, saved by every layer but one storage)."""
    head_dim, _, _ = attention_dims(config)
    h, b = config.hidden_size, compute_bytes
    return 8 + (3 * 4 * h + 4 + h * b) + 2 * 8 + 4 + 2 * head_dim * b


def estimate(
    config,
    world_size: int,
    micro_batch_tokens: int,
    *,
    activation_checkpointing: bool | str = "full",
    checkpoint_every: int = 1,
    grad_accumulation: str = "reduce_scatter",
    reshard_after_forward: bool | str = "auto",
    mixed_precision: bool = True,
) -> dict[str, int]:
    """Bytes per rank by component for FSDP2 training of a Cohere2 `config` on `world_size`
    ranks with micro-batches of `micro_batch_tokens` packed tokens (our kernels: fused loss
    head, varlen attention). Assumptions (docs/memory.md): fp32 master weights, gradients and
    AdamW states sharded 1/world; with `mixed_precision`, bf16 gathered parameters and
    activations and fp32 gradient reduction (else fp32 throughout); FSDP2 gathers
    GATHERED_LAYERS layers at once (`reshard_after_forward` false: every layer) and keeps the
    root (embedding = tied head, final norm) gathered for the whole step. Not counted: the CUDA
    context and NCCL buffers (~1-3 GB), allocator fragmentation, the all-gather input copies.
    `activation_checkpointing`: `none` or `full` (True/False alike; `selective` is not modelled:
    ValueError), on layers 0, k, 2k, ... for `checkpoint_every` = k (the others keep everything,
    as `model.activation_checkpointing_every` does).

    Keys: params_shards, params_gathered, grads_shards, grads_unsharded (whole-model fp32
    gradients kept between micro-batches: `grad_accumulation=unsharded` only), grads_transient
    (a layer's unsharded gradient and its fp32 reduce-scatter input, GATHERED_LAYERS at a time,
    and the same for the tied embedding at the end of backward: head dW + lookup gradient in
    the compute dtype, then its fp32 reduce-scatter input),
    adam_states, activations, head_transient (the fused head's dlogits chunk and fp32 dH), and
    total (their sum: a simultaneous peak is assumed, an upper bound)."""
    ac = {True: "full", False: "none"}.get(activation_checkpointing, activation_checkpointing)
    if ac not in ("none", "full"):
        raise ValueError(f"activation_checkpointing={ac!r}: only none and full are modelled")
    if grad_accumulation not in ("reduce_scatter", "unsharded"):
        raise ValueError(f"grad_accumulation={grad_accumulation!r}: reduce_scatter|unsharded")
    cb = 2 if mixed_precision else 4  # compute (gathered parameter, activation) bytes
    p, n, w = parameter_count(config), micro_batch_tokens, world_size
    layer, root = layer_parameter_count(config), root_parameter_count(config)
    n_layers, h, v = config.num_hidden_layers, config.hidden_size, config.vocab_size
    emb = v * h
    gathered = n_layers if reshard_after_forward is False else min(GATHERED_LAYERS, n_layers)
    per_layer = layer_activation_bytes(config, cb)
    if ac == "none":
        acts = n_layers * per_layer * n
    else:  # checkpointed layers keep their input; one layer's own tensors while it recomputes
        wrapped = -(-n_layers // checkpoint_every)
        acts = (wrapped * h * cb + (n_layers - wrapped) * per_layer + per_layer) * n
    out = {
        "params_shards": p * 4 // w,
        "params_gathered": (root + gathered * layer) * cb,
        "grads_shards": p * 4 // w,
        "grads_unsharded": p * 4 if grad_accumulation == "unsharded" else 0,
        "grads_transient": (GATHERED_LAYERS * layer + emb) * (cb + 4),
        "adam_states": 2 * p * 4 // w,
        "activations": acts + root_activation_bytes(config, cb) * n,
        "head_transient": n * min(v, HEAD_CHUNK_ROWS) * cb + n * h * 4,
    }
    out["total"] = sum(out.values())
    return out


# ----------------------------------------------------------------------------- measurements


def _fsdp_params(model):
    """Every FSDPParam of `model`'s FSDP2 modules (torch.distributed.fsdp internals: read for
    measurement only; a RuntimeError names what is missing if a torch version moved them)."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        state = module._get_fsdp_state()
        groups = getattr(state, "_fsdp_param_groups", None)
        if groups is None:  # older FSDP2 keeps one group per module
            if not hasattr(state, "_fsdp_param_group"):
                raise RuntimeError(
                    "FSDP2 state has neither _fsdp_param_groups nor _fsdp_param_group"
                )
            groups = [g for g in [state._fsdp_param_group] if g is not None]
        for group in groups:
            yield from group.fsdp_params


def _nbytes(t: torch.Tensor | None) -> int:
    if t is None:
        return 0
    if hasattr(t, "to_local"):  # a DTensor: this rank's shard
        t = t.to_local()
    return t.numel() * t.element_size()


def gradient_bytes(model) -> dict[str, int]:
    """Gradient bytes this rank holds now: `sharded` (each parameter's `.grad`: the local shard
    under FSDP2, the whole tensor otherwise) and `unsharded` (FSDP2's per-parameter unsharded
    gradients kept while the reduce-scatter is skipped: `_unsharded_param.grad`, and
    `unsharded_accumulated_grad`, its reduce-dtype copy under mixed precision)."""
    sharded = sum(_nbytes(p.grad) for p in model.parameters())
    unsharded = 0
    for fp in _fsdp_params(model):
        unsharded_param = getattr(fp, "_unsharded_param", None)
        if unsharded_param is not None:
            unsharded += _nbytes(unsharded_param.grad)
        unsharded += _nbytes(getattr(fp, "unsharded_accumulated_grad", None))
    return {"sharded": sharded, "unsharded": unsharded}


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of the optimizer's tensor states on this rank (AdamW: exp_avg, exp_avg_sq, step;
    DTensor states count their local shard)."""
    return sum(
        _nbytes(v)
        for state in optimizer.state.values()
        for v in state.values()
        if isinstance(v, torch.Tensor)
    )
