"""No host sync inside a training step (issue #16): the loop reads the device once per logging
interval, and a NaN/Inf still stops the run before anything bad is saved.

The tests run on the CPU, where a read costs no device sync, so they count the Python-level
reads that WOULD sync on CUDA: `.item()`, `.tolist()`, `.cpu()`, `.numpy()` and the
`bool`/`float`/`int`/`index` conversions of a tensor. The device code paths are forced where the
CPU takes its own (`device_paths`): the kernels' value checks and the attention planner read
cu_seqlens on the host only for CPU tensors, and the CPU's default AdamW keeps its step counters
on the host; the test turns those off (the banded attention path, fused AdamW) as on CUDA.
"""

from __future__ import annotations

import collections
import sys
import traceback

import pytest
import torch
from _train_helpers import (  # noqa: F401 (fixtures)
    COMMON,
    latest_checkpoint_model,
    metrics,
    one_thread,
    one_thread_module,
)

from r7b_fast import checkpoint, train
from r7b_fast.config import load_config
from r7b_fast.data.packing import pack_sft
from r7b_fast.train_data import collate

# `nonzero` has a data-dependent output size: on CUDA it waits for the device like a read
READS = ("item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__float__", "__int__",
         "__index__")  # fmt: skip
SFT = ["data.synthetic_families=[digits_ar]", "data.synthetic_train=8", "optim.global_batch=2",
       "optim.micro_batch=1", "logging.tensorboard=false", "checkpoint.export_hf=false"]  # fmt: skip


def run(out, *overrides, config="sft_tiny"):
    train.run(load_config(config, [*COMMON, f"run.output_dir={out}", *SFT, *overrides]))
    return out


class FusedAdamW(torch.optim.AdamW):
    """AdamW with fused=True (the CUDA default; it exists on the CPU too): its step counters
    live with the parameters and it takes `found_inf`."""

    def __init__(self, params, **kw):
        kw.pop("foreach", None)
        kw.pop("fused", None)
        super().__init__(params, fused=True, **kw)


@pytest.fixture
def device_paths(monkeypatch):
    """The code paths a CUDA run takes, on the CPU (see the module docstring)."""
    from r7b_fast.kernels import attention, fused_logprobs

    monkeypatch.setattr(attention, "host_value_checks", lambda t: False)
    monkeypatch.setattr(fused_logprobs, "host_value_checks", lambda t: False)
    monkeypatch.setattr(attention, "_torch_path", attention._banded)
    monkeypatch.setattr(torch.optim, "AdamW", FusedAdamW)


@pytest.fixture
def reads(monkeypatch):
    """Counts reads per optimizer step: {step: Counter((method, caller))}. Step k starts when
    accumulate_gradients is called for the k-th time; reads inside `collate` (host tensors
    before the copy to the device) and `checkpoint.save` (I/O at read-back points) are not
    counted."""
    counts: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    state = {"step": 0, "paused": 0}

    def counting(name, real):
        def read(self, *args, **kwargs):
            if state["step"] and not state["paused"]:
                caller = traceback.extract_stack(limit=2)[0].name
                counts[state["step"]][(name, caller)] += 1
            return real(self, *args, **kwargs)

        return read

    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))

    def paused(fn):
        def call(*args, **kwargs):
            state["paused"] += 1
            try:
                return fn(*args, **kwargs)
            finally:
                state["paused"] -= 1

        return call

    real_accumulate = train.accumulate_gradients

    def accumulate(*args, **kwargs):
        state["step"] += 1
        return real_accumulate(*args, **kwargs)

    monkeypatch.setattr(train, "accumulate_gradients", accumulate)
    monkeypatch.setattr(train, "collate", paused(train.collate))
    monkeypatch.setattr(checkpoint, "save", paused(checkpoint.save))
    return counts


