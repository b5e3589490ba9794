"""r7b_fast.merge refuses bad input clearly and never leaves anything at the output path:
a corpus of malformed headers/indexes/model sets, a mutation fuzz of headers (>= 1000 cases;
R7B_FUZZ_CASES for more), SIGKILL part-way, overwrite rules, engine I/O errors naming the
file, and `python -m r7b_fast.merge` not importing torch."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_merge_helpers import read_raw, reference_merge, write_model, write_safetensors

from r7b_fast import _merge
from r7b_fast.merge import ITEMSIZE, MergeError, main, merge_checkpoints, read_header

F4 = np.float32([1, 2, 3, 4]).tobytes()


def _file(header, data: bytes = b"", n: int | None = None) -> bytes:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(h) if n is None else n) + h + data


def _e(dtype="F32", shape=(4,), offs=(0, 16)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offs)}


# (id, file bytes, expected message fragment)
HEADER_CORPUS = [
    ("short", b"\x01\x00\x00", ">= 8"),
    ("huge-len", struct.pack("<Q", 2**40) + b"{}", "exceeds"),
    ("len-past-eof", _file({"a": _e()}, F4, n=500), "past the end"),
    ("not-utf8", _file(b'{"\xff\xfe":1}'), "not UTF-8"),
    ("not-json", _file(b"{'a': 1}"), "not valid JSON"),
    ("json-array", _file([1, 2]), "not a JSON object"),
    ("nan-const", _file(b'{"a": NaN}'), "not valid JSON"),
    ("dup-name", _file(b'{"a":' + json.dumps(_e()).encode() + b',"a":' + json.dumps(_e()).encode() + b"}", F4), "duplicate"),
    ("unknown-dtype", _file({"a": _e(dtype="F12")}, F4), "unknown dtype"),
    ("dtype-not-str", _file({"a": {**_e(), "dtype": 3}}, F4), "unknown dtype"),
    ("shape-float", _file({"a": {**_e(), "shape": [4.0]}}, F4), "shape"),
    ("shape-neg", _file({"a": _e(shape=(-4,))}, F4), "shape"),
    ("shape-bool", _file({"a": {**_e(), "shape": [True]}}, F4), "shape"),
    ("shape-not-list", _file({"a": {**_e(), "shape": 4}}, F4), "shape"),
    ("offs-len", _file({"a": {**_e(), "data_offsets": [0]}}, F4), "data_offsets"),
    ("offs-reversed", _file({"a": _e(offs=(16, 0))}, F4), "data_offsets"),
    ("offs-str", _file({"a": {**_e(), "data_offsets": ["0", "16"]}}, F4), "data_offsets"),
    ("missing-key", _file({"a": {"dtype": "F32", "shape": [4]}}, F4), "exactly"),
    ("extra-key", _file({"a": {**_e(), "x": 1}}, F4), "exactly"),
    ("entry-not-obj", _file({"a": [1]}, F4), "exactly"),
    ("bytes-mismatch", _file({"a": _e(shape=(3,))}, F4), "is 12"),
    ("numel-overflow", _file({"a": _e(shape=(2**62, 2**62))}, F4), "more bytes"),
    ("gap", _file({"a": _e(shape=(2,), offs=(0, 8)), "b": _e(shape=(1,), offs=(12, 16))}, F4), "gap"),
    ("overlap", _file({"a": _e(shape=(3,), offs=(0, 12)), "b": _e(shape=(2,), offs=(8, 16))}, F4), "overlap"),
    ("not-from-0", _file({"a": _e(shape=(3,), offs=(4, 16))}, F4), "expected 0"),
    ("trailing-bytes", _file({"a": _e()}, F4 + b"\0"), "file holds"),
    ("data-short", _file({"a": _e()}, F4[:12]), "file holds"),
    ("meta-not-str", _file({"__metadata__": {"k": 1}, "a": _e()}, F4), "__metadata__"),
    ("meta-not-obj", _file({"__metadata__": "x", "a": _e()}, F4), "__metadata__"),
]  # fmt: skip


def _assert_refused(tmp_path, models, match, out="out", **kw):
    with pytest.raises(MergeError, match=match):
        merge_checkpoints(models, tmp_path / out, progress=False, **kw)
    assert not (tmp_path / out).exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".{out}")]


@pytest.mark.parametrize(
    "blob,match", [c[1:] for c in HEADER_CORPUS], ids=[c[0] for c in HEADER_CORPUS]
)
def test_malformed_header_refused(tmp_path, blob, match):
    good = write_model(tmp_path / "good", {"a": ("F32", np.float32([1, 2, 3, 4]))})
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes(blob)
    _assert_refused(tmp_path, [good, bad], match)
    assert str(bad / "model.safetensors") in _message(
        lambda: read_header(bad / "model.safetensors")
    )


def _message(fn) -> str:
    try:
        fn()
    except MergeError as e:
        return str(e)
    raise AssertionError("no MergeError")


def _sharded(tmp_path, name="s") -> Path:
    t = {k: ("F32", np.float32([i, 1])) for i, k in enumerate("abc")}
    return write_model(tmp_path / name, t, shards=[["a", "b"], ["c"]])


def _set_map(d: Path, wm) -> None:
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))


INDEX_CASES = {
    "missing-shard": (lambda d: (d / "part-1.safetensors").unlink(), "does not exist"),
    "extra-tensor": (lambda d: _set_map(d, {"a": "part-0.safetensors", "c": "part-1.safetensors"}), "extra"),
    "wrong-file": (lambda d: _set_map(d, {"a": "part-1.safetensors", "b": "part-0.safetensors", "c": "part-1.safetensors"}), "index does not say"),
    "traversal": (lambda d: _set_map(d, {"a": "../x.safetensors"}), "plain file name"),
    "not-json": (lambda d: (d / "model.safetensors.index.json").write_text("{"), "unreadable index"),
    "no-weight-map": (lambda d: (d / "model.safetensors.index.json").write_text("{}"), "weight_map"),
    "no-weights": (lambda d: [p.unlink() for p in d.glob("*.safetensors*")], "neither"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(INDEX_CASES))
def test_malformed_index_refused(tmp_path, case):
    good, bad = _sharded(tmp_path, "good"), _sharded(tmp_path, "bad")
    mutate, match = INDEX_CASES[case]
    mutate(bad)
    _assert_refused(tmp_path, [good, bad], match)


@pytest.mark.parametrize(
    "other,match",
    [({"a": ("F32", np.zeros(3, np.float32))}, r"a: shape/dtype differ \(F32\[2\], F32\[3\]\)"),
     ({"a": ("F16", np.zeros(2, np.float32))}, r"a: shape/dtype differ"),
     ({"b": ("F32", np.zeros(2, np.float32))}, r"(?s)a: missing in .*b: missing in")],
)  # fmt: skip
def test_models_that_disagree_are_refused_before_reading_data(tmp_path, other, match):
    m0 = write_model(tmp_path / "m0", {"a": ("F32", np.zeros(2, np.float32))})
    m1 = write_model(tmp_path / "m1", other)
    _assert_refused(tmp_path, [m0, m1], match)


def test_bad_arguments_refused(tmp_path):
    m = [write_model(tmp_path / f"m{k}", {"a": ("F32", np.ones(2, np.float32))}) for k in range(2)]
    _assert_refused(tmp_path, m, "weights: got 1", weights=[1.0])
    _assert_refused(tmp_path, m, "sum to 0", weights=[1.0, -1.0])
    _assert_refused(tmp_path, m, "needs a base", method="task_arithmetic")
    _assert_refused(tmp_path, m, "method must be", method="breadcrumbs")  # not implemented
    _assert_refused(tmp_path, m, "dtype must be", dtype="int8")
    _assert_refused(tmp_path, m, "threads", threads=0)
    _assert_refused(tmp_path, m, "max_shard_size", max_shard_size="lots")
    with pytest.raises(MergeError, match="must not be"):
        merge_checkpoints(m, m[0] / "sub", progress=False)
    f64 = write_model(tmp_path / "f64", {"a": ("F32", np.ones(2, np.float32))})
    write_safetensors(f64 / "model.safetensors", {"a": ("F64", (2,), bytes(16))})
    _assert_refused(tmp_path, [f64, f64], "F32/F16/BF16")


@pytest.mark.parametrize(
    "kw,match",
    [({"chunk_bytes": 63}, "chunk_bytes"), ({"chunk_bytes": 0}, "chunk_bytes"),
     ({"chunk_bytes": "2MB"}, "chunk_bytes"), ({"chunk_bytes": 64.0}, "chunk_bytes"),
     ({"chunk_bytes": True}, "chunk_bytes"), ({"threads": True}, "threads"),
     ({"threads": 2.0}, "threads"), ({"max_shard_size": True}, "max_shard_size")],
)  # fmt: skip
def test_engine_arguments_refused_before_any_directory_is_made(tmp_path, kw, match):
    """chunk_bytes must be an int >= 64 (the engine's minimum; it is rounded down to a multiple
    of 64, so 63 would become 0); threads / max_shard_size must not be bools."""
    m = [write_model(tmp_path / f"m{k}", {"a": ("F32", np.ones(2, np.float32))}) for k in range(2)]
    with pytest.raises(MergeError, match=match):
        merge_checkpoints(m, tmp_path / "new" / "out", progress=False, **kw)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m0", "m1"]


def test_smallest_chunk_bytes_merges_exactly(tmp_path):
    """chunk_bytes=64 (the bound) splits a 100-element tensor into 16-float chunks; integer
    values halve exactly in fp32, so the bytes must equal numpy's (x0 + x1) / 2."""
    x = [np.arange(100, dtype=np.float32) * (k + 1) for k in range(2)]
    m = [write_model(tmp_path / f"m{k}", {"a": ("F32", x[k])}) for k in range(2)]
    merge_checkpoints(m, tmp_path / "out", chunk_bytes=64, threads=2, progress=False)
    assert read_raw(tmp_path / "out")["a"][2] == ((x[0] + x[1]) / 2).tobytes()


