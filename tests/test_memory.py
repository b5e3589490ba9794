"""r7b_fast.memory against measurements: exact parameter counts of built models, the saved
activation bytes per token of a layer (saved_tensors_hooks), and what FSDP2 holds between
micro-batches under each `fsdp.grad_accumulation` (a one-process gloo group, in this process).
Also the `fsdp` config keys and apply_fsdp's per-layer resharding choice."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as torch_dist
from _train_helpers import one_thread  # noqa: F401 (autouse fixture)
from transformers import Cohere2Config

from r7b_fast import distributed, memory
from r7b_fast.config import ConfigError, load_config
from r7b_fast.model import R7B_SHAPES, apply_kernels, build_model, tiny_config
from r7b_fast.optim import build_optimizer
from r7b_fast.train import accumulate_gradients
from r7b_fast.train_loss import sft_count, sft_loss


@pytest.mark.parametrize(
    "overrides",
    [{}, {"tie_word_embeddings": False}, {"head_dim": 24, "num_attention_heads": 3},
     {"attention_bias": True, "num_hidden_layers": 3}],
)  # fmt: skip
def test_parameter_count_is_exact(overrides):
    config = tiny_config(hidden_size=64, intermediate_size=96, **overrides)
    model = build_model(config)
    assert memory.parameter_count(config) == sum(p.numel() for p in model.parameters())


def test_r7b_has_8_03b_parameters():
    n = memory.parameter_count(Cohere2Config(**R7B_SHAPES))
    assert n == 8_028_033_024  # 32 x 226.5M layer params + the 1.05B tied embedding + norm


def _packed(tokens: int, vocab: int) -> dict:
    lens = [tokens // 2, tokens - tokens // 2]
    ids = torch.randint(5, vocab, (1, tokens), generator=torch.Generator().manual_seed(tokens))
    return dict(
        input_ids=ids, targets=torch.roll(ids, -1),
        position_ids=torch.cat([torch.arange(n) for n in lens])[None],
        cu_seqlens=torch.tensor([0, lens[0], tokens], dtype=torch.int32), max_seqlen=max(lens),
    )  # fmt: skip


def _saved_bytes(model, batch) -> dict[str, int]:
    """Bytes saved for backward while each decoder layer (and the rest: `root`) runs forward;
    parameters excluded, each storage counted once, by the first module that saves it."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    where, owner, seen = ["root"], {}, {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        hooks.append(layer.register_forward_pre_hook(lambda *_, i=i: where.__setitem__(0, i)))
        hooks.append(layer.register_forward_hook(lambda *_: where.__setitem__(0, "root")))

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params and st.data_ptr() not in owner:
            owner[st.data_ptr()] = where[0]
            seen[where[0]] = seen.get(where[0], 0) + st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**batch)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.triton_interpret
