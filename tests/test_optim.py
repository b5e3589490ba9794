"""r7b_fast.optim: `optim.implementation` (fused / foreach / for_loop AdamW) gives the same update
as a float64 AdamW written out from its formula, and `auto` picks foreach on the CPU."""

import pytest
import torch

from r7b_fast.config import ConfigError, load_config
from r7b_fast.optim import build_optimizer, implementation_kwargs

LR, BETAS, EPS, WD = 1e-2, (0.9, 0.95), 1e-8, 0.1


class Toy(torch.nn.Module):
    """A matrix (decayed) and a 1-D vector (not decayed), odd sizes (no multiple of a SIMD width)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(7, 13, generator=g))
        self.b = torch.nn.Parameter(torch.randn(13, generator=g))


def cfg(implementation: str):
    return load_config(
        None,
        ["run.output_dir=x", "data.synthetic_families=[digits_ar]", f"optim.lr={LR}",
         f"optim.weight_decay={WD}", "optim.warmup_steps=0", "optim.schedule=constant",
         f"optim.implementation={implementation}"],
    )  # fmt: skip


def grads(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return {"w": torch.randn(7, 13, generator=g), "b": torch.randn(13, generator=g) * 1e-3}


def run(implementation: str, steps: int = 4) -> dict[str, torch.Tensor]:
    model = Toy()
    opt, sched = build_optimizer(cfg(implementation), model, total_steps=steps)
    for step in range(steps):
        for name, p in model.named_parameters():
            p.grad = grads(step)[name].clone()
        opt.step()
        sched.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def reference(steps: int = 4) -> dict[str, torch.Tensor]:
    """AdamW (decoupled decay, bias correction) in float64, from the formula."""
    out = {}
    for name, p0 in Toy().named_parameters():
        p = p0.detach().double()
        m, v = torch.zeros_like(p), torch.zeros_like(p)
        wd = WD if p.ndim >= 2 else 0.0
        for t in range(1, steps + 1):
            g = grads(t - 1)[name].double()
            p = p * (1 - LR * wd)
            m = BETAS[0] * m + (1 - BETAS[0]) * g
            v = BETAS[1] * v + (1 - BETAS[1]) * g * g
            m_hat, v_hat = m / (1 - BETAS[0] ** t), v / (1 - BETAS[1] ** t)
            p = p - LR * m_hat / (v_hat.sqrt() + EPS)
        out[name] = p
    return out


@pytest.mark.parametrize("implementation", ["fused", "foreach", "for_loop", "auto"])
def test_each_implementation_matches_float64_adamw(implementation):
    ref = reference()
    got = run(implementation)
    for name in ref:
        # 4 updates of size ~lr=1e-2 computed in fp32: rounding ~1e-7 relative per op, so 1e-6
        # absolute; a wrong decay mask, bias correction or eps moves them by >= 1e-4.
        torch.testing.assert_close(got[name].double(), ref[name], rtol=0, atol=1e-6)


def test_implementations_agree_with_each_other():
    fused, foreach, loop = run("fused"), run("foreach"), run("for_loop")
    for name in fused:  # same fp32 formula, different op order: a few ulps
        torch.testing.assert_close(fused[name], foreach[name], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(loop[name], foreach[name], rtol=1e-6, atol=1e-7)


def test_kwargs_per_implementation_and_device():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert implementation_kwargs("auto", cpu) == {"foreach": True}
    assert implementation_kwargs("auto", cuda) == {"fused": True}
    assert implementation_kwargs("fused", cpu) == {"fused": True}  # CPU fused AdamW (torch >= 2.4)
    assert implementation_kwargs("for_loop", cuda) == {"foreach": False}
    opt, _ = build_optimizer(cfg("auto"), Toy(), total_steps=1)
    assert opt.defaults["foreach"] is True and not opt.defaults["fused"]
    with pytest.raises(ConfigError, match="optim.implementation: fused AdamW is not available"):
        implementation_kwargs("fused", torch.device("meta"))


def test_config_refuses_an_unknown_implementation():
    with pytest.raises(ConfigError, match="optim.implementation"):
        cfg("apex")