def test_at_most_256_sources_base_included(tmp_path, capsys):
    """The engine takes at most 256 sources per tensor (csrc/engine.cpp kMaxSources) and a
    non-floating tensor reads every model, base included: 256 work, 257 are a MergeError
    naming `models` before any directory is made (the CLI answers it with exit status 2)."""
    m = []
    for k in range(257):
        m.append(write_model(tmp_path / "in" / f"m{k}", {"a": ("F32", np.float32([k, 1]))}))
        write_safetensors(m[-1] / "model.safetensors", {
            "a": ("F32", (2,), np.float32([k, 1]).tobytes()),
            "i": ("I32", (2,), np.int32([7, -7]).tobytes())})  # fmt: skip
    merge_checkpoints(m[:255], tmp_path / "ok", base=m[255], progress=False)
    got = read_raw(tmp_path / "ok")
    xs = [np.float32([k, 1]) for k in range(255)]  # the base's coefficient 0 drops it
    assert got["a"][2] == reference_merge(xs, [1 / 255] * 255, "F32")
    assert got["i"][2] == np.int32([7, -7]).tobytes()
    for models, base in [(m, None), (m[:256], m[256]), (m[:256] + m[:1], None)]:
        with pytest.raises(MergeError, match=r"models: at most 256 .* got 257"):
            merge_checkpoints(models, tmp_path / "new" / "out", base=base, progress=False)
    args = [a for p in m for a in ("--model", str(p))]
    assert main([*args, "--out", str(tmp_path / "new" / "out")]) == 2
    assert "models: at most 256" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "ok"]


