"""Every autotune candidate of the linear_logprobs kernels (forward, the backward's dlogits kernel
and its dW / dH GEMMs) compiles for Hopper (sm_90) with the JIT's specialisation at the real shape,
under the GPU image's Triton (3.6, installed into a side directory) and the venv's: no register
spills, no stack frame, shared memory within 227 KB, wgmma tensor-core instructions, and the main
loop software-pipelined (cp.async in the PTX; shared memory holds at least two stages of operand
tiles). The autotuner may pick any candidate, so each one must be clean."""

from __future__ import annotations

import pytest

import r7b_fast.kernels._fused_logprobs_triton as llp_triton
from r7b_fast.kernels.aot import GPU_TRITON_VERSION, HOPPER_SMEM_LIMIT, compile_in_subprocess
from r7b_fast.kernels.fused_logprobs import AOT_SPECS


@pytest.fixture(scope="module", params=["venv", GPU_TRITON_VERSION])
def reports(request):
    version = None if request.param == "venv" else request.param
    return {r["label"]: r for r in compile_in_subprocess(AOT_SPECS, triton_version=version)}


def _stage_bytes(spec) -> int:
    c = spec.constexprs
    if "BLOCK_N" in c:  # hidden tile + weight tile per K step, bf16
        return (c["BLOCK_N"] + c["BLOCK_V"]) * c["BLOCK_K"] * 2
    return (c["BLOCK_M"] + c["BLOCK_P"]) * c["BLOCK_K"] * 2


def test_one_spec_per_candidate_including_128x256():
    """The specs follow the candidate lists: adding a candidate adds its AOT check."""
    want = {}
    for kind, fn in (("fwd", "_llp_fwd_kernel"), ("dl", "_llp_dlogits_kernel")):
        for c in llp_triton._GPU[kind]:
            want.setdefault(fn, []).append((c["BLOCK_N"], c["BLOCK_V"], c["BLOCK_K"]))
    for kind in ("dw", "dh"):
        for c in llp_triton._GPU[kind]:
            key = (c["BLOCK_M"], c["BLOCK_P"], c["BLOCK_K"])
            want.setdefault("_matmul_kernel", []).extend([key] * (1 if kind == "dw" else 2))
    got = {}
    for s in AOT_SPECS:
        c, fn = s.constexprs, s.target.split(":")[1]
        key = (c.get("BLOCK_N", c.get("BLOCK_M")), c.get("BLOCK_V", c.get("BLOCK_P")), c["BLOCK_K"])
        got.setdefault(fn, []).append(key)
        assert s.pipelined and s.divisible, s.label
    assert {k: sorted(v) for k, v in got.items()} == {k: sorted(v) for k, v in want.items()}
    for fn in want:  # 128x256 tiles are among every kernel's candidates
        assert any(k[:2] == (128, 256) for k in got[fn]), fn
    assert len({s.label for s in AOT_SPECS}) == len(AOT_SPECS)


@pytest.mark.slow  # ~40-60 s per Triton version (10 sm_90 compiles)
@pytest.mark.parametrize("label", [s.label for s in AOT_SPECS])
def test_compiles_for_sm90_clean(reports, label, cuobjdump_available):
    r = reports[label]
    assert "error" not in r, r.get("error")
    spec = next(s for s in AOT_SPECS if s.label == label)
    assert r["spills"] == 0 and r["stack"] == 0, r
    assert r["shared_bytes"] <= HOPPER_SMEM_LIMIT, r
    assert r["wgmma"], f"{label}: no wgmma in the PTX (tensor-core path lost)"
    assert r["cp_async"], f"{label}: no cp.async: main loop not pipelined: {r}"
    assert r["shared_bytes"] >= 2 * _stage_bytes(spec), f"{label}: not pipelined: {r}"
    assert r["problems"] == []
