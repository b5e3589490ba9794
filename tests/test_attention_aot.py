"""The attention kernels compile for sm_90 as the GPU builds them: every head-dim-128 bf16 config
the autotuner may pick (causal and causal + window; both backward schedules), at the JIT's
divisible-by-16 specialisation, with the GPU image's Triton (3.6) and the venv's. Each must have
no register spills, neither as local memory nor as a stack frame, shared memory within 227 KB,
wgmma (Hopper tensor cores) in the tl.dot kernels, and cp.async in their PTX: their main loops
are software pipelined (without the divisible-by-16 hint they were not: issue 15, item 1)."""

import pytest

from r7b_fast.kernels import attention_bwd, attention_fwd
from r7b_fast.kernels.aot import GPU_TRITON_VERSION, HOPPER_SMEM_LIMIT, compile_in_subprocess
from r7b_fast.kernels.attention import AOT_SPECS

KERNELS = {"attn_fwd_kernel", "attn_bwd_dkdv_kernel", "attn_bwd_dq_kernel"}  # tl.dot: wgmma
DELTA = "attn_bwd_delta_kernel"  # elementwise rowsum(dO * O): no dot
CANDIDATES = {
    "attn_fwd_kernel": attention_fwd.FWD_CANDIDATES[128],
    "attn_bwd_dkdv_kernel": attention_bwd.DKDV_CANDIDATES[128],
    "attn_bwd_dkdv_kernel+atomic_dq": attention_bwd.ATOMIC_CANDIDATES[128],  # atomic schedule
    "attn_bwd_dq_kernel": attention_bwd.DQ_CANDIDATES[128],
}


def test_specs_cover_every_autotune_candidate_at_bf16_d128():
    assert {s.target.split(":")[1] for s in AOT_SPECS} == KERNELS | {DELTA}
    for name, candidates in CANDIDATES.items():
        got = sorted(
            (s.constexprs["BLOCK_M"], s.constexprs["BLOCK_N"], s.num_warps, s.num_stages,
             s.constexprs["HAS_WINDOW"])
            for s in AOT_SPECS if s.label.split("[")[0] == name
        )  # fmt: skip
        assert got == sorted((*c, w) for c in candidates for w in (False, True)), name
    for s in AOT_SPECS:
        assert s.constexprs["HEAD_DIM"] == 128
        # what the JIT specialises at R7B's shapes: pointers, strides, T (and the window)
        assert {"T", "stride_ot", "stride_oh"} <= set(s.divisible), s.label
        assert "B" not in s.divisible  # the number of sequences is anything
        if DELTA in s.target:
            assert s.signature["Out"] == s.signature["DO"] == "*bf16"
            continue
        assert s.pipelined
        assert {"Q", "K", "V", "window", "stride_qt", "stride_kt"} <= set(s.divisible), s.label
        assert s.signature["Q"] == "*bf16"
        assert s.constexprs["CAST"] is False and s.constexprs["ROUND"] is False  # GPU: bf16 dots
    assert {s.constexprs.get("HAS_WINDOW") for s in AOT_SPECS} == {False, True, None}


def test_the_tuner_prunes_to_the_head_dims_candidates():
    """triton.autotune benchmarks only the calling head dim's candidates (fp32: its one tile),
    and the tuning key leaves out T and the lengths (one tuning per layer shape)."""
    for tuner, cands, fp32 in (
        (attention_fwd.attn_fwd_tuned, attention_fwd.FWD_CANDIDATES, attention_fwd.FWD_CONFIG_FP32),
        (attention_bwd.attn_bwd_dq_tuned, attention_bwd.DQ_CANDIDATES, attention_bwd.BWD_CONFIG_FP32),
    ):  # fmt: skip
        assert "T" not in tuner.keys and "B" not in tuner.keys and "HEAD_DIM" in tuner.keys
        for d in (16, 64, 128):
            got = tuner.early_config_prune(tuner.configs, {}, HEAD_DIM=d, DOT_PREC="tf32")
            as_tuple = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
                        for c in got]  # fmt: skip
            assert as_tuple == cands[d]
        got = tuner.early_config_prune(tuner.configs, {}, HEAD_DIM=128, DOT_PREC="ieee")
        assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
                for c in got] == [fp32]  # fmt: skip


def check(reports):
    assert len(reports) == len(AOT_SPECS)
    for r in reports:
        assert "error" not in r, r
        assert r["spills"] == 0 and r["stack"] == 0, r
        assert 0 < r["shared_bytes"] <= HOPPER_SMEM_LIMIT or DELTA in r["label"], r
        assert r["wgmma"] == (DELTA not in r["label"]), r
        if DELTA not in r["label"]:
            assert r["cp_async"], r  # pipelined main loop
        assert r["problems"] == [], r


@pytest.mark.slow  # ~1-4 min on a loaded 2-core machine
def test_kernels_compile_for_hopper_with_the_gpu_images_triton(cuobjdump_available):
    check(compile_in_subprocess(AOT_SPECS, triton_version=GPU_TRITON_VERSION))


@pytest.mark.slow
def test_kernels_compile_for_hopper_with_the_venvs_triton(cuobjdump_available):
    check(compile_in_subprocess(AOT_SPECS))
