"""`apply_kernels`: patch an HF causal LM in place so our kernels run inside its own forward.

Works on the plain model, on a PEFT `PeftModel` around it (the base model is patched), and
before or after an HF `Trainer` / accelerate prepared it (accelerate's autocast and fp32-output
wrappers around the instance's forward are rebuilt around ours). `r7b_fast.model` re-exports
`apply_kernels` and `TokenLogpsOutput`.
"""

from __future__ import annotations

import types
import warnings
from dataclasses import dataclass

import torch
from transformers.utils import ModelOutput

SUPPORTED_MODEL_TYPES = frozenset({"cohere2", "cohere", "llama", "mistral", "qwen2"})
BACKENDS = ("auto", "triton", "torch")
# rope types whose frequencies depend on the longest position in the batch: in a packed row every
# sequence would get the longest one's frequencies instead of its own
_BATCH_DEPENDENT_ROPE = ("dynamic", "longrope")
IGNORE_INDEX = -100


@dataclass
class TokenLogpsOutput(ModelOutput):
    """What a kernel-patched model returns for `model(..., targets=...)`."""

    token_logps: torch.Tensor | None = None
    """fp32 [B, T]: log p(targets[b, t]) under the model, 0 where targets == -100."""


def apply_kernels(model, attention: bool = True, loss: bool = True, *, backend: str = "auto"):
    """Opt-in patch of an HF causal LM (Cohere2, Cohere, Llama, Mistral, Qwen2), in place;
    returns `model` (the object given).

    model: the `*ForCausalLM`, or a PEFT `PeftModel` around one (its base model is patched; LoRA
        layers added later, e.g. `get_peft_model` after this call, are kept: the patch only
        replaces the root forward and the attention function). Refused with a ValueError naming
        every reason: another architecture (by `config.model_type`), logit soft-capping
        (`final_logit_softcapping` for `loss`, `attn_logit_softcapping` for `attention`),
        attention sinks, `attention_dropout > 0`, or a batch-dependent rope type
        ("dynamic"/"longrope": packed sequences would share the longest one's frequencies).
    attention: every attention module runs our varlen kernel (`r7b_fast.hf_attention`, name
        "r7b_varlen") on padding-free batches: `position_ids` restarting at 0 per sequence and no
        `attention_mask` (HF's `DataCollatorWithFlattening`, our packer). The boundaries are
        computed once per forward: from `cu_seqlens=int32[S+1]` (over the B*T flattened tokens,
        e.g. `train_data.collate`'s) and `max_seqlen=int` when given (no host sync), else from
        the `cu_seq_lens_q`/`max_length_q` kwargs a flattening collator may pass, else from
        `position_ids` (one host sync). Sliding windows are the ones the HF layers pass.
        A padded batch (an `attention_mask`) or a KV cache runs SDPA instead and warns once per
        model and reason.
    loss: log-probs come from `linear_logprobs` (times `config.logit_scale`, 1 when absent; the
        lm_head may be tied or not) without materialising the [tokens, vocab] logits:
        - `model(input_ids, position_ids=..., targets=T)`, `targets` already shifted (the next
          token or -100): `TokenLogpsOutput(token_logps=fp32[B, T])` in train and eval mode —
          what our trainer uses, so the head runs inside the root module's forward (FSDP2);
        - `model(input_ids, labels=L)` in training mode (HF convention: unshifted, -100 ignored;
          what HF `Trainer`/TRL pass): `CausalLMOutputWithPast(loss=..., logits=None)`, loss =
          mean NLL over the label tokens, or their sum / `num_items_in_batch` when given
          (gradient accumulation);
        - in eval mode (`not model.training`, e.g. `Trainer.evaluate` with `compute_metrics`)
          and without `targets`/`labels`: the HF forward (logits, and HF's loss for labels),
          still with the attention patch.
        The head runs in the weights' dtype: autocast does not reach the fused kernel.
    backend: "auto", "triton" or "torch", for `linear_logprobs` and every attention module.

    Order: apply before or after `get_peft_model`, before or after an HF `Trainer` is built or
    has trained (its accelerate wrappers are kept around the patched forward), before FSDP2 /
    activation checkpointing (r7b_fast.distributed; FSDP2 keeps the instance's forward) and
    before torch.compile (a compiled module is refused).
    Calling it again adds features and updates `backend`; it never removes one.
    """
    if backend not in BACKENDS:
        raise ValueError(f"apply_kernels: backend must be one of {BACKENDS}, got {backend!r}")
    lm = causal_lm(model)
    check_supported(lm, attention=attention, loss=loss)
    state = lm.__dict__.get("_r7b_kernels")
    if state is None:
        state = {"attention": False, "loss": False, "warned": set()}
        lm._r7b_kernels = state
    state["backend"] = backend
    if attention or state["attention"]:
        from r7b_fast.hf_attention import use_varlen_attention

        use_varlen_attention(lm, backend=backend, warned=state["warned"])
        state["attention"] = True
    state["loss"] = state["loss"] or loss
    _install_forward(lm)
    return model


