"""AdamW and the learning-rate schedule (linear warmup, then cosine/linear decay or constant)."""

from __future__ import annotations

import math

import torch

from r7b_fast.config import Config


def build_optimizer(cfg: Config, model, total_steps: int):
    """AdamW (fused on CUDA; no decay on 1-D params) and a warmup + cosine/linear/constant schedule."""
    o = cfg.optim
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": o.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    fused = next(model.parameters()).device.type == "cuda"
    optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=fused)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, cfg)
    )
    return optimizer, scheduler


def lr_factor(step: int, total_steps: int, cfg: Config) -> float:
    """LR multiplier before optimizer step `step` (0-based): linear warmup, then decay to
    `min_lr_ratio` at the last step."""
    o = cfg.optim
    if step < o.warmup_steps:
        return (step + 1) / (o.warmup_steps + 1)
    if o.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - o.warmup_steps) / max(1, total_steps - o.warmup_steps - 1))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if o.schedule == "cosine" else 1 - progress
    return o.min_lr_ratio + (1 - o.min_lr_ratio) * shape
