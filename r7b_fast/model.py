"""Build or load Cohere2 (Command R7B-architecture) models.

HF transformers' `Cohere2ForCausalLM` is the source of truth for architecture and weights; this
module only builds it, loads it, and (opt-in) patches it with our kernels.
"""

from __future__ import annotations

import torch
from transformers import Cohere2Config, Cohere2ForCausalLM

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
