"""`apply_kernels` outside our trainer: PEFT LoRA models (patched before or after wrapping, adapter
save/load), refused architectures and features, one q/k/v dtype under autocast, the backend on
every attention module (Llama, Mistral and Qwen2 sliding windows), "r7b_varlen" by name,
warn-once fallbacks, `max_seqlen` passed through, eval-mode logits and torch.compile."""

from __future__ import annotations

import copy
import subprocess
import sys
import warnings

import pytest
import torch
from _train_helpers import one_thread  # noqa: F401 (autouse fixture)
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import r7b_fast.hf_attention as hfa
from r7b_fast.kernels import kernel_calls
from r7b_fast.model import apply_kernels, build_model, tiny_config

VOCAB = 256
LENS = [3, 7, 12]  # packed into one row
# fp32 on both sides; only the summation order differs (varlen tiles vs SDPA, fused log-sum-exp
# chunks vs log_softmax): ~1e-7 relative per op.
RTOL = 1e-5


def llama_config(**over):
    kw = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=2, num_key_value_heads=1, head_dim=16, tie_word_embeddings=False,
              use_cache=False)  # fmt: skip
    return LlamaConfig(**{**kw, **over})


def llama(seed=0, **over):
    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(**over))


def flat_batch(lens=LENS, seed=0):
    """One padding-free row as `DataCollatorWithFlattening` makes it (labels -100 at each start)."""
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(8, VOCAB, (n,), generator=g) for n in lens]
    labels = torch.cat([torch.cat([torch.tensor([-100]), s[1:]]) for s in seqs])
    pos = torch.cat([torch.arange(n) for n in lens])
    return {"input_ids": torch.cat(seqs)[None], "labels": labels[None], "position_ids": pos[None]}


def lora(model, seed=1, targets=("q_proj", "v_proj")):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)  # init_lora_weights=False: random B, so LoRA changes the outputs
    cfg = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=list(targets),
                     lora_dropout=0.0, init_lora_weights=False)  # fmt: skip
    return get_peft_model(model, cfg)


def lora_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_peft_patched_before_and_after_wrapping():
    batch = flat_batch()
    ref = lora(llama())
    want = ref(**batch)
    want.loss.backward()
    base_loss = llama()(**batch).loss
    assert abs(base_loss.item() - want.loss.item()) > 1e-3  # the adapter matters here
    before = lora(apply_kernels(llama(), backend="torch"))
    after = apply_kernels(lora(llama()), backend="torch")
    assert type(after).__name__ == "PeftModelForCausalLM"  # the object given comes back
    for model in (before, after):
        with kernel_calls() as calls:
            got = model(**batch)
        assert calls["linear_logprobs:torch"] == 1 and calls["varlen_attention:torch"] == 2
        assert got.logits is None
        assert got.loss.item() == pytest.approx(want.loss.item(), rel=RTOL)
        got.loss.backward()
        grads, ref_grads = lora_grads(model), lora_grads(ref)
        assert set(grads) == set(ref_grads) and len(grads) == 8  # A and B of q, v in 2 layers
        for name, g in ref_grads.items():
            torch.testing.assert_close(grads[name], g, rtol=RTOL, atol=RTOL * g.abs().max())


def test_peft_adapter_save_load_round_trip(tmp_path):
    from peft import PeftModel

    batch = flat_batch(seed=3)
    trained = apply_kernels(lora(llama()), backend="torch")
    trained.save_pretrained(tmp_path / "adapter")
    loaded = apply_kernels(
        PeftModel.from_pretrained(llama(), tmp_path / "adapter"), backend="torch"
    )
    trained.train(), loaded.train()
    assert loaded(**batch).loss.item() == trained(**batch).loss.item()  # same weights, same ops
    trained.eval(), loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, trained(**batch).logits, rtol=0, atol=0)
        assert not torch.allclose(loaded(**batch).logits, llama()(**batch).logits, atol=1e-4)