def causal_lm(model):
    """The `*ForCausalLM` to patch: `model` itself, or the base model of a PEFT `PeftModel`."""
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        raise ValueError("apply_kernels: apply it before torch.compile (the compiled module "
                         "traced the unpatched forward)")  # fmt: skip
    if hasattr(model, "get_base_model"):  # peft.PeftModel (base_model is the LoraModel)
        model = model.get_base_model()
    if not hasattr(model, "config") or not hasattr(model, "lm_head"):
        raise ValueError(
            f"apply_kernels: {type(model).__name__} is not an HF causal LM (no config/lm_head)"
        )
    return model


def check_supported(lm, *, attention: bool, loss: bool) -> None:
    """Raise a ValueError naming every feature of `lm` the requested patches cannot reproduce."""
    cfg = lm.config
    problems = []
    if cfg.model_type not in SUPPORTED_MODEL_TYPES:
        problems.append(
            f"model_type {cfg.model_type!r} (supported: {sorted(SUPPORTED_MODEL_TYPES)})"
        )
    if loss and getattr(cfg, "final_logit_softcapping", None):
        problems.append(
            f"final_logit_softcapping={cfg.final_logit_softcapping} (the fused loss has none)"
        )
    if attention and getattr(cfg, "attn_logit_softcapping", None):
        problems.append(
            f"attn_logit_softcapping={cfg.attn_logit_softcapping} (varlen attention has none)"
        )
    if attention and any(hasattr(m, "sinks") for m in lm.modules()):
        problems.append("attention sinks (varlen attention has none)")
    if attention and (getattr(cfg, "attention_dropout", 0.0) or 0.0) > 0:
        problems.append(
            f"attention_dropout={cfg.attention_dropout} (varlen attention has no dropout)"
        )
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type")) if isinstance(rope, dict) else None
    if attention and rope_type in _BATCH_DEPENDENT_ROPE:
        problems.append(f"rope_type {rope_type!r} (depends on the longest packed position)")
    if problems:
        raise ValueError(f"apply_kernels: cannot patch {type(lm).__name__}: " + "; ".join(problems))


def warn_once(warned: set, reason: str, message: str) -> None:
    """`warnings.warn(message)` the first time `reason` is seen in `warned` (one set per model)."""
    if reason not in warned:
        warned.add(reason)
        warnings.warn(f"r7b_fast.apply_kernels: {message}", RuntimeWarning, stacklevel=3)


def _unwrapped(fn, stop):
    """Follow `fn`'s `__wrapped__` chain (a bound method gives its function) down to one of the
    functions in `stop`; None if the chain ends elsewhere."""
    fn = getattr(fn, "__func__", fn)
    while fn not in stop:
        if not hasattr(fn, "__wrapped__"):
            return None
        fn = getattr(fn.__wrapped__, "__func__", fn.__wrapped__)
    return fn


