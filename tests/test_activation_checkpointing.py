"""Activation checkpointing modes (`distributed.apply_activation_checkpointing`): `full`,
`selective` (op-level, saving matmul/attention outputs) and every k-th layer give the gradients
of no checkpointing; the wrappers land on the layers asked for; the selective policy really
saves matmuls and recomputes the rest.

Tolerance: the recomputation runs the same ops on the same fp32 inputs, which on this CPU gives
bit-identical values; we allow 1e-6 of each gradient's largest entry (a few fp32 ulps of
accumulated magnitude) so that a kernel picking another thread split or algorithm on the
recompute (oneDNN/BLAS heuristics, GPU atomics) would still pass, while a wrong recomputation
(a skipped op, stale RNG, a missed input) is off by O(1) relative.
"""

import collections
import copy

import pytest
import torch
from _train_helpers import one_thread  # noqa: F401 (autouse fixture)

from r7b_fast import distributed, train
from r7b_fast.data.packing import pack_sft
from r7b_fast.model import apply_kernels, build_model, tiny_config
from r7b_fast.train_data import collate

RTOL = 1e-6


def tiny_model(seed=0, layers=4):
    cfg = tiny_config(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      sliding_window=8)  # fmt: skip
    model = build_model(cfg, torch.float32, seed=seed)
    return apply_kernels(model, attention=True, loss=True, backend="torch")


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for n in (3, 19, 33, 7):  # ragged; 19 and 33 cross the sliding window (8)
        ids = torch.randint(8, 1000, (n,), generator=g).tolist()
        mask = [1] * n
        mask[: n // 3] = [0] * (n // 3)  # an untrained prompt
        seqs.append((ids, mask))
    packed = pack_sft(seqs, max_tokens=64)
    return collate([packed.row(i) for i in range(len(packed))], "cpu")


def loss_and_grads(model, b):
    model.zero_grad()
    loss, _ = train.sft_loss(model, b, train.sft_count(b).float(), None)
    loss.backward()
    return loss.item(), {distributed.unwrap_layer_names(n): p.grad.clone()
                         for n, p in model.named_parameters()}  # fmt: skip


@pytest.mark.parametrize("mode,every", [("full", 1), ("selective", 1), ("full", 2),
                                        ("selective", 3), (True, 1)])  # fmt: skip
def test_checkpointing_gives_the_gradients_of_none(mode, every):
    ref = tiny_model(seed=3)
    ac = copy.deepcopy(ref)
    distributed.apply_activation_checkpointing(ac, mode, every=every)
    wrapped = ["CheckpointWrapper" in type(layer).__name__ for layer in ac.model.layers]
    assert wrapped == [i % every == 0 for i in range(4)]
    b = batch()
    want_loss, want = loss_and_grads(ref, b)
    got_loss, got = loss_and_grads(ac, b)
    assert got_loss == pytest.approx(want_loss, rel=RTOL)
    assert set(got) == set(want)  # HF names once the wrapper prefix is dropped
    for name, g in want.items():
        assert g.abs().max() > 0, name
        assert (got[name] - g).abs().max() <= RTOL * g.abs().max(), name


def test_none_and_bad_modes():
    model = tiny_model(layers=2)
    before = [type(layer) for layer in model.model.layers]
    distributed.apply_activation_checkpointing(model, "none")
    distributed.apply_activation_checkpointing(model, False)
    assert [type(layer) for layer in model.model.layers] == before
    with pytest.raises(ValueError, match="selective"):
        distributed.apply_activation_checkpointing(model, "partial")
    with pytest.raises(ValueError, match=">= 1"):
        distributed.apply_activation_checkpointing(model, "full", every=0)


def backward_op_counts(model, b) -> collections.Counter:
    """aten ops run by backward (gradient ops plus whatever checkpointing recomputes)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    counts = collections.Counter()

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            counts[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    loss, _ = train.sft_loss(model, b, train.sft_count(b).float(), None)
    with Count():
        loss.backward()
    return counts


def test_selective_recomputes_elementwise_not_matmuls():
    """The policy is real: in backward, full recomputes the layers' matmuls and activations;
    selective recomputes the activations (silu) but takes the matmul outputs from its cache, so
    it runs exactly the matmuls of no checkpointing."""
    b = batch()
    counts = {}
    for mode in ("none", "selective", "full"):
        model = tiny_model(seed=5)
        distributed.apply_activation_checkpointing(model, mode)
        counts[mode] = backward_op_counts(model, b)
    none, sel, full = counts["none"], counts["selective"], counts["full"]
    assert none["silu"] == 0 and sel["silu"] == full["silu"] == 4  # one MLP per layer
    assert sel["mm"] == none["mm"] < full["mm"], (none["mm"], sel["mm"], full["mm"])


def test_selective_policy_saves_matmuls_and_recomputes_the_rest():
    from torch.utils.checkpoint import CheckpointPolicy

    ops = distributed._sac_saved_ops()
    assert torch.ops.aten.mm.default in ops and torch.ops.aten.addmm.default in ops
    assert torch.ops.r7b_fast.varlen_attention_fwd.default in ops
    assert torch.ops.aten.mul.Tensor not in ops and torch.ops.aten.silu.default not in ops
    assert CheckpointPolicy.MUST_SAVE != CheckpointPolicy.PREFER_RECOMPUTE
