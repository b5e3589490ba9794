"""The ahead-of-time Hopper compile helper reports real resource usage (no GPU needed)."""

from pathlib import Path

import pytest

import r7b_fast.kernels.aot as aot
from r7b_fast.kernels.aot import (
    GPU_TRITON_VERSION,
    HOPPER_SMEM_LIMIT,
    AotSpec,
    KernelReport,
    compile_in_subprocess,
)

HERE = str(Path(__file__).parent)
MM_SIG = {"a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": "*fp32", "BLOCK": "constexpr"}
SCALE_SIG = {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"}
LOOP_SIG = {
    **dict(a_ptr="*bf16", b_ptr="*bf16", c_ptr="*fp32"),
    **dict.fromkeys(("K", "stride_a", "stride_b", "stride_c"), "i32"),
    **dict.fromkeys(("BLOCK_M", "BLOCK_N", "BLOCK_K"), "constexpr"),
}
LOOP_TILES = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64)
LOOP_DIV = [k for k, t in LOOP_SIG.items() if t != "constexpr"]


def _loop_specs() -> list[AotSpec]:
    """The same pipelinable K loop compiled as the GPU's JIT sees it at real shapes (pointers,
    sizes and strides divisible by 16) and without that specialisation (issue 15, item 1: the
    attention specs lacked it, so their reports showed neither cp.async nor the real smem)."""
    t = "_aot_toys:toy_loop_matmul"
    return [
        AotSpec(t, LOOP_SIG, LOOP_TILES, 8, 3, label="loop_plain", pipelined=True),
        AotSpec(t, LOOP_SIG, LOOP_TILES, 8, 3, label="loop_div", divisible=LOOP_DIV,
                pipelined=True),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def reports():
    specs = [
        AotSpec("_aot_toys:toy_matmul", MM_SIG, {"BLOCK": 64}, num_warps=4, label="mm64"),
        AotSpec("_aot_toys:toy_scale", SCALE_SIG, {"BLOCK": 1024}, label="scale"),
        AotSpec("_aot_toys:toy_matmul", MM_SIG, {"BLOCK": 256}, 8, 3, label="mm256"),
        *_loop_specs(),
    ]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("R7B_AOT_JOBS", "2")  # two workers: reports still come back in spec order
        out = compile_in_subprocess(specs, extra_path=[HERE])
    assert [r["label"] for r in out] == [s.label for s in specs]
    return {r["label"]: r for r in out}


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


def _check_divisible_decides_pipelining(plain: dict, div: dict) -> None:
    # without the hint: no async copies, so problems() names it (how item 1 would have been caught)
    assert not plain["cp_async"], plain
    assert any("cp.async" in p for p in plain["problems"]), plain["problems"]
    # with it: cp.async in the main loop, several stages of A and B tiles in shared memory
    assert div["cp_async"] and div["wgmma"] and div["problems"] == [], div
    stage = (128 + 128) * 64 * 2  # one A and one B bf16 tile
    assert div["shared_bytes"] >= 2 * stage > plain["shared_bytes"] - stage, (plain, div)


def test_divisible_hint_decides_pipelining(reports, cuobjdump_available):
    _check_divisible_decides_pipelining(reports["loop_plain"], reports["loop_div"])


def test_stack_frames_and_missing_pipelining_are_problems():
    base = dict(name="k", registers=128, spills=0, stack=0, shared_bytes=1024, wgmma=True, ptx="")
    assert KernelReport(**base).problems() == []
    assert "stack frame" in " ".join(KernelReport(**{**base, "stack": 16}).problems())
    assert KernelReport(**base, pipelined=True).problems()  # expected cp.async, none in the PTX
    assert KernelReport(**base, pipelined=True, cp_async=True).problems() == []


@pytest.mark.slow  # ~15-35 s: a second compile subprocess (plus a ~10 s pip install, first time)
def test_gpu_image_triton_compiles_and_reports_its_version(cuobjdump_available):
    """The GPU image's Triton (3.6), installed into the side directory (cached across runs; a
    failed install raises, so this cannot pass without it), compiles the toys, names itself in
    every report, and shows the same specialisation effect as the venv's Triton."""
    specs = [AotSpec("_aot_toys:toy_matmul", MM_SIG, {"BLOCK": 64}, label="mm64"), *_loop_specs()]
    got = {r["label"]: r for r in compile_in_subprocess(specs, [HERE], GPU_TRITON_VERSION)}
    assert {r["triton_version"] for r in got.values()} == {GPU_TRITON_VERSION}, got
    assert got["mm64"]["wgmma"] and got["mm64"]["problems"] == []
    _check_divisible_decides_pipelining(got["loop_plain"], got["loop_div"])


def test_failed_side_install_raises(tmp_path, monkeypatch):
    monkeypatch.setattr(aot, "SIDE_TRITON_ROOT", str(tmp_path))
    with pytest.raises(RuntimeError, match="could not install triton==0.0.0"):
        aot.side_triton("0.0.0")
