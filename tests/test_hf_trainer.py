"""HF `Trainer` + `apply_kernels` on tiny Llama and Cohere2: the same losses and eval metrics as
the unpatched model's Trainer run, padded and padding-free (`DataCollatorWithFlattening`)
batches, gradient accumulation, bf16 autocast, and the patch applied after the Trainer exists.
`kernel_calls` proves our kernels ran on every optimizer step."""

from __future__ import annotations

import copy

import pytest
import torch
from _train_helpers import one_thread  # noqa: F401 (autouse fixture)
from datasets import Dataset
from transformers import (
    DataCollatorWithFlattening,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from r7b_fast.kernels import kernel_calls
from r7b_fast.model import apply_kernels, build_model, tiny_config

GA = 2  # gradient accumulation steps
STEPS = 2
# fp32 on both sides: the patched run sums the same terms in another order (varlen tiles vs SDPA,
# fused log-sum-exp chunks vs log_softmax), ~1e-7 relative per op; 1e-5 on the loss leaves room
# for two SGD steps of such differences.
FP32_RTOL = 1e-5
# bf16 autocast: 8 mantissa bits (2^-8 = 3.9e-3 relative per rounding), a few matmuls deep; the
# patched head runs in fp32 (more exact than HF's bf16 logits). 2e-2 relative on a ~5.5 loss.
BF16_RTOL = 2e-2
VOCAB = 256


def llama(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                      tie_word_embeddings=False, use_cache=False)  # fmt: skip
    return LlamaForCausalLM(cfg)


def cohere2(seed=0):
    cfg = tiny_config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                      num_key_value_heads=1, sliding_window=6)  # 3 sliding layers + 1 global  # fmt: skip
    return build_model(cfg, seed=seed)


ARCHS = {"llama": llama, "cohere2": cohere2}


def dataset():
    g = torch.Generator().manual_seed(0)
    lengths = [5, 9, 13, 7, 11, 3, 8, 12]  # ragged; 9..13 exceed Cohere2's window (6)
    rows = [torch.randint(8, VOCAB, (n,), generator=g).tolist() for n in lengths]
    labels = [[-100] * 2 + r[2:] for r in rows]  # a 2-token "prompt" not trained
    return Dataset.from_dict({"input_ids": rows, "labels": labels})


def pad_collator(features):
    """Right-padded [B, L] batch with an attention_mask (what a tokenizer's padding gives)."""
    L = max(len(f["input_ids"]) for f in features)
    ids = [f["input_ids"] + [0] * (L - len(f["input_ids"])) for f in features]
    labels = [f["labels"] + [-100] * (L - len(f["labels"])) for f in features]
    mask = [[1] * len(f["input_ids"]) + [0] * (L - len(f["input_ids"])) for f in features]
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels),
            "attention_mask": torch.tensor(mask)}  # fmt: skip


COLLATORS = {"padded": pad_collator, "flat": DataCollatorWithFlattening()}


def token_accuracy(pred):
    """Next-token accuracy over the label tokens (needs the logits: argmax kept per token)."""
    preds, labels = pred.predictions, pred.label_ids
    keep = labels[:, 1:] != -100
    return {"accuracy": float((preds[:, :-1] == labels[:, 1:])[keep].mean()),
            "tokens": float(keep.sum())}  # fmt: skip


class StepCalls(TrainerCallback):
    """Our kernels' call counts at the end of each optimizer step (deltas per step)."""

    def __init__(self, calls):
        self.calls, self.per_step, self.last = calls, [], {}

    def on_step_end(self, args, state, control, **kwargs):
        now = dict(self.calls)
        self.per_step.append({k: v - self.last.get(k, 0) for k, v in now.items()})
        self.last = now


def make_trainer(model, collator, tmp_path, bf16=False):
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=2,
        per_device_eval_batch_size=4, gradient_accumulation_steps=GA, learning_rate=1e-2,
        optim="sgd", seed=0, report_to=[], use_cpu=True, bf16=bf16, save_strategy="no",
        logging_steps=1, dataloader_num_workers=0, remove_unused_columns=False, disable_tqdm=True,
    )  # fmt: skip
    data = dataset()
    return Trainer(model=model, args=args, train_dataset=data, eval_dataset=data,
                   data_collator=COLLATORS[collator], compute_metrics=token_accuracy,
                   preprocess_logits_for_metrics=lambda logits, labels: logits.argmax(-1))  # fmt: skip


def train_and_eval(trainer):
    with kernel_calls() as calls:
        steps = StepCalls(calls)
        trainer.add_callback(steps)
        trainer.train()
        train_calls = dict(calls)
        metrics = trainer.evaluate()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == STEPS
    return losses, metrics, steps.per_step, train_calls


def assert_metrics_equal(got, want, rtol):
    assert got["eval_loss"] == pytest.approx(want["eval_loss"], rel=rtol)
    assert got["eval_tokens"] == want["eval_tokens"] > 0
    # argmax of two logits tied to fp32 rounding may flip: at most one token of difference
    assert abs(got["eval_accuracy"] - want["eval_accuracy"]) <= 1 / want["eval_tokens"]