def test_overwrite_rules(tmp_path):
    m = [write_model(tmp_path / f"m{k}", {"a": ("F32", np.float32([k, 1]))}) for k in range(2)]
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(FileExistsError, match="overwrite"):
        merge_checkpoints(m, out, progress=False)
    assert (out / "keep").read_text() == "x"
    merge_checkpoints(m, out, overwrite=True, progress=False)
    assert not (out / "keep").exists() and read_raw(out)["a"][2] == np.float32([0.5, 1]).tobytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m0", "m1", "out"]


def _snapshot(d: Path) -> dict[str, bytes]:
    return {str(f.relative_to(d)): f.read_bytes() for f in sorted(d.rglob("*")) if f.is_file()}


@pytest.mark.parametrize("overwrite", [True, False])
@pytest.mark.parametrize("role", ["models", "base"])
def test_out_containing_an_input_model_is_refused_and_inputs_kept(tmp_path, role, overwrite):
    """`out` = the parent of an input model (a model or the base) would be replaced, deleting
    the inputs: refused with a MergeError naming `out`, before anything is written or removed."""
    w = tmp_path / "w"
    m = [write_model(w / f"m{k}", {"a": ("F32", np.float32([k, 1]))}) for k in range(2)]
    models, base = (m, None) if role == "models" else ([tmp_path / "x"], m[0])
    if role == "base":
        write_model(tmp_path / "x", {"a": ("F32", np.float32([5, 1]))})
    before = _snapshot(tmp_path)
    with pytest.raises(MergeError, match=f"out {str(w)!r} must not"):
        merge_checkpoints(models, w, base=base, overwrite=overwrite, progress=False)
    with pytest.raises(MergeError, match="must not"):  # the same through a relative path
        merge_checkpoints(models, os.path.relpath(w), base=base, overwrite=True, progress=False)
    assert _snapshot(tmp_path) == before
    assert {p.name for p in tmp_path.iterdir()} == ({"w", "x"} if role == "base" else {"w"})