def _install_forward(lm) -> None:
    """Make `lm.forward` our forward, keeping instance-level wrappers accelerate added around the
    class forward (HF Trainer prepares the model with autocast + fp32 outputs when bf16/fp16)."""
    current = lm.__dict__.get("forward")
    class_forward = getattr(type(lm).forward, "__func__", type(lm).forward)
    found = None if current is None else _unwrapped(current, (_patched_forward, class_forward))
    if found is _patched_forward:
        return  # already ours (possibly inside accelerate's wrappers): keep them
    ours = types.MethodType(_patched_forward, lm)
    if current is None:
        lm.forward = ours
        return
    if found is None:
        raise ValueError(
            f"apply_kernels: {type(lm).__name__}.forward was replaced on the instance by "
            f"{current!r}, which does not wrap the class forward; apply the kernels first"
        )
    lm.forward = types.MethodType(_rewrap(current, class_forward, _patched_forward), lm)
    if "_original_forward" in lm.__dict__:  # accelerate unwraps down to this one
        lm._original_forward = ours


def _rewrap(current, class_forward, fn):
    """Rebuild accelerate's wrappers of `current` down to `class_forward` (outermost first:
    convert_outputs_to_fp32, autocast) around function `fn`; any other wrapper is refused."""
    from accelerate.utils.operations import ConvertOutputsToFp32, convert_outputs_to_fp32

    layers, f = [], getattr(current, "__func__", current)
    while f is not class_forward:
        code = getattr(f, "__code__", None)
        cells = dict(zip(code.co_freevars, f.__closure__ or ())) if code is not None else {}
        inner = cells["model_forward"].cell_contents if "model_forward" in cells else None
        if isinstance(inner, ConvertOutputsToFp32):
            layers.append(convert_outputs_to_fp32)
            f = inner.model_forward
        elif isinstance(f, ConvertOutputsToFp32):
            layers.append(convert_outputs_to_fp32)
            f = f.model_forward
        elif "autocast_instance" in cells:
            layers.append(cells["autocast_instance"].cell_contents)  # autocast(...)(fn)
            f = f.__wrapped__
        else:
            raise ValueError(f"apply_kernels: cannot re-wrap the forward wrapper {f!r}")
        f = getattr(f, "__func__", f)
    for wrap in reversed(layers):
        fn = wrap(fn)
    return fn


def _packing_kwargs(input_ids, attention_mask, position_ids, cu_seqlens, max_seqlen, kwargs):
    """Add the varlen boundaries to `kwargs` once per forward (see apply_kernels: attention)."""
    if attention_mask is not None or "cu_seq_lens_q" in kwargs:
        return  # padded batch (SDPA takes over) or a flattening collator's own boundaries
    from r7b_fast.hf_attention import packed_kwargs

    if position_ids is None and cu_seqlens is None and input_ids is not None:
        B, T = input_ids.shape  # one sequence per row, known without reading the device
        cu_seqlens = torch.arange(0, B * T + 1, T, device=input_ids.device, dtype=torch.int32)
        max_seqlen = T
    if position_ids is None and cu_seqlens is None:
        return
    kwargs.update(packed_kwargs(position_ids, cu_seqlens, max_seqlen=max_seqlen))


# Decoders whose forward takes a prepared {layer type: mask} mapping as `attention_mask`
# (transformers 5.17 and 5.24): given one, they skip building masks, and with it an eager host
# read per mask type (masking_utils.find_packed_sequence_indices checks position_ids for packing).
_MASK_MAPPING_TYPES = frozenset({"cohere2", "qwen2"})


def _no_mask_mapping(lm, kwargs):
    """{layer type: None} for a packed forward of a decoder that accepts a mask mapping (our
    varlen attention reads the boundaries, never a mask), else None (HF builds its masks).
    Not with a KV cache: generation falls back to SDPA, which needs HF's masks."""
    types_ = getattr(lm.config, "layer_types", None)
    if (lm.config.model_type not in _MASK_MAPPING_TYPES or not types_ or "cu_seq_lens_q" not in kwargs
            or kwargs.get("past_key_values") is not None or kwargs.get("use_cache")):  # fmt: skip
        return None
    return dict.fromkeys(types_)


