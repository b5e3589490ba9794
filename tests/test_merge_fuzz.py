"""Seeded fuzzer (slow tier): >= 10,000 malformed merge inputs, each built to be malformed by
construction (no random flip that might leave a file valid), each must be a clean MergeError
with nothing at the output path (no `out`, no temporary sibling):

- safetensors headers: header length (past the end, over 100 MB, short), truncated / extended
  files, invalid JSON, invalid UTF-8, non-object headers, duplicate keys, non-JSON constants,
  bad dtypes, shapes and data_offsets, extra / missing entry keys, gaps and overlaps, bad
  __metadata__;
- sharded indexes: unreadable JSON, bad weight_map, missing / non-plain / misassigned shards;
- plans: weights, densities, t, seed, methods, base; models with missing or extra tensors or a
  disagreeing shape / dtype; mergekit YAML with a wrong key, type or value.

Runs in-process (no subprocess per case). Plus a SIGKILL in the middle of a TIES merge."""

from __future__ import annotations

import json
import signal
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_merge_helpers import write_model, write_safetensors
from test_merge_validation import _sparse_model  # the same sparse one-tensor model

from r7b_fast.merge import MergeError, load_mergekit_yaml, merge_checkpoints

pytestmark = pytest.mark.slow
N_HEADER, N_INDEX, N_PLAN, N_YAML = 6000, 1000, 2000, 1500  # >= 10,200 cases checked
TENSORS = {"a": ("F32", [2, 3]), "b": ("BF16", [5]), "c": ("I32", [1]), "d": ("F16", [])}
SIZES = {"F32": 4, "BF16": 2, "I32": 4, "F16": 2}


def _entries() -> dict:
    head, pos = {"__metadata__": {"format": "pt"}}, 0
    for name, (dt, shape) in TENSORS.items():
        n = SIZES[dt] * int(np.prod(shape, dtype=np.int64))
        head[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [pos, pos + n]}
        pos += n
    return head


DATA_LEN = _entries()["d"]["data_offsets"][1]


def _pick(rng: np.random.Generator, seq):
    return seq[int(rng.integers(0, len(seq)))]


def _blob(text: bytes, data: bytes = bytes(DATA_LEN), n: int | None = None) -> bytes:
    return struct.pack("<Q", len(text) if n is None else n) + text + data


def _enc(head) -> bytes:
    return json.dumps(head, separators=(",", ":")).encode()


BAD_DTYPES = ["F8", "f32", "", "BF 16", "F4", "Q4_0", 3, None, ["F32"], {"F32": 1}]
BAD_DIMS = [-1, 1.5, "2", None, True, [2], -(2**63), 2**64]
BAD_OFFS = [[0], [0, 1, 2], [5, 1], [-4, 20], ["0", 24], [0.0, 24.0], None, "0-24", [None, 24]]