def _mutations(blob: bytes):
    """Strategy: a valid file with byte flips, truncation/extension, or a rewritten length."""
    pos = st.integers(0, len(blob) - 1)
    flip = st.lists(st.tuples(pos, st.integers(0, 255)), min_size=1, max_size=4)
    return st.one_of(
        flip.map(lambda fs: bytes(_apply(blob, fs))),
        st.integers(0, len(blob) - 1).map(lambda n: blob[:n]),
        st.binary(min_size=1, max_size=9).map(lambda b: blob + b),
        st.integers(0, 2**64 - 1).map(lambda n: struct.pack("<Q", n) + blob[8:]),
        st.tuples(pos, st.binary(min_size=1, max_size=6)).map(
            lambda t: blob[: t[0]] + t[1] + blob[t[0] :]
        ),
    )


def _apply(blob, flips):
    b = bytearray(blob)
    for i, v in flips:
        b[i] = v
    return b


FUZZ_CASES = int(os.environ.get("R7B_FUZZ_CASES", "1000"))
VALID = _file(
    {"__metadata__": {"format": "pt"}, "w": _e("BF16", (2, 3), (0, 12)), "b": _e("I32", (1,), (12, 16)),
     "s": _e("F16", (), (16, 18)), "z": _e("F32", (0,), (18, 18))},
    bytes(range(18)),
)  # fmt: skip


@settings(max_examples=FUZZ_CASES, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))  # fmt: skip
@given(blob=_mutations(VALID))
def test_fuzz_mutated_headers(tmp_path_factory, blob):
    """Every mutation is either refused with MergeError or accepted with consistent entries."""
    p = tmp_path_factory.getbasetemp() / "fuzz.safetensors"
    p.write_bytes(blob)
    try:
        ts = read_header(p)
    except MergeError:
        return
    (n,) = struct.unpack("<Q", blob[:8])
    spans = sorted((t.offset, t.offset + t.nbytes) for t in ts.values())
    pos = 8 + n
    for b, e in spans:  # contiguous from the data start to the end of the file
        assert b == pos
        pos = e
    assert pos == len(blob)
    for t in ts.values():
        assert t.nbytes == int(np.prod(t.shape, dtype=object)) * ITEMSIZE[t.dtype]


def test_engine_io_errors_name_the_file(tmp_path):
    src = tmp_path / "in.bin"
    src.write_bytes(bytes(64))
    dst = tmp_path / "out.bin"
    dst.write_bytes(b"")
    task = ("x", _merge.MERGE, 0, 0, _merge.F32, 16, [0], [0], _merge.F32, [1.0])
    with pytest.raises(OSError, match="cannot open input.*nope.bin"):
        _merge.Engine([str(tmp_path / "nope.bin")], [str(dst)], [task]).run()
    beyond = ("x", _merge.MERGE, 0, 0, _merge.F32, 16, [0], [32], _merge.F32, [1.0])
    with pytest.raises(OSError, match="unexpected end of file in '.*in.bin'"):
        _merge.Engine([str(src)], [str(dst)], [beyond]).run()
    with pytest.raises(OSError, match="cannot open output.*missing/o.bin"):
        _merge.Engine([str(src)], [str(tmp_path / "missing" / "o.bin")], [task]).run()
    e = _merge.Engine([str(src)], [str(dst)], [task], threads=1, chunk_bytes=64)
    e.run()
    assert (e.done_bytes, e.total_bytes) == (64, 64) and dst.read_bytes() == bytes(64)


