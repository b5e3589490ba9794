"""The three attention kernels compile for sm_90 with the bf16, head-dim-128 configs the GPU runs
(causal and causal + window): no register spills, neither as local memory (cuobjdump LOCAL) nor
as a stack frame (where sm_90 put them for larger tiles: 250-1000 B per thread), shared memory
within 227 KB, and wgmma (Hopper tensor cores) in the three tl.dot kernels."""

import pytest

from r7b_fast.kernels.aot import HOPPER_SMEM_LIMIT, compile_in_subprocess
from r7b_fast.kernels.attention import AOT_SPECS

KERNELS = {"attn_fwd_kernel", "attn_bwd_dkdv_kernel", "attn_bwd_dq_kernel"}  # tl.dot: wgmma
DELTA = "attn_bwd_delta_kernel"  # elementwise rowsum(dO * O): no dot


@pytest.fixture(scope="module")
def reports():
    return compile_in_subprocess(AOT_SPECS)


def test_specs_cover_all_three_kernels_at_bf16_d128():
    assert {s.target.split(":")[1] for s in AOT_SPECS} == KERNELS | {DELTA}
    for s in AOT_SPECS:
        assert s.constexprs["HEAD_DIM"] == 128
        if DELTA in s.target:
            assert s.signature["Out"] == s.signature["DO"] == "*bf16"
            continue
        assert s.signature["Q"] == "*bf16"
        assert s.constexprs["CAST"] is False  # the GPU keeps bf16 dot operands
    assert {s.constexprs.get("HAS_WINDOW") for s in AOT_SPECS} == {False, True, None}


@pytest.mark.slow
def test_kernels_compile_for_hopper_without_spills(reports, cuobjdump_available):
    assert len(reports) == len(AOT_SPECS)
    for r in reports:
        assert "error" not in r, r
        assert r["spills"] == 0 and r["stack"] == 0, r
        assert 0 < r["shared_bytes"] <= HOPPER_SMEM_LIMIT, r
        assert r["wgmma"] == (DELTA not in r["label"]), r
        assert r["problems"] == [], r