@pytest.mark.parametrize("config", ["sft_tiny", "dpo_tiny"])
def test_one_read_per_logging_interval(tmp_path, device_paths, reads, config):
    """8 steps, logging.every_steps=4, checkpoint at the end only: after step 1 (warm-up:
    one-time set-up), the only reads are ONE `.tolist()` at steps 4 and 8 (the read-backs: 2 in
    7 steps). The code before this change read, for sft, 5 times per step (loss, grad_norm and
    token `.item()`, two `isfinite` bools), plus per micro-batch one for max_seqlen and one for
    the loss's count check: 9 per step with 2 micro-batches, 63 over steps 2..8 (measured by
    benchmarks/host_sync.py); dpo also read its metrics and checked sequence ids per step.
    Nothing is exempt: transformers' packed-mask check (find_packed_sequence_indices, a read per
    mask type) is skipped by the patched forward's mask mapping, and the head's trained rows
    come from collate (no `nonzero` on the device)."""
    out = run(tmp_path / "run", "optim.max_steps=8", "logging.every_steps=4",
              "checkpoint.every_steps=0", config=config)  # fmt: skip
    seen = {step: dict(c) for step, c in reads.items() if step >= 2}
    expected = {4: {("tolist", "read_back"): 1}, 8: {("tolist", "read_back"): 1}}
    assert {step: c for step, c in seen.items() if c} == expected
    rows = metrics(out)
    assert [r["step"] for r in rows] == [4, 8]
    for r in rows:  # the read-back values are the real ones: finite, a real token count
        assert r["tokens"] > 0 and r["tokens"] == int(r["tokens"])
        assert all(r[k] > 0 for k in ("loss", "grad_norm", "tokens_per_s", "step_s"))


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "foreach"])
def test_nan_between_read_backs_stops_before_saving(tmp_path, monkeypatch, fused):
    """A NaN loss at step 3 with read-backs at 2 (a checkpoint) and 4: the run stops at step
    4's read-back naming step 3, with step 2's checkpoint the latest and no metrics record after
    it. Fused AdamW skipped step 3 on the device (`found_inf`): the live weights are still step
    2's, exactly; foreach AdamW took it (the documented trade-off): live weights are NaN, and
    were never saved."""
    if fused:
        monkeypatch.setattr(torch.optim, "AdamW", FusedAdamW)
    built, real_build = [], train.build_model
    monkeypatch.setattr(train, "build_model", lambda *a: built.append(real_build(*a)) or built[-1])
    out = tmp_path / "nan"
    with pytest.raises(train.NonFiniteError, match=r"^step 3: non-finite loss \(nan\).*step 4's "
                       r"read-back.*step_00000002"):  # fmt: skip
        run(out, "optim.max_steps=8", "logging.every_steps=4", "checkpoint.every_steps=2",
            "debug.nan_at_step=3")  # fmt: skip
    assert [r["step"] for r in metrics(out)] == []  # step 2 is not on the logging cadence
    assert checkpoint.latest(out / "checkpoints").name == "step_00000002"
    assert not (out / "done.json").exists()
    saved = latest_checkpoint_model(out, real_build)
    assert all(torch.isfinite(p).all() for p in saved.parameters())
    live = list(built[0].parameters())
    if fused:
        for p, q in zip(live, saved.parameters()):
            assert torch.equal(p, q)
    else:
        assert not all(torch.isfinite(p).all() for p in live)


def test_sequence_sums_match_losses_sequence_logps():
    """train_loss.sequence_sums (no host read) equals losses.sequence_logps (its reference,
    with checks and boolean indexing) on ragged ids with padding, values and gradients: the
    same fp32 additions in the same order on the CPU, so exactly."""
    from r7b_fast import losses
    from r7b_fast.train_loss import sequence_sums

    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([0, 0, 0, 1, 2, 2, -1, -1, 3, 3, 3, 3, -1])
    a = torch.randn(ids.numel(), generator=g, requires_grad=True)
    b = a.detach().clone().requires_grad_(True)
    got, want = sequence_sums(a, ids, 5), losses.sequence_logps(b, ids, 5)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    (got * torch.arange(5.0)).sum().backward()
    (want * torch.arange(5.0)).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)


def test_collate_gives_max_seqlen_from_the_host():
    """max_seqlen is the longest segment the attention sees (a sequence, or a row's padding as
    one segment), a python int, checked against lengths counted here from the input."""
    lengths = [5, 4, 3]  # packed into rows [5, 4] and [3 + 6 padding]
    examples = [(list(range(1, n + 1)), [1] * n) for n in lengths]
    packed = pack_sft(examples, 9, pad_id=0)
    rows = [packed.row(i) for i in range(len(packed))]
    batch = collate(rows, "cpu")
    segments = []
    for r in rows:
        seq = torch.bincount(r["seq_ids"][r["seq_ids"] >= 0]).tolist()
        pad = int((r["seq_ids"] < 0).sum())
        segments += seq + ([pad] if pad else [])
    assert max(segments) > max(lengths)  # here the padding is the longest segment
    assert type(batch["max_seqlen"]) is int and batch["max_seqlen"] == max(segments)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_attention_device_paths_read_nothing(monkeypatch, backend):
    """varlen_attention forward + backward on the paths a CUDA run takes (the Triton kernels,
    here through the interpreter; the banded torch path) reads nothing on the host from the
    project's kernel code (the interpreter's own copies are not counted: on CUDA there is none).
    Ragged sequences, GQA, a window: the planner would read cu_seqlens, the banded path must not."""
    from pathlib import Path

    from r7b_fast.kernels import attention, fused_logprobs

    kernels = {str(Path(attention.__file__).parent), str(Path(attention.__file__).resolve().parent)}
    monkeypatch.setattr(attention, "host_value_checks", lambda t: False)
    monkeypatch.setattr(fused_logprobs, "host_value_checks", lambda t: False)
    monkeypatch.setattr(attention, "_torch_path", attention._banded)
    seen = collections.Counter()

    def counting(name, real):
        def read(self, *args, **kwargs):
            frame = traceback.extract_stack(limit=2)[0]
            if str(Path(frame.filename).parent) in kernels:
                seen[(name, frame.name)] += 1
            return real(self, *args, **kwargs)

        return read

    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    g = torch.Generator().manual_seed(0)
    cu = torch.tensor([0, 3, 10, 11, 17], dtype=torch.int32)
    q, k, v = (torch.randn(17, h, 16, generator=g, requires_grad=True) for h in (4, 2, 2))
    out = attention.varlen_attention(q, k, v, cu, 7, window=4, backend=backend)
    out.square().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert dict(seen) == {}


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
