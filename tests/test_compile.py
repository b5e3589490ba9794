"""Regional torch.compile (`r7b_fast.compile`): the trainer's order (kernels -> checkpointing ->
compile -> FSDP), no recompilation across packed-row lengths on our kernels' custom ops, no
graph break, and the numerics of the eager model.

Tolerances: the compiled graphs run the same fp32 ops, but the compilers (AOT autograd's
decompositions, inductor's fused kernels) may reorder fp32 sums (layer norm statistics, softmax,
the logits' log-sum-exp, the matmul epilogues). Each reordering is ~1 ulp (6e-8) of the summed
magnitude; through two layers and the head that stays below 1e-6 relative (measured ~5e-7), so
we allow 1e-5 of each tensor's largest entry. A wrong graph (a dropped mask, a stale shape, a
missing gradient) is off by O(1).
"""

import copy

import pytest
import torch
from _train_helpers import one_thread  # noqa: F401 (autouse fixture)

from r7b_fast import distributed
from r7b_fast.compile import compile_model, enabled
from r7b_fast.kernels import kernel_calls
from r7b_fast.model import apply_kernels, build_model, tiny_config

RTOL = 1e-5


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """No compiled code or counters leak between tests (or into other test files)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()
    counters.clear()


def tiny(backend, seed=0):
    cfg = tiny_config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      sliding_window=8)  # fmt: skip
    return apply_kernels(build_model(cfg, seed=seed), backend=backend)


def row(lens, seed=0):
    """One packed row of sequences of `lens` tokens (positions restart; a third untrained)."""
    g = torch.Generator().manual_seed(seed)
    T = sum(lens)
    targets = torch.randint(8, 1000, (1, T), generator=g)
    targets[0, ::3] = -100
    return {
        "input_ids": torch.randint(8, 1000, (1, T), generator=g),
        "position_ids": torch.cat([torch.arange(n) for n in lens])[None],
        "targets": targets,
        "cu_seqlens": torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32),
    }


def logps_and_grads(model, b):
    model.zero_grad()
    logp = model(b["input_ids"], position_ids=b["position_ids"], targets=b["targets"],
                 cu_seqlens=b["cu_seqlens"]).token_logps  # fmt: skip
    (logp * torch.linspace(0.5, 1.5, logp.shape[1])).sum().backward()  # non-uniform upstream
    grads = {distributed.unwrap_layer_names(n): p.grad.clone()
             for n, p in model.named_parameters()}  # fmt: skip
    return logp.detach(), grads


def assert_close(got, want):
    tol = RTOL * want.abs().max() + 1e-12
    assert (got - want).abs().max() <= tol


def test_enabled():
    assert not enabled("auto", "cpu") and enabled("auto", "cuda")
    assert enabled("on", "cpu") and not enabled("off", "cuda")
    assert enabled(True, "cpu") and not enabled(False, "cuda")
    with pytest.raises(ValueError, match="model.compile"):
        enabled("yes", "cpu")


def test_parallelize_checkpoints_then_compiles_in_place():
    model = tiny("torch")
    names = set(model.state_dict())
    with pytest.warns(RuntimeWarning, match="torch twins"):
        distributed.parallelize(model, distributed.Dist(), activation_checkpointing="selective",
                                mixed_precision=False, compile=True)  # fmt: skip
    for layer in model.model.layers:  # the wrapper compiled in place: type and names kept
        assert "CheckpointWrapper" in type(layer).__name__
        assert layer._compiled_call_impl is not None
    assert {distributed.unwrap_layer_names(n) for n in model.state_dict()} == names
    assert model._r7b_kernels["head"] is not None  # the loss head, compiled
    with pytest.raises(ValueError, match="already compiled"):
        compile_model(model)


@pytest.mark.parametrize("mode,want", [("on", True), ("auto", False), ("false", False)])
def test_build_model_follows_model_compile(tmp_path, mode, want):
    from r7b_fast import train
    from r7b_fast.config import load_config

    cfg = load_config("sft_tiny", [f"run.output_dir={tmp_path}", f"model.compile={mode}",
                                   "model.activation_checkpointing=full",
                                   "model.tiny_overrides={hidden_size: 32, num_hidden_layers: 2}"])  # fmt: skip
    model = train.build_model(cfg, distributed.Dist(), range(16))  # kernels: the interpreter
    compiled = [layer._compiled_call_impl is not None for layer in model.model.layers]
    assert compiled == [want, want]
    assert ("head" in model._r7b_kernels) == want


@pytest.mark.triton_interpret
def test_no_recompile_across_row_lengths():
    """Our kernels as custom ops (the CUDA path, here through the Triton interpreter): rows of
    three lengths and compositions run on the graphs of the first, with no graph break, and give
    the eager model's log-probs and gradients."""
    from torch._dynamo.utils import counters

    eager = tiny("triton", seed=1)
    model = copy.deepcopy(eager)
    compile_model(model, backend="aot_eager")  # dynamo + AOT autograd: the guards are dynamo's
    graphs = []
    for lens in ([10, 14], [20, 3, 14], [31, 19]):
        with kernel_calls() as calls:
            got = logps_and_grads(model, row(lens))
        assert calls["varlen_attention:triton"] and calls["linear_logprobs:triton"], calls
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] >= 2 and graphs == [graphs[0]] * 3, graphs  # a layer graph + the head
    assert not counters["graph_break"], dict(counters["graph_break"])
    want = logps_and_grads(eager, row([31, 19]))
    assert_close(got[0], want[0])
    for name, g in want[1].items():
        assert_close(got[1][name], g)


@pytest.mark.slow
def test_inductor_with_selective_checkpointing_matches_eager():
    """The torch twins compiled by inductor (CPU C++ codegen) inside selectively checkpointed
    layers: log-probs and gradients of the eager, unchecked model, no graph break. Slow: the
    C++ compilation of the forward and backward graphs (~40 s of CPU here)."""
    from torch._dynamo.utils import counters

    eager = tiny("torch", seed=2)
    model = copy.deepcopy(eager)
    distributed.apply_activation_checkpointing(model, "selective")
    with pytest.warns(RuntimeWarning, match="torch twins"):
        compile_model(model)
    b = row([9, 30, 5])
    got, want = logps_and_grads(model, b), logps_and_grads(eager, b)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] >= 2
    assert_close(got[0], want[0])
    for name, g in want[1].items():
        assert g.abs().max() > 0, name
        assert_close(got[1][name], g)
