"""linear_logprobs: Triton (interpreter) and the torch twin against a float64 truth.

Error bound (STYLE.md habit 4): a path may be at most 2x as far from the float64 truth as plain
PyTorch in the same dtype (materialised logits, log_softmax, autograd), plus a floor of 1e-6 for
fp32 where both errors are at rounding level and their ratio is noise. Errors are normwise
relative: ||x - truth|| / ||truth||. The factor 2 covers the kernel's different summation order
(tiles, vocab splits, dlogits rounded to the GEMM dtype once) and nothing more: a wrong tile
edge, mask or chunk gives errors of order 1.
"""

from __future__ import annotations

import pytest
import torch

import r7b_fast.kernels._fused_logprobs_triton as llp_triton
import r7b_fast.kernels.fused_logprobs as llp
from r7b_fast.kernels.fused_logprobs import linear_logprobs, linear_logprobs_torch

pytestmark = pytest.mark.triton_interpret
DEV = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter runs CPU tensors


def _rel(x, truth):
    return ((x.double() - truth).norm() / truth.norm().clamp_min(1e-300)).item()


def _inputs(N, H, V, dtype, ignore_index=-100, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g, dtype=torch.float64).to(dtype)
    w = (torch.randn(V, H, generator=g, dtype=torch.float64) * 0.5).to(dtype)
    t = torch.randint(0, V, (N,), generator=g)
    t[:: max(1, N // 3)] = ignore_index  # some ignored rows, including row 0
    t[-1:] = V - 1  # the last vocab row (in the ragged last tile) is a target
    grad = torch.randn(N, generator=g, dtype=torch.float64)
    return h.to(DEV), w.to(DEV), t.to(DEV), grad.to(DEV)


def _run(fn, h, w, t, grad, **kw):
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    y = fn(h, w, t, **kw)
    (y.to(grad.dtype) * grad).sum().backward()
    return y.detach(), h.grad, w.grad


def _naive(h, w, t, scale=1.0, ignore_index=-100):
    """Plain PyTorch in the inputs' dtype: materialised logits, log_softmax, gather."""
    logits = (h @ w.T).float() * scale
    valid = t != ignore_index
    lp = torch.log_softmax(logits, -1).gather(1, torch.where(valid, t, 0)[:, None])[:, 0]
    return torch.where(valid, lp, 0.0)


CASES = [  # (N, H, V, dtype, scale, ignore_index): none a multiple of the interpreter tiles
    (37, 40, 131, torch.float32, 0.7, -100),
    (37, 40, 131, torch.bfloat16, 0.7, -100),
    (7, 24, 97, torch.bfloat16, 1.0, -1),
    (7, 24, 97, torch.float16, 2.5, -100),
]


@pytest.mark.parametrize("N,H,V,dtype,scale,ignore_index", CASES)
def test_matches_float64_truth(N, H, V, dtype, scale, ignore_index, monkeypatch):
    # several backward vocab chunks (the last one ragged) and several forward vocab splits
    monkeypatch.setattr(llp_triton, "DLOGITS_TARGET_ROWS", 64)
    monkeypatch.setattr(llp_triton, "DLOGITS_MIN_ROWS", 64)
    h, w, t, grad = _inputs(N, H, V, dtype, ignore_index)
    kw = dict(scale=scale, ignore_index=ignore_index)
    truth = _run(linear_logprobs_torch, h.double(), w.double(), t, grad, **kw)
    naive = _run(_naive, h, w, t, grad, **kw)
    tri = _run(linear_logprobs, h, w, t, grad, backend="triton", **kw)
    twin = _run(linear_logprobs_torch, h, w, t, grad, **kw)
    assert tri[0].dtype == torch.float32 and tri[0].shape == (N,)
    assert tri[1].dtype == dtype and tri[2].dtype == dtype
    floor = 1e-6 if dtype == torch.float32 else 0.0
    for name, got, ref, tru in zip(("logp", "dH", "dW"), tri, naive, truth):
        bound = 2 * _rel(ref, tru) + floor
        assert _rel(got, tru) <= bound, (name, _rel(got, tru), bound)
    for name, got, ref, tru in zip(("logp", "dH", "dW"), twin, naive, truth):
        assert _rel(got, tru) <= 2 * _rel(ref, tru) + floor, name
    ignored = t == ignore_index
    assert (tri[0][ignored] == 0).all() and (tri[1][ignored] == 0).all()
    assert (tri[0][~ignored] < 0).all()


def test_torch_twin_gradcheck_float64(monkeypatch):
    monkeypatch.setattr(llp, "TORCH_CHUNK_ELEMENTS", 22)  # 2 tokens per chunk: 3 checkpoints
    h, w, t, _ = _inputs(5, 6, 11, torch.float64)
    h.requires_grad_()
    w.requires_grad_()
    fn = lambda a, b: linear_logprobs_torch(a, b, t, scale=0.5)
    assert torch.autograd.gradcheck(fn, (h, w))


def test_tied_embedding_gets_both_gradients():
    """The weight is both the input embedding and the output projection (Command R7B)."""
    N, H, V = 9, 24, 53
    g = torch.Generator().manual_seed(1)
    w0 = (torch.randn(V, H, generator=g, dtype=torch.float64) * 0.3).to(DEV)
    ids = torch.randint(0, V, (N,), generator=g).to(DEV)
    t = torch.roll(ids, -1)

    def grads(fn, dtype):
        emb = torch.nn.Embedding(V, H, dtype=dtype, device=DEV)
        emb.weight.data.copy_(w0)
        x = torch.tanh(emb(ids) * 1.5)  # (N, H) hidden states depend on the same weight
        fn(x, emb.weight, t, scale=0.8).sum().backward()
        return emb.weight.grad

    truth = grads(linear_logprobs_torch, torch.float64)
    got = grads(lambda *a, **k: linear_logprobs(*a, backend="triton", **k), torch.float32)
    assert _rel(got, truth) < 1e-5  # fp32 rounding on an O(1) problem
    # both paths into the weight matter: the embedding rows alone or the projection alone differ
    emb_rows = torch.zeros_like(truth)
    emb_rows[ids] = 1
    assert (truth * (1 - emb_rows)).abs().sum() > 0 and (truth * emb_rows).abs().sum() > 0


def test_empty_and_backend_choice(monkeypatch):
    h, w, t, _ = _inputs(0, 8, 5, torch.float32)
    h.requires_grad_()
    w.requires_grad_()
    for backend in ("triton", "torch"):
        y = linear_logprobs(h, w, t, backend=backend)
        assert y.shape == (0,) and y.dtype == torch.float32
        y.sum().backward()
        assert h.grad.shape == h.shape and (w.grad == 0).all()
    forward, calls = llp_triton._forward, []
    monkeypatch.setattr(llp_triton, "_forward", lambda *a: calls.append(a) or forward(*a))
    h, w, t, _ = _inputs(9, 16, 33, torch.float32)
    auto = linear_logprobs(h, w, t, scale=0.3)  # auto = Triton under the interpreter
    assert len(calls) == 1
    torch_path = linear_logprobs(h, w, t, scale=0.3, backend="torch")
    assert len(calls) == 1
    assert torch.equal(torch_path, linear_logprobs_torch(h, w, t, scale=0.3))
    torch.testing.assert_close(auto, torch_path, rtol=1e-5, atol=1e-5)


def test_custom_op_fake_and_schema():
    h, w, t, _ = _inputs(6, 16, 33, torch.float32)
    torch.library.opcheck(
        llp._llp_fwd_op, (h, w, t, 0.5, -100), test_utils=("test_schema", "test_faketensor")
    )
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fh, fw, ft = (mode.from_tensor(x) for x in (h, w, t))
        logp, lse = llp._llp_fwd_op(fh, fw, ft, 0.5, -100)
        dh, dw = llp._llp_bwd_op(logp, fh, fw, ft, lse, 0.5, -100, True, False)
    assert logp.shape == (6,) and logp.dtype == torch.float32
    assert dh.shape == h.shape and dw.numel() == 0


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_bad_inputs_raise(backend):
    h, w, t, _ = _inputs(4, 8, 5, torch.float32)
    call = lambda *a, **k: linear_logprobs(*a, backend=backend, **k)
    cases = [
        ((h, w[:, :6], t), r"width mismatch.*\(4, 8\).*\(5, 6\)"),
        ((h, w, torch.tensor([0, 1, 5, 2], device=DEV)), r"targets\[2\] = 5 is outside \[0, V=5\)"),
        ((h, w, torch.tensor([0, -3, 1, 2], device=DEV)), r"targets\[1\] = -3"),
        ((h[None], w, t), r"hidden must be 2-D, got shape \(1, 4, 8\)"),
        ((h, w[None], t), r"weight must be 2-D"),
        ((h, w, t[:3]), r"targets \(3,\) must have one entry per row of hidden \(4, 8\)"),
        ((h, w, t.float()), r"targets dtype"),
        ((h.half(), w, t), r"dtypes differ"),
        ((h.int(), w.int(), t), r"hidden dtype"),
        ((h, w.to("meta"), t), r"one device"),
    ]
    for args, msg in cases:
        with pytest.raises(ValueError, match=msg):
            call(*args)
    with pytest.raises(ValueError, match="backend"):
        linear_logprobs(h, w, t, backend="cuda")


def test_torch_compile_fullgraph_through_custom_op():
    """The custom op (fake impl + registered autograd) lets torch.compile trace without breaks."""
    h, w, t, _ = _inputs(9, 16, 33, torch.float32)
    fn = lambda a, b: linear_logprobs(a, b, t, scale=0.5).sum()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(h.requires_grad_(), w.requires_grad_()), (h, w))
    want = torch.autograd.grad(fn(h, w), (h, w))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # same kernels, same order


def test_kernel_calls_counts_each_dispatch_per_backend():
    """kernel_calls() sees every dispatcher call inside its block (and only those), per backend."""
    from r7b_fast.kernels import kernel_calls, varlen_attention

    h, w = torch.randn(7, 16), torch.randn(13, 16)
    t = torch.randint(0, 13, (7,))
    linear_logprobs(h, w, t, backend="torch")  # outside: not counted
    with kernel_calls() as outer:
        linear_logprobs(h, w, t, backend="torch")
        with kernel_calls() as inner:
            q = torch.randn(5, 2, 16)
            cu = torch.tensor([0, 2, 5], dtype=torch.int32)
            varlen_attention(q, q[:, :1], q[:, :1], cu, 3, backend="torch")
    assert dict(inner) == {"varlen_attention": 1, "varlen_attention:torch": 1}
    assert outer["linear_logprobs:torch"] == 1 and outer["varlen_attention"] == 1


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_autocast_does_not_round_the_logits(backend, dtype):
    """Under bf16 autocast (a trainer's mixed precision) the result is still fp32 logp, equal to
    the no-autocast result of the same inputs: autocast would otherwise run the logits matmul in
    bf16 and round every logit (relative error ~1e-2, 0.04-0.08 absolute in logp). Inputs hold
    bf16 values (exact in either dtype), so the float64 truth is the same for both dtypes; the
    fp32 bound 1e-6 is rounding of O(1) sums over H=48 and V=67 terms, 10^4 below the bf16 error."""
    h, w, t, grad = _inputs(11, 48, 67, torch.bfloat16, seed=4)
    h, w = h.to(dtype), w.to(dtype)
    kw = dict(scale=0.9, backend=backend)
    truth = _run(linear_logprobs_torch, h.double(), w.double(), t, grad, scale=0.9)
    plain = _run(linear_logprobs, h, w, t, grad, **kw)
    hl, wl = h.clone().requires_grad_(), w.clone().requires_grad_()
    with torch.autocast(DEV, dtype=torch.bfloat16):  # forward only, as torch recommends
        y = linear_logprobs(hl, wl, t, **kw)
    (y.to(grad.dtype) * grad).sum().backward()
    auto = y.detach(), hl.grad, wl.grad
    assert auto[0].dtype == torch.float32
    assert auto[1].dtype == dtype and auto[2].dtype == dtype
    assert _rel(auto[0], truth[0]) <= 1e-6, _rel(auto[0], truth[0])
    for name, a, p, tru in zip(("logp", "dH", "dW"), auto, plain, truth):
        # gradients are stored in the inputs' dtype: bf16 ones carry one bf16 rounding (2^-8)
        bound = 1e-6 if dtype == torch.float32 else 2.0**-8
        assert _rel(a, tru) <= bound, (name, _rel(a, tru))
        assert _rel(a, p.double()) <= 1e-6, (name, _rel(a, p.double()))


@pytest.mark.parametrize("splits,group_rows", [(1, 16), (3, 32), (5, 1000), (7, 16)])
def test_any_split_count_and_launch_group(splits, group_rows, monkeypatch):
    """The grouped 1-D launch order and the split count change only the schedule: any split
    count (5 = one per vocab tile of 32 here, 7 leaves two splits past V empty) and any group
    size (1 token tile, 2 with a ragged last group, all 5) give the fp32 result to rounding."""
    monkeypatch.setattr(llp_triton, "_fwd_splits", lambda *a: splits)
    monkeypatch.setattr(llp_triton, "_INTERP_GROUP_ROWS", group_rows)
    monkeypatch.setattr(llp_triton, "DLOGITS_TARGET_ROWS", 64)  # 3 chunks, dlogits grouped too
    monkeypatch.setattr(llp_triton, "DLOGITS_MIN_ROWS", 64)
    h, w, t, grad = _inputs(70, 24, 150, torch.float32)
    kw = dict(scale=0.6)
    truth = _run(linear_logprobs_torch, h.double(), w.double(), t, grad, **kw)
    tri = _run(linear_logprobs, h, w, t, grad, backend="triton", **kw)
    for name, got, tru in zip(("logp", "dH", "dW"), tri, truth):
        assert _rel(got, tru) < 1e-6, (name, _rel(got, tru))  # fp32 rounding, O(1) values


def test_fwd_splits_fill_whole_waves():
    """The split count fills (nearly) whole waves where the old rule (~8 waves) left a last wave
    24% full at N=8192, H=4096, V=256000 on 132 SMs, and keeps a wave within one L2 group."""
    for sms in (132, 114, 78):
        for n_tiles in (16, 64, 128, 512):  # N = 2048 ... 65536 in 128-row tiles
            group = 24  # 24 MiB of hidden rows at H=4096 bf16
            s = llp_triton._fwd_splits(n_tiles, 1000, sms, group)
            progs = n_tiles * s
            waves = -(-progs // sms)
            assert progs / (waves * sms) >= 0.9, (sms, n_tiles, s, progs / sms)
            assert s * group >= sms and 1 <= s <= 1000
    assert llp_triton._fwd_splits(64, 1000, 132, 24) == 6  # the docstring's worked example
    assert llp_triton._fwd_splits(1, 3, 132, 24) == 3  # never more splits than granules


def test_dlogits_chunk_grows_with_n_and_fills_the_dw_gemm(monkeypatch):
    monkeypatch.setattr(llp_triton, "interpreting", lambda: False)  # the GPU's tile candidates
    rows = llp_triton._chunk_rows
    GiB = 1 << 30
    for N in (8192, 65536):
        r = rows(N, 256000, 4096, 2, 132, 80 * GiB)
        # dW GEMM of the chunk: (r / 128) x (4096 / 256) tiles, at least two waves of 132 SMs
        assert r == 3072 and (r // 128) * (4096 // 256) >= 2 * 132
    assert rows(8192, 256000, 4096, 2, 132, 80 * GiB) * 8192 * 2 == 48 << 20  # as before at 8k
    narrow = rows(65536, 256000, 1024, 2, 132, 80 * GiB)  # H=1024: 4 column tiles
    assert (narrow // 128) * 4 >= 2 * 132 and narrow % 256 == 0
    assert rows(8192, 1000, 4096, 2, 132, 80 * GiB) == 1000  # the whole vocabulary
    capped = rows(8192, 256000, 4096, 2, 132, 400 << 20)  # 100 MiB for dlogits: 6400 -> 3072
    assert capped == 3072
    llp_triton._warned_chunk = False
    with pytest.warns(UserWarning, match="exceeds 0.25 of the free device memory"):
        tight = rows(65536, 256000, 4096, 2, 132, 1 * GiB)  # 256 MiB < the 2-wave floor
    assert tight == 2304  # the floor: ceil(264 / 16) * 128 rows, rounded up to 256


def test_autotune_candidates_and_keys():
    """GPU launchers tune over every candidate keyed on H (and the dtypes); the dH GEMM's
    accumulator is restored after each timed config; the interpreter runs one config untimed."""
    for kind, key in (("fwd", ["K"]), ("dl", ["K"]), ("dw", ["P", "A_TRANS", "ACCUMULATE"])):
        tuned = llp_triton._tuned(kind, False)
        assert len(tuned.configs) == len(llp_triton._GPU[kind]) >= 2 and tuned.keys == key
        assert len(llp_triton._tuned(kind, True).configs) == 1
    assert llp_triton._tuned("dh", False).restore_value == ["c_ptr"]
    assert llp_triton._tuned("fwd", False).restore_value == []
    blocks = {
        (c.kwargs.get("BLOCK_N", c.kwargs.get("BLOCK_M")), c.kwargs.get("BLOCK_V", 0))
        for c in llp_triton._tuned("fwd", False).configs
    }
    assert (128, 256) in blocks


def test_kernel_calls_nested_blocks_with_equal_counts():
    """Leaving a nested block removes that block's counter, not an outer one with equal counts."""
    from r7b_fast.kernels import kernel_calls

    h, w, t = torch.randn(3, 8), torch.randn(5, 8), torch.tensor([0, 1, 2])
    with kernel_calls() as outer:
        with kernel_calls() as inner:  # both empty (equal) when the inner block ends
            pass
        linear_logprobs(h, w, t, backend="torch")
    assert outer["linear_logprobs"] == 1 and inner["linear_logprobs"] == 0