def test_lora_on_lm_head_is_refused():
    model = apply_kernels(lora(llama(), targets=("q_proj", "lm_head")), backend="torch")
    with pytest.raises(ValueError, match="lm_head is a .*Linear"):
        model(**flat_batch())


def test_unsupported_architectures_and_features_are_named():
    from transformers import Gemma2Config, Gemma2ForCausalLM, GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        apply_kernels(gpt2)
    gemma = Gemma2ForCausalLM(Gemma2Config(vocab_size=64, hidden_size=16, intermediate_size=32,
                                           num_hidden_layers=2, num_attention_heads=2,
                                           num_key_value_heads=1, head_dim=8,
                                           final_logit_softcapping=30.0,
                                           attn_logit_softcapping=50.0))  # fmt: skip
    with pytest.raises(ValueError, match="'gemma2'.*final_logit_softcapping=30.0.*attn_logit"):
        apply_kernels(gemma)
    with pytest.raises(ValueError, match="final_logit_softcapping") as err:
        apply_kernels(gemma, attention=False)
    assert "attn_logit_softcapping" not in str(err.value)  # only what the asked patch needs
    assert "forward" not in gemma.__dict__  # nothing patched on refusal
    with pytest.raises(ValueError, match="attention_dropout=0.1"):
        apply_kernels(llama(attention_dropout=0.1))
    apply_kernels(llama(attention_dropout=0.1), attention=False)  # the loss patch is fine
    dynamic = llama(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4})
    with pytest.raises(ValueError, match="rope_type 'dynamic'"):
        apply_kernels(dynamic)
    with pytest.raises(ValueError, match="backend"):
        apply_kernels(llama(), backend="cuda")
    with pytest.raises(ValueError, match="before torch.compile"):
        apply_kernels(torch.compile(llama()))


def test_llama_attention_one_dtype_under_autocast_matches_sdpa():
    """fp32 weights + bf16 autocast: q/k leave the rotary embedding in fp32, v in bf16 (this
    raised 'q, k, v dtypes differ'); ours runs them in bf16 and matches per-sequence SDPA."""
    ref = llama(seed=2)
    ours = apply_kernels(copy.deepcopy(ref), loss=False, backend="torch")
    batch = flat_batch(seed=2)
    ids = batch["input_ids"][0]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        with kernel_calls() as calls:
            got = ours(batch["input_ids"], position_ids=batch["position_ids"]).logits[0].float()
        want = torch.cat([ref(s[None]).logits[0].float() for s in ids.split(LENS)])
        with torch.autocast("cpu", enabled=False):
            exact = torch.cat([ref(s[None]).logits[0] for s in ids.split(LENS)])
    assert calls["varlen_attention:torch"] == 2
    # bf16: 8 mantissa bits, 2^-8 relative per rounding, a few roundings deep
    assert (got - want).abs().max() <= 2e-2 * want.abs().max()
    assert (want - exact).abs().max() > 0  # autocast really changed the numbers
    q = torch.randn(1, 2, 5, 16)
    k, v = torch.randn(1, 1, 5, 16), torch.randn(1, 1, 5, 16).bfloat16()
    module = ours.model.layers[0].self_attn
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = hfa.varlen_attention_forward(module, q, k, v, None, scaling=0.25)
        ref_out, _ = sdpa_attention_forward(module, q, k, v, None, scaling=0.25, is_causal=True)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref_out.float()).abs().max() <= 2e-2 * ref_out.float().abs().max()


def mistral():
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    return MistralForCausalLM(
        MistralConfig(**llama_config().to_diff_dict() | {"sliding_window": 4})
    )


def qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = llama_config().to_diff_dict() | dict(use_sliding_window=True, sliding_window=4,
                                                max_window_layers=1)  # fmt: skip
    model = Qwen2ForCausalLM(Qwen2Config(**cfg))
    assert "sliding_attention" in model.config.layer_types  # a window to get right
    return model


