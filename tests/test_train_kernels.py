"""`apply_kernels`: the patched model gives the unpatched HF model's loss and gradients (packed
rows vs each sequence alone; HF `labels`), and an HF `Trainer` trains it like the original."""

import copy

import pytest
import torch
from _train_helpers import one_thread  # noqa: F401 (autouse fixture)

from r7b_fast import train
from r7b_fast.data.packing import pack_sft
from r7b_fast.model import apply_kernels, build_model, tiny_config
from r7b_fast.train_data import collate

# fp32 throughout; the two sides sum the same terms in a different order (packed vs per
# sequence, fused log-prob vs log_softmax), so they agree to fp32 rounding: rtol 1e-5 on the
# loss, and gradients within 1e-5 of the largest gradient entry of each tensor.
RTOL = 1e-5


def small_model(seed=0):
    cfg = tiny_config(hidden_size=32, intermediate_size=64, num_attention_heads=2,
                      num_key_value_heads=1, sliding_window=8)  # fmt: skip
    return build_model(cfg, torch.float32, seed=seed)


def sequences(seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = [1 + 2, 7, 19, 33, 5, 12]  # ragged; 19 and 33 exceed the sliding window (8)
    out = []
    for n in lengths:
        ids = torch.randint(8, 1000, (n,), generator=g).tolist()
        mask = (torch.rand(n, generator=g) < 0.6).long().tolist()
        mask[-1] = 1
        out.append((ids, mask))
    return out


def reference_loss_and_grads(model, seqs):
    """Each sequence alone through the UNPATCHED model's logits: -sum log p / count."""
    model.zero_grad()
    total = sum(sum(m[1:]) for _, m in seqs)
    loss = 0.0
    for ids, mask in seqs:
        logits = model(torch.tensor([ids])).logits[0].double()  # logit_scale applied by HF
        logp = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
        loss = loss - (logp * torch.tensor(mask[1:], dtype=torch.float64)).sum() / total
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_grads_close(got, want):
    for name, g in want.items():
        tol = RTOL * g.abs().max().item() + 1e-12
        assert torch.allclose(got[name], g, rtol=0, atol=tol), name


@pytest.mark.parametrize("attention", [True, False], ids=["varlen", "sdpa"])
def test_packed_sft_equals_unpacked(attention):
    ref_model = small_model()
    model = apply_kernels(copy.deepcopy(ref_model), attention=attention, loss=True,
                          backend="torch")  # fmt: skip
    seqs = sequences()
    want_loss, want_grads = reference_loss_and_grads(ref_model, seqs)

    packed = pack_sft(seqs, max_tokens=48)  # several sequences per row, padding at the ends
    assert 1 < len(packed) < len(seqs)
    rows = [collate([packed.row(i)], "cpu") for i in range(len(packed))]
    denom = torch.tensor(float(sum(train.sft_count(b) for b in rows)))
    loss = 0.0
    for b in rows:  # gradient accumulation over micro-batches, global token count
        micro, _ = train.sft_loss(model, b, denom, None)
        micro.backward()
        loss += micro.item()
    assert loss == pytest.approx(want_loss, rel=RTOL)
    assert_grads_close({n: p.grad for n, p in model.named_parameters()}, want_grads)

    # the same rows stacked into one forward (micro_batch = all rows) give the same again
    model.zero_grad()
    one = collate([packed.row(i) for i in range(len(packed))], "cpu")
    micro, _ = train.sft_loss(model, one, denom, None)
    micro.backward()
    assert micro.item() == pytest.approx(want_loss, rel=RTOL)
    assert_grads_close({n: p.grad for n, p in model.named_parameters()}, want_grads)


def test_hf_labels_loss_matches_unpatched():
    ref_model = small_model(seed=1)
    model = apply_kernels(copy.deepcopy(ref_model), attention=True, loss=True, backend="torch")
    ids = torch.randint(8, 1000, (2, 21), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[0, :5] = -100  # prompt tokens not trained
    labels[1, 15:] = -100
    want = ref_model(ids, labels=labels)
    want.loss.backward()
    got = model(ids, labels=labels)
    assert got.logits is None  # never materialised
    got.loss.backward()
    assert got.loss.item() == pytest.approx(want.loss.item(), rel=RTOL)
    assert_grads_close({n: p.grad for n, p in model.named_parameters()},
                       {n: p.grad for n, p in ref_model.named_parameters()})  # fmt: skip
    # without labels/targets the original forward runs (logits, e.g. for generation)
    torch.testing.assert_close(model(ids).logits, ref_model(ids).logits, rtol=1e-5, atol=1e-6)


def test_hf_trainer_steps_match_unpatched(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    g = torch.Generator().manual_seed(5)
    data = Dataset.from_dict({"input_ids": torch.randint(8, 1000, (8, 16), generator=g).tolist()})
    data = data.map(lambda r: {"labels": r["input_ids"]})

    def train_two_steps(model, name):
        args = TrainingArguments(output_dir=str(tmp_path / name), max_steps=2,
                                 per_device_train_batch_size=4, learning_rate=1e-2,
                                 report_to=[], use_cpu=True, save_strategy="no", seed=0, optim="sgd",
                                 logging_steps=1, dataloader_num_workers=0)  # fmt: skip
        trainer = Trainer(model=model, args=args, train_dataset=data)
        out = trainer.train()
        return out.training_loss, dict(model.named_parameters())

    init = dict(small_model(seed=2).named_parameters())
    ref_model = small_model(seed=2)
    patched = apply_kernels(copy.deepcopy(ref_model), attention=True, loss=True, backend="torch")
    want_loss, want = train_two_steps(ref_model, "ref")
    got_loss, got = train_two_steps(patched, "patched")
    assert got_loss == pytest.approx(want_loss, rel=RTOL)
    # SGD: the update is lr x gradient, so the gradient tolerance carries over to the update,
    # plus the fp32 rounding of two parameter updates (4 ulps of the largest weight).
    for name, p in want.items():
        update = (p - init[name]).detach()
        assert update.abs().max() > 0, name
        tol = RTOL * update.abs().max() + 4 * torch.finfo(torch.float32).eps * p.abs().max()
        assert (got[name] - p).abs().max() <= tol, name


def test_activation_checkpointing_same_loss_and_grads():
    from r7b_fast import distributed

    ref_model = small_model(seed=4)
    plain = apply_kernels(copy.deepcopy(ref_model), attention=True, loss=True, backend="torch")
    ac = apply_kernels(copy.deepcopy(ref_model), attention=True, loss=True, backend="torch")
    distributed.parallelize(ac, distributed.Dist(), activation_checkpointing=True,
                            mixed_precision=False)  # fmt: skip
    assert "CheckpointWrapper" in type(ac.model.layers[0]).__name__
    assert set(ac.state_dict()) == set(plain.state_dict())  # HF names kept
    packed = pack_sft(sequences(seed=1), max_tokens=64)
    batch = collate([packed.row(i) for i in range(len(packed))], "cpu")
    denom = train.sft_count(batch).float()
    losses = []
    for model in (plain, ac):
        loss, _ = train.sft_loss(model, batch, denom, None)
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == losses[1]  # the same ops, recomputed: bit-identical on CPU
    for (name, p), q in zip(plain.named_parameters(), ac.parameters()):
        assert torch.equal(p.grad, q.grad), name


def test_load_model_llama_dir_and_apply_kernels(tmp_path):
    """A Llama-family checkpoint dir loads and the patched loss matches its own logits (no
    logit_scale: scale 1); an unsupported architecture is refused by name."""
    from transformers import GPT2Config, LlamaConfig, LlamaForCausalLM

    from r7b_fast.model import load_model

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1024, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "llama")
    ref = load_model(str(tmp_path / "llama"))
    assert type(ref).__name__ == "LlamaForCausalLM" and ref.config.use_cache is False
    model = apply_kernels(copy.deepcopy(ref), attention=True, loss=True, backend="torch")
    seqs = sequences(seed=2)
    want_loss, want_grads = reference_loss_and_grads(ref, seqs)
    packed = pack_sft(seqs, max_tokens=64)
    batch = collate([packed.row(i) for i in range(len(packed))], "cpu")
    loss, _ = train.sft_loss(model, batch, train.sft_count(batch).float(), None)
    loss.backward()
    assert loss.item() == pytest.approx(want_loss, rel=RTOL)
    assert_grads_close({n: p.grad for n, p in model.named_parameters()}, want_grads)

    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="'gpt2' model"):
        load_model(str(tmp_path / "gpt2"))


def test_collate_cu_seqlens_one_segment_per_row_padding():
    """collate's flat boundaries: each row's sequences, then its padding as ONE segment (not one
    sequence per pad token, which is what position ids alone would give)."""
    from r7b_fast.data.packing import pack_sft

    seqs = [([5] * 7, [1] * 7), ([6] * 5, [1] * 5), ([7] * 9, [1] * 9), ([8] * 16, [1] * 16)]
    packed = pack_sft(seqs, 16, pad_id=0)
    rows = [packed.row(i) for i in range(len(packed))]
    cu = collate(rows, "cpu")["cu_seqlens"].tolist()
    expect, offset = [0], 0
    for r in rows:
        lens = torch.diff(r["cu_seqlens"]).tolist()
        pad = len(r["input_ids"]) - sum(lens)
        for n in lens + ([pad] if pad else []):
            expect.append(expect[-1] + n)
        offset += len(r["input_ids"])
    assert cu == expect and cu[-1] == offset == 16 * len(rows)
    assert any(int(r["cu_seqlens"][-1]) < 16 for r in rows)  # the case under test: padding