def _header_case(rng: np.random.Generator) -> bytes:
    """One malformed file; the mutation kind cycles through every family."""
    head = _entries()
    name = str(rng.choice(list(TENSORS)))
    e = head[name]
    kind = int(rng.integers(0, 19))
    text = _enc(head)
    if kind == 0:  # header length past the end of the file
        return _blob(text, n=len(text) + DATA_LEN + 1 + int(rng.integers(0, 2**40)))
    if kind == 1:  # over MAX_HEADER
        return _blob(text, n=100_000_001 + int(rng.integers(0, 2**62)))
    if kind == 2:  # header length too short: JSON cut, or the data region misread
        return _blob(text, n=int(rng.integers(0, len(text))))
    if kind == 3:  # a truncated file
        b = _blob(text)
        return b[: int(rng.integers(0, len(b)))]
    if kind == 4:  # trailing bytes after the data
        return _blob(text) + rng.bytes(int(rng.integers(1, 65)))
    if kind == 5:  # a structural character deleted
        pos = [i for i, ch in enumerate(text) if ch in b'{}[]":,']
        i = int(rng.choice(pos))
        return _blob(text[:i] + text[i + 1 :])
    if kind == 6:  # invalid UTF-8 inside a string
        i = text.index(b'"', 2) + 1
        return _blob(text[:i] + bytes([int(rng.choice([0xFF, 0xC3, 0x80, 0xFE]))]) + text[i:])
    if kind == 7:  # not an object
        return _blob(_enc(_pick(rng, [[1, 2], 3, "x", None, [head]])))
    if kind == 8:  # a duplicate key
        dup = f'"{name}":' + json.dumps(e, separators=(",", ":"))
        return _blob(text[:-1] + b"," + dup.encode() + b"}")
    if kind == 9:  # a non-JSON constant
        e["data_offsets"][int(rng.integers(0, 2))] = float(rng.choice([np.nan, np.inf, -np.inf]))
        return _blob(json.dumps(head).encode())
    if kind == 10:
        e["dtype"] = BAD_DTYPES[int(rng.integers(0, len(BAD_DTYPES)))]
    elif kind == 11:
        if e["shape"]:
            e["shape"][int(rng.integers(0, len(e["shape"])))] = BAD_DIMS[int(rng.integers(0, 8))]
        else:
            e["shape"] = ["()", 0, None, {"n": 1}][int(rng.integers(0, 4))]
    elif kind == 12:  # a shape whose byte size disagrees with data_offsets
        e["shape"] = [*e["shape"], int(rng.integers(2, 9))]
    elif kind == 13:
        e["data_offsets"] = BAD_OFFS[int(rng.integers(0, len(BAD_OFFS)))]
    elif kind == 14:  # an extra or a missing entry key
        if rng.integers(0, 2):
            e[str(rng.choice(["offset", "dtype2", "", "meta"]))] = 0
        else:
            del e[str(rng.choice(["dtype", "shape", "data_offsets"]))]
    elif kind == 15:  # a gap: every tensor from `name` on moves by k bytes (file unchanged)
        k = int(rng.integers(1, 9))
        for other in list(TENSORS)[list(TENSORS).index(name) :]:
            head[other]["data_offsets"] = [o + k for o in head[other]["data_offsets"]]
    elif kind == 16:  # an overlap: one tensor starts inside an earlier one
        later = [n for n in TENSORS if head[n]["data_offsets"][0] > 0]
        t = head[str(rng.choice(later))]
        size = t["data_offsets"][1] - t["data_offsets"][0]
        b0 = int(rng.integers(0, t["data_offsets"][0]))
        t["data_offsets"] = [b0, b0 + size]
    elif kind == 17:
        head["__metadata__"] = [{"format": 1}, ["pt"], "pt", {"x": None}][int(rng.integers(0, 4))]
    else:  # an entry that is not a mapping
        head[name] = [e["dtype"], e["shape"], e["data_offsets"]]
    return _blob(_enc(head))


def _assert_clean(tmp: Path, fn, what) -> None:
    out = tmp / "out"
    try:
        fn(out)
    except MergeError:
        pass
    else:
        raise AssertionError(f"accepted: {what!r}")
    assert not out.exists() and not list(tmp.glob(".out.merge-*")), what


def test_fuzz_malformed_headers(tmp_path):
    rng = np.random.default_rng(20261201)
    good = write_model(tmp_path / "good", {"x": ("F32", np.float32([1, 2]))})
    bad = tmp_path / "bad"
    bad.mkdir()
    for _ in range(N_HEADER):
        blob = _header_case(rng)
        (bad / "model.safetensors").write_bytes(blob)
        _assert_clean(
            tmp_path, lambda out: merge_checkpoints([bad, good], out, progress=False), blob
        )


def _sharded(d: Path) -> dict:
    d.mkdir(parents=True, exist_ok=True)
    write_safetensors(d / "p0.safetensors", {"a": ("F32", (2,), bytes(8))})
    write_safetensors(
        d / "p1.safetensors", {"b": ("F32", (1,), bytes(4)), "c": ("F32", (), bytes(4))}
    )
    return {"metadata": {}, "weight_map": {"a": "p0.safetensors", "b": "p1.safetensors",
                                           "c": "p1.safetensors"}}  # fmt: skip


