"""Build or load Cohere2 (Command R7B-architecture) models.

HF transformers' `Cohere2ForCausalLM` is the source of truth for architecture and weights; this
module only builds it, loads it, and (opt-in) patches it with our kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import Cohere2Config, Cohere2ForCausalLM
from transformers.utils import ModelOutput

# Special-token ids shared by the tiny config and the embedded tokenizer (r7b_fast.data.tokenizer),
# which puts its special tokens first, in this order.
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
END_OF_TURN_ID = 4

TINY_DEFAULTS = dict(
    vocab_size=1024,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,  # layer_types: 3 sliding + 1 global (every 4th, as in R7B)
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    sliding_window=32,
    logit_scale=0.25,
    layer_norm_eps=1e-5,
    initializer_range=0.02,
    tie_word_embeddings=True,
    use_cache=False,
    pad_token_id=PAD_ID,
    bos_token_id=BOS_ID,
    eos_token_id=END_OF_TURN_ID,
)

# Command R7B's shapes (for benchmarks and the pipeline_r7b config; weights come from a checkpoint).
R7B_SHAPES = dict(
    vocab_size=256000,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=8192,
    sliding_window=4096,
    logit_scale=0.25,
    tie_word_embeddings=True,
    use_cache=False,
)


def tiny_config(**overrides) -> Cohere2Config:
    """A small Cohere2Config for tests and the demo.

    Defaults: vocab 1024, hidden 128, 4 layers (3 sliding-window + 1 global), 4 query / 2 key-value
    heads (head_dim 32), window 32, logit_scale 0.25, tied embeddings, use_cache=False, and the
    special ids of the embedded tokenizer (pad 0, bos 1, eos = end-of-turn 4). Any Cohere2Config
    field can be overridden; `layer_types` follows `num_hidden_layers` unless given."""
    unknown = set(overrides) - set(Cohere2Config().to_dict()) - {"layer_types"}
    if unknown:
        raise ValueError(f"tiny_config: unknown Cohere2Config fields {sorted(unknown)}")
    kwargs = {**TINY_DEFAULTS, **overrides}
    return Cohere2Config(**kwargs)


def build_model(
    config: Cohere2Config,
    dtype: torch.dtype = torch.float32,
    *,
    seed: int | None = 0,
    attn_implementation: str = "sdpa",
    device: str | torch.device = "cpu",
) -> Cohere2ForCausalLM:
    """A freshly initialised `Cohere2ForCausalLM` in `dtype` on `device` (deterministic for `seed`)."""
    if seed is not None:
        torch.manual_seed(seed)
    config._attn_implementation = attn_implementation
    model = Cohere2ForCausalLM(config)
    return model.to(device=device, dtype=dtype)


def load_model(
    path: str = "tiny",
    dtype: torch.dtype = torch.float32,
    *,
    tiny_overrides: dict | None = None,
    seed: int | None = 0,
    attn_implementation: str = "sdpa",
    device: str | torch.device = "cpu",
):
    """A causal LM to train: `path="tiny"` builds `tiny_config(**tiny_overrides)` (seeded init);
    otherwise `path` is an HF checkpoint directory of a Cohere2 (Command R7B) or Llama-family
    model, loaded with its weights. The result has `use_cache=False` (packed rows never cache)."""
    if path == "tiny":
        return build_model(
            tiny_config(**(tiny_overrides or {})),
            dtype,
            seed=seed,
            attn_implementation=attn_implementation,
            device=device,
        )
    if tiny_overrides:
        raise ValueError("load_model: tiny_overrides only apply to path='tiny'")
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"load_model: {path} is a {config.model_type!r} model; supported: "
            f"{sorted(SUPPORTED_MODEL_TYPES)}"
        )
    config.use_cache = False
    if torch.device(device).type == "meta":  # shapes only: weights come later (sharded load)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(
                config, dtype=dtype, attn_implementation=attn_implementation
            )
    model = AutoModelForCausalLM.from_pretrained(
        path, config=config, dtype=dtype, attn_implementation=attn_implementation
    )
    return model.to(device)


def read_hf_weights(path: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors files in checkpoint dir `path`, on CPU, floats in `dtype`."""
    from pathlib import Path

    from safetensors.torch import load_file

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise ValueError(f"read_hf_weights: no *.safetensors in {path}")
    out = {}
    for f in files:
        for name, t in load_file(str(f)).items():
            out[name] = t.to(dtype) if t.is_floating_point() else t
    return out


def fresh_buffers(model) -> dict[str, torch.Tensor]:
    """Non-persistent buffers (rotary `inv_freq`...) recomputed on CPU from the config, by name:
    what a model built on the meta device needs after `to_empty`. Each module owning such buffers
    must be constructible as `type(module)(config=model.config)` (HF rotary embeddings are)."""
    out = {}
    for mname, module in model.named_modules():
        names = getattr(module, "_non_persistent_buffers_set", ())
        if not names:
            continue
        with torch.device("cpu"):
            fresh = type(module)(config=model.config)
        for b in names:
            out[f"{mname}.{b}" if mname else b] = getattr(fresh, b).detach().clone()
    return out


