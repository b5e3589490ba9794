"""r7b_fast.losses against independent formulas, HF's own logits, and Liger's DPO loss formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from r7b_fast.losses import dpo_loss, reference_logps, sequence_logps, sft_loss, token_logps
from r7b_fast.model import build_model, tiny_config

pytestmark = pytest.mark.triton_interpret
B, T, V = 3, 11, 97


@pytest.fixture(scope="module")
def model():
    cfg = tiny_config(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, logit_scale=0.5,
    )  # fmt: skip
    return build_model(cfg, torch.float32, seed=0)


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (B, T), generator=g)
    pos = torch.arange(T).repeat(B, 1)
    targets = torch.roll(ids, -1, dims=1)
    targets[:, -1] = -100
    targets[0, :4] = -100  # a prompt: not trained
    targets[2, 7:] = -100
    return ids, pos, targets


def test_token_logps_match_hf_logits(model, batch):
    ids, pos, targets = batch
    got = token_logps(model, ids, pos, targets)  # Triton (interpreter) path
    with torch.no_grad():
        logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits.double()
    valid = targets != -100
    ref = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    ref = torch.where(valid, ref, 0.0)
    assert got.shape == (B, T) and got.dtype == torch.float32
    assert (got[~valid] == 0).all()
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)  # fp32 model


def test_sft_gradient_accumulation_is_exact(model, batch):
    """3 micro-batches (one row each) with the global token count == one batch of 3 rows."""
    ids, pos, targets = batch
    count = int((targets != -100).sum())

    def grads(rows_per_step):
        model.zero_grad()
        losses = []
        for i in range(0, B, rows_per_step):
            sl = slice(i, i + rows_per_step)
            lp = token_logps(model, ids[sl], pos[sl], targets[sl])
            loss = sft_loss(lp, targets[sl], count)
            loss.backward()
            losses.append(loss.detach())
        return sum(losses), [p.grad.clone() for p in model.parameters()]

    loss1, g1 = grads(B)
    loss3, g3 = grads(1)
    torch.testing.assert_close(loss3, loss1, rtol=1e-6, atol=0)
    for a, b in zip(g3, g1):  # same sums, different order: fp32 rounding only
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    lp = token_logps(model, ids, pos, targets).detach()
    manual = -sum(lp[b, t] for b in range(B) for t in range(T) if targets[b, t] != -100) / count
    torch.testing.assert_close(loss1, manual, rtol=1e-6, atol=0)


def test_sequence_logps_and_reference(model, batch):
    ids, pos, targets = batch
    seq_ids = torch.full((B, T), -1)
    seq_ids[0, :6], seq_ids[0, 6:], seq_ids[1, :], seq_ids[2, :9] = 0, 1, 2, 3
    lp = torch.randn(B, T)
    got = sequence_logps(lp, seq_ids, 5)
    want = [sum(float(lp[b, t]) for b in range(B) for t in range(T) if seq_ids[b, t] == s)
            for s in range(5)]  # fmt: skip
    torch.testing.assert_close(got, torch.tensor(want), rtol=1e-6, atol=1e-6)
    assert got[4] == 0  # a sequence with no tokens

    attn = [m for m in model.modules() if hasattr(m, "attention_dropout")]
    assert attn
    for m in attn:  # dropout would change the result if train mode leaked into the reference
        m.attention_dropout = 0.5
    try:
        model.train()
        with torch.no_grad():
            noisy = sequence_logps(token_logps(model, ids, pos, targets), seq_ids, 5)
        ref = reference_logps(model, ids, pos, targets, seq_ids, 5)
        assert model.training and not ref.requires_grad
        model.eval()
        with torch.no_grad():
            want = sequence_logps(token_logps(model, ids, pos, targets), seq_ids, 5)
        torch.testing.assert_close(ref, want, rtol=1e-6, atol=1e-6)
        assert not torch.allclose(noisy, want, rtol=1e-3)
    finally:
        for m in attn:
            m.attention_dropout = 0.0
        model.train()
    with pytest.raises(ValueError, match="seq_ids"):
        sequence_logps(lp, seq_ids, 3)
    with pytest.raises(ValueError, match="token_logps"):
        sequence_logps(lp[:, :4], seq_ids, 5)


def _pairs(P=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    pc, pr, rc, rr = (-(torch.rand(P, generator=g) * 40 + 5) for _ in range(4))
    nc = torch.randint(3, 30, (P,), generator=g)
    nr = torch.randint(3, 30, (P,), generator=g)
    return pc, pr, rc, rr, nc, nr


def _logsig(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _formula(kind, pc, pr, rc, rr, nc, nr, beta, ls):
    """Per-pair losses written out in plain Python (TRL's definitions)."""
    out = []
    for i in range(len(pc)):
        c, r, a, b = float(pc[i]), float(pr[i]), float(rc[i]), float(rr[i])
        if kind in ("ipo", "sigmoid_norm"):
            c, a, r, b = c / int(nc[i]), a / int(nc[i]), r / int(nr[i]), b / int(nr[i])
        m = (c - a) - (r - b)
        if kind in ("sigmoid", "sigmoid_norm"):
            out.append(-_logsig(beta * m) * (1 - ls) - _logsig(-beta * m) * ls)
        elif kind == "ipo":
            out.append((m - 1 / (2 * beta)) ** 2)
        elif kind == "hinge":
            out.append(max(0.0, 1 - beta * m))
        else:
            out.append(((1 - ls) * -_logsig(beta * m) + ls * _logsig(-beta * m)) / (1 - 2 * ls))
    return sum(out) / len(out)


@pytest.mark.parametrize(
    "kind,ls",
    [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0), ("hinge", 0.0), ("robust", 0.1),
     ("sigmoid_norm", 0.0)],
)  # fmt: skip
def test_dpo_kinds_and_metrics(kind, ls):
    pc, pr, rc, rr, nc, nr = _pairs()
    beta = 0.3
    pc.requires_grad_()
    loss, met = dpo_loss(pc, pr, rc, rr, beta=beta, kind=kind, label_smoothing=ls,
                         chosen_lengths=nc, rejected_lengths=nr)  # fmt: skip
    assert math.isclose(
        float(loss.detach()),
        _formula(kind, pc.detach(), pr, rc, rr, nc, nr, beta, ls),
        rel_tol=1e-5,
    )
    loss.backward()
    assert pc.grad is not None and pc.grad.abs().sum() > 0
    norm = kind in ("ipo", "sigmoid_norm")
    div_c = nc.double() if norm else torch.ones(len(pc), dtype=torch.float64)
    div_r = nr.double() if norm else torch.ones(len(pc), dtype=torch.float64)
    c, r = pc.detach().double() / div_c, pr.double() / div_r
    cr, rj = beta * (c - rc.double() / div_c), beta * (r - rr.double() / div_r)
    want = {
        "rewards/chosen": cr.mean(), "rewards/rejected": rj.mean(),
        "rewards/margins": (cr - rj).mean(), "rewards/accuracies": (cr > rj).double().mean(),
        "logps/chosen": c.mean(), "logps/rejected": r.mean(),
    }  # fmt: skip
    assert sorted(met) == sorted(want)
    for k, v in want.items():
        assert not met[k].requires_grad and met[k].dim() == 0
        assert math.isclose(float(met[k]), float(v), rel_tol=1e-5, abs_tol=1e-6), k
    assert 0 < float(met["rewards/accuracies"]) < 1  # the data has both outcomes