def test_fuzz_malformed_indexes(tmp_path):
    rng = np.random.default_rng(7)
    d = tmp_path / "m"
    idx_path = d / "model.safetensors.index.json"
    for _ in range(N_INDEX):
        idx = _sharded(d)
        wm = idx["weight_map"]
        kind = int(rng.integers(0, 8))
        if kind == 0:
            text = json.dumps(idx)[: int(rng.integers(0, 40))]
        else:
            if kind == 1:
                idx["weight_map"] = [[1, 2], "x", None, 3][int(rng.integers(0, 4))]
            elif kind == 2:
                wm[str(rng.choice(list(wm)))] = [1, None, 2.5][int(rng.integers(0, 3))]
            elif kind == 3:
                wm[str(rng.choice(list(wm)))] = f"p{int(rng.integers(2, 99))}.safetensors"
            elif kind == 4:
                wm[str(rng.choice(list(wm)))] = ["../p0.safetensors", "sub/p0.safetensors", "",
                                                 ".", ".."][int(rng.integers(0, 5))]  # fmt: skip
            elif kind == 5:  # a tensor assigned to the other shard
                n = str(rng.choice(list(wm)))
                wm[n] = "p1.safetensors" if wm[n] == "p0.safetensors" else "p0.safetensors"
            elif kind == 6:  # a tensor the shards do not hold
                wm[f"extra{int(rng.integers(0, 9))}"] = str(
                    rng.choice(["p0.safetensors", "p1.safetensors"])
                )
            else:  # a tensor missing from the map (its shard still listed: p1 holds b and c)
                del wm[str(rng.choice(["b", "c"]))]
            text = json.dumps(idx)
        idx_path.write_text(text)
        _assert_clean(tmp_path, lambda out: merge_checkpoints([d, d], out, progress=False), text)


def _plan_models(tmp: Path) -> list[Path]:
    t = {"a": ("BF16", np.float32([1, 2, 3])), "b": ("F32", np.zeros((2, 2), np.float32))}
    base = write_model(tmp / "p0", t)
    ok = [write_model(tmp / f"p{k}", t) for k in (1, 2)]
    odd = [
        write_model(tmp / "missing", {"a": t["a"]}),
        write_model(tmp / "extra", {**t, "z": ("F32", np.float32([0]))}),
        write_model(tmp / "shape", {**t, "b": ("F32", np.zeros((4,), np.float32))}),
        write_model(tmp / "dtype", {**t, "a": ("F16", np.float32([1, 2, 3]))}),
    ]
    return [base, *ok, *odd]


BAD_NUMBERS = [float("nan"), float("inf"), -float("inf"), "1", None, True, [1.0], {"w": 1}]


