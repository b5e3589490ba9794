"""Run logging: a tqdm bar (rank 0), JSONL metrics, TensorBoard; FLOPs and MFU.

`metrics.jsonl` has one JSON object per line: `{"event": "start", "config": ..., "versions": ...}`
first, then `{"step": s, "loss": ..., "lr": ..., "grad_norm": ..., "tokens_per_s": ..., "mfu":
..., ...}` per logged step (DPO stages add TRL's names: `rewards/chosen`, `rewards/rejected`,
`rewards/margins`, `rewards/accuracies`, `logps/chosen`, `logps/rejected`), and other events
(`{"event": "round", ...}`, `{"event": "error", ...}`). The trainer hands `log` python numbers
read back from the device once per logging interval (r7b_fast.step_metrics): each record's
loss, grad_norm, tokens and metrics are its own step's; `tokens_per_s`, `step_s` and `mfu` are
averages over the interval the step closes (timing one step would need a sync per step). A
tensor given to `log` is read with `.item()` (one sync each). Only rank 0 writes. A resumed run
keeps each step once: `resumed_at(step)` drops the records of the steps after the resumed
checkpoint (an interrupted attempt's) from metrics.jsonl and purges them from TensorBoard.
"""

from __future__ import annotations

import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

# Dense bf16 tensor-core peak (vendor datasheets, FLOP/s, no sparsity) by a substring of the
# device name, for MFU (the trainer's and the benchmarks'). First match wins, so the more
# specific names come first.
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("A10", 125e12),
)


def peak_flops(device, override_tflops: float = 0.0) -> float | None:
    """Peak FLOP/s of `device`: `override_tflops` if > 0, else the table by GPU name; None on a
    CPU or an unknown card."""
    if override_tflops > 0:
        return override_tflops * 1e12
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16_FLOPS:
        if key in name:
            return flops
    return None


def flops_per_token(config, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3 x forward) of a Cohere2/Llama config.

    Matmuls: 6 x (per-layer q, k, v, o and gated-MLP weights x layers + the vocab projection,
    which runs even when tied). Attention scores and values: 6 x 2 x layers x heads x head_dim x
    the mean causal context, seq_len/2, or min(window, seq_len/2) on sliding-window layers.
    """
    h, layers = config.hidden_size, config.num_hidden_layers
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    kv = config.num_key_value_heads
    per_layer = h * heads * head_dim * 2 + h * kv * head_dim * 2 + 3 * h * config.intermediate_size
    matmul = layers * per_layer + config.vocab_size * h
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None) or ["full_attention"] * layers
    ctx = 0.0
    for kind in layer_types:
        full = seq_len / 2
        ctx += min(window, full) if (kind == "sliding_attention" and window) else full
    attention = 2 * 2 * heads * head_dim * ctx
    return 3 * (2 * matmul + attention)


def versions() -> dict:
    import transformers

    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
    }
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
    return out


def _jsonable(value):
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsLogger:
    """Writes metrics on rank 0 (JSONL + TensorBoard + progress bar); a no-op on other ranks."""

    def __init__(self, out_dir, *, enabled: bool, tensorboard: bool, progress_bar: bool):
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self._tb = None
        self._bar = None
        if not enabled:
            return
        self._file = open(self.path, "a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:  # tensorboard is the `train` extra, not a core dependency
                raise ImportError(
                    "logging.tensorboard=true needs TensorBoard: pip install 'r7b-fast[train]' "
                    "(or set logging.tensorboard=false)"
                ) from e

            self._tb = SummaryWriter(str(Path(out_dir) / "tb"))
        self._want_bar = progress_bar

    def start_bar(self, total: int, initial: int, desc: str) -> None:
        if self.enabled and self._want_bar:
            from tqdm import tqdm

            self.close_bar()
            self._bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)

    def close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def event(self, name: str, **fields) -> None:
        if self.enabled:
            record = {"event": name, "time": time.time(), **fields}
            self._file.write(json.dumps(record, default=str, ensure_ascii=False) + "\n")

    def log(self, step: int, metrics: dict, *, prefix: str = "train") -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(f"{prefix}/{k}", v, step)
        if self._bar is not None:
            shown = {k: record[k] for k in ("loss", "lr", "tokens_per_s") if k in record}
            self._bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items()}, refresh=False)

    def resumed_at(self, step: int) -> None:
        """The run continues after optimizer step `step` (a resumed checkpoint): drop the step
        records after it that an interrupted attempt logged, so each step appears once in
        metrics.jsonl (events are kept), and purge them from TensorBoard (purge_step)."""
        if not self.enabled:
            return
        self._file.close()
        kept = []
        for line in self.path.read_text().splitlines(keepends=True):
            try:
                rec = json.loads(line)
            except ValueError:  # a line cut by a kill mid-write
                continue
            if "event" in rec or rec.get("step", 0) <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(kept))
        tmp.replace(self.path)
        self._file = open(self.path, "a", buffering=1)
        if self._tb is not None:
            from torch.utils.tensorboard import SummaryWriter

            log_dir = self._tb.log_dir
            self._tb.close()
            self._tb = SummaryWriter(log_dir, purge_step=step + 1)

    def scalars(self, step: int, values: dict, *, prefix: str) -> None:
        """TensorBoard-only scalars (e.g. per-round stats, which metrics.jsonl has as events)."""
        if self.enabled and self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(f"{prefix}/{k}", _jsonable(v), step)

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def message(self, text: str) -> None:
        """A line for the user on rank 0 (printed without breaking the progress bar)."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled:
            self.close_bar()
            if self._tb is not None:
                self._tb.close()
            self._file.close()
