"""r7b_fast.integrations.trl: our SFTTrainer / DPOTrainer against TRL's own, on the same data.

Each comparison trains TRL's trainer and ours from the same seeded tiny model (Cohere2 from
`tiny_config`, or a Llama from `LlamaConfig`) on the same in-test dataset, fp32 on the CPU, a
few optimizer steps with gradient accumulation, and compares every logged step. Tolerances:
losses and log-probs rel 1e-5 (fp32; the two paths sum the same terms in another order: TRL's
chunked head over padded rows vs our head over one packed row; observed <= 2e-7 rel); rewards
(beta x a difference of two log-probs of ~30-100 nats) and weights abs 1e-5 (a few fp32 ulps
of those log-probs; SGD, so an update is proportional to its gradient). Our kernels run on their
torch backends here (fast); `test_triton_interpreted` runs the Triton kernels (interpreter).
"""

from __future__ import annotations

import copy

import pytest
import torch
import trl
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM
from trl import DPOConfig, SFTConfig

from r7b_fast.data.tokenizer import load_tokenizer
from r7b_fast.integrations import trl as ours
from r7b_fast.kernels import kernel_calls
from r7b_fast.model import build_model, tiny_config

REL = 1e-5
ABS = 1e-5
STEPS, ACCUM = 3, 2  # 6 micro-batches per run


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def cohere(seed=0):
    cfg = tiny_config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, sliding_window=8)  # fmt: skip
    return build_model(cfg, seed=seed)


def llama(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=1024, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, pad_token_id=0,
                      bos_token_id=1, eos_token_id=4, tie_word_embeddings=False, use_cache=False)  # fmt: skip
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg)


def user(i):
    return [{"role": "user", "content": f"what is {i} + {i}?"}]


def sft_data(kind: str) -> Dataset:
    if kind == "prompt_completion":  # completion_only_loss (TRL's default for this format)
        rows = [{"prompt": user(i), "completion": [{"role": "assistant",
                 "content": f"{2 * i} is the sum " * (1 + i % 3)}]} for i in range(8)]  # fmt: skip
    elif kind == "conversation":  # two assistant turns: assistant_only_loss trains both
        rows = [{"messages": [*user(i), {"role": "assistant", "content": f"{2 * i} it is"},
                              {"role": "user", "content": "sure?"},
                              {"role": "assistant", "content": "yes " * (1 + i % 3)}]}
                for i in range(8)]  # fmt: skip
    else:  # plain text, packed by TRL (bfd) into max_length rows
        rows = [{"text": f"the number {i} doubled is {2 * i}. " * (1 + i % 4)} for i in range(12)]
    return Dataset.from_list(rows)


def generation_marked(tok):
    """A copy of the tokenizer whose chat template marks assistant turns (end-of-turn included)
    with {% generation %}, which TRL's assistant_only_loss needs."""
    tok = copy.deepcopy(tok)
    turn = "<|START_OF_TURN_TOKEN|>{{ role }}{{ message['content'] }}<|END_OF_TURN_TOKEN|>"
    body = "{{ message['content'] }}<|END_OF_TURN_TOKEN|>"
    marked = ("<|START_OF_TURN_TOKEN|>{{ role }}{% if message['role'] == 'assistant' %}"
              f"{{% generation %}}{body}{{% endgeneration %}}{{% else %}}{body}{{% endif %}}")  # fmt: skip
    assert turn in tok.chat_template
    tok.chat_template = tok.chat_template.replace(turn, marked)
    return tok


def dpo_data() -> Dataset:
    rows = [{"prompt": user(i),
             "chosen": [{"role": "assistant", "content": f"{2 * i} " * (1 + i % 3)}],
             "rejected": [{"role": "assistant", "content": f"no idea about {i} " * (1 + i % 2)}]}
            for i in range(8)]  # fmt: skip
    return Dataset.from_list(rows)


def common_args(tmp_path, name, **kw):
    return dict(output_dir=str(tmp_path / name), use_cpu=True, report_to=[], bf16=False,
                max_steps=STEPS, per_device_train_batch_size=2, gradient_accumulation_steps=ACCUM,
                logging_steps=1, seed=0, save_strategy="no", optim="sgd",
                gradient_checkpointing=False) | kw  # fmt: skip


def run(trainer_cls, config_cls, tmp_path, name, model, data, tok, extra=None, **cfg):
    kw = {"kernel_backend": "torch"} if trainer_cls.__module__.startswith("r7b_fast") else {}
    args = config_cls(**common_args(tmp_path, name, **cfg))
    trainer = trainer_cls(model=model, args=args, train_dataset=data, processing_class=tok,
                          **(extra or {}), **kw)  # fmt: skip
    with kernel_calls() as calls:
        trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == STEPS
    return logs, model, calls


