"""TRL drop-in trainers that train through r7b_fast's kernels (change one import):

    from r7b_fast.integrations.trl import SFTTrainer, DPOTrainer   # was: from trl import ...
    trainer = DPOTrainer(model=model, ref_model=ref, args=DPOConfig(...), train_dataset=ds,
                         processing_class=tokenizer)
    trainer.train()

Subclasses of TRL's (1.16) trainers taking TRL's own configs (`SFTConfig`, `DPOConfig`) and
datasets unchanged: TRL prepares the data (tokenisation, chat templates, completion / assistant
masks, packing, truncation, reference log-prob precomputation and caching) and runs the loop;
each micro-batch is then ONE packed row without padding (positions restarting at 0 per sequence,
`cu_seqlens`), the model is patched with `r7b_fast.model.apply_kernels(attention=True,
loss=True)` (varlen attention, fused linear log-prob head: no [tokens, vocab] logits), and every
training/eval forward checks with `kernel_calls()` that both kernels ran (RuntimeError if not:
never a silent fallback). The optional keyword `kernel_backend` ("auto" | "triton" | "torch") is
passed to the kernels.

SFT: loss = -sum(log p of the label tokens TRL selects: completion_only_loss /
assistant_only_loss as configured) / num_items_in_batch (the Trainer's token count over the whole
gradient-accumulation step, so accumulation is exact, as in TRL), or / the micro-batch count
without it; `loss_type="dft"` weights each token by its detached probability, as TRL does.
DPO: chosen and rejected sequences of the micro-batch packed in one row; sequence log-prob = sum
of completion-token log-probs; reference log-probs from `ref_model`, from the policy with its
PEFT adapter disabled, or precomputed once (`precompute_ref_log_probs=True`, cached like TRL's);
loss types sigmoid, hinge, ipo, robust, sigmoid_norm, sft (weighted sum with `loss_weights`);
metrics named as TRL names them: rewards/{chosen,rejected,accuracies,margins},
logps/{chosen,rejected}, num_tokens. Not logged: TRL's entropy, logits/*, mean_token_accuracy
(they need the full logits; a warning says so once).

Refused at construction with a ValueError naming the option (the full list is in
`_trl_common.check_training_args`, `SFTTrainer._check` and `DPOTrainer._check`):
use_liger_kernel, a custom data_collator, compute_metrics / preprocess_logits_for_metrics /
compute_loss_func, label_smoothing_factor, torch_compile, vision datasets, models apply_kernels
does not support; SFT packing_strategy="wrapped"; DPO loss types other than the above, ld_alpha,
f_divergence_type != "reverse_kl", use_weighting, label_smoothing without a loss type that uses
it. Everything else passes through to TRL (padding_free / pad_to_multiple_of do not matter: rows
are always packed, which gives the padded result; gradient checkpointing, PEFT, sync_ref_model,
gradient accumulation, ... work as in TRL).
"""

from __future__ import annotations

import contextlib
import inspect

import torch
import trl
from trl.trainer.dpo_trainer import DPOConfig
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from r7b_fast import losses
from r7b_fast.integrations import _trl_common as common

SFT_LOSS_TYPES = ("nll", "dft")
DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust", "sigmoid_norm", "sft")


def _bound(parent_init, self, args, kwargs) -> dict:
    """The parent constructor's arguments by name (positional or keyword, as TRL accepts them)."""
    bound = inspect.signature(parent_init).bind(self, *args, **kwargs)
    return bound.arguments


