"""Special values through every SIMD path this CPU has (the `simd` argument and R7B_MERGE_SIMD):
subnormal inputs and outputs survive (the engine clears flush-to-zero / denormals-are-zero in
MXCSR for its compute threads), and NaN / +-Inf in the scalar tail after the 8- or 16-lane
vector body come out as the canonical quiet NaN 0x7FC00000 (bf16 0x7FC0, fp16 0x7E00) -- x86's
own default NaN from Inf - Inf is 0xFFC00000, so a missing canonicalisation shows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_merge_helpers import read_raw, reference_merge, write_model
from test_merge_methods import out_bytes, ref_gta, ref_slerp

from r7b_fast import _merge
from r7b_fast.merge import merge_checkpoints

SIMD = _merge.available_simd()
LANES = {"scalar": 1, "avx2": 8, "avx512": 16}
N = 16 * 3 + 7  # a vector body for both widths, then a 7-element scalar tail
TINY = np.float32(2.0**-126)  # the smallest normal fp32 (and bf16)
BITS = {"F32": np.uint32, "BF16": np.uint16, "F16": np.uint16}


def _data(out: str) -> bytes:
    return read_raw(Path(out))["a"][2]


def _run(tmp_path, xs, simd, how, monkeypatch, **kw) -> str:
    paths = [write_model(tmp_path / f"m{k}", {"a": ("F32", x)}) for k, x in enumerate(xs)]
    out = tmp_path / f"o-{simd}-{how}-{kw.get('method', 'linear')}-{kw.get('dtype')}"
    if how == "env":
        monkeypatch.setenv("R7B_MERGE_SIMD", simd)
    s = merge_checkpoints(paths if kw.get("method") != "ties" else paths[1:], out,
                          simd=simd if how == "arg" else "auto", threads=1, progress=False,
                          base=paths[0] if "method" in kw else None, **kw)  # fmt: skip
    assert s["simd"] == simd
    monkeypatch.delenv("R7B_MERGE_SIMD", raising=False)
    return str(out)


@pytest.mark.parametrize("how", ["arg", "env"])
@pytest.mark.parametrize("simd", SIMD)
@pytest.mark.parametrize("out_dtype", ["F32", "BF16"])
def test_subnormals_survive(tmp_path, simd, how, out_dtype, monkeypatch):
    rng = np.random.default_rng(0)
    x0 = (rng.uniform(-1, 1, N) * TINY).astype(np.float32)  # subnormal inputs
    x1 = (rng.uniform(-1, 1, N) * TINY).astype(np.float32)
    assert np.sum(np.abs(x0) < TINY) > N // 2
    out = _run(tmp_path, [x0, x1], simd, how, monkeypatch, weights=[0.25, 0.5],
               normalize=False, dtype=out_dtype)  # fmt: skip
    want = reference_merge([x0, x1], [0.25, 0.5], out_dtype)
    got = np.frombuffer(_data(out), BITS[out_dtype])
    vals = (
        got.view(np.float32)
        if out_dtype == "F32"
        else (got.astype(np.uint32) << 16).view(np.float32)
    )
    sub = (vals != 0) & (np.abs(vals) < TINY)
    assert sub[: N - 7].sum() > 10 and sub[N - 7 :].sum() > 2  # in the vector body and the tail
    assert _data(out) == want


@pytest.mark.parametrize("simd", SIMD)
def test_subnormals_survive_ties_and_slerp(tmp_path, simd, monkeypatch):
    rng = np.random.default_rng(1)
    xs = [(rng.uniform(-1, 1, N) * TINY).astype(np.float32) for _ in range(3)]
    out = _run(tmp_path, xs, simd, "arg", monkeypatch, method="ties", density=0.5,
               weights=[0.6, 0.3])  # fmt: skip
    want = ref_gta("ties", xs, [0.6, 0.3], [0.5, 0.5], "a")
    assert np.sum((want != 0) & (np.abs(want) < TINY)) > N // 2
    assert _data(out) == out_bytes(want, "F32")
    out = _run(tmp_path, xs[:2], simd, "arg", monkeypatch, method="slerp", t=0.4)
    want = ref_slerp(xs[0], xs[1], 0.4)
    assert np.sum((want != 0) & (np.abs(want) < TINY)) > N // 2
    assert _data(out) == out_bytes(want, "F32")


def _specials(simd: str):
    """x0, x1 with NaN (negative, with payload), +-Inf and Inf - Inf placed in the scalar tail
    of `simd` and in its vector body."""
    x0 = np.linspace(-1, 1, N).astype(np.float32)
    x1 = np.linspace(2, -2, N).astype(np.float32)
    tail = N - N % LANES[simd] if simd != "scalar" else N - 7
    neg_nan = np.uint32(0xFFC12345).view(np.float32)
    for base in (tail, 5):  # the tail, then the vector body
        x0[base + 0], x1[base + 0] = np.inf, -np.inf  # Inf - Inf: x86's default NaN 0xFFC00000
        x0[base + 1] = neg_nan  # a NaN operand propagates its sign and payload
        x1[base + 2] = np.inf
        x0[base + 3] = -np.inf
        x0[base + 4], x1[base + 4] = np.float32(3e38), np.float32(3e38)  # overflow to Inf
    return x0, x1, tail


@pytest.mark.parametrize("how", ["arg", "env"])
@pytest.mark.parametrize("simd", SIMD)
@pytest.mark.parametrize("out_dtype", ["F32", "BF16", "F16"])
def test_nan_and_inf_in_the_scalar_tail_are_canonical(tmp_path, simd, how, out_dtype, monkeypatch):
    x0, x1, tail = _specials(simd)
    out = _run(tmp_path, [x0, x1], simd, how, monkeypatch, weights=[1.0, 1.0], normalize=False,
               dtype=out_dtype)  # fmt: skip
    got = np.frombuffer(_data(out), BITS[out_dtype])
    nan = {"F32": 0x7FC00000, "BF16": 0x7FC0, "F16": 0x7E00}[out_dtype]
    inf = {"F32": 0x7F800000, "BF16": 0x7F80, "F16": 0x7C00}[out_dtype]
    neg_inf = inf | (0x80000000 if out_dtype == "F32" else 0x8000)
    for base in (tail, 5):
        assert list(got[base : base + 5]) == [nan, nan, inf, neg_inf, inf]
    assert _data(out) == reference_merge([x0, x1], [1.0, 1.0], out_dtype)
