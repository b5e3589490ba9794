"""The ahead-of-time Hopper compile helper reports real resource usage (no GPU needed)."""

from pathlib import Path

import pytest

from r7b_fast.kernels.aot import HOPPER_SMEM_LIMIT, AotSpec, compile_in_subprocess

HERE = str(Path(__file__).parent)
MM_SIG = {"a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": "*fp32", "BLOCK": "constexpr"}
SCALE_SIG = {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"}


@pytest.fixture(scope="module")
def reports():
    specs = [
        AotSpec("_aot_toys:toy_matmul", MM_SIG, {"BLOCK": 64}, num_warps=4, label="mm64"),
        AotSpec("_aot_toys:toy_scale", SCALE_SIG, {"BLOCK": 1024}, label="scale"),
        AotSpec("_aot_toys:toy_matmul", MM_SIG, {"BLOCK": 256}, 8, 3, label="mm256"),
    ]
    return {r["label"]: r for r in compile_in_subprocess(specs, extra_path=[HERE])}


def test_bf16_dot_uses_wgmma(reports, cuobjdump_available):
    r = reports["mm64"]
    assert r["wgmma"] and r["spills"] == 0 and r["registers"] > 0
    assert 0 < r["shared_bytes"] <= HOPPER_SMEM_LIMIT and r["problems"] == []


def test_elementwise_has_no_wgmma(reports):
    r = reports["scale"]
    assert not r["wgmma"] and r["spills"] == 0


def test_oversized_shared_memory_is_caught(reports):
    # a 256x256 bf16 tile (2 x 128 KB per stage) cannot fit Hopper's 227 KB: triton refuses (OutOfResources) or the
    # report flags it; either way it is caught before any GPU time is spent.
    r = reports["mm256"]
    if "error" in r:
        assert "shared" in r["error"].lower() or "resource" in r["error"].lower(), r["error"]
    else:
        assert r["shared_bytes"] > HOPPER_SMEM_LIMIT and r["problems"], r
