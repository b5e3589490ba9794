"""r7b_fast.hf_attention: a packed [1, T] row through a tiny Cohere2 with "r7b_varlen" (Triton
under the interpreter) gives the logits and gradients of per-sequence HF eager runs."""

from __future__ import annotations

import pytest
import torch

import r7b_fast.hf_attention as hfa
from r7b_fast.model import build_model, tiny_config

pytestmark = pytest.mark.triton_interpret
LENS = [1, 4, 5, 6, 13]  # window 5: lengths w-1, w, w+1 and one well past it


@pytest.fixture(scope="module")
def models():
    # head_dim 16, 3 sliding layers (window 5) + 1 global: small enough for the interpreter
    cfg = lambda: tiny_config(hidden_size=32, num_attention_heads=2, num_key_value_heads=1,
                              intermediate_size=32, sliding_window=5)  # fmt: skip
    eager = build_model(cfg(), attn_implementation="eager", seed=0)  # own config objects: the
    ours = build_model(cfg(), attn_implementation="eager", seed=0)  # switch edits the config
    assert eager.config._attn_implementation == "eager"
    hfa.use_varlen_attention(ours)
    assert eager.config._attn_implementation == "eager"
    assert ours.config._attn_implementation == "r7b_varlen"
    return eager, ours


def packed_inputs():
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(8, 1024, (n,), generator=g) for n in LENS]
    pos = torch.cat([torch.arange(n) for n in LENS])[None]
    return ids, torch.cat(ids)[None], pos


def test_packed_kwargs():
    kw = hfa.packed_kwargs(torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]]))
    assert kw["cu_seq_lens_q"].dtype == torch.int32
    assert kw["cu_seq_lens_q"].tolist() == [0, 3, 5, 6, 10, 12] and kw["max_length_q"] == 4
    assert kw["cu_seq_lens_k"] is kw["cu_seq_lens_q"] and kw["max_length_k"] == 4
    assert hfa.packed_kwargs(torch.arange(7))["cu_seq_lens_q"].tolist() == [0, 7]
    given = torch.tensor([0, 5, 7], dtype=torch.int32)  # e.g. the packer's, padding as one segment
    kw = hfa.packed_kwargs(torch.tensor([0, 1, 2, 3, 4, 0, 0]), cu_seqlens=given)
    assert kw["cu_seq_lens_q"] is given and kw["max_length_q"] == 5
    with pytest.raises(ValueError, match="int32"):
        hfa.packed_kwargs(torch.arange(7), cu_seqlens=given.long())


@pytest.mark.slow  # 8-25 s on a busy 2-core machine
def test_packed_row_matches_per_sequence_eager(models, monkeypatch):
    eager, ours = models
    ids, row, pos = packed_inputs()
    g = torch.Generator().manual_seed(1)
    weights = torch.randn(row.shape[1], eager.config.vocab_size, generator=g)
    kwargs = hfa.packed_kwargs(pos)
    calls = []
    monkeypatch.setattr(hfa, "packed_kwargs", lambda p: calls.append(p) or pytest.fail("per layer"))
    ours.zero_grad()
    logits = ours(row, position_ids=pos, use_cache=False, **kwargs).logits[0]
    (logits * weights).sum().backward()
    assert not calls  # cu_seqlens came from the batch kwargs, not recomputed in a layer

    eager.zero_grad()
    ref, s = [], 0
    for x in ids:
        out = eager(x[None], use_cache=False).logits[0]
        (out * weights[s : s + len(x)]).sum().backward()
        ref.append(out.detach())
        s += len(x)
    # fp32 throughout; differences are summation order only (~1e-7 relative per op)
    torch.testing.assert_close(logits.detach(), torch.cat(ref), rtol=1e-4, atol=1e-5)
    for (name, a), (_, b) in zip(ours.named_parameters(), eager.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_without_kwargs_cu_seqlens_come_from_position_ids(models):
    _, ours = models
    _, row, pos = packed_inputs()
    with torch.no_grad():
        a = ours(row, position_ids=pos, use_cache=False, **hfa.packed_kwargs(pos)).logits
        b = ours(row, position_ids=pos, use_cache=False).logits
        joined = ours(row, position_ids=torch.arange(row.shape[1])[None], use_cache=False).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, joined, atol=1e-3)  # one long sequence attends across: differs


def test_cached_generation_falls_back_to_sdpa(models):
    eager, ours = models
    prompt = torch.tensor([[1, 9, 30, 77, 5]])
    kw = dict(max_new_tokens=4, do_sample=False, use_cache=True, pad_token_id=0)
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="KV cache") as record:
        assert torch.equal(ours.generate(prompt, **kw), eager.generate(prompt, **kw))
    # said once per model, not once per layer or step
    assert sum("KV cache" in str(w.message) for w in record) == 1


def test_packed_kwargs_from_cu_seqlens_alone():
    """cu_seqlens without position_ids or max_seqlen: the boundaries as given, the longest
    sequence read from them (it raised 'give position_ids or cu_seqlens' though cu was given)."""
    import torch

    from r7b_fast.hf_attention import packed_kwargs

    cu = torch.tensor([0, 3, 10, 12], dtype=torch.int32)
    kw = packed_kwargs(None, cu)
    assert kw["cu_seq_lens_q"] is cu and kw["max_length_q"] == kw["max_length_k"] == 7
    assert packed_kwargs(None, cu, 9)["max_length_q"] == 9
