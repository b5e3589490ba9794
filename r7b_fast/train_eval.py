"""Held-out loss during training (`eval.every_steps`): the stage's own loss on the eval split.

The eval split is `data.eval` (files with the training schema), or for synthetic data the split
r7b_fast.data.synthetic generates next to the training one (prompts never in train): the
family's eval.jsonl for sft, preference rows drawn from the same eval split for dpo (written to
out/data/<family>/pref_eval.jsonl). DPO eval rows get reference log-probs from the model the
stage started from (computed once, stored in out/reference/eval.pt like the training ones).

The value is the training loss function itself over ALL eval rows as one step: `sft_loss` /
`dpo_loss` with the eval split's global normalisers (target tokens; pairs and chosen tokens),
so SFT reports the token-mean NLL and DPO the DPO loss (+ its SFT term) and the reward
accuracy, comparable with the training curve. Rank r evaluates rows r, r+W, ... (every rank
runs the same number of forwards, as FSDP needs) and the sums are all-reduced.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from r7b_fast import distributed
from r7b_fast.config import Config, ConfigError


def eval_files(cfg: Config, out: Path, dist: distributed.Dist) -> list[str]:
    """`data.eval`, or the generated eval split of each synthetic family (dpo: written here)."""
    if cfg.data.eval:
        return list(cfg.data.eval)
    from r7b_fast.data.synthetic import preference_rows, write_jsonl

    d = cfg.data
    if d.synthetic_eval < 1:
        raise ConfigError("eval.every_steps: needs data.synthetic_eval > 0 (the eval split)")
    files = []
    for fam in d.synthetic_families:
        if cfg.run.stage == "sft":
            files.append(str(out / "data" / fam / "eval.jsonl"))
            continue
        path = out / "data" / fam / "pref_eval.jsonl"
        if dist.is_main:
            write_jsonl(preference_rows(fam, d.synthetic_eval, cfg.run.seed, "eval"), path)
        files.append(str(path))
    distributed.barrier(dist)
    return files


def prepare_eval(s, count_fn):
    """(packed eval rows (DPO: with reference log-probs), their global normaliser) for Session
    `s`, or (None, None) when eval.every_steps is 0. Call before the first training step."""
    from r7b_fast.train_data import SOURCE_KIND, collate, load_checked, pack_rows, reference_rows

    cfg = s.cfg
    if not cfg.eval.every_steps:
        return None, None
    kw = {"tokenizer": s.tokenizer, "max_len": cfg.data.max_tokens}
    rows = []
    for i, path in enumerate(eval_files(cfg, s.out, s.dist)):
        rows += load_checked(cfg, f"data.eval[{i}]", path, SOURCE_KIND[cfg.run.stage], kw)[0]
    packed = pack_rows(cfg, s.tokenizer, rows)
    if cfg.run.stage != "sft":
        packed = reference_rows(s, packed, s.out / "reference" / "eval.pt")
    counts = [count_fn(collate([packed.row(i)], "cpu")) for i in range(len(packed))]
    denom = torch.stack(counts).sum(0).double().clamp(min=1).float().to(s.dist.device)
    s.logger.message(f"eval: {len(rows)} rows in {len(packed)} packed rows, every "
                     f"{cfg.eval.every_steps} steps")  # fmt: skip
    return packed, denom


@torch.no_grad()
def evaluate(s, packed, denom, loss_fn, step: int) -> dict:
    """The stage's loss over every eval row (see the module docstring); logged as the `eval`
    event in metrics.jsonl and eval/* in TensorBoard. Returns {"loss"[, "accuracy"]}."""
    from r7b_fast.train_data import autocast, collate

    model, dist = s.model, s.dist
    t0 = time.perf_counter()
    model.eval()
    n, world = len(packed), dist.world_size
    loss_sum = torch.zeros((), device=dist.device)
    acc_sum = torch.zeros((), device=dist.device)
    for k in range(-(-n // world)):
        i = k * world + dist.rank
        real = float(i < n)  # a repeated last row keeps every rank in the same forwards
        batch = collate([packed.row(min(i, n - 1))], dist.device)
        with autocast(s):
            loss, metrics = loss_fn(model, batch, denom, s.cfg)
        loss_sum += real * loss.float()
        if "rewards/accuracies" in metrics:
            acc_sum += real * metrics["rewards/accuracies"].to(acc_sum.device)
    model.train()
    out = {"loss": distributed.all_reduce_sum(loss_sum, dist).item()}
    if s.cfg.run.stage != "sft":
        out["accuracy"] = (distributed.all_reduce_sum(acc_sum, dist) / denom[0]).item()
    s.logger.event("eval", step=step, **{f"eval/{k}": v for k, v in out.items()})
    s.logger.scalars(step, out, prefix="eval")
    shown = ", ".join(f"{k} {v:.4f}" for k, v in out.items())
    s.logger.message(f"eval at step {step}: {shown} ({time.perf_counter() - t0:.1f} s)")
    return out