class SFTTrainer(trl.SFTTrainer):
    """TRL's SFTTrainer on r7b_fast's packed path (see the module docstring)."""

    def __init__(self, *args, kernel_backend: str = "auto", **kwargs):
        named = _bound(trl.SFTTrainer.__init__, self, args, kwargs)
        self._r7b_backend = kernel_backend
        self._check(named)
        model = named["model"]
        if not isinstance(model, str):
            common.patch(model, kernel_backend)  # fail fast on the architecture
        super().__init__(*args, **kwargs)
        if not isinstance(self.data_collator, DataCollatorForLanguageModeling):
            common.refuse("data_collator", type(self.data_collator).__name__,
                          "expected TRL's DataCollatorForLanguageModeling")  # fmt: skip
        # TRL's own padding-free mode: one flattened row, positions restarting per sequence (or
        # per packed document, from `seq_lengths`), label -100 at each sequence start.
        self.data_collator.padding_free = True
        common.patch(self.model, kernel_backend)

    @staticmethod
    def _check(named: dict) -> None:
        cfg = named.get("args")
        common.check_training_args(
            cfg or trl.SFTConfig("unused"), "sft",
            data_collator=named.get("data_collator"),
            compute_metrics=named.get("compute_metrics"),
            preprocess_logits_for_metrics=named.get("preprocess_logits_for_metrics"),
            compute_loss_func=named.get("compute_loss_func"),
        )  # fmt: skip
        common.check_not_vision(named.get("train_dataset"))
        if cfg is None:
            return
        if getattr(cfg, "packing", False) and getattr(cfg, "packing_strategy", "bfd") == "wrapped":
            common.refuse("packing_strategy", "wrapped", "it cuts documents and lets them attend "
                          "across boundaries; use 'bfd' or 'bfd_split'")  # fmt: skip
        if getattr(cfg, "loss_type", "nll") not in SFT_LOSS_TYPES + ("chunked_nll",):
            common.refuse("loss_type", cfg.loss_type, f"supported: {SFT_LOSS_TYPES}")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """-sum(label-token log-probs) / num_items_in_batch, as TRL's SFTTrainer (nll / dft)."""
        if return_outputs:
            common.refuse("return_outputs", True, "there are no logits to return")
        mode = "train" if self.model.training else "eval"
        labels = inputs["labels"]
        batch = {
            "input_ids": inputs["input_ids"],
            "position_ids": inputs["position_ids"],
            "targets": common.shift_targets(labels),
            "cu_seqlens": inputs["cu_seq_lens_q"],
            "max_seqlen": inputs["max_length_q"],
        }
        token_logps = common.checked_logps(model, batch)
        per_token = -token_logps
        if self.args.loss_type == "dft":  # Dynamic Fine-Tuning: weight by the detached probability
            per_token = per_token * token_logps.exp().detach()
        mask = batch["targets"] != -100
        count = mask.sum() if num_items_in_batch is None else num_items_in_batch
        loss = per_token.sum() / torch.as_tensor(count, device=per_token.device).clamp(min=1)
        # As TRL: num_items_in_batch counts every rank's tokens and DDP averages the gradients
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        if mode == "train":
            local = torch.tensor(inputs["position_ids"].size(1), device=labels.device)
            self._total_train_tokens += (
                self.accelerator.gather_for_metrics(local).sum().item() // self._tp_size
            )
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        return loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None