def test_activation_bytes_per_token_match_the_autograd_graph(triton_interpret):
    """The GPU path (Triton attention + head, here through the interpreter) in bf16: the bytes
    saved per extra token by layer 1 and by the root equal the formulas exactly (per-layer
    constants such as the fp32 copy of the norm weight cancel in the difference)."""
    config = tiny_config(vocab_size=256, hidden_size=64, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    model = build_model(config, torch.bfloat16)
    apply_kernels(model, attention=True, loss=True, backend="triton")
    a, b = _saved_bytes(model, _packed(48, 256)), _saved_bytes(model, _packed(80, 256))
    layer = (b[1] - a[1]) / 32
    assert layer == memory.layer_activation_bytes(config, 2)
    # the rotary cos/sin are saved by every layer but stored once: layer 0 owns them here
    root = (b["root"] - a["root"] + b[0] - a[0]) / 32 - layer
    assert root == memory.root_activation_bytes(config, 2)


@pytest.fixture
def one_rank_group(tmp_path):
    """A one-process gloo group: FSDP2 runs for real (a 1-rank mesh, shard = the whole tensor)."""
    torch_dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    yield
    torch_dist.destroy_process_group()


def _held_between_micro_batches(scheme: str, micro: int = 3):
    """gradient_bytes after each backward of one step, trained through train.accumulate_gradients
    on a tiny FSDP2 model; also the optimizer state bytes after the step and the grads."""
    config = tiny_config(hidden_size=32, intermediate_size=64, num_attention_heads=2,
                         num_key_value_heads=1, num_hidden_layers=2, vocab_size=128)  # fmt: skip
    cfg = load_config("sft_tiny", ["run.output_dir=x", f"fsdp.grad_accumulation={scheme}"])
    model = build_model(config)
    apply_kernels(model, attention=True, loss=True, backend="torch")
    distributed.apply_fsdp(model, distributed.Dist(), mixed_precision=False, options=cfg.fsdp)
    # accumulate_gradients syncs only when dist.distributed: a 2-rank Dist on the 1-rank group
    # (the loss is scaled by 2, FSDP averages over 1: gradients x2, the same for both schemes)
    dist = distributed.Dist(world_size=2)
    s = SimpleNamespace(cfg=cfg, dist=dist, model=model, mixed=False)
    held = []

    def loss_fn(m, batch, denom, c):
        held.append(memory.gradient_bytes(m))
        return sft_loss(m, batch, denom, c)

    batches = [_packed(16 + 8 * i, 128) for i in range(micro)]
    denom = torch.stack([sft_count(b) for b in batches]).sum().float()
    accumulate_gradients(s, batches, denom, loss_fn, step=1)
    held.append(memory.gradient_bytes(model))
    grads = {n: p.grad.full_tensor().clone() for n, p in model.named_parameters()}
    optimizer, _ = build_optimizer(cfg, model, total_steps=1)
    optimizer.step()
    return config, held[1:], grads, memory.optimizer_state_bytes(optimizer)


def test_fsdp_holds_unsharded_grads_only_under_unsharded(one_rank_group):
    config, rs, g_rs, adam = _held_between_micro_batches("reduce_scatter")
    _, un, g_un, _ = _held_between_micro_batches("unsharded")
    p = memory.parameter_count(config)
    full = memory.estimate(config, 1, 16, grad_accumulation="unsharded", mixed_precision=False)
    # reduce_scatter: after every backward only the (1-rank) shards, never an unsharded copy
    assert rs == [{"sharded": 4 * p, "unsharded": 0}] * 3
    # unsharded: FSDP keeps a whole fp32 gradient until the last backward's reduce-scatter
    assert un[:2] == [{"sharded": 0, "unsharded": full["grads_unsharded"]}] * 2
    assert un[2] == {"sharded": 4 * p, "unsharded": 0}
    for name in g_rs:  # the same sum of the same micro-batch gradients, other fp32 order
        torch.testing.assert_close(g_un[name], g_rs[name], rtol=1e-5, atol=1e-7)
    # AdamW: exp_avg + exp_avg_sq per parameter (+ a 4-byte step per tensor, not estimated)
    n_tensors = len(list(build_model(config).parameters()))
    assert adam == memory.estimate(config, 1, 16)["adam_states"] + 4 * n_tensors


def test_estimate_components_for_r7b_on_8_ranks():
    c = Cohere2Config(**R7B_SHAPES)
    p = memory.parameter_count(c)
    rs = memory.estimate(c, 8, 8192)
    un = memory.estimate(c, 8, 8192, grad_accumulation="unsharded")
    none = memory.estimate(c, 8, 8192, activation_checkpointing="none")
    assert rs["params_shards"] == rs["grads_shards"] == p * 4 // 8
    assert rs["adam_states"] == 2 * rs["params_shards"]
    assert un["total"] - rs["total"] == un["grads_unsharded"] == 4 * p  # ~32 GB more per GPU
    # without checkpointing every layer keeps its activations: 32 layers instead of 1 + inputs
    per_token = memory.layer_activation_bytes(c)
    assert none["activations"] - rs["activations"] == 8192 * (31 * per_token - 32 * 4096 * 2)
    every2 = memory.estimate(c, 8, 8192, checkpoint_every=2)  # 16 layers wrapped, 16 not
    assert every2["activations"] - rs["activations"] == 8192 * 16 * (per_token - 4096 * 2)
    assert memory.estimate(c, 8, 16384)["activations"] > 1.9 * rs["activations"]
    with pytest.raises(ValueError, match="selective"):
        memory.estimate(c, 8, 8192, activation_checkpointing="selective")


def test_fsdp_config_keys_and_layer_resharding():
    def load(*overrides):
        return load_config("sft_tiny", ["run.output_dir=x", *overrides]).fsdp

    assert load().reshard_after_forward == "auto" and load().grad_accumulation == "reduce_scatter"
    assert load("fsdp.reshard_after_forward=false").reshard_after_forward is False
    assert load("fsdp.reshard_after_forward=4").reshard_after_forward == 4
    for bad in ("fsdp.reshard_after_forward=1", "fsdp.reshard_after_forward=sometimes",
                "fsdp.grad_accumulation=never"):  # fmt: skip
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            load(bad)
    eight = distributed.Dist(world_size=8)
    assert [distributed.layer_reshard("auto", i, 3, eight) for i in range(3)] == [True, True, False]
    assert distributed.layer_reshard(False, 0, 3, eight) is False
    assert distributed.layer_reshard(4, 2, 3, eight) == 4
    for n in (3, 8):  # not a proper divisor of the world size
        with pytest.raises(ConfigError, match="fsdp.reshard_after_forward"):
            distributed.layer_reshard(n, 0, 3, eight)
