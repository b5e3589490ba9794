"""AdamW and the learning-rate schedule (linear warmup, then cosine/linear decay or constant)."""

from __future__ import annotations

import math

import torch

from r7b_fast.config import Config, ConfigError


def build_optimizer(cfg: Config, model, total_steps: int):
    """AdamW (`optim.implementation`; no decay on 1-D params) and a warmup +
    cosine/linear/constant schedule.

    Under FSDP2 the parameters are sharded DTensors: AdamW's `exp_avg`/`exp_avg_sq` are created
    like each parameter, so they are sharded the same way (1/world of the fp32 states per rank)."""
    o = cfg.optim
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": o.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    kwargs = implementation_kwargs(o.implementation, next(model.parameters()).device)
    optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, **kwargs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, cfg)
    )
    return optimizer, scheduler


def implementation_kwargs(implementation: str, device: torch.device) -> dict:
    """`torch.optim.AdamW` keyword arguments for `optim.implementation`: `auto` is `fused` on
    CUDA and `foreach` elsewhere; `fused` on a device torch has no fused AdamW for is a
    ConfigError (torch would raise only at the first step)."""
    if implementation == "auto":
        implementation = "fused" if device.type == "cuda" else "foreach"
    if implementation == "fused":
        from torch.optim.optimizer import _get_fused_kernels_supported_devices

        if device.type not in _get_fused_kernels_supported_devices():
            raise ConfigError(
                f"optim.implementation: fused AdamW is not available on {device.type} in "
                f"torch {torch.__version__}; use foreach or for_loop"
            )
        return {"fused": True}
    if implementation == "foreach":
        return {"foreach": True}
    if implementation == "for_loop":
        return {"foreach": False}
    raise ConfigError(f"optim.implementation: unknown {implementation!r}")


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