@pytest.mark.parametrize("make", [llama, mistral, qwen2], ids=["llama", "mistral", "qwen2"])
def test_backend_on_every_attention_module_and_windows(make):
    ref = make()
    ours = apply_kernels(copy.deepcopy(ref), loss=False, backend="torch")
    attn = [m for m in ours.modules() if type(m).__name__.endswith("Attention")]
    assert len(attn) == 2 and all(m.r7b_varlen_backend == "torch" for m in attn)
    batch = flat_batch(seed=4)
    with torch.no_grad():
        with kernel_calls() as calls:
            got = ours(batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
        want = torch.cat([ref(s[None]).logits[0] for s in batch["input_ids"][0].split(LENS)])
    assert calls["varlen_attention:torch"] == 2 and calls["varlen_attention:triton"] == 0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)  # fp32, summation order


@pytest.mark.slow  # a fresh interpreter importing transformers and r7b_fast: 10-25 s
def test_r7b_varlen_by_name_once_r7b_fast_model_is_imported():
    code = (
        "from transformers import AutoModelForCausalLM, LlamaConfig\n"
        "cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,"
        " num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)\n"
        "try:\n"
        "    AutoModelForCausalLM.from_config(cfg, attn_implementation='r7b_varlen')\n"
        "    print('known before import')\n"
        "except Exception:\n"
        "    print('unknown before import')\n"
        "import r7b_fast.model\n"
        "m = AutoModelForCausalLM.from_config(cfg, attn_implementation='r7b_varlen')\n"
        "print(m.config._attn_implementation)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["unknown", "before", "import", "r7b_varlen"]


def test_fallbacks_warn_once_per_model_and_reason():
    batch = flat_batch()
    padded = {"input_ids": torch.tensor([[9, 10, 11, 0], [12, 13, 14, 15]]),
              "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])}  # fmt: skip
    for _ in range(2):  # a second model warns again (one set per model)
        model = apply_kernels(llama(), backend="torch")
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            for _ in range(3):
                model(**padded)
                model(inputs_embeds=model.model.embed_tokens(batch["input_ids"]),
                      labels=batch["labels"], position_ids=batch["position_ids"])  # fmt: skip
        messages = [str(w.message) for w in seen]
        assert sum("attention_mask" in m for m in messages) == 1, messages
        assert sum("inputs_embeds" in m for m in messages) == 1, messages
        assert len(messages) == 2, messages


def test_max_seqlen_is_passed_through(monkeypatch):
    model = apply_kernels(build_model(tiny_config(vocab_size=VOCAB, hidden_size=32,
                                                  intermediate_size=64, num_attention_heads=2,
                                                  num_key_value_heads=1)), backend="torch")  # fmt: skip
    batch = flat_batch()
    targets = torch.roll(batch["labels"], -1, 1)
    targets[0, -1] = -100
    cu = torch.tensor([0, 3, 10, 22], dtype=torch.int32)
    kw = dict(position_ids=batch["position_ids"], targets=targets, cu_seqlens=cu)
    want = model(batch["input_ids"], **kw).token_logps
    seen, real = [], hfa.varlen_attention
    monkeypatch.setattr(hfa, "varlen_attention", lambda *a, **k: seen.append(a[4]) or real(*a, **k))
    got = model(batch["input_ids"], max_seqlen=40, **kw).token_logps  # an upper bound is valid
    assert seen == [40] * model.config.num_hidden_layers  # not recomputed from cu_seqlens
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    monkeypatch.setattr(torch.Tensor, "item", lambda self: pytest.fail("host sync"))
    assert hfa.packed_kwargs(None, cu, max_seqlen=12)["max_length_k"] == 12


def test_eval_mode_returns_hf_logits_and_loss():
    ref = llama(seed=5)
    model = apply_kernels(copy.deepcopy(ref), backend="torch")
    batch = flat_batch(seed=5)
    ref.eval(), model.eval()
    with torch.no_grad():
        want = ref(**batch)
        with kernel_calls() as calls:
            got = model(**batch)
    assert calls["varlen_attention:torch"] == 2  # the attention patch still runs
    assert got.loss.item() == pytest.approx(want.loss.item(), rel=RTOL)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-5)
    model.train()
    assert model(**batch).logits is None  # training: never materialised


@pytest.mark.parametrize("attention", [False, True], ids=["loss", "loss+attention"])
def test_patched_forward_compiles_fullgraph(attention):
    """torch.compile(fullgraph=True) raises on any graph break: the patched Cohere2 forward has
    none. The fused log-probs take every row with ignore_index (no nonzero); with cu_seqlens and
    max_seqlen given the attention patch reads nothing on the host, and the kernels' torch varlen
    path is fullgraph-safe (its banded path, kernels/attention.py)."""
    model = apply_kernels(build_model(tiny_config(vocab_size=VOCAB, hidden_size=32,
                                                  intermediate_size=64, num_attention_heads=2,
                                                  num_key_value_heads=1, sliding_window=6)),
                          attention=attention, backend="torch")  # fmt: skip
    batch = flat_batch(seed=6)
    targets = torch.roll(batch["labels"], -1, 1)
    targets[0, -1] = -100
    kw = dict(position_ids=batch["position_ids"], targets=targets)
    if attention:
        kw.update(cu_seqlens=torch.tensor([0, 3, 10, 22], dtype=torch.int32), max_seqlen=max(LENS))
    want = model(batch["input_ids"], **kw).token_logps
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with kernel_calls() as calls:
        got = compiled(batch["input_ids"], **kw).token_logps
    assert calls["varlen_attention"] == (model.config.num_hidden_layers if attention else 0)
    assert (got[targets == -100] == 0).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)  # fp32, summation order