def _plan_case(rng, models):
    """Keyword arguments of one invalid merge_checkpoints call."""
    base, ok, odd = models[0], models[1:3], models[3:]
    method = str(
        rng.choice(["linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "slerp"])
    )
    kw = dict(models=list(ok), method=method, base=base)
    if method == "slerp":
        kw.update(models=[ok[0]], t=0.5)
    elif method != "linear" and method != "task_arithmetic":
        kw.update(density=0.5)
    kind = int(rng.integers(0, 9))
    if kind == 0:  # a model that disagrees (missing / extra tensor, shape, dtype)
        kw["models"] = [*kw["models"], odd[int(rng.integers(0, len(odd)))]]
        if method == "slerp":
            kw["models"] = kw["models"][1:]
    elif kind == 1:
        kw["method"] = str(rng.choice(["breadcrumbs", "TIES", "", "della", "model_stock"]))
    elif kind == 2 and method != "slerp":
        w = [1.0] * len(kw["models"])
        w[int(rng.integers(0, len(w)))] = BAD_NUMBERS[int(rng.integers(0, len(BAD_NUMBERS)))]
        kw["weights"] = w
    elif kind == 3 and method != "slerp":  # one weight too many or too few
        kw["weights"] = [0.5] * (len(kw["models"]) + int(rng.choice([-1, 1])))
    elif kind == 4 and method in ("ties", "dare_linear", "dare_ties"):
        d = _pick(rng, [0.0, -0.1, 1.01, 2.0, -1e9, *[b for b in BAD_NUMBERS if b is not None]])
        kw["density"] = d if rng.integers(0, 2) else [0.5, d]
    elif kind == 5 and method == "slerp":
        kw["t"] = [float(rng.uniform(1.0001, 9)), -0.5, *BAD_NUMBERS][int(rng.integers(0, 10))]
    elif kind == 6 and method.startswith("dare"):
        kw["seed"] = [-1, 2**64, 1.5, "7", True, None][int(rng.integers(0, 6))]
    elif kind == 7 and method != "linear":
        kw["base"] = None
    else:  # a parameter the method does not take
        key = {"slerp": "density", "linear": "t", "task_arithmetic": "density"}.get(method, "t")
        kw[key] = 0.5
    return kw


def test_fuzz_invalid_plans(tmp_path):
    rng = np.random.default_rng(11)
    models = _plan_models(tmp_path)
    for _ in range(N_PLAN):
        kw = _plan_case(rng, models)
        _assert_clean(
            tmp_path, lambda out, kw=kw: merge_checkpoints(out=out, progress=False, **kw), kw
        )


YAML_FAULTS = [
    ("merge_method: ties", "merge_method: {m}"),
    ("weight: 0.5", "weight: {v}"),
    ("density: 0.5", "density: {v}"),
    ("normalize: true", "normalize: {v}"),
    ("base_model: {base}", "base_model: {v}"),
    ("  - model: {m1}", "  - model: {v}"),
    ("parameters: {{normalize: true}}", "parameters: {{{k}: 1}}"),
    ("    parameters: {{weight: 0.5, density: 0.5}}", "    parameters: {{weight: 0.5, {k}: 1}}"),
    ("dtype: bfloat16", "dtype: {d}"),
    ("models:", "modelz:"),
]
YAML_TEMPLATE = """merge_method: ties
base_model: {base}
models:
  - model: {m1}
    parameters: {{weight: 0.5, density: 0.5}}
  - model: {m2}
    parameters: {{weight: 0.5, density: 0.5}}
parameters: {{normalize: true}}
dtype: bfloat16
"""


def test_fuzz_invalid_yaml(tmp_path):
    rng = np.random.default_rng(13)
    models = _plan_models(tmp_path)
    y = tmp_path / "m.yaml"
    good = YAML_TEMPLATE.format(base=models[0], m1=models[1], m2=models[2])
    load_mergekit_yaml(y.write_text(good) and y)  # the template itself is valid
    values = ["[1]", "'x'", "{a: 1}", "null", ".nan", "-.inf", "2.0", "-1", "0", "true", "[", "}"]
    checked = 0
    for _ in range(N_YAML):
        old, new = YAML_FAULTS[int(rng.integers(0, len(YAML_FAULTS)))]
        v = str(rng.choice(values))
        if (old.startswith("weight") and v in ("2.0", "-1", "0")) or (
            old.startswith("normalize") and v in ("true", "null")  # null: the default
        ):
            continue  # valid values for these keys
        bad = new.format(m=rng.choice(["tiess", "slerp", "linear_x", "[ties]"]), v=v,
                         k=rng.choice(["lambda", "int8_mask", "epsilon", "gamma", "t"]),
                         d=rng.choice(["int8", "float64", "[bf16]", "fp8"]), base=models[0])  # fmt: skip
        text = good.replace(old.format(base=models[0], m1=models[1]), bad, 1)
        assert text != good
        y.write_text(text)
        _assert_clean(tmp_path, lambda out: merge_checkpoints(out=out, progress=False,
                                                              **load_mergekit_yaml(y)), text)  # fmt: skip
        checked += 1
    assert checked >= 1200


KILL_CHILD = """
import os, signal, sys
from r7b_fast.merge import merge_checkpoints
def progress(done, total):
    if 0 < done < total:
        print(f"killing at {done}/{total}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
merge_checkpoints(sys.argv[2:4], sys.argv[4], base=sys.argv[1], method="ties", density=0.5,
                  threads=1, progress=progress)
"""


def test_sigkill_mid_ties_merge_leaves_nothing(tmp_path):
    m = [_sparse_model(tmp_path / f"m{k}", 24 << 20) for k in range(3)]  # 96 MiB each, sparse
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-c", KILL_CHILD, *map(str, m), str(out)],
                       capture_output=True, text=True, timeout=170)  # fmt: skip
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert "killing at" in r.stdout and not out.exists()
