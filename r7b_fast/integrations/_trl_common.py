"""What r7b_fast's TRL trainers share: option checks, model patching, the checked forward, and
the packed preference collator. See `r7b_fast.integrations.trl` for the user-facing contract."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

KERNELS = ("linear_logprobs", "varlen_attention")
"""The dispatchers every training forward must call (checked per forward, see `checked_logps`)."""

LOGIT_METRICS = {
    "sft": ("entropy", "mean_token_accuracy"),
    "dpo": ("entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy"),
}
"""TRL metrics that need the full [tokens, vocab] logits, which our fused head never builds."""

_warned: set[str] = set()


def refuse(option: str, value, why: str) -> None:
    """Raise the ValueError every refused option gets: the option, its value, why, what to do."""
    raise ValueError(f"r7b_fast TRL trainer: {option}={value!r} is not supported: {why}")


def check_training_args(args, kind: str, *, data_collator, compute_metrics,
                        preprocess_logits_for_metrics=None, compute_loss_func=None) -> None:  # fmt: skip
    """Options shared by SFTConfig and DPOConfig (TrainingArguments) that our path cannot honour."""
    if args.use_liger_kernel:
        refuse("use_liger_kernel", True, "Liger patches the model's layers and loss, which would "
               "replace ours; drop it (our kernels cover attention and the LM head)")  # fmt: skip
    if data_collator is not None:
        refuse("data_collator", type(data_collator).__name__, "the trainer packs rows itself "
               "(padding-free, one packed row per micro-batch); leave it None")  # fmt: skip
    if compute_metrics is not None or preprocess_logits_for_metrics is not None:
        refuse("compute_metrics", "set", "evaluation metrics from logits need the full "
               "[tokens, vocab] logits, which the fused log-prob head never builds")  # fmt: skip
    if compute_loss_func is not None:
        refuse("compute_loss_func", "set", "a custom loss needs the logits; subclass and "
               "override compute_loss on top of the token log-probs instead")  # fmt: skip
    if getattr(args, "label_smoothing_factor", 0):
        refuse("label_smoothing_factor", args.label_smoothing_factor,
               "label smoothing needs the full logits")  # fmt: skip
    if getattr(args, "torch_compile", False):
        refuse("torch_compile", True, "the per-forward check that our kernels ran (kernel_calls) "
               "cannot see inside a compiled graph; train eagerly")  # fmt: skip
    if kind not in _warned:
        _warned.add(kind)
        logger.warning(
            "r7b_fast %s trainer: TRL's metrics %s are not logged (they need the full logits, "
            "which the fused log-prob head never builds); losses, rewards/*, logps/* and "
            "num_tokens are.", kind.upper(), list(LOGIT_METRICS[kind]))  # fmt: skip


def check_not_vision(dataset) -> None:
    """Vision datasets go through TRL's vision collators (padded, pixel values): refused."""
    if dataset is None:
        return
    sample = next(iter(dataset))
    if "image" in sample or "images" in sample:
        refuse("train_dataset", "image columns", "vision-language data is not packed by r7b_fast")


