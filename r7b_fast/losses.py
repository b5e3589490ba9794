"""Losses on top of `linear_logprobs`: token log-probs from a decoder, SFT and DPO.

    logp = token_logps(model, input_ids, position_ids, targets)          # (B, T) fp32, 0 off-target
    loss = sft_loss(logp, targets, num_target_tokens=global_count)       # exact under accumulation
    seq = sequence_logps(logp.flatten(), seq_ids.flatten(), num_seqs)    # (S,) per packed sequence
    loss, metrics = dpo_loss(seq[chosen], seq[rejected], ref[chosen], ref[rejected], beta=0.1)

Nothing here materialises the [tokens, vocab] logits: hidden states go straight into the fused
kernel with the lm_head weight (tied to the embedding for Command R7B) and `config.logit_scale`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from r7b_fast.kernels.fused_logprobs import linear_logprobs

IGNORE_INDEX = -100
DPO_KINDS = ("sigmoid", "ipo", "hinge", "robust", "sigmoid_norm")


def token_logps(model, input_ids, position_ids, targets, *, backend="auto", head=None,
                rows=None, **model_kwargs):  # fmt: skip
    """Log-prob of each target token under `model`, without computing the logits.

    Args:
        model: an HF causal LM with `.model` (the decoder) and `.lm_head` (e.g. Cohere2ForCausalLM).
        input_ids, position_ids, targets: (B, T) int64; targets are already shifted (the token to
            predict at each position) and -100 where nothing is trained.
        backend: passed to `linear_logprobs`; model_kwargs go to `model.model(...)` (e.g. the
            packed-attention kwargs).
        head: called instead of `linear_logprobs` (same arguments), e.g. the compiled one that
            r7b_fast.compile installs; None: `linear_logprobs`.
        rows: int64 indices of the trained tokens (targets != -100) in the flattened (B*T)
            targets, on the model's device, e.g. from the packer (`train_data.collate` computes
            them on the host); None: computed here with `nonzero` (a host sync on CUDA).
    Returns:
        fp32 (B, T): log p(targets[b, t]) where targets != -100, else 0; differentiable.
    """
    if input_ids.shape != targets.shape or position_ids.shape != targets.shape:
        raise ValueError(
            f"input_ids {tuple(input_ids.shape)}, position_ids {tuple(position_ids.shape)} and "
            f"targets {tuple(targets.shape)} must have the same (B, T) shape"
        )
    out = model.model(
        input_ids=input_ids, position_ids=position_ids, use_cache=False, **model_kwargs
    )
    hidden = out.last_hidden_state  # (B, T, H)
    flat_t = targets.reshape(-1)
    if rows is None:  # only trained tokens reach the kernel
        rows = (flat_t != IGNORE_INDEX).nonzero().squeeze(1)
    scale = getattr(model.config, "logit_scale", None) or 1.0
    picked = (head or linear_logprobs)(
        hidden.reshape(-1, hidden.shape[-1])[rows],
        model.lm_head.weight,
        flat_t[rows],
        scale=float(scale),
        backend=backend,
    )
    logp = torch.zeros(flat_t.numel(), device=picked.device, dtype=torch.float32)
    return logp.index_put((rows,), picked.float()).view(targets.shape)


def sequence_logps(token_logps, seq_ids, num_seqs: int):
    """Sum of token log-probs per packed sequence.

    token_logps: fp32 (T,) (any shape; flattened), seq_ids: int64 of the same shape, the
    sequence index in [0, num_seqs) or -1 for padding. Returns fp32 (num_seqs,); differentiable."""
    if token_logps.shape != seq_ids.shape:
        raise ValueError(
            f"token_logps {tuple(token_logps.shape)} and seq_ids {tuple(seq_ids.shape)} differ"
        )
    if seq_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"seq_ids must be int64, got {seq_ids.dtype}")
    lp, ids = token_logps.reshape(-1), seq_ids.reshape(-1).long()
    if bool(((ids < -1) | (ids >= num_seqs)).any()):
        raise ValueError(f"seq_ids must lie in [-1, num_seqs={num_seqs})")
    keep = ids >= 0
    out = torch.zeros(num_seqs, device=lp.device, dtype=torch.float32)
    return out.index_add(0, ids[keep], lp[keep].float())


def sft_loss(token_logps, targets, num_target_tokens, ignore_index: int = IGNORE_INDEX):
    """-sum(log p over targets != ignore_index) / num_target_tokens.

    num_target_tokens is the GLOBAL count over all micro-batches (and ranks) of one optimizer
    step, so k micro-batches each backpropagated and summed equal one large batch exactly."""
    if token_logps.shape != targets.shape:
        raise ValueError(
            f"token_logps {tuple(token_logps.shape)} and targets {tuple(targets.shape)} differ"
        )
    if float(num_target_tokens) <= 0:
        raise ValueError(f"num_target_tokens must be > 0, got {num_target_tokens}")
    mask = targets != ignore_index
    return -(token_logps * mask).sum() / num_target_tokens


def _check_dpo(pc, pr, rc, rr, beta, kind, label_smoothing, chosen_lengths, rejected_lengths):
    shapes = {n: tuple(t.shape) for n, t in zip(("policy_chosen", "policy_rejected", "ref_chosen",
                                                 "ref_rejected"), (pc, pr, rc, rr))}  # fmt: skip
    if len(set(shapes.values())) != 1 or pc.dim() != 1:
        raise ValueError(f"dpo_loss needs four 1-D tensors of one shape (pairs,), got {shapes}")
    if kind not in DPO_KINDS:
        raise ValueError(f"kind must be one of {DPO_KINDS}, got {kind!r}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if kind == "robust" and not 0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5) for 'robust', got {label_smoothing}")
    if kind == "sigmoid" and not 0 <= label_smoothing <= 1:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if kind in ("ipo", "hinge", "sigmoid_norm") and label_smoothing != 0:
        raise ValueError(f"label_smoothing is not used by kind={kind!r}; got {label_smoothing}")
    if kind in ("ipo", "sigmoid_norm"):
        for name, n in (("chosen_lengths", chosen_lengths), ("rejected_lengths", rejected_lengths)):
            if n is None or tuple(n.shape) != tuple(pc.shape):
                got = None if n is None else tuple(n.shape)
                raise ValueError(f"kind={kind!r} averages over tokens: {name} of shape "
                                 f"{tuple(pc.shape)} is required, got {got}")  # fmt: skip
            if bool((n <= 0).any()):
                raise ValueError(f"{name} must be > 0")


def dpo_loss(
    policy_chosen,
    policy_rejected,
    ref_chosen,
    ref_rejected,
    *,
    beta: float = 0.1,
    kind: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths=None,
    rejected_lengths=None,
    sft_weight: float = 0.0,
    chosen_token_count=None,
):
    """DPO loss over pairs of sequence log-probs (all fp32 (P,), summed over each sequence's
    target tokens; refs from `reference_logps`, no grad).

    With m = (pc - rc) - (pr - rr), the loss is the mean over pairs of
      sigmoid:      -logsigmoid(beta m) (1 - ls) - logsigmoid(-beta m) ls   (ls = label_smoothing)
      ipo:          (m - 1 / (2 beta))^2          on per-token averages (TRL averages for IPO)
      hinge:        relu(1 - beta m)
      robust:       ((1 - ls)(-logsigmoid(beta m)) + ls logsigmoid(-beta m)) / (1 - 2 ls)
      sigmoid_norm: sigmoid on per-token averages (each log-prob / its sequence length)
    "Per-token averages" divide chosen values by chosen_lengths and rejected ones by
    rejected_lengths (target-token counts, (P,)), required for those kinds.
    sft_weight > 0 adds sft_weight * -sum(pc) / chosen_token_count (default sum(chosen_lengths)).

    Returns (loss, metrics): metrics are detached 0-d fp32 tensors named as TRL names them, means
    over the pairs of the values the loss uses: rewards/chosen = beta (pc - rc), rewards/rejected
    = beta (pr - rr), rewards/margins, rewards/accuracies (chosen reward > rejected reward),
    logps/chosen = pc, logps/rejected = pr."""
    pc, pr, rc, rr = (t.float() for t in (policy_chosen, policy_rejected, ref_chosen, ref_rejected))
    _check_dpo(pc, pr, rc, rr, beta, kind, label_smoothing, chosen_lengths, rejected_lengths)
    if kind in ("ipo", "sigmoid_norm"):
        nc, nr = chosen_lengths.float(), rejected_lengths.float()
        pc, rc, pr, rr = pc / nc, rc / nc, pr / nr, rr / nr
    chosen_r, rejected_r = beta * (pc - rc), beta * (pr - rr)
    m = (pc - rc) - (pr - rr)
    ls = label_smoothing
    if kind in ("sigmoid", "sigmoid_norm"):
        losses = -F.logsigmoid(beta * m) * (1 - ls) - F.logsigmoid(-beta * m) * ls
    elif kind == "ipo":
        losses = (m - 1 / (2 * beta)) ** 2
    elif kind == "hinge":
        losses = torch.relu(1 - beta * m)
    else:  # robust
        losses = ((1 - ls) * -F.logsigmoid(beta * m) + ls * F.logsigmoid(-beta * m)) / (1 - 2 * ls)
    loss = losses.mean()
    if sft_weight:
        count = chosen_token_count
        if count is None:
            if chosen_lengths is None:
                raise ValueError("sft_weight > 0 needs chosen_token_count or chosen_lengths")
            count = chosen_lengths.sum()
        loss = loss - sft_weight * policy_chosen.float().sum() / count
    with torch.no_grad():
        metrics = {
            "rewards/chosen": chosen_r.mean(),
            "rewards/rejected": rejected_r.mean(),
            "rewards/margins": (chosen_r - rejected_r).mean(),
            "rewards/accuracies": (chosen_r > rejected_r).float().mean(),
            "logps/chosen": pc.mean(),
            "logps/rejected": pr.mean(),
        }
    return loss, {k: v.detach() for k, v in metrics.items()}


def reference_logps(model, input_ids, position_ids, targets, seq_ids, num_seqs: int, **kw):
    """Per-sequence target log-probs of a frozen model: fp32 (num_seqs,), no grad.

    Same inputs as `token_logps` ((B, T), or (T,) for one packed row) plus seq_ids (same shape,
    -1 = padding); `kw` goes to `token_logps` (backend, model kwargs). The model runs in eval
    mode (no dropout); its previous training mode is restored afterwards."""
    if input_ids.dim() == 1:
        input_ids, position_ids, targets, seq_ids = (
            t.unsqueeze(0) for t in (input_ids, position_ids, targets, seq_ids)
        )
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            lp = token_logps(model, input_ids, position_ids, targets, **kw)
            return sequence_logps(lp, seq_ids, num_seqs)
    finally:
        model.train(was_training)
