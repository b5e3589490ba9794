"""Independent numpy reference for the merge engine, and tests of that reference itself.

- `fma32(a, b, c)`: correctly rounded fp32 fused multiply-add, emulated in float64 (a*b is
  exact in float64; the only double-rounding hazard, a float64 sum landing exactly on an fp32
  midpoint, is resolved with the TwoSum error term).
- `to_bf16_bits` / `to_f16_bits`: round-to-nearest-even written here, by methods different from
  the engine's (bf16: compare the dropped half-word with 0x8000; fp16: scale by the ulp and
  np.rint), NaN -> canonical quiet NaN.
- `reference_merge(xs, coefs, out_dtype)`: acc = c0*x0, then acc = fma(c_j, x_j, acc), rounded.
- `write_model` / `read_raw`: safetensors writer/reader written from the format spec.
"""

from __future__ import annotations

import json
import struct
from fractions import Fraction
from pathlib import Path

import numpy as np

F32_NAN = np.uint32(0x7FC00000)


def fma32(a, b, c) -> np.ndarray:
    """Correctly rounded fp32 a*b + c (arrays of float32, broadcastable)."""
    a, b, c = (np.asarray(x, np.float32).astype(np.float64) for x in (a, b, c))
    with np.errstate(all="ignore"):
        p = a * b  # exact: 24 + 24 bits < 53
        s = p + c
        bb = s - p
        e = (p - (s - bb)) + (c - bb)  # s + e == p + c exactly (TwoSum)
        r = s.astype(np.float32)
        r64 = r.astype(np.float64)
        d = s - r64
        toward = np.where(d > 0, np.float32(np.inf), np.float32(-np.inf)).astype(np.float32)
        nb = np.nextafter(r, toward)
        half = (d != 0) & (d == (nb.astype(np.float64) - r64) / 2)
        fix = half & (e != 0) & (np.sign(e) == np.sign(d))
    return np.where(fix, nb, r).astype(np.float32)


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """fp32 -> bf16 bits, round to nearest even; NaN -> 0x7FC0."""
    u = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    lo, rem = u >> 16, u & 0xFFFF
    up = (rem > 0x8000) | ((rem == 0x8000) & (lo & 1 == 1))
    out = (lo + up).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FC0), out)


def to_f16_bits(x: np.ndarray) -> np.ndarray:
    """fp32 -> fp16 bits, round to nearest even (subnormals, overflow to Inf); NaN -> 0x7E00."""
    x = np.asarray(x, np.float32).astype(np.float64)
    fin = np.isfinite(x)
    xf = np.where(fin, x, 0.0)
    _, e = np.frexp(xf)  # |x| in [2^(e-1), 2^e)
    ulp = np.ldexp(1.0, np.maximum(e - 11, -24))
    q = np.rint(xf / ulp) * ulp  # rint rounds half to even
    q = np.where(np.abs(q) > 65504.0, np.copysign(np.inf, xf), q)
    q = np.where(fin, q, x)
    bits = q.astype(np.float16).view(np.uint16)  # exact: q is representable
    return np.where(np.isnan(x), np.uint16(0x7E00), bits)