def base_model(model):
    """The HF causal LM under accelerate / PEFT wrappers (the module apply_kernels patches)."""
    model = getattr(model, "module", model)
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def patch(model, backend: str):
    """Check the architecture, then `apply_kernels(attention=True, loss=True)` on the base HF
    model of `model` (idempotent). Returns `model`."""
    from r7b_fast.model import SUPPORTED_MODEL_TYPES, apply_kernels

    base = base_model(model)
    model_type = getattr(base.config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        refuse("model", f"{type(base).__name__} ({model_type})",
               f"apply_kernels supports {sorted(SUPPORTED_MODEL_TYPES)}")  # fmt: skip
    state = getattr(base, "_r7b_kernels", None)
    if not (state and state["attention"] and state["loss"] and state["backend"] == backend):
        # TRL's __init__ puts its chunked LM head (add_fused_lm_head) on every model as the
        # instance forward. On a model patched before (passed in built) it wraps ours and passes
        # through (fused_lm_head=False), so it stays; on one TRL built from a path it wraps the
        # class forward, which apply_kernels cannot re-wrap (accelerate's wrappers only): it goes.
        code = getattr(getattr(base.__dict__.get("forward"), "__func__", None), "__code__", None)
        if code is not None and code.co_name == "_fused_forward" and "trl" in code.co_filename:
            del base.__dict__["forward"]  # (functools.wraps hides it from __qualname__)
        apply_kernels(base, attention=True, loss=True, backend=backend)
    return model


def checked_logps(model, batch) -> torch.Tensor:
    """fp32 [1, T] token log-probs of packed `batch` (input_ids, position_ids, targets,
    cu_seqlens, max_seqlen) from a patched `model`; raises RuntimeError if our kernels did not run (a silent
    fallback to another attention or head would otherwise train on the same data unnoticed)."""
    from r7b_fast.kernels import kernel_calls

    with kernel_calls() as calls:
        out = model(
            input_ids=batch["input_ids"],
            position_ids=batch["position_ids"],
            targets=batch["targets"],
            cu_seqlens=batch["cu_seqlens"],
            max_seqlen=batch["max_seqlen"],  # an int: no host sync to find it
        )
    missing = [k for k in KERNELS if calls[k] == 0]
    if missing:
        raise RuntimeError(f"r7b_fast TRL trainer: the forward did not run {missing}; "
                           f"calls seen: {dict(calls)}")  # fmt: skip
    return out.token_logps


def shift_targets(labels: torch.Tensor) -> torch.Tensor:
    """HF labels (label t predicted from position t-1) -> targets (predicted at position t)."""
    targets = torch.full_like(labels, -100)
    targets[..., :-1] = labels[..., 1:]
    return targets


@dataclass
class PackedPreferenceCollator:
    """Preference pairs -> one packed row, no padding.

    Input examples carry TRL's tokenized columns `prompt_ids`, `chosen_ids`, `rejected_ids` (and
    `ref_chosen_logps`, `ref_rejected_logps` once precomputed). Each sequence is prompt +
    completion truncated like TRL's DataCollatorForPreference (`max_length`, `truncation_mode`);
    the row holds the P chosen sequences then the P rejected ones (TRL's [chosen; rejected]
    order). Returns int64 [1, T] `input_ids`, `position_ids` (restarting at 0 per sequence),
    `targets` (next token where it is a completion token of the same sequence, else -100),
    `seq_ids` (sequence index of each target, -1 elsewhere), int32 [2P+1] `cu_seqlens`, the int
    `max_seqlen`, int64
    [2P] `completion_lengths` (completion tokens kept per sequence, TRL's length normaliser),
    and fp32 [P] `ref_chosen_logps`/`ref_rejected_logps` when the examples have them."""

    max_length: int | None = None
    truncation_mode: str = "keep_start"

    def _truncate(self, ids: list, mask: list) -> tuple[list, list]:
        if self.max_length is None:
            return ids, mask
        if self.truncation_mode == "keep_start":
            return ids[: self.max_length], mask[: self.max_length]
        if self.truncation_mode == "keep_end":
            return ids[-self.max_length :], mask[-self.max_length :]
        refuse("truncation_mode", self.truncation_mode, "expected 'keep_start' or 'keep_end'")

    def __call__(self, examples: list[dict]) -> dict:
        seqs = []
        for side in ("chosen_ids", "rejected_ids"):
            for ex in examples:
                prompt, completion = list(ex["prompt_ids"]), list(ex[side])
                seqs.append(self._truncate(prompt + completion,
                                           [0] * len(prompt) + [1] * len(completion)))  # fmt: skip
        ids, pos, targets, seq_ids, lens, comp = [], [], [], [], [0], []
        for s, (x, m) in enumerate(seqs):
            n = len(x)
            ids += x
            pos += range(n)
            nxt = [x[t + 1] if m[t + 1] else -100 for t in range(n - 1)] + [-100]
            targets += nxt
            seq_ids += [s if y != -100 else -1 for y in nxt]
            lens.append(lens[-1] + n)
            comp.append(sum(m))
        row = lambda v: torch.tensor(v, dtype=torch.long)[None]  # noqa: E731
        out = {
            "input_ids": row(ids),
            "position_ids": row(pos),
            "targets": row(targets),
            "seq_ids": row(seq_ids),
            "cu_seqlens": torch.tensor(lens, dtype=torch.int32),
            "max_seqlen": max(b - a for a, b in zip(lens, lens[1:])),
            "completion_lengths": torch.tensor(comp, dtype=torch.long),
        }
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            if key in examples[0]:
                out[key] = torch.tensor([ex[key] for ex in examples], dtype=torch.float32)
        return out
