"""Both linear_logprobs kernels (forward, and the backward's dlogits kernel and GEMMs) compile for
Hopper (sm_90) with the bf16 configurations the GPU runs: no register spills, shared memory within
227 KB, wgmma tensor-core instructions in the PTX, and software pipelining actually on (shared
memory holds at least two stages of operand tiles; without the 16-divisibility the JIT gives real
shapes, Triton silently falls back to one stage)."""

from __future__ import annotations

import pytest

from r7b_fast.kernels.aot import HOPPER_SMEM_LIMIT, compile_in_subprocess
from r7b_fast.kernels.fused_logprobs import AOT_SPECS

LABELS = ("llp_fwd", "llp_dlogits", "llp_matmul_dW", "llp_matmul_dH")


@pytest.fixture(scope="module")
def reports():
    return {r["label"]: r for r in compile_in_subprocess(AOT_SPECS)}


def _stage_bytes(spec) -> int:
    c = spec.constexprs
    if "BLOCK_N" in c:  # hidden tile + weight tile per K step, bf16
        return (c["BLOCK_N"] + c["BLOCK_V"]) * c["BLOCK_K"] * 2
    return (c["BLOCK_M"] + c["BLOCK_P"]) * c["BLOCK_K"] * 2


@pytest.mark.slow
@pytest.mark.parametrize("label", LABELS)
def test_compiles_for_sm90_without_spills(reports, label, cuobjdump_available):
    assert sorted(reports) == sorted(LABELS)
    r = reports[label]
    assert "error" not in r, r.get("error")
    spec = next(s for s in AOT_SPECS if s.label == label)
    assert r["spills"] == 0, r
    assert r["shared_bytes"] <= HOPPER_SMEM_LIMIT, r
    assert r["wgmma"], f"{label}: no wgmma in the PTX (tensor-core path lost)"
    assert r["shared_bytes"] >= 2 * _stage_bytes(spec), f"{label}: not pipelined: {r}"
    assert r["problems"] == []
