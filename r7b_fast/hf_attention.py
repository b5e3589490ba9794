"""Run a transformers model's attention through `varlen_attention` (packed rows, no dense mask).

    from r7b_fast.hf_attention import packed_kwargs, use_varlen_attention
    use_varlen_attention(model)                       # registers "r7b_varlen", switches the model
    out = model(input_ids, position_ids=pos, use_cache=False, **packed_kwargs(pos))

`input_ids`/`position_ids` are [B, T] rows of sequences packed back to back, `position_ids`
restarting at 0 at each sequence (B is usually 1). `packed_kwargs` computes `cu_seqlens` and
`max_seqlen` once per batch (one host sync; none when the caller gives both) under the names transformers already forwards from
`model(**kwargs)` through every decoder layer to the attention function (`cu_seq_lens_q/_k`,
`max_length_q/_k`, part of `TransformersKwargs` in 5.x); without them every layer derives them
from `position_ids` itself (correct, slower). Sliding-window layers pass their window as the
`sliding_window` argument (Cohere2Attention does; global layers pass None).

The mask function registered with `AttentionMaskInterface` returns None, so HF builds no
[T, T] mask. Cases varlen attention does not cover (a KV cache: query and key lengths differ,
or a padding mask) fall back to transformers' SDPA path, mask included, so `generate` still works,
and warn once per model and reason (modules switched by `use_varlen_attention`).
q/k/v of different dtypes (autocast: the rotary embedding upcasts q/k) run in one dtype, the
autocast dtype. Importing `r7b_fast.model` registers the name, so
`AutoModelForCausalLM.from_config(cfg, attn_implementation="r7b_varlen")` works.
"""

from __future__ import annotations

import torch

from r7b_fast.kernels.attention import varlen_attention

NAME = "r7b_varlen"


def packed_kwargs(
    position_ids: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
) -> dict:
    """Kwargs for `model(...)` / `model.model(...)` describing packed rows.

    position_ids: [B, T] or [T] int; a sequence starts where a row starts or where a position is
    not the previous one + 1 (so positions restarting at 0 split sequences; padding tokens at
    position 0 each become a 1-token sequence that attends to itself).
    cu_seqlens: optional int32 [S+1] boundaries over the B*T flattened tokens (e.g. the packer's,
    with the padding as one segment) used instead of deriving them from position_ids (which may
    then be None).
    max_seqlen: optional int, the longest sequence (the packer knows it): given with cu_seqlens,
    nothing is read from the device; else one host sync computes it.
    Returns {"cu_seq_lens_q", "cu_seq_lens_k": int32 [S+1], "max_length_q", "max_length_k": int}
    (the names transformers uses for flash-attention kwargs)."""
    if cu_seqlens is not None:  # position_ids unused (the docstring: "may then be None")
        _check_cu(cu_seqlens)
        if max_seqlen is None:
            max_seqlen = int(torch.diff(cu_seqlens).max().item()) if cu_seqlens.numel() > 1 else 0
        return _kwargs(cu_seqlens, int(max_seqlen))
    if position_ids is None:
        raise ValueError("packed_kwargs: give position_ids or cu_seqlens")
    if position_ids.dim() == 1:
        position_ids = position_ids[None]
    if position_ids.dim() != 2:
        raise ValueError(f"position_ids must be [B, T] or [T], got {tuple(position_ids.shape)}")
    B, T = position_ids.shape
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    idx = torch.nonzero(starts.reshape(-1)).reshape(-1)
    end = torch.tensor([B * T], device=idx.device, dtype=idx.dtype)
    cu = torch.cat([idx, end]).to(torch.int32)
    if max_seqlen is None:
        max_seqlen = int(torch.diff(cu).max().item()) if cu.numel() > 1 else 0
    return _kwargs(cu, int(max_seqlen))


def _check_cu(cu_seqlens: torch.Tensor) -> None:
    if cu_seqlens.dim() != 1 or cu_seqlens.dtype != torch.int32:
        raise ValueError(
            f"cu_seqlens must be 1-D int32, got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}"
        )


def _kwargs(cu: torch.Tensor, max_len: int) -> dict:
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": max_len,
            "max_length_k": max_len}  # fmt: skip