KILL_CHILD = """
import os, signal, sys
from r7b_fast.merge import merge_checkpoints
def progress(done, total):
    if 0 < done < total:
        print(f"killing at {done}/{total}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
merge_checkpoints(sys.argv[1:3], sys.argv[3], threads=1, simd="scalar", progress=progress)
"""


def _sparse_model(d: Path, numel: int) -> Path:
    """A model whose one F32 tensor is a hole in a sparse file (instant to create, all zeros)."""
    d.mkdir()
    h = json.dumps({"a": _e("F32", (numel,), (0, 4 * numel))}).encode()
    with open(d / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        f.truncate(8 + len(h) + 4 * numel)
    return d


def test_sigkill_part_way_leaves_nothing_at_out(tmp_path):
    m = [_sparse_model(tmp_path / f"m{k}", 128 << 20) for k in range(2)]  # 512 MiB each, sparse
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-c", KILL_CHILD, str(m[0]), str(m[1]), str(out)],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == -signal.SIGKILL, r.stderr  # killed by the progress poll, part-way
    assert "killing at" in r.stdout and not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.merge-tmp-")]
    small = [write_model(tmp_path / f"s{k}", {"a": ("F32", np.float32([k, 1]))}) for k in range(2)]
    merge_checkpoints(small, out, progress=False)  # a later merge succeeds and clears the debris
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m0", "m1", "out", "s0", "s1"]


def test_cli_does_not_import_torch(tmp_path):
    """`--help`, and a whole CLI merge, without importing torch (checked with -X importtime)."""
    m = [write_model(tmp_path / f"m{k}", {"a": ("BF16", np.float32([k, 1]))}) for k in range(2)]
    merge = ["--out", str(tmp_path / "o"), "--model", f"{m[0]}:1", "--model", f"{m[1]}:3"]
    for args in (["--help"], merge):
        r = subprocess.run([sys.executable, "-X", "importtime", "-m", "r7b_fast.merge", *args],
                           capture_output=True, text=True, timeout=60)  # fmt: skip
        assert r.returncode == 0, r.stderr[-2000:]
        imported = [line.split("|")[-1].strip() for line in r.stderr.splitlines() if "|" in line]
        assert "r7b_fast" in imported and not [x for x in imported if x.split(".")[0] == "torch"]
    assert "r7b_fast._merge" in imported and "merged 1 tensors" in r.stdout
    assert read_raw(tmp_path / "o")["a"][2] == bytes.fromhex("403f803f")  # bf16 0.75, 1.0


RSS_CHILD = """
import sys
from r7b_fast.merge import merge_checkpoints
merge_checkpoints(sys.argv[1:4], sys.argv[4], threads=2, progress=False)
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
print(int(hwm.split()[1]) // 1024)
"""


def test_memory_stays_bounded_by_the_buffers_not_the_model(tmp_path):
    """3 models of one 48 MB tensor each: a tensor-at-a-time merge would hold >= 144 MB; the
    engine holds 2 * threads * (3 + 1) * 2 MiB = 32 MiB of buffers (plus the interpreter)."""
    m = [
        write_model(tmp_path / f"m{k}", {"a": ("F32", np.full(12_000_000, k, np.float32))})
        for k in range(3)
    ]
    r = subprocess.run([sys.executable, "-c", RSS_CHILD, *map(str, m), str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    peak_mib = int(r.stdout.split()[-1])
    assert peak_mib < 90, f"peak RSS {peak_mib} MiB"
    assert read_raw(tmp_path / "out")["a"][2][:8] == np.float32([1, 1]).tobytes()
