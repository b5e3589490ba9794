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


def _real_launch_ints(monkeypatch) -> dict[str, dict[str, list[int]]]:
    """Every integer argument each kernel gets at N=8192, H=4096, V=256000 bf16 on 132 SMs, as
    the launchers compute them (all backward chunks, the ragged last one included)."""
    monkeypatch.setattr(llp_triton, "interpreting", lambda: False)  # the GPU's tiles and groups
    N, H, V, sms = 8192, 4096, 256000, 132
    rows = llp_triton._chunk_rows(N, V, H, 2, sms, 80 << 30)
    chunks = [(v0, min(rows, V - v0)) for v0 in range(0, V, rows)]
    group_rows = llp_triton._group_rows(H, 2)
    splits = llp_triton._fwd_splits(-(-N // 128), -(-V // 256), sms, group_rows // 128)
    common = dict(N=[N], K=[H], stride_h=[H], stride_w=[H], group_rows=[group_rows])
    return {
        "fwd": dict(common, V=[V], n_splits=[splits]),
        "dlogits": dict(common, Vc=[r for _, r in chunks], v_start=[v for v, _ in chunks],
                        stride_dl=[rows]),
        "dW": dict(M=[r for _, r in chunks], P=[H], K=[N], stride_a=[rows], stride_b=[H],
                   stride_c=[H]),
        "dH": dict(M=[N], P=[H], K=[r for _, r in chunks], stride_a=[rows], stride_b=[H],
                   stride_c=[H]),
    }  # fmt: skip


def test_specs_carry_the_jits_specialisation_at_the_real_shape(monkeypatch):
    """An integer argument is marked divisible exactly when every value the launcher passes at
    the real shape is a multiple of 16 (what the JIT checks); every pointer is marked, and every
    pointer the launchers pass there (chunk slices of weight and dW included) is 16-byte
    aligned. A spec missing a hint compiles a kernel the GPU never runs (issue 15, item 1)."""
    real = _real_launch_ints(monkeypatch)
    assert real["fwd"]["n_splits"][0] % 16 != 0  # the one integer not divisible there
    for v0 in real["dlogits"]["v_start"]:  # weight[v0:], dW[v0:] with 4096 bf16 per row
        assert v0 * 4096 * 2 % 16 == 0
    for spec in AOT_SPECS:
        kind = next(k for k in real if f"_{k}" in spec.label)
        for arg, typ in spec.signature.items():
            if typ.startswith("*"):
                assert arg in spec.divisible, (spec.label, arg)
            elif typ == "i32":
                want = all(v % 16 == 0 for v in real[kind][arg])
                assert (arg in spec.divisible) == want, (spec.label, arg, real[kind][arg])


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