def _common_dtype(query, key, value) -> torch.dtype:
    """One dtype for q/k/v: under autocast q/k can come out of the rotary embedding in fp32 (cos
    and sin are fp32) while v is the projection's bf16; the attention matmuls would run in the
    autocast dtype, so that is the dtype; outside autocast the lowest precision of the three."""
    dtypes = {query.dtype, key.dtype, value.dtype}
    if len(dtypes) == 1:
        return query.dtype
    device = query.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return min(dtypes, key=lambda d: torch.finfo(d).bits)


def _warn_fallback(module, reason: str, message: str) -> None:
    warned = getattr(module, "r7b_varlen_warned", None)
    if warned is not None:  # set by use_varlen_attention: one set per model
        from r7b_fast.patch import warn_once

        warn_once(warned, reason, message)


def varlen_attention_forward(module, query, key, value, attention_mask, dropout=0.0,
                             scaling=None, sliding_window=None, **kwargs):  # fmt: skip
    """transformers attention function: query [B, Hq, S, D], key/value [B, Hk, S, D] ->
    ([B, S, Hq, D], None). Uses cu_seq_lens_q/max_length_q from kwargs when given, else
    position_ids; falls back to SDPA for a padding mask or a KV cache (see the module doc).
    q/k/v run in one dtype (`_common_dtype`); the output has that dtype."""
    B, Hq, S, D = query.shape
    if attention_mask is not None or key.shape[2] != S:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        if attention_mask is not None:
            _warn_fallback(module, "attention_mask",
                           "a padded batch (attention_mask) runs SDPA with a mask, not varlen "
                           "attention; pass position_ids and no attention_mask (padding-free, "
                           "e.g. DataCollatorWithFlattening) to use the kernel")  # fmt: skip
        else:
            _warn_fallback(module, "kv_cache",
                           "a KV cache (query and key lengths differ) runs SDPA, not varlen "
                           "attention")  # fmt: skip

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)  # fmt: skip
    if dropout:
        raise ValueError(
            f"{NAME} attention has no dropout (got {dropout}); set attention_dropout=0"
        )
    cu, max_len = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    if cu is None:
        pos = kwargs.get("position_ids")
        pos = torch.arange(S, device=query.device)[None] if pos is None else pos
        packed = packed_kwargs(pos.expand(B, -1))
        cu, max_len = packed["cu_seq_lens_q"], packed["max_length_q"]
    elif max_len is None:
        max_len = int(torch.diff(cu).max())
    dtype = _common_dtype(query, key, value)
    to_tokens = lambda x: x.transpose(1, 2).reshape(B * S, x.shape[1], D).to(dtype)
    out = varlen_attention(
        to_tokens(query), to_tokens(key), to_tokens(value), cu.to(torch.int32), int(max_len),
        causal=kwargs.get("is_causal", getattr(module, "is_causal", True)) is not False,
        window=sliding_window, softmax_scale=scaling,
        backend=getattr(module, "r7b_varlen_backend", "auto"),
    )  # fmt: skip
    return out.view(B, S, Hq, D), None


def varlen_mask(*args, **kwargs):
    """transformers mask function: None (no dense mask) unless SDPA must take over (a padding
    mask or differing query/key lengths), then SDPA's mask."""
    q_len, kv_len = kwargs.get("q_length"), kwargs.get("kv_length")
    if kwargs.get("attention_mask") is None and q_len == kv_len:
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, **kwargs)


def register() -> None:
    """Register "r7b_varlen" with transformers' attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, varlen_attention_forward)
    AttentionMaskInterface.register(NAME, varlen_mask)


def use_varlen_attention(model, *, backend: str = "auto", warned: set | None = None):
    """Switch `model` (any transformers model whose attention goes through AttentionInterface,
    e.g. Cohere2ForCausalLM, LlamaForCausalLM) to varlen attention in place; returns the model.

    backend: passed to `varlen_attention` ("auto": Triton on CUDA or under the interpreter), set
    on every attention module (a module with q_proj and o_proj and a layer_idx).
    warned: a set shared by the model's attention modules so a fallback to SDPA (padding mask,
    KV cache) warns once per model and reason; None: a new set."""
    register()
    model.set_attn_implementation(NAME)
    warned = set() if warned is None else warned
    attention = [m for m in model.modules()
                 if hasattr(m, "q_proj") and hasattr(m, "o_proj") and hasattr(m, "layer_idx")]  # fmt: skip
    if not attention:
        raise ValueError(f"use_varlen_attention: no attention module in {type(model).__name__}")
    for m in attention:
        m.r7b_varlen_backend = backend
        m.r7b_varlen_warned = warned
    return model