@pytest.mark.parametrize("kind,ls", [("sigmoid", 0.0), ("hinge", 0.0), ("robust", 0.2)])
def test_dpo_matches_liger_formulas(kind, ls):
    from liger_kernel.chunked_loss.dpo_loss import LigerFusedLinearDPOFunction

    pc, pr, rc, rr, _, _ = _pairs(seed=3)
    ours, met = dpo_loss(pc, pr, rc, rr, beta=0.2, kind=kind, label_smoothing=ls)
    theirs, cr, rj = LigerFusedLinearDPOFunction.preference_loss_fn(
        pc, pr, torch.zeros(2 * len(pc)), rc, rr, beta=0.2, loss_type=kind, label_smoothing=ls
    )
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(met["rewards/chosen"], cr.mean(), rtol=1e-6, atol=1e-6)


def test_dpo_sft_term():
    pc, pr, rc, rr, nc, nr = _pairs()
    base, _ = dpo_loss(pc, pr, rc, rr, beta=0.1)
    with_sft, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, sft_weight=0.5, chosen_token_count=100)
    assert math.isclose(float(with_sft - base), 0.5 * -float(pc.sum()) / 100, rel_tol=1e-5)
    default, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, sft_weight=0.5, chosen_lengths=nc)
    assert math.isclose(float(default - base), 0.5 * -float(pc.sum()) / int(nc.sum()), rel_tol=1e-5)


def test_loss_bad_inputs():
    pc, pr, rc, rr, nc, nr = _pairs()
    cases = [
        (dict(kind="kto"), "kind must be one of"),
        (dict(beta=0.0), "beta must be > 0"),
        (dict(kind="robust", label_smoothing=0.5), r"label_smoothing must be in \[0, 0.5\)"),
        (dict(kind="ipo", label_smoothing=0.1), "not used by kind='ipo'"),
        (dict(kind="sigmoid_norm"), "chosen_lengths of shape"),
        (dict(kind="ipo", chosen_lengths=nc), "rejected_lengths of shape"),
        (
            dict(kind="ipo", chosen_lengths=nc * 0, rejected_lengths=nr),
            "chosen_lengths must be > 0",
        ),
        (dict(sft_weight=1.0), "sft_weight > 0 needs"),
    ]
    for kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            dpo_loss(pc, pr, rc, rr, **kw)
    with pytest.raises(ValueError, match="four 1-D tensors"):
        dpo_loss(pc, pr[:3], rc, rr)
    with pytest.raises(ValueError, match="num_target_tokens must be > 0"):
        sft_loss(torch.zeros(4), torch.zeros(4, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="token_logps"):
        sft_loss(torch.zeros(4), torch.zeros(5, dtype=torch.long), 3)
    m = torch.nn.Module()
    with pytest.raises(ValueError, match="same"):
        token_logps(m, torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3), torch.zeros(2, 4))


def test_logsig_helper_is_right():  # the test's own formula helper against torch
    for x in (-30.0, -1.5, 0.0, 2.0, 40.0):
        assert math.isclose(_logsig(x), float(F.logsigmoid(torch.tensor(x, dtype=torch.float64))),
                            rel_tol=1e-12, abs_tol=1e-300)  # fmt: skip
