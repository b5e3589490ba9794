"""The training loop's per-step values, kept on the device and read back once per interval.

`train_steps` (r7b_fast.train) hands each optimizer step's values to a `StepWindow` as device
tensors (loss, gradient norm, tokens, metric sums: no `.item()`, so the host never waits for
the device inside a step) and reads them back at read-back points (logging.every_steps,
checkpoints, eval, the last step): one `torch.stack(...).tolist()` for all the steps since the
previous read-back. The wall time is measured per interval too (between read-backs; a per-step
time would need a sync per step), so tokens/s, step_s and MFU are interval averages (the
first interval of a run lacks one optimizer step: the clock runs from sync to sync).

Non-finite steps. The read-back comes before its step's optimizer step, so a NaN/Inf loss or
gradient norm found there stops the run (r7b_fast.train.check_finite: exit 3, naming the first
bad step) before any checkpoint, eval, metrics record or HF export, which all happen at
read-back points. Between read-backs the optimizer step cannot wait for the check; the
trade-off, per optimizer:
  - an optimizer that takes `found_inf` (fused AdamW, the CUDA default; the mechanism
    torch.amp.GradScaler uses) skips the step on the device (`optimizer_step`): the live
    weights and the optimizer state stay the last finite step's;
  - the others (foreach / for-loop AdamW, the CPU default) cannot skip without a sync, so they
    take it: the live weights are bad from that step until the read-back stops the run, and
    are never saved.
logging.every_steps=1 makes every step a read-back: every optimizer step is checked first (the
behaviour of a per-step sync).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

FIXED = ("loss", "grad_norm", "tokens")
"""The first columns of every step's row; the stage's metrics (TRL names) follow."""


@dataclass
class StepRecord:
    """One optimizer step's values as read back (python numbers)."""

    step: int
    lr: float
    values: dict[str, float]

    @property
    def finite(self) -> bool:
        return math.isfinite(self.values["loss"]) and math.isfinite(self.values["grad_norm"])


@dataclass
class StepWindow:
    """The steps since the last read-back: their values as device rows, their lrs, the clock.

    `flops_per_token` and `peak` (FLOP/s per device, None: no MFU) give MFU, over `world_size`
    devices. `excluded` is time inside the interval that is not training (eval passes,
    checkpoint saves; the loop adds it with `exclude`)."""

    world_size: int
    flops_per_token: float
    peak: float | None
    steps: list[int] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    rows: list[torch.Tensor] = field(default_factory=list)
    names: tuple[str, ...] = FIXED
    t0: float = field(default_factory=time.perf_counter)
    excluded: float = 0.0

    def add(self, step: int, lr: float, loss, grad_norm, tokens, metrics: dict) -> torch.Tensor:
        """Record step `step` (all tensors 0-d on one device, already global over ranks); returns
        the step's finite flag (a 0-d bool tensor on the device: nothing is read)."""
        self.names = FIXED + tuple(metrics)
        parts = [loss, grad_norm, tokens, *metrics.values()]
        # float64: token counts stay exact past 2**24 per step
        self.rows.append(torch.stack([t.detach().reshape(()).double() for t in parts]))
        self.steps.append(step)
        self.lrs.append(lr)
        return torch.isfinite(self.rows[-1][:2]).all()

    def exclude(self, seconds: float) -> None:
        self.excluded += seconds

    def read_back(self) -> tuple[list[StepRecord], float]:
        """The recorded steps as python numbers (ONE device read for all of them) and the
        interval's training seconds (from the previous read-back to this one, minus `exclude`d
        time); the window starts a new interval."""
        values = torch.stack(self.rows).tolist() if self.rows else []
        now = time.perf_counter()
        seconds = max(now - self.t0 - self.excluded, 1e-9)
        records = [StepRecord(step, lr, dict(zip(self.names, row)))
                   for step, lr, row in zip(self.steps, self.lrs, values)]  # fmt: skip
        self.steps, self.lrs, self.rows = [], [], []
        self.t0, self.excluded = now, 0.0
        return records, seconds

    def log_values(self, record: StepRecord, records: list[StepRecord], seconds: float) -> dict:
        """metrics.jsonl's fields for `record` (one of `records`, read back together over
        `seconds`): its own loss, grad_norm, tokens and metrics; tokens_per_s, step_s and mfu
        as the interval's averages."""
        v = record.values
        tokens_per_s = sum(r.values["tokens"] for r in records) / seconds
        out = {"loss": v["loss"], "lr": record.lr, "grad_norm": v["grad_norm"],
               "tokens": v["tokens"], "tokens_per_s": tokens_per_s,
               "step_s": seconds / len(records)}  # fmt: skip
        if self.peak:
            out["mfu"] = tokens_per_s * self.flops_per_token / (self.peak * self.world_size)
        out.update({k: v[k] for k in self.names[len(FIXED) :]})
        return out


def reduce_step(loss_sum, tokens, metric_sums: dict, denom, dist) -> tuple:
    """(loss, tokens, metrics) summed over ranks in ONE all-reduce (no host read): this rank's
    loss sum and real-token count, and its metric sums divided by the step's global count
    `denom[0]` (TRL's per-pair means for DPO)."""
    from r7b_fast import distributed

    parts = [loss_sum, tokens, *metric_sums.values()]
    total = distributed.all_reduce_sum(torch.stack([t.reshape(()).double() for t in parts]), dist)
    scale = denom.reshape(-1)[0].double()
    metrics = {k: total[2 + i] / scale for i, k in enumerate(metric_sums)}
    return total[0], total[1], metrics


def optimizer_step(optimizer, finite: torch.Tensor | None) -> None:
    """`optimizer.step()`, skipped ON THE DEVICE when `finite` (a 0-d bool tensor) is False and
    the optimizer takes torch.amp.GradScaler's `found_inf` (fused AdamW: the update and the step
    count are left as they were, nothing is read on the host). Other optimizers (foreach /
    for-loop AdamW) step regardless; `finite=None` (the flag was already checked): a plain step."""
    if finite is None or not getattr(optimizer, "_step_supports_amp_scaling", False):
        optimizer.step()
        return
    optimizer.found_inf = (~finite).float()  # read by the fused kernel on the device
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf
