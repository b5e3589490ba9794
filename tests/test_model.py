import pytest
import torch

from r7b_fast.model import BOS_ID, END_OF_TURN_ID, PAD_ID, build_model, tiny_config


def test_tiny_config_shape():
    c = tiny_config()
    assert c.vocab_size <= 2048
    assert 64 <= c.hidden_size <= 128
    assert c.num_hidden_layers == 4
    assert c.layer_types.count("full_attention") == 1 and c.layer_types[3] == "full_attention"
    assert (c.num_attention_heads, c.num_key_value_heads) == (4, 2)
    assert c.sliding_window < 128 and c.use_cache is False and c.tie_word_embeddings
    assert (c.pad_token_id, c.bos_token_id, c.eos_token_id) == (PAD_ID, BOS_ID, END_OF_TURN_ID)


def test_tiny_config_overrides_and_unknown_key():
    assert tiny_config(hidden_size=64).hidden_size == 64
    with pytest.raises(ValueError, match="hidden_sise"):
        tiny_config(hidden_sise=64)


def test_build_model_dtype_tied_and_deterministic():
    c = tiny_config()
    a = build_model(c, torch.bfloat16, seed=3)
    b = build_model(c, torch.bfloat16, seed=3)
    assert all(p.dtype == torch.bfloat16 for p in a.parameters())
    assert a.lm_head.weight.data_ptr() == a.model.embed_tokens.weight.data_ptr()
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
    ids = torch.randint(0, c.vocab_size, (2, 9))
    out = a(ids)
    assert out.logits.shape == (2, 9, c.vocab_size)