SUPPORTED_MODEL_TYPES = {"cohere2", "cohere", "llama", "mistral", "qwen2"}


@dataclass
class TokenLogpsOutput(ModelOutput):
    """What a kernel-patched model returns for `model(..., targets=...)`."""

    token_logps: torch.Tensor | None = None
    """fp32 [B, T]: log p(targets[b, t]) under the model, 0 where targets == -100."""


def apply_kernels(model, attention: bool = True, loss: bool = True, *, backend: str = "auto"):
    """Opt-in patch of an HF Cohere2/Llama-style causal LM, in place; returns `model`.

    attention: the model runs packed rows ([1, T] or [B, T] with `position_ids` restarting at 0
        per sequence, `use_cache=False`) through our varlen attention kernel
        (`r7b_fast.hf_attention.use_varlen_attention`); the per-batch packing kwargs
        (`hf_attention.packed_kwargs(position_ids)`) are computed once per forward. Optional
        `model(..., cu_seqlens=int32[S+1])` gives the boundaries over the flattened tokens
        instead (e.g. `train_data.collate`'s, padding as one segment rather than one sequence
        per pad token); ignored without the attention patch.
    loss: `model(...)` computes log-probs with `linear_logprobs` (scaled by `logit_scale`),
        never materialising the [tokens, vocab] logits:
        - `model(input_ids, position_ids=..., targets=T)` with `targets` already shifted (the next
          token or -100) returns `TokenLogpsOutput(token_logps=fp32[B, T])` — what our trainer
          uses, so the head runs inside the root module's forward (FSDP2 gathers it there);
        - `model(input_ids, labels=L)` (HF convention: unshifted, -100 ignored; what HF `Trainer`
          passes) returns a CausalLMOutputWithPast with `loss` = mean NLL over the label tokens
          (or sum / `num_items_in_batch` when given) and `logits=None`;
        - without `targets`/`labels` the original forward runs (logits), e.g. for generation.
    `backend` is passed to linear_logprobs ("auto", "triton", "torch").
    """
    import types

    state = getattr(model, "_r7b_kernels", None)
    if state is None:
        state = {"attention": False, "loss": False, "backend": backend}
        state["forward"] = types.MethodType(type(model).forward, model)
        model._r7b_kernels = state
    state["backend"] = backend
    if attention and not state["attention"]:
        from r7b_fast.hf_attention import use_varlen_attention

        use_varlen_attention(model, backend=backend)
        state["attention"] = True
    state["loss"] = state["loss"] or loss
    model.forward = types.MethodType(_patched_forward, model)
    return model


def _patched_forward(self, input_ids=None, attention_mask=None, position_ids=None, **kwargs):
    state = self._r7b_kernels
    cu_seqlens = kwargs.pop("cu_seqlens", None)  # the packer's boundaries (see apply_kernels)
    if state["attention"] and position_ids is not None and attention_mask is None:
        from r7b_fast.hf_attention import packed_kwargs

        for key, value in packed_kwargs(position_ids, cu_seqlens).items():
            kwargs.setdefault(key, value)
    targets, labels = kwargs.pop("targets", None), kwargs.get("labels")
    if not state["loss"] or (targets is None and labels is None):
        return state["forward"](input_ids, attention_mask, position_ids, **kwargs)
    from r7b_fast import losses

    if position_ids is None:
        position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(
            input_ids
        )
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    if targets is not None:
        token_logps = losses.token_logps(
            self, input_ids, position_ids, targets, backend=state["backend"], **kwargs
        )
        # a fresh tensor, not a view: FSDP2 hooks the root output for backward
        return TokenLogpsOutput(token_logps=token_logps.clone())
    return _hf_labels_loss(self, input_ids, position_ids, kwargs, state["backend"])


def _hf_labels_loss(model, input_ids, position_ids, kwargs, backend):
    """HF-convention loss: labels[b, t] is predicted from position t - 1 (shifted here)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from r7b_fast import losses

    labels = kwargs.pop("labels")
    num_items = kwargs.pop("num_items_in_batch", None)
    kwargs.pop("use_cache", None)
    kwargs.pop("logits_to_keep", None)
    kwargs.pop("return_dict", None)
    targets = torch.full_like(labels, -100)
    targets[:, :-1] = labels[:, 1:]
    token_logps = losses.token_logps(
        model, input_ids, position_ids, targets, backend=backend, **kwargs
    )
    count = num_items if num_items is not None else (targets != -100).sum()
    loss = -token_logps.sum() / torch.as_tensor(count, device=token_logps.device).clamp(min=1)
    return CausalLMOutputWithPast(loss=loss, logits=None)