def cohere():
    from transformers import CohereConfig, CohereForCausalLM

    torch.manual_seed(0)  # tied embeddings, logit_scale applied to the logits
    cfg = llama_config().to_diff_dict() | dict(logit_scale=0.5, tie_word_embeddings=True)
    return CohereForCausalLM(CohereConfig(**cfg))


@pytest.mark.parametrize("make", [llama, cohere, qwen2], ids=["llama-untied", "cohere", "qwen2"])
def test_labels_loss_and_grads_match_unpatched(make):
    ref = make()
    model = apply_kernels(copy.deepcopy(ref), backend="torch")
    batch = flat_batch(seed=7)
    want = ref(**batch)
    want.loss.backward()
    with kernel_calls() as calls:
        got = model(**batch)
    got.loss.backward()
    assert calls["linear_logprobs:torch"] == 1 and got.logits is None
    assert got.loss.item() == pytest.approx(want.loss.item(), rel=RTOL)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        tol = RTOL * q.grad.abs().max()
        torch.testing.assert_close(p.grad, q.grad, rtol=RTOL, atol=tol, msg=name)


def test_flattening_collator_flash_kwargs_are_used(monkeypatch):
    """DataCollatorWithFlattening(return_flash_attn_kwargs=True) passes cu_seq_lens_q/k and
    max_length_q/k itself: used as given (nothing derived from position_ids)."""
    from transformers import DataCollatorWithFlattening

    ref = llama(seed=8)
    model = apply_kernels(copy.deepcopy(ref), backend="torch")
    g = torch.Generator().manual_seed(8)
    feats = [{"input_ids": torch.randint(8, VOCAB, (n,), generator=g).tolist()} for n in LENS]
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=True)(feats)
    assert "cu_seq_lens_q" in batch and "max_length_q" in batch
    plain = {k: batch[k] for k in ("input_ids", "labels", "position_ids")}
    want = ref(**plain).loss
    monkeypatch.setattr(hfa, "packed_kwargs", lambda *a, **k: pytest.fail("recomputed"))
    with kernel_calls() as calls:
        got = model(**batch).loss
    assert calls["varlen_attention:torch"] == 2
    assert got.item() == pytest.approx(want.item(), rel=RTOL)