def _patched_forward(self, input_ids=None, attention_mask=None, position_ids=None, **kwargs):
    state = self._r7b_kernels
    cu_seqlens = kwargs.pop("cu_seqlens", None)  # the packer's boundaries (see apply_kernels)
    max_seqlen = kwargs.pop("max_seqlen", None)
    targets = kwargs.pop("targets", None)
    target_rows = kwargs.pop("target_rows", None)
    if state["attention"]:
        _packing_kwargs(input_ids, attention_mask, position_ids, cu_seqlens, max_seqlen, kwargs)
        if attention_mask is None:
            attention_mask = _no_mask_mapping(self, kwargs)
    labels = kwargs.get("labels")
    wants_loss = targets is not None or (labels is not None and self.training)
    if state["loss"] and wants_loss and input_ids is None:
        warn_once(state["warned"], "inputs_embeds",
                  "inputs_embeds without input_ids: the fused loss needs input_ids; "
                  "ran the HF forward (logits materialised)")  # fmt: skip
        wants_loss = False
    if not state["loss"] or not wants_loss:
        if targets is not None:
            raise ValueError("targets= needs apply_kernels(loss=True) and input_ids")
        return type(self).forward(self, input_ids=input_ids, attention_mask=attention_mask,
                                  position_ids=position_ids, **kwargs)  # fmt: skip
    _check_head(self)
    if position_ids is None:
        position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)
        position_ids = position_ids.expand_as(input_ids)
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    for key in ("use_cache", "logits_to_keep", "return_dict", "output_attentions",
                "output_hidden_states", "inputs_embeds"):  # fmt: skip
        kwargs.pop(key, None)  # HF/PEFT pass these; nothing to return but log-probs
    if targets is not None:
        kwargs.pop("labels", None)
        kwargs.pop("num_items_in_batch", None)
        token_logps = _token_logps(self, input_ids, position_ids, targets, state["backend"], kwargs,
                                   rows=target_rows)  # fmt: skip
        # a fresh tensor, not a view: FSDP2 hooks the root output for backward
        return TokenLogpsOutput(token_logps=token_logps.clone())
    return _hf_labels_loss(self, input_ids, position_ids, kwargs, state["backend"])


def _check_head(lm) -> None:
    """The fused loss reads `lm_head.weight` directly: a PEFT-wrapped head (LoRA on lm_head,
    modules_to_save) would be silently skipped, so it is refused."""
    if type(lm.lm_head) is not torch.nn.Linear:
        raise ValueError(
            f"apply_kernels(loss=True): lm_head is a {type(lm.lm_head).__name__}, not a plain "
            "nn.Linear (LoRA/modules_to_save on lm_head); the fused loss would skip it"
        )


def _token_logps(lm, input_ids, position_ids, targets, backend, kwargs, rows=None):
    """fp32 [B, T] log p(targets). Eager: `losses.token_logps` (only trained rows reach the
    kernel: `rows`, their indices from the packer, or found there with one host sync). Under
    torch.compile every row goes in with ignore_index instead: static shapes, no graph break,
    the same values (0 where ignored)."""
    from r7b_fast import losses

    if not torch.compiler.is_compiling():  # "head": r7b_fast.compile's compiled linear_logprobs
        head = lm._r7b_kernels.get("head")
        return losses.token_logps(lm, input_ids, position_ids, targets, backend=backend,
                                  head=head, rows=rows, **kwargs)  # fmt: skip
    from r7b_fast.kernels.fused_logprobs import linear_logprobs

    hidden = lm.model(
        input_ids=input_ids, position_ids=position_ids, use_cache=False, **kwargs
    ).last_hidden_state
    scale = getattr(lm.config, "logit_scale", None) or 1.0
    logp = linear_logprobs(hidden.reshape(-1, hidden.shape[-1]), lm.lm_head.weight,
                           targets.reshape(-1), scale=float(scale), ignore_index=IGNORE_INDEX,
                           backend=backend)  # fmt: skip
    return logp.float().view(targets.shape)


def _hf_labels_loss(lm, input_ids, position_ids, kwargs, backend):
    """HF-convention loss: labels[b, t] is predicted from position t - 1 (shifted here)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    labels = kwargs.pop("labels")
    num_items = kwargs.pop("num_items_in_batch", None)
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    token_logps = _token_logps(lm, input_ids, position_ids, targets, backend, kwargs)
    count = num_items if num_items is not None else (targets != IGNORE_INDEX).sum()
    loss = -token_logps.sum() / torch.as_tensor(count, device=token_logps.device).clamp(min=1)
    return CausalLMOutputWithPast(loss=loss, logits=None)
