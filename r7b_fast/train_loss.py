"""Each stage's loss on one micro-batch, as r7b_fast.train's step loop calls it.

A stage is `(count_fn, loss_fn)` (`STAGE_LOSS`): `count_fn(batch)` gives the micro-batch's
normaliser units (summed over the step's micro-batches and ranks before the first forward),
`loss_fn(model, batch, denom, cfg)` returns (this micro-batch's share of the step loss, TRL
metrics as sums). See r7b_fast.train's docstring for the exact averaging.
"""

from __future__ import annotations

import torch

from r7b_fast.config import Config


def packed_forward(model, batch: dict) -> torch.Tensor:
    """fp32 [1, T] log p(target) of a collated micro-batch: the packer's boundaries and longest
    sequence (`max_seqlen`, a python int) and the trained tokens' indices (`target_rows`) go to
    the model, so nothing is read from the device to size attention or the head."""
    return model(
        batch["input_ids"], position_ids=batch["position_ids"], targets=batch["targets"],
        cu_seqlens=batch["cu_seqlens"], max_seqlen=batch["max_seqlen"],
        target_rows=batch.get("target_rows"),
    ).token_logps  # fmt: skip


def sequence_sums(token_logps, seq_ids, num_seqs: int) -> torch.Tensor:
    """fp32 [num_seqs]: losses.sequence_logps without its host reads (an id range check and a
    boolean index, each a device sync per micro-batch): padding tokens (id -1) add into one
    extra slot, dropped. collate's seq_ids are in range by construction."""
    ids = seq_ids.reshape(-1).long()
    ids = torch.where(ids >= 0, ids, num_seqs)
    out = torch.zeros(num_seqs + 1, device=token_logps.device, dtype=torch.float32)
    return out.index_add(0, ids, token_logps.reshape(-1).float())[:num_seqs]


def sft_count(batch: dict) -> torch.Tensor:
    """Normalizer units in a micro-batch for SFT: trained target tokens."""
    return (batch["targets"] != -100).sum()


def sft_loss(model, batch: dict, denom: torch.Tensor, cfg: Config):
    """-sum(log p(target)) / denom (denom = the step's global target-token count)."""
    token_logps = packed_forward(model, batch)
    # not losses.sft_loss: it checks its count on the host (a device sync per micro-batch);
    # the loop's denom is already clamped >= 1
    mask = batch["targets"] != -100
    return -(token_logps * mask).sum() / denom, {}


def dpo_count(batch: dict) -> torch.Tensor:
    """Normalizer units in a micro-batch for DPO: [preference pairs, chosen target tokens] (the
    DPO term is a mean over the step's pairs, the SFT term a mean over its chosen tokens)."""
    pairs = batch["chosen_index"].numel()
    chosen_tokens = batch["seq_target_tokens"][batch["chosen_index"]].sum()
    # new_full: a fill on the device; as_tensor(int, device=cuda) is a blocking host->device copy
    return torch.stack([chosen_tokens.new_full((), pairs), chosen_tokens])


def dpo_loss(model, batch: dict, denom: torch.Tensor, cfg: Config):
    """losses.dpo_loss on this micro-batch's pairs weighted by pairs / denom[0] (the step's global
    pair count), plus dpo.sft_weight x -sum(chosen log-probs) / denom[1] (the step's GLOBAL
    chosen-token count, so the SFT term, like sft_loss, does not depend on how the step's pairs
    are split over micro-batches and ranks); TRL metrics as sums over pairs."""
    from r7b_fast import losses

    token_logps = packed_forward(model, batch)
    seq_logps = sequence_sums(token_logps[0], batch["seq_ids"][0], batch["num_seqs"])
    chosen, rejected = batch["chosen_index"], batch["rejected_index"]
    ref = batch["ref_logps"]
    lengths = batch["seq_target_tokens"]
    loss, metrics = losses.dpo_loss(
        seq_logps[chosen],
        seq_logps[rejected],
        ref[chosen],
        ref[rejected],
        beta=cfg.dpo.beta,
        kind=cfg.dpo.loss_type,
        label_smoothing=cfg.dpo.label_smoothing,
        chosen_lengths=lengths[chosen],
        rejected_lengths=lengths[rejected],
    )
    n = chosen.numel()
    loss = loss * n / denom[0]
    if cfg.dpo.sft_weight:
        loss = loss - cfg.dpo.sft_weight * seq_logps[chosen].float().sum() / denom[1]
    return loss, {k: v.detach().float() * n for k, v in metrics.items()}


STAGE_LOSS = {"sft": (sft_count, sft_loss), "dpo": (dpo_count, dpo_loss)}
STAGE_LOSS["online_dpo"] = STAGE_LOSS["dpo"]