def assert_same_logs(theirs, mine, keys, abs_keys=()):
    for step, (a, b) in enumerate(zip(theirs, mine, strict=True)):
        for k in keys:
            assert k in b, f"step {step}: metric {k} missing from ours"
            tol = dict(abs=ABS) if k in abs_keys else dict(rel=REL, abs=1e-7)
            assert b[k] == pytest.approx(a[k], **tol), f"step {step} {k}: TRL {a[k]} ours {b[k]}"


def assert_same_weights(m1, m2):
    for (n, p1), p2 in zip(m1.named_parameters(), m2.parameters(), strict=True):
        torch.testing.assert_close(p2, p1, rtol=0, atol=ABS, msg=f"weight {n} differs")
    # the runs trained: the weights moved away from the shared seeded initialisation
    assert any((p - q).abs().max() > 1e-4 for p, q in zip(m1.parameters(), cohere_or_llama(m1)))


def cohere_or_llama(model):
    fresh = cohere() if model.config.model_type == "cohere2" else llama()
    return fresh.parameters()


def assert_kernels_ran(calls, model):
    """Exactly one head call and one attention call per layer per micro-batch forward."""
    layers = model.config.num_hidden_layers
    assert calls["linear_logprobs"] == STEPS * ACCUM, dict(calls)
    assert calls["varlen_attention"] == STEPS * ACCUM * layers, dict(calls)


@pytest.mark.parametrize(
    "make_model,data_kind,cfg",
    [
        (cohere, "prompt_completion", dict(learning_rate=0.5)),
        pytest.param(
            llama,
            "prompt_completion",
            dict(learning_rate=0.5, loss_type="dft"),
            marks=pytest.mark.slow,
        ),
        pytest.param(
            cohere,
            "text",
            dict(learning_rate=0.5, packing=True, max_length=48),
            marks=pytest.mark.slow,
        ),
        pytest.param(
            cohere,
            "conversation",
            dict(learning_rate=0.5, assistant_only_loss=True),
            marks=pytest.mark.slow,
        ),
    ],
    ids=["cohere-completion_only", "llama-dft", "cohere-packed_text", "cohere-assistant_only"],
)
def test_sft_matches_trl(tmp_path, tok, make_model, data_kind, cfg):
    data = sft_data(data_kind)
    if cfg.get("assistant_only_loss"):
        tok = generation_marked(tok)
    theirs, m_theirs, _ = run(trl.SFTTrainer, SFTConfig, tmp_path, "trl", make_model(), data,
                              tok, **cfg)  # fmt: skip
    mine, m_mine, calls = run(ours.SFTTrainer, SFTConfig, tmp_path, "ours", make_model(), data,
                              tok, **cfg)  # fmt: skip
    assert_same_logs(theirs, mine, ["loss", "grad_norm", "num_tokens"])
    assert_same_weights(m_theirs, m_mine)
    assert_kernels_ran(calls, m_mine)


DPO_CASES = {
    "sigmoid-ref_model": dict(loss_type=["sigmoid"]),
    "robust-precomputed": dict(
        loss_type=["robust"], label_smoothing=0.1, precompute_ref_log_probs=True
    ),  # fmt: skip
    "ipo-ref_model": dict(loss_type=["ipo"]),
    "hinge+sft-precomputed": dict(
        loss_type=["hinge", "sft"], loss_weights=[1.0, 0.5], precompute_ref_log_probs=True
    ),  # fmt: skip
    "sigmoid_norm-llama": dict(loss_type=["sigmoid_norm"]),
}
DPO_METRICS = ["loss", "grad_norm", "num_tokens", "logps/chosen", "logps/rejected",
               "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"]  # fmt: skip


SLOW_DPO = {"sigmoid-ref_model", "hinge+sft-precomputed", "sigmoid_norm-llama"}  # ~15-20 s each


@pytest.mark.parametrize(
    "case", [pytest.param(c, marks=[pytest.mark.slow] if c in SLOW_DPO else []) for c in DPO_CASES]
)
def test_dpo_matches_trl(tmp_path, tok, case):
    cfg = dict(DPO_CASES[case], learning_rate=0.5, max_length=40, beta=0.1)
    make = llama if "llama" in case else cohere
    refs = {} if cfg.get("precompute_ref_log_probs") else None
    out = {}
    for name, cls in (("trl", trl.DPOTrainer), ("ours", ours.DPOTrainer)):
        extra = {} if refs is not None else {"ref_model": make()}
        out[name] = run(cls, DPOConfig, tmp_path, name, make(), dpo_data(), tok, extra, **cfg)
    (theirs, m_theirs, _), (mine, m_mine, calls) = out["trl"], out["ours"]
    rewards = [k for k in DPO_METRICS if k.startswith("rewards/")]
    assert_same_logs(theirs, mine, DPO_METRICS, abs_keys=rewards)
    assert_same_weights(m_theirs, m_mine)
    # the policy forward per micro-batch, plus the reference forward unless precomputed
    per_step = 1 if refs is not None else 2
    layers = m_mine.config.num_hidden_layers
    assert calls["linear_logprobs"] == STEPS * ACCUM * per_step, dict(calls)
    assert calls["varlen_attention"] == STEPS * ACCUM * per_step * layers, dict(calls)


