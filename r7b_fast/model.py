"""Build or load Cohere2 (Command R7B-architecture) models.

HF transformers' `Cohere2ForCausalLM` is the source of truth for architecture and weights; this
module only builds it, loads it, and (opt-in) patches it with our kernels (`apply_kernels`,
re-exported from r7b_fast.patch). Importing it registers the "r7b_varlen" attention
implementation with transformers (r7b_fast.hf_attention.register).
"""

from __future__ import annotations

import torch
from transformers import Cohere2Config, Cohere2ForCausalLM

from r7b_fast import hf_attention
from r7b_fast.patch import SUPPORTED_MODEL_TYPES, TokenLogpsOutput, apply_kernels  # noqa: F401

# "r7b_varlen" usable by name once this module is imported, e.g.
# AutoModelForCausalLM.from_config(cfg, attn_implementation="r7b_varlen")
hf_attention.register()

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