@pytest.mark.parametrize("collator", ["padded", "flat"])
@pytest.mark.parametrize("arch", ["llama", "cohere2"])
def test_trainer_matches_unpatched_fp32(arch, collator, tmp_path):
    ref = ARCHS[arch]()
    patched = apply_kernels(copy.deepcopy(ref), backend="torch")
    want, want_metrics, _, _ = train_and_eval(make_trainer(ref, collator, tmp_path / "ref"))
    if collator == "padded":  # the attention falls back to SDPA: said once, not silently
        with pytest.warns(RuntimeWarning, match="attention_mask"):
            got, metrics, per_step, calls = train_and_eval(
                make_trainer(patched, collator, tmp_path / "ours")
            )
    else:
        got, metrics, per_step, calls = train_and_eval(
            make_trainer(patched, collator, tmp_path / "ours")
        )
    assert got == pytest.approx(want, rel=FP32_RTOL)
    assert_metrics_equal(metrics, want_metrics, FP32_RTOL)
    layers = ref.config.num_hidden_layers
    assert len(per_step) == STEPS
    for step in per_step:  # every micro-batch of every optimizer step ran the fused loss
        assert step.get("linear_logprobs:torch") == GA
        assert step.get("varlen_attention:torch", 0) == (GA * layers if collator == "flat" else 0)
    assert calls["linear_logprobs"] == GA * STEPS


@pytest.mark.parametrize("arch", ["llama", "cohere2"])
def test_trainer_bf16_autocast_flat(arch, tmp_path):
    """fp32 weights + `bf16=True` (autocast on the CPU): Llama used to raise 'q, k, v dtypes
    differ' (the rotary embedding upcasts q/k to fp32, v stays bf16)."""
    ref = ARCHS[arch]()
    fp32, fp32_metrics, _, _ = train_and_eval(
        make_trainer(copy.deepcopy(ref), "flat", tmp_path / "a")
    )
    hf_bf16, _, _, _ = train_and_eval(
        make_trainer(copy.deepcopy(ref), "flat", tmp_path / "b", True)
    )
    patched = apply_kernels(copy.deepcopy(ref), backend="torch")
    got, metrics, per_step, _ = train_and_eval(make_trainer(patched, "flat", tmp_path / "c", True))
    assert hf_bf16 != fp32  # autocast really ran (else this test could not tell)
    assert got == pytest.approx(fp32, rel=BF16_RTOL)
    assert got == pytest.approx(hf_bf16, rel=BF16_RTOL)
    assert metrics["eval_loss"] == pytest.approx(fp32_metrics["eval_loss"], rel=BF16_RTOL)
    layers = ref.config.num_hidden_layers
    assert all(s.get("varlen_attention:torch") == GA * layers for s in per_step)
    assert all(s.get("linear_logprobs:torch") == GA for s in per_step)


def test_apply_kernels_after_trainer_built_and_trained(tmp_path):
    """The Trainer holds the model; once it trained, accelerate wrapped the instance's forward
    (autocast + fp32 outputs): the patch goes inside those wrappers."""
    ref = llama(seed=1)
    model = copy.deepcopy(ref)
    before = apply_kernels(copy.deepcopy(ref), backend="torch")
    want, _, _, _ = train_and_eval(make_trainer(before, "flat", tmp_path / "a", True))

    trainer = make_trainer(model, "flat", tmp_path / "b", True)
    apply_kernels(model, backend="torch")  # built, not trained yet
    got, _, per_step, _ = train_and_eval(trainer)
    assert got == want  # the same ops in the same order: bit-identical
    assert all(s.get("linear_logprobs:torch") == GA for s in per_step)

    late = copy.deepcopy(ref)
    trainer = make_trainer(late, "flat", tmp_path / "c", True)
    train_and_eval(trainer)  # unpatched: accelerate wraps late.forward
    assert "forward" in late.__dict__ and hasattr(late, "_original_forward")
    apply_kernels(late, backend="torch")
    batch = DataCollatorWithFlattening()([dataset()[i] for i in range(3)])
    late.train()  # evaluate() left it in eval mode (HF forward with logits)
    with kernel_calls() as calls:
        out = late(**batch)
    assert calls["linear_logprobs:torch"] == 1 and calls["varlen_attention:torch"] == 2
    assert out.logits is None and out.loss.dtype == torch.float32  # fp32-output wrapper kept
    fresh = copy.deepcopy(ref)
    fresh.load_state_dict(late.state_dict())
    apply_kernels(fresh, backend="torch")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fresh(**batch).loss.item() == out.loss.item()  # accelerate's autocast was kept
    assert fresh(**batch).loss.item() != out.loss.item()  # (fp32 differs: the check can fail)


def test_trainer_peft_lora_patched_after_construction(tmp_path):
    """A LoRA PeftModel in the Trainer, patched after the Trainer exists (the base model inside
    is patched): the same losses as the unpatched LoRA run, our kernels on every step."""
    from peft import LoraConfig, get_peft_model

    def lora(model):
        torch.manual_seed(1)  # init_lora_weights=False: the adapter changes the outputs
        cfg = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.0,
                         target_modules=["q_proj", "v_proj"], init_lora_weights=False)  # fmt: skip
        return get_peft_model(model, cfg)

    want, want_metrics, _, _ = train_and_eval(make_trainer(lora(llama()), "flat", tmp_path / "a"))
    model = lora(llama())
    trainer = make_trainer(model, "flat", tmp_path / "b")
    apply_kernels(model, backend="torch")
    got, metrics, per_step, _ = train_and_eval(trainer)
    assert got == pytest.approx(want, rel=FP32_RTOL)
    assert_metrics_equal(metrics, want_metrics, FP32_RTOL)
    assert all(s.get("linear_logprobs:torch") == GA for s in per_step)
    assert all(s.get("varlen_attention:torch") == GA * 2 for s in per_step)