def test_fallback_is_an_error(tmp_path, tok):
    """If the model's attention is switched away from ours after construction, the next forward
    raises instead of training on another path."""
    model = cohere()
    args = DPOConfig(**common_args(tmp_path, "fb", max_length=40))
    trainer = ours.DPOTrainer(model=model, ref_model=cohere(), args=args, train_dataset=dpo_data(),
                              processing_class=tok, kernel_backend="torch")  # fmt: skip
    model.set_attn_implementation("sdpa")
    with pytest.raises(RuntimeError, match="varlen_attention"):
        trainer.train()


def _vision_data():
    return Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c", "images": []}] * 2)


REFUSED = [
    ("sft", dict(use_liger_kernel=True), {}, "use_liger_kernel"),
    ("dpo", dict(use_liger_kernel=True), {}, "use_liger_kernel"),
    ("sft", dict(packing=True, packing_strategy="wrapped"), {}, "packing_strategy"),
    ("sft", dict(label_smoothing_factor=0.1), {}, "label_smoothing_factor"),
    ("dpo", dict(torch_compile=True), {}, "torch_compile"),
    ("sft", {}, dict(compute_metrics=lambda p: {}), "compute_metrics"),
    ("sft", {}, dict(data_collator=lambda rows: rows), "data_collator"),
    ("dpo", dict(loss_type=["exo_pair"], label_smoothing=1e-3), {}, "loss_type"),
    ("dpo", dict(loss_type=["sigmoid", "nca_pair"]), {}, "loss_type"),
    ("dpo", dict(ld_alpha=0.5), {}, "ld_alpha"),
    ("dpo", dict(f_divergence_type="js_divergence"), {}, "f_divergence_type"),
    ("dpo", dict(use_weighting=True), {}, "use_weighting"),
    ("dpo", dict(label_smoothing=0.1), {}, "label_smoothing"),
    ("dpo", {}, dict(data_collator=lambda rows: rows), "data_collator"),
    ("dpo", {}, dict(train_dataset=_vision_data()), "train_dataset"),
    ("dpo", {}, dict(model="gpt2_tiny"), "model"),
]


@pytest.mark.parametrize("kind,cfg,extra,option", REFUSED, ids=[r[3] + "-" + r[0] for r in REFUSED])
def test_refused_options_raise_at_construction(tmp_path, tok, kind, cfg, extra, option):
    cls, config_cls = (
        (ours.SFTTrainer, SFTConfig) if kind == "sft" else (ours.DPOTrainer, DPOConfig)
    )
    args = config_cls(**common_args(tmp_path, "x", **cfg))
    kw = dict(model=cohere(), args=args, processing_class=tok,
              train_dataset=sft_data("prompt_completion") if kind == "sft" else dpo_data())  # fmt: skip
    if kind == "dpo":
        kw["ref_model"] = cohere()
    kw.update(extra)
    if kw["model"] == "gpt2_tiny":
        from transformers import GPT2Config, GPT2LMHeadModel

        kw["model"] = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=1024))
        kw.pop("ref_model")
    with pytest.raises(ValueError, match=f"trainer: {option}="):
        cls(**kw)


@pytest.mark.slow
@pytest.mark.triton_interpret
def test_triton_interpreted(tmp_path, tok):
    """The Triton kernels themselves (interpreter on the CPU) under our DPOTrainer: same first
    step as TRL's, and the calls went to the triton backend."""
    cfg = dict(learning_rate=0.5, max_length=24, max_steps=1, gradient_accumulation_steps=1)
    data = dpo_data().select(range(2))
    logs = {}
    for name, cls, kw in (("trl", trl.DPOTrainer, {}), ("ours", ours.DPOTrainer, {})):
        args = DPOConfig(**{**common_args(tmp_path, name), **cfg})
        trainer = cls(model=cohere(), ref_model=cohere(), args=args, train_dataset=data,
                      processing_class=tok, **kw)  # fmt: skip
        with kernel_calls() as calls:
            trainer.train()
        logs[name] = [h for h in trainer.state.log_history if "loss" in h]
    assert calls["linear_logprobs:triton"] == 2 and calls["varlen_attention:triton"] == 4
    assert logs["ours"][0]["logps/chosen"] == pytest.approx(logs["trl"][0]["logps/chosen"], rel=REL)
    assert logs["ours"][0]["loss"] == pytest.approx(logs["trl"][0]["loss"], rel=REL)