class DPOTrainer(trl.DPOTrainer):
    """TRL's DPOTrainer on r7b_fast's packed path (see the module docstring)."""

    def __init__(self, *args, kernel_backend: str = "auto", **kwargs):
        named = _bound(trl.DPOTrainer.__init__, self, args, kwargs)
        self._r7b_backend = kernel_backend
        cfg = named.get("args")
        if cfg is None:  # TRL's own default, built here because the collator needs it
            model = named["model"]
            name = model if isinstance(model, str) else model.config._name_or_path
            cfg = DPOConfig(f"{(name or 'model').split('/')[-1]}-DPO")
            named["args"] = cfg
        self._check(named)
        for key in ("model", "ref_model"):
            if named.get(key) is not None and not isinstance(named[key], str):
                common.patch(named[key], kernel_backend)  # before TRL precomputes references
        named["data_collator"] = common.PackedPreferenceCollator(
            max_length=cfg.max_length, truncation_mode=cfg.truncation_mode
        )
        named.pop("self")
        super().__init__(**named)
        common.patch(self.model, kernel_backend)
        if self.ref_model is not None:  # TRL may have built it (from the policy's path)
            common.patch(self.ref_model, kernel_backend)

    @staticmethod
    def _check(named: dict) -> None:
        cfg = named["args"]
        common.check_training_args(cfg, "dpo", data_collator=named.get("data_collator"),
                                   compute_metrics=named.get("compute_metrics"))  # fmt: skip
        common.check_not_vision(named.get("train_dataset"))
        loss_types = [cfg.loss_type] if isinstance(cfg.loss_type, str) else list(cfg.loss_type)
        for lt in loss_types:
            if lt not in DPO_LOSS_TYPES:
                common.refuse("loss_type", lt, f"supported: {DPO_LOSS_TYPES}")
        if cfg.ld_alpha is not None:
            common.refuse("ld_alpha", cfg.ld_alpha, "LD-DPO length weighting is not implemented")
        if cfg.f_divergence_type != "reverse_kl":
            common.refuse("f_divergence_type", cfg.f_divergence_type, "only 'reverse_kl' (DPO)")
        if cfg.use_weighting:
            common.refuse("use_weighting", True, "WPO weights need sum_v p_v^2 over the vocabulary, "
                          "which the fused head does not compute")  # fmt: skip
        if cfg.label_smoothing and "robust" not in loss_types:
            common.refuse("label_smoothing", cfg.label_smoothing, f"TRL 1.16 uses it only for "
                          f"'robust' (and 'exo_pair'), not {loss_types}: it would be ignored")  # fmt: skip

    def _precompute_ref_logps(self, dataset, name, batch_size):
        # TRL caches reference log-probs under a hash of (dataset, model); tag ours so a cache
        # written by TRL's own DPOTrainer (or the reverse) is never reused across paths.
        if not (isinstance(self._precompute_model_hash, tuple)):
            self._precompute_model_hash = ("r7b_fast.packed", self._precompute_model_hash)
        return super()._precompute_ref_logps(dataset, name, batch_size)

    def _sequence_logps(self, model, inputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(chosen [P], rejected [P], token log-probs [1, T]) of a packed batch under `model`."""
        common.patch(model, self._r7b_backend)  # no-op once patched (TRL may precompute first)
        token_logps = common.checked_logps(model, inputs)
        pairs = inputs["completion_lengths"].numel() // 2
        seq = losses.sequence_logps(token_logps, inputs["seq_ids"], 2 * pairs)
        return seq[:pairs], seq[pairs:], token_logps

    def compute_ref_log_probs(self, model, inputs):
        """Reference (chosen, rejected) log-probs of one packed batch, no grad; the policy with its
        PEFT adapter disabled (or the "ref" adapter) when there is no reference model."""
        from accelerate.utils import is_peft_model
        from trl.models.utils import disable_gradient_checkpointing
        from trl.trainer.utils import use_adapter

        adapter = contextlib.nullcontext()
        if self.ref_model is None and is_peft_model(self.model):
            unwrapped = self.accelerator.unwrap_model(self.model)
            adapter = use_adapter(unwrapped, "ref" if "ref" in unwrapped.peft_config else None)
        with (torch.no_grad(), adapter, self.accelerator.autocast(),
              disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs)):  # fmt: skip
            chosen, rejected, _ = self._sequence_logps(model, inputs)
        return chosen, rejected

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """TRL's DPO loss (weighted sum over `loss_type`) on packed pairs; logs TRL's metrics."""
        if return_outputs:
            common.refuse("return_outputs", True, "there are no logits to return")
        mode = "train" if self.model.training else "eval"
        pc, pr, token_logps = self._sequence_logps(model, inputs)
        if self.precompute_ref_logps:
            rc, rr = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            rc, rr = self.compute_ref_log_probs(self.ref_model or self.model, inputs)
        loss = self._loss(pc, pr, rc.to(pc), rr.to(pc), token_logps, inputs)
        self._log_metrics(mode, pc, pr, rc.to(pc), rr.to(pc), inputs)
        return loss

    def _loss(self, pc, pr, rc, rr, token_logps, inputs):
        pairs = pc.numel()
        lengths = inputs["completion_lengths"].clamp(min=1)  # TRL clamps its normaliser at 1
        loss = 0.0
        for kind, weight in zip(self.loss_types, self.loss_weights, strict=True):
            if kind == "sft":  # TRL: mean NLL over the chosen completions' target tokens
                seq_ids = inputs["seq_ids"]
                chosen = (seq_ids >= 0) & (seq_ids < pairs)
                term = -(token_logps * chosen).sum() / chosen.sum().clamp(min=1)
            else:
                term, _ = losses.dpo_loss(
                    pc, pr, rc, rr, beta=self.beta, kind=kind,
                    label_smoothing=self.label_smoothing if kind == "robust" else 0.0,
                    chosen_lengths=lengths[:pairs], rejected_lengths=lengths[pairs:],
                )  # fmt: skip
            loss = loss + term * weight
        return loss

    def _log_metrics(self, mode, pc, pr, rc, rr, inputs):
        """TRL's names and definitions: rewards are beta * raw log-ratios whatever the loss type."""
        gather = self.accelerator.gather
        with torch.no_grad():
            chosen_r, rejected_r = self.beta * (pc - rc).detach(), self.beta * (pr - rr).detach()
            m = self._metrics[mode]
            m["rewards/chosen"].append(gather(chosen_r).mean().item())
            m["rewards/rejected"].append(gather(rejected_r).mean().item())
            m["rewards/accuracies"].append(gather((chosen_r > rejected_r).float()).mean().item())
            m["rewards/margins"].append(gather(chosen_r - rejected_r).mean().item())
            m["logps/chosen"].append(gather(pc.detach()).mean().item())
            m["logps/rejected"].append(gather(pr.detach()).mean().item())
        if mode == "train":
            local = torch.tensor(inputs["input_ids"].numel(), device=pc.device)
            tokens = self.accelerator.gather_for_metrics(local).sum().item()
            self._total_train_tokens += tokens // self._tp_size
        m["num_tokens"] = [self._total_train_tokens]

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None