def from_bits(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Storage array (uint16 bits for BF16/F16, float32 for F32) -> float32 values."""
    if dtype == "BF16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    if dtype == "F16":
        return raw.view(np.float16).astype(np.float32)
    return raw.astype(np.float32)


def encode(values: np.ndarray, dtype: str) -> bytes:
    """float32 values -> stored bytes in `dtype` (rounded to nearest even)."""
    v = np.asarray(values, np.float32)
    if dtype == "F32":
        return v.tobytes()
    return (to_bf16_bits(v) if dtype == "BF16" else to_f16_bits(v)).tobytes()


def reference_merge(xs: list[np.ndarray], coefs: list[float], out_dtype: str) -> bytes:
    """Bytes of sum_j coefs[j] * xs[j] as the engine defines it (fp32 fma chain, then RNE)."""
    c = [np.float32(v) for v in coefs]
    with np.errstate(all="ignore"):
        acc = (c[0] * np.asarray(xs[0], np.float32)).astype(np.float32)
    for cj, xj in zip(c[1:], xs[1:]):
        acc = fma32(cj, xj, acc)
    if out_dtype == "F32":
        return np.where(np.isnan(acc), F32_NAN.view(np.float32), acc).astype(np.float32).tobytes()
    return encode(acc, out_dtype)


def random_values(rng, dtype: str, shape, scale=1.0) -> np.ndarray:
    """float32 values exactly representable in `dtype`."""
    v = (rng.standard_normal(shape) * scale).astype(np.float32)
    return from_bits(
        np.frombuffer(encode(v, dtype), {"F32": np.float32}.get(dtype, np.uint16)).reshape(v.shape),
        dtype,
    )


def write_safetensors(path: Path, tensors: dict[str, tuple[str, tuple, bytes]], pad=True) -> None:
    """tensors: name -> (dtype, shape, raw bytes), written in the given order."""
    head, pos = {}, 0
    for name, (dt, shape, raw) in tensors.items():
        head[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [pos, pos + len(raw)]}
        pos += len(raw)
    h = json.dumps(head).encode()
    if pad:
        h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        for _, _, raw in tensors.values():
            f.write(raw)


def write_model(
    d: Path, tensors: dict[str, tuple[str, np.ndarray]], shards=None, config=None
) -> Path:
    """A model dir: tensors name -> (dtype, float32 values); `shards` = list of name lists (an
    index is written) or None (single model.safetensors)."""
    d.mkdir(parents=True, exist_ok=True)
    enc = {n: (dt, v.shape, encode(v, dt)) for n, (dt, v) in tensors.items()}
    if shards is None:
        write_safetensors(d / "model.safetensors", enc)
    else:
        wm = {}
        for k, names in enumerate(shards):
            fname = f"part-{k}.safetensors"
            write_safetensors(d / fname, {n: enc[n] for n in names})
            wm.update({n: fname for n in names})
        (d / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": wm})
        )
    (d / "config.json").write_text(
        json.dumps(config or {"model_type": "toy", "tie_word_embeddings": False})
    )
    return d


def read_raw(d: Path) -> dict[str, tuple[str, tuple, bytes]]:
    """All tensors of an output dir as name -> (dtype, shape, raw bytes); checks 8-byte padding."""
    files = [d / "model.safetensors"]
    if (d / "model.safetensors.index.json").exists():
        wm = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
        files = [d / f for f in sorted(set(wm.values()))]
    out = {}
    for f in files:
        blob = f.read_bytes()
        (n,) = struct.unpack("<Q", blob[:8])
        assert n % 8 == 0, f"{f}: header length {n} not padded to 8"
        head = json.loads(blob[8 : 8 + n])
        head.pop("__metadata__", None)
        for name, e in head.items():
            b, end = e["data_offsets"]
            out[name] = (e["dtype"], tuple(e["shape"]), blob[8 + n + b : 8 + n + end])
    return out


# ---------------------------------------------------------------- tests of the reference itself


def _exact_f32_neighbours_ok(a, b, c, r) -> bool:
    exact = Fraction(float(a)) * Fraction(float(b)) + Fraction(float(c))
    dr = abs(exact - Fraction(float(r)))
    for nb in (np.nextafter(r, np.float32(np.inf)), np.nextafter(r, np.float32(-np.inf))):
        dn = abs(exact - Fraction(float(nb)))
        if dn < dr or (dn == dr and int(np.float32(nb).view(np.uint32)) % 2 == 0):
            return False
    return True


def test_fma32_is_correctly_rounded():
    rng = np.random.default_rng(0)
    a = rng.standard_normal(3000).astype(np.float32)
    b = rng.standard_normal(3000).astype(np.float32)
    c = rng.standard_normal(3000).astype(np.float32)
    # crafted ties: c chosen so a*b + c sits at (or one float64 ulp off) an fp32 midpoint
    a[:1000] = np.float32(1 + 2**-12)
    b[:1000] = np.float32(1 + 2**-12)  # a*b = 1 + 2^-11 + 2^-24 (exactly a midpoint above 1+2^-11)
    c[:1000] = np.float32(0)
    c[1000:1500] = np.float32(2.0**-60) * np.sign(rng.standard_normal(500)).astype(np.float32)
    a[1000:1500], b[1000:1500] = a[0], b[0]
    r = fma32(a, b, c)
    assert all(_exact_f32_neighbours_ok(a[i], b[i], c[i], r[i]) for i in range(len(a)))
    assert r[0] == np.float32(1 + 2**-11)  # tie to even
    assert r[1000] != r[1001] or np.sign(c[1000]) == np.sign(c[1001])


def test_rne_references_match_numpy_casts():
    rng = np.random.default_rng(1)
    x = np.concatenate([
        rng.standard_normal(20000).astype(np.float32) * np.float32(1000),
        (rng.standard_normal(5000) * 1e-6).astype(np.float32),  # fp16 subnormals
        np.array([65504, 65519.99, 65520, -65520, 6e-8, 3e-8, 2.98e-8, 0.0, -0.0, np.inf, -np.inf], np.float32),
    ])  # fmt: skip
    with np.errstate(over="ignore"):  # the cast overflows to Inf on purpose
        assert np.array_equal(to_f16_bits(x), x.astype(np.float16).view(np.uint16))
    # bf16 against an exact float64 nearest-even search over the two candidates
    x = x[np.isfinite(x)]
    u = x.view(np.uint32)
    lo = (u & 0xFFFF0000).view(np.float32).astype(np.float64)
    hi = ((u & 0xFFFF0000) + 0x10000).view(np.float32).astype(np.float64)
    dlo, dhi = np.abs(x - lo), np.abs(hi - x)
    want_hi = (dhi < dlo) | ((dhi == dlo) & (((u >> 16) & 1) == 1))
    want = np.where(want_hi, (u >> 16) + 1, u >> 16).astype(np.uint16)
    assert np.array_equal(to_bf16_bits(x), want)
    nan = np.array([np.nan, -np.nan], np.float32)
    assert list(to_bf16_bits(nan)) == [0x7FC0, 0x7FC0] and list(to_f16_bits(nan)) == [0x7E00] * 2