def test_dpo_model_path_and_trl_built_reference(tmp_path, tok):
    """The policy given as a checkpoint path: TRL loads it and builds the reference model from
    the same path; ours patches both (TRL's chunked head on them is replaced) and matches."""
    path = tmp_path / "ckpt"
    cohere().save_pretrained(path)
    tok.save_pretrained(path)
    cfg = dict(learning_rate=0.5, max_length=40)
    out = {}
    for name, cls in (("trl", trl.DPOTrainer), ("ours", ours.DPOTrainer)):
        kw = {"kernel_backend": "torch"} if cls is ours.DPOTrainer else {}
        args = DPOConfig(**common_args(tmp_path, name, **cfg))
        trainer = cls(model=str(path), args=args, train_dataset=dpo_data(), processing_class=tok,
                      **kw)  # fmt: skip
        with kernel_calls() as calls:
            trainer.train()
        out[name] = ([h for h in trainer.state.log_history if "loss" in h], calls)
    assert_same_logs(out["trl"][0], out["ours"][0], DPO_METRICS,
                     abs_keys=[k for k in DPO_METRICS if k.startswith("rewards/")])  # fmt: skip
    assert out["ours"][1]["linear_logprobs"] == 2 * STEPS * ACCUM  # policy + reference


def test_dpo_peft_reference_is_the_adapter_disabled(tmp_path, tok):
    """LoRA via TRL's peft_config, no ref_model: the reference is the policy with its adapter
    disabled (TRL's rule), here under gradient checkpointing; same logs and LoRA weights."""
    from peft import LoraConfig

    cfg = dict(learning_rate=0.5, max_length=40, gradient_checkpointing=True)
    out = {}
    for name, cls in (("trl", trl.DPOTrainer), ("ours", ours.DPOTrainer)):
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
        out[name] = run(cls, DPOConfig, tmp_path, name, cohere(), dpo_data(), tok,
                        {"peft_config": lora}, **cfg)  # fmt: skip
    (theirs, m_theirs, _), (mine, m_mine, calls) = out["trl"], out["ours"]
    assert_same_logs(theirs, mine, DPO_METRICS,
                     abs_keys=[k for k in DPO_METRICS if k.startswith("rewards/")])  # fmt: skip
    lora_weights = lambda m: {n: p for n, p in m.named_parameters() if "lora_" in n}  # noqa: E731
    a, b = lora_weights(m_theirs), lora_weights(m_mine)
    assert a.keys() == b.keys() and a
    for n in a:
        torch.testing.assert_close(b[n], a[n], rtol=0, atol=ABS, msg=f"LoRA weight {n} differs")
    assert any(p.abs().max() > 1e-4 for n, p in b.items() if "lora_B" in n)  # it trained
    # policy + reference forwards, plus the policy's recomputation under checkpointing
    assert calls["linear_logprobs"] == 2 * STEPS * ACCUM
    assert calls["varlen_attention"] == 3 * STEPS * ACCUM * m_mine.config.num_hidden_layers


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_evaluate_matches_trl(tmp_path, tok, kind):
    """`trainer.evaluate()` (our prediction_step: loss only, through our kernels) gives TRL's
    eval_loss and eval metrics."""
    cls_pair, config_cls = ((trl.SFTTrainer, ours.SFTTrainer), SFTConfig) if kind == "sft" else (
        (trl.DPOTrainer, ours.DPOTrainer), DPOConfig)  # fmt: skip
    data = sft_data("prompt_completion") if kind == "sft" else dpo_data()
    extra = dict(max_length=40) if kind == "dpo" else {}
    out = {}
    for name, cls in zip(("trl", "ours"), cls_pair, strict=True):
        kw = {"kernel_backend": "torch"} if cls.__module__.startswith("r7b_fast") else {}
        if kind == "dpo":
            kw["ref_model"] = cohere(seed=1)  # a reference that differs from the policy
        args = config_cls(**common_args(tmp_path, name, per_device_eval_batch_size=3, **extra))
        trainer = cls(model=cohere(), args=args, train_dataset=data, eval_dataset=data,
                      processing_class=tok, **kw)  # fmt: skip
        with kernel_calls() as calls:
            out[name] = trainer.evaluate()
    keys = ["eval_loss"] + ([f"eval_{k}" for k in DPO_METRICS[3:]] if kind == "dpo" else [])
    rewards = [k for k in keys if "rewards/" in k]
    assert_same_logs([out["trl"]], [out["ours"]], keys, abs_keys=rewards)
    batches = -(-len(data) // 3)
    assert calls["linear_logprobs"] == batches * (2 if kind == "dpo" else 1), dict(calls)
