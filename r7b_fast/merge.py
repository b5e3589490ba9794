"""Merge expert checkpoints (sharded safetensors): Python plans, the C++ engine moves bytes.

`merge_checkpoints(models, out, ...)` and `python -m r7b_fast.merge --out DIR --model P[:W] ...`
(or `--config merge.yaml`, mergekit's YAML for `linear` / `task_arithmetic`).

What happens, in order (DESIGN.md §7):
1. Every model directory is read: a single `model.safetensors`, or `model.safetensors.index.json`
   plus shards (experts may be sharded differently). Every header is validated strictly
   (`read_header`) and every index is checked against its shards (`read_model`).
2. Tensor names, shapes and dtypes must agree across all models (base included) before any
   tensor data is read; the error lists the disagreeing tensors.
3. The method becomes one weighted sum per tensor with fp32 coefficients (`coefficients`):
   linear: sum_i w_i x_i (w normalised to sum 1 when `normalize`, the default, as in mergekit);
   task_arithmetic: base + sum_i w_i (x_i - base) = (1 - sum w) base + sum w_i x_i, experts
   being the models other than the base (normalize defaults to False, as in mergekit).
   Sources with a coefficient of exactly 0 are not read.
4. Output shards are laid out HF-style (`model.safetensors`, or `model-0000i-of-0000N.safetensors`
   + `model.safetensors.index.json` with `metadata.total_size` when over `max_shard_size`),
   tensors sorted by name, headers padded to 8 bytes; `lm_head.weight` is dropped when the
   base/first config has `tie_word_embeddings: true`.
5. `r7b_fast._merge.Engine` computes every floating tensor as a chain of fp32 fused
   multiply-adds in source order (base first), rounded to nearest even to the output dtype
   (NaN -> canonical quiet NaN), and copies non-floating tensors after checking they are
   identical in every model.
6. Everything is written into a hidden temporary sibling directory, the config / tokenizer /
   generation files of the base (or first) model are copied, and the directory is renamed onto
   `out` only when complete: an interrupted or killed merge leaves nothing at `out`.

This module must not import torch (it starts in well under a second).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import struct
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

# safetensors dtype -> bytes per element (sub-byte float formats are not supported).
ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
    "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}  # fmt: skip
ENGINE_DTYPE = {"F32": 0, "F16": 1, "BF16": 2}  # floating dtypes the engine combines
NON_FLOAT = {"BOOL", "U8", "I8", "I16", "U16", "I32", "U32", "I64", "U64"}  # copied, never mixed
DTYPE_NAMES = {
    "bfloat16": "BF16", "bf16": "BF16", "float16": "F16", "fp16": "F16", "half": "F16",
    "float32": "F32", "fp32": "F32", "float": "F32",
}  # fmt: skip
MAX_HEADER = 100 * 1000 * 1000
BUFFER_BUDGET = 128 << 20  # the engine's buffers, whatever the number of models or threads
SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"
COPIED_FILES = re.compile(
    r"^(config\.json|generation_config\.json|tokenizer.*|special_tokens_map\.json|"
    r"added_tokens\.json|chat_template.*|vocab.*|merges\.txt|.*\.jinja)$"
)
METHODS = ("linear", "task_arithmetic")


class MergeError(ValueError):
    """Invalid input to a merge (bad header, disagreeing models, bad argument)."""


@dataclass(frozen=True)
class Tensor:
    """One tensor of one model: where its bytes are (`offset` is absolute in `file`)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str
    offset: int
    nbytes: int


def _no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        dup = sorted({k for k in keys if keys.count(k) > 1})
        raise MergeError(f"duplicate keys {dup[:5]}")
    return dict(pairs)


def _bad_constant(name):
    raise MergeError(f"non-JSON constant {name}")


def read_header(path: str | os.PathLike) -> dict[str, Tensor]:
    """Parse and strictly validate one safetensors file; returns {name: Tensor}.

    Checks: >= 8 bytes; little-endian u64 header length <= 100 MB and within the file; header
    is UTF-8 JSON object without duplicate keys; `__metadata__` (optional) maps str -> str;
    every entry has exactly `dtype` (known), `shape` (non-negative ints), `data_offsets`
    ([begin, end] ints); end - begin == numel * itemsize; offsets contiguous from 0 without gap
    or overlap; the data ends exactly at the end of the file. Raises MergeError naming the file.
    """
    path = str(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise MergeError(f"{path}: file has {size} bytes, a safetensors file needs >= 8")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER:
                raise MergeError(f"{path}: header length {n} exceeds {MAX_HEADER} bytes")
            if 8 + n > size:
                raise MergeError(f"{path}: header length {n} runs past the end of the file")
            raw = f.read(n)
    except OSError as e:
        raise MergeError(f"{path}: cannot read ({e.strerror or e})") from e
    try:
        text = raw.decode("utf-8")
        obj = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_bad_constant)
    except UnicodeDecodeError as e:
        raise MergeError(f"{path}: header is not UTF-8 ({e.reason})") from e
    except (json.JSONDecodeError, MergeError, RecursionError) as e:
        raise MergeError(f"{path}: header is not valid JSON ({e})") from e
    if not isinstance(obj, dict):
        raise MergeError(f"{path}: header is not a JSON object")
    return _validate_entries(path, obj, size - 8 - n, 8 + n)


def _validate_entries(path: str, obj: dict, data_size: int, base: int) -> dict[str, Tensor]:
    meta = obj.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
    ):
        raise MergeError(f"{path}: __metadata__ must map strings to strings")
    out, spans = {}, []
    for name, e in obj.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
            raise MergeError(f"{where}: entry must have exactly dtype, shape, data_offsets")
        dtype, shape, offs = e["dtype"], e["shape"], e["data_offsets"]
        if not isinstance(dtype, str) or dtype not in ITEMSIZE:
            raise MergeError(f"{where}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise MergeError(f"{where}: shape must be a list of non-negative integers")
        if (
            not isinstance(offs, list)
            or len(offs) != 2
            or not all(type(o) is int for o in offs)
            or not 0 <= offs[0] <= offs[1]
        ):
            raise MergeError(f"{where}: data_offsets must be [begin, end] with 0 <= begin <= end")
        numel = 1
        for d in shape:
            numel *= d
            if numel * ITEMSIZE[dtype] > data_size:  # also bounds the integers (no overflow)
                raise MergeError(f"{where}: shape {shape} needs more bytes than the file holds")
        nbytes = numel * ITEMSIZE[dtype]
        if offs[1] - offs[0] != nbytes:
            raise MergeError(
                f"{where}: data_offsets span {offs[1] - offs[0]} bytes, but {dtype}{shape} is {nbytes}"
            )
        spans.append((offs[0], offs[1], name))
        out[name] = Tensor(name, dtype, tuple(shape), path, base + offs[0], nbytes)
    pos = 0
    for b, e, name in sorted(spans):
        if b != pos:
            kind = "gap" if b > pos else "overlap"
            raise MergeError(f"{path}: tensor {name!r} starts at {b}, expected {pos} ({kind})")
        pos = e
    if pos != data_size:
        raise MergeError(f"{path}: tensor data ends at {pos}, but the file holds {data_size} bytes")
    return out


def read_model(path: str | os.PathLike) -> dict[str, Tensor]:
    """All tensors of a model directory (single file or index + shards), validated.

    For an index, every shard named in `weight_map` must be a plain file name in the directory
    and must hold exactly the tensors the map assigns to it."""
    d = Path(path)
    if not d.is_dir():
        raise MergeError(f"model {str(path)!r} is not a directory")
    if (d / INDEX).is_file():
        try:
            idx = json.loads((d / INDEX).read_text("utf-8"), object_pairs_hook=_no_duplicates)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, MergeError) as e:
            raise MergeError(f"{d / INDEX}: unreadable index ({e})") from e
        wm = idx.get("weight_map") if isinstance(idx, dict) else None
        if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
            raise MergeError(f"{d / INDEX}: needs a weight_map of tensor name -> file name")
        tensors: dict[str, Tensor] = {}
        for fname in sorted(set(wm.values())):
            if fname in ("", ".", "..") or "/" in fname or "\\" in fname:
                raise MergeError(f"{d / INDEX}: shard name {fname!r} is not a plain file name")
            if not (d / fname).is_file():
                raise MergeError(f"{d / INDEX}: shard {fname!r} does not exist")
            got = read_header(d / fname)
            want = {k for k, v in wm.items() if v == fname}
            if set(got) != want:
                extra, missing = sorted(set(got) - want)[:5], sorted(want - set(got))[:5]
                raise MergeError(
                    f"{d / fname}: holds tensors the index does not say (extra {extra}, missing {missing})"
                )
            tensors.update(got)
        return tensors
    if (d / SINGLE).is_file():
        return read_header(d / SINGLE)
    raise MergeError(f"model {str(path)!r} has neither {INDEX} nor {SINGLE}")


def check_agree(paths: list[str], models: list[dict[str, Tensor]]) -> None:
    """Raise MergeError listing tensors whose presence, shape or dtype differs across models."""
    problems = []
    names = set().union(*models)
    for name in sorted(names):
        have = [m.get(name) for m in models]
        if any(t is None for t in have):
            lacking = [p for p, t in zip(paths, have) if t is None]
            problems.append(f"{name}: missing in {lacking}")
        elif len({(t.shape, t.dtype) for t in have}) > 1:
            desc = ", ".join(f"{t.dtype}{list(t.shape)}" for t in have)
            problems.append(f"{name}: shape/dtype differ ({desc})")
    if problems:
        more = f" (and {len(problems) - 20} more)" if len(problems) > 20 else ""
        raise MergeError(
            f"models disagree on {len(problems)} tensors{more}:\n  " + "\n  ".join(problems[:20])
        )


def _f32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", x))[0]


def coefficients(
    method: str, n_models: int, weights: list[float] | None, base_index: int | None, normalize
) -> list[tuple[int, float]]:
    """[(model index, fp32 coefficient)] in accumulation order (base first for task arithmetic).

    `base_index` indexes the participating models list; for task_arithmetic it is required and
    that model's own weight is ignored. Zero coefficients are dropped (one source always kept)."""
    if method not in METHODS:
        raise MergeError(f"method must be one of {METHODS}, got {method!r}")
    w = [1.0] * n_models if weights is None else [float(x) for x in weights]
    if len(w) != n_models:
        raise MergeError(f"weights: got {len(w)} for {n_models} models")
    if method == "linear":
        norm = True if normalize is None else bool(normalize)
        s = sum(w)
        if norm and s == 0:
            raise MergeError("weights sum to 0: cannot normalize (pass normalize=False)")
        terms = [(i, wi / s if norm else wi) for i, wi in enumerate(w)]
    else:
        if base_index is None:
            raise MergeError("task_arithmetic needs a base model (base=...)")
        experts = [i for i in range(n_models) if i != base_index]
        if not experts:
            raise MergeError("task_arithmetic needs at least one model besides the base")
        s = sum(w[i] for i in experts)
        div = s if (normalize and abs(s) >= 1e-8) else 1.0  # mergekit's divisor rule
        ws = {i: w[i] / div for i in experts}
        terms = [(base_index, 1.0 - sum(ws.values()))] + [(i, ws[i]) for i in experts]
    terms = [(i, _f32(c)) for i, c in terms]
    return [t for t in terms if t[1] != 0.0] or terms[:1]


def parse_size(s: str | int) -> int:
    """'5GB' -> 5e9, '2GiB' -> 2*2**30, '500MB', '100KB', or bytes as int/str."""
    if isinstance(s, int):
        return s
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(s), re.IGNORECASE)
    if not m:
        raise MergeError(f"max_shard_size: cannot parse {s!r} (e.g. '5GB', '500MB')")
    unit = (m.group(2) or "B").upper()
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    mult.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})
    return int(float(m.group(1)) * mult[unit])


def _layout(entries: list[tuple[str, str, tuple, int]], max_shard: int) -> list[list]:
    """Greedy HF-style split of (name, dtype, shape, nbytes) into shards of <= max_shard bytes."""
    shards, cur, size = [], [], 0
    for e in entries:
        if cur and size + e[3] > max_shard:
            shards.append(cur)
            cur, size = [], 0
        cur.append(e)
        size += e[3]
    return [*shards, cur]


def _header(entries) -> tuple[bytes, dict[str, int]]:
    """Serialized header (padded with spaces to 8 bytes) and each tensor's data offset."""
    obj, offs, pos = {"__metadata__": {"format": "pt"}}, {}, 0
    for name, dtype, shape, nbytes in entries:
        obj[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        offs[name] = pos
        pos += nbytes
    h = json.dumps(obj, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h, offs


def _config(model_dir: Path) -> dict:
    p = model_dir / "config.json"
    try:
        return json.loads(p.read_text("utf-8")) if p.is_file() else {}
    except (OSError, ValueError) as e:
        raise MergeError(f"{p}: unreadable config ({e})") from e


def _plan(tensors, terms, lead, out_dtype, drop_lm_head, max_shard):
    """Output shards [(file name, header bytes, [engine task tuples], data bytes)] and the list
    of input files. `lead` (base or first model) comes first among a copy task's sources."""
    ref = tensors[lead]
    names = sorted(n for n in ref if not (drop_lm_head and n == "lm_head.weight"))
    entries, kinds = [], {}
    for n in names:
        t = ref[n]
        if t.dtype in NON_FLOAT:
            kinds[n], dt = "copy", t.dtype
        elif t.dtype in ENGINE_DTYPE:
            kinds[n], dt = "merge", out_dtype or t.dtype
        else:
            raise MergeError(f"tensor {n!r} has dtype {t.dtype}; the engine merges F32/F16/BF16")
        numel = t.nbytes // ITEMSIZE[t.dtype]
        entries.append((n, dt, t.shape, numel * ITEMSIZE[dt]))
    files: dict[str, int] = {}
    fid = lambda f: files.setdefault(f, len(files))
    everyone = [lead] + [i for i in range(len(tensors)) if i != lead]
    shards = _layout(entries, max_shard)
    plan = []
    for k, shard in enumerate(shards):
        fname = (
            SINGLE if len(shards) == 1 else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        )
        head, offs = _header(shard)
        tasks = []
        for name, dt, _, nbytes in shard:
            out_off = len(head) + offs[name]
            if kinds[name] == "copy":
                src = [tensors[i][name] for i in everyone]
                tasks.append((name, 1, k, out_off, 0, nbytes, [fid(s.file) for s in src],
                              [s.offset for s in src], 0, []))  # fmt: skip
            else:
                src = [tensors[i][name] for i, _ in terms]
                numel = nbytes // ITEMSIZE[dt]
                tasks.append((name, 0, k, out_off, ENGINE_DTYPE[dt], numel,
                              [fid(s.file) for s in src], [s.offset for s in src],
                              ENGINE_DTYPE[src[0].dtype], [c for _, c in terms]))  # fmt: skip
        plan.append((fname, head, tasks, sum(e[3] for e in shard)))
    return plan, list(files)


def _write_files(tmp: Path, plan, src_dir: Path, out_dtype: str | None) -> None:
    """Create the shard files (header + zero-length-extended data), index, config and tokenizer."""
    for fname, head, _, size in plan:
        with open(tmp / fname, "wb") as f:
            f.write(head)
            f.truncate(len(head) + size)
    if len(plan) > 1:
        wm = {t[0]: fname for fname, _, tasks, _ in plan for t in tasks}
        idx = {
            "metadata": {"total_size": sum(p[3] for p in plan)},
            "weight_map": dict(sorted(wm.items())),
        }
        (tmp / INDEX).write_text(json.dumps(idx, indent=2) + "\n")
    for p in sorted(src_dir.iterdir()):
        if p.is_file() and COPIED_FILES.match(p.name):
            shutil.copyfile(p, tmp / p.name)
    cfg = tmp / "config.json"
    if out_dtype and cfg.is_file():
        c = json.loads(cfg.read_text("utf-8"))
        name = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}[out_dtype]
        for key in ("dtype", "torch_dtype"):
            if key in c:
                c[key] = name
        cfg.write_text(json.dumps(c, indent=2, sort_keys=True) + "\n")


def _clean_stale(out: Path) -> None:
    """Remove temporary siblings left by merges into `out` that were killed (their pid is gone)."""
    for p in out.parent.glob(f".{out.name}.merge-tmp-*"):
        m = re.match(r".*\.merge-tmp-(\d+)-", p.name)
        if m:
            try:
                os.kill(int(m.group(1)), 0)
            except ProcessLookupError:
                shutil.rmtree(p, ignore_errors=True)
            except PermissionError:
                pass


def _run_engine(engine, progress) -> None:
    """Run the engine in a thread (it releases the GIL) and poll its byte counter every 0.1 s
    (and once at the end): a tqdm bar, or `progress(done_bytes, total_bytes)`."""
    err: list[BaseException] = []

    def work():
        try:
            engine.run()
        except BaseException as e:  # re-raised in the caller's thread
            err.append(e)

    if progress is None:
        progress = sys.stderr.isatty()
    if progress is True:
        from tqdm import tqdm

        bar = tqdm(total=engine.total_bytes, unit="B", unit_scale=True, desc="merge",
                   file=sys.stderr, disable=False)  # fmt: skip
        report = lambda done, total: bar.update(done - bar.n)
    else:
        bar, report = None, progress if callable(progress) else (lambda done, total: None)
    th = threading.Thread(target=work, name="r7b-merge", daemon=True)
    try:
        th.start()
        alive = True
        while alive:
            th.join(0.1)
            alive = th.is_alive()
            report(engine.done_bytes, engine.total_bytes)
    except BaseException:
        engine.cancel()
        th.join()
        raise
    finally:
        if bar is not None:
            bar.close()
    if err:
        raise err[0]


def _participants(paths: list[Path], base, weights, method: str):
    """(every model read: `paths` then the base if not among them, base index, weights aligned
    with that list or None). A base that is not among `models` gets weight 0 in a linear merge."""
    base_path = Path(base).resolve() if base is not None else None
    everyone = list(paths)
    if base_path is not None and base_path not in everyone:
        everyone.append(base_path)
    base_index = everyone.index(base_path) if base_path is not None else None
    w = None if weights is None else [float(x) for x in weights]
    if w is not None and len(w) != len(paths):
        raise MergeError(f"weights: got {len(w)} for {len(paths)} models")
    if len(everyone) > len(paths) and (w is not None or method == "linear"):
        w = (w or [1.0] * len(paths)) + [0.0]
    return everyone, base_index, w


def merge_checkpoints(
    models,
    out,
    *,
    weights=None,
    method: str = "linear",
    base=None,
    normalize=None,
    dtype: str | None = None,
    threads: int | None = None,
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
    progress=None,
    simd: str = "auto",
    chunk_bytes: int = 2 << 20,
) -> dict:
    """Merge HF safetensors checkpoints `models` (directories) into directory `out`.

    weights: one per model (default 1 each). method: "linear" | "task_arithmetic".
    base: base model directory (required for task_arithmetic; for linear it only supplies
    config/tokenizer and non-floating tensors unless also listed in `models`).
    normalize: None = the method's mergekit default (linear True, task_arithmetic False).
    dtype: output dtype of floating tensors ("bfloat16"/"float16"/"float32"; default: each
    tensor's input dtype). threads: engine threads (default min(cpu count, 8)).
    max_shard_size: "5GB"-style or bytes. overwrite: replace an existing `out`.
    progress: None = a bar on a terminal, True/False, or callable(done_bytes, total_bytes).
    simd: "auto" (honours R7B_MERGE_SIMD) | "scalar" | "avx2" | "avx512".
    chunk_bytes: bytes per buffer (>= 64; lowered, not below 64 KiB, so that all the engine's
    buffers fit in BUFFER_BUDGET = 128 MiB).
    Returns a summary dict (coefficients, tensors, shards, bytes, seconds, simd, threads).
    Raises MergeError (a ValueError) for invalid input, FileExistsError for an existing `out`,
    OSError naming the file for I/O failures; `out` is untouched on any failure."""
    t0 = time.perf_counter()
    from r7b_fast import _merge

    if not models:
        raise MergeError("models: need at least one model directory")
    paths = [Path(m).resolve() for m in models]
    out = Path(out).resolve()
    out_dtype = None
    if dtype is not None:
        out_dtype = DTYPE_NAMES.get(str(dtype).lower(), str(dtype).upper())
        if out_dtype not in ENGINE_DTYPE:
            raise MergeError(f"dtype must be bfloat16, float16 or float32, got {dtype!r}")
    if threads is None:
        threads = min(os.cpu_count() or 1, 8)
    if not isinstance(threads, int) or threads < 1:
        raise MergeError(f"threads must be a positive integer, got {threads!r}")
    max_shard = parse_size(max_shard_size)
    if max_shard <= 0:
        raise MergeError("max_shard_size must be positive")
    everyone, base_index, w = _participants(paths, base, weights, method)
    for p in everyone:
        if out == p or p in out.parents:
            raise MergeError(f"out {str(out)!r} must not be (inside) input model {str(p)!r}")
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise FileExistsError(f"out {str(out)!r} exists (pass overwrite=True / --overwrite)")
    terms = coefficients(method, len(everyone), w, base_index, normalize)
    tensors = [read_model(p) for p in everyone]
    check_agree([str(p) for p in everyone], tensors)
    src_dir = everyone[base_index if base_index is not None else 0]
    drop = _config(src_dir).get("tie_word_embeddings") is True
    lead = base_index if base_index is not None else 0
    plan, inputs = _plan(tensors, terms, lead, out_dtype, drop, max_shard)
    out.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(out)
    tmp = out.parent / f".{out.name}.merge-tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _write_files(tmp, plan, src_dir, out_dtype)
        tasks = [t for _, _, ts, _ in plan for t in ts]
        outputs = [str(tmp / p[0]) for p in plan]
        # engine buffers: 2 * threads slots of (sources + 1) chunks, kept under BUFFER_BUDGET
        per_chunk = BUFFER_BUDGET // (2 * threads * (len(everyone) + 1))
        chunk = min(chunk_bytes, max(64 << 10, per_chunk)) // 64 * 64
        engine = _merge.Engine(inputs, outputs, tasks, threads, chunk, simd)
        _run_engine(engine, progress)
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {
        "out": str(out),
        "method": method,
        "coefficients": {str(everyone[i]): c for i, c in terms},
        "tensors": len(tasks),
        "shards": [p[0] for p in plan],
        "total_size": sum(p[3] for p in plan),
        "seconds": time.perf_counter() - t0,
        "simd": engine.simd,
        "threads": threads,
    }


def _replace(tmp: Path, out: Path) -> None:
    if out.exists() or out.is_symlink():
        trash = out.parent / f".{out.name}.merge-old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.rename(out, trash)
        os.rename(tmp, out)
        shutil.rmtree(trash, ignore_errors=True) if trash.is_dir() else trash.unlink()
    else:
        os.rename(tmp, out)


def load_mergekit_yaml(path: str | os.PathLike) -> dict:
    """mergekit's YAML (linear / task_arithmetic subset) -> merge_checkpoints keyword arguments.

    Accepted keys: merge_method, models[].model, models[].parameters.weight, base_model, dtype,
    parameters.normalize. Any other key is a MergeError naming it."""
    import yaml

    try:
        cfg = yaml.safe_load(Path(path).read_text("utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise MergeError(f"{path}: cannot read YAML ({e})") from e

    def only(obj, allowed, where):
        if not isinstance(obj, dict):
            raise MergeError(f"{path}: {where} must be a mapping")
        bad = sorted(set(obj) - allowed)
        if bad:
            raise MergeError(f"{path}: unsupported key {where}.{bad[0]}".replace(": .", ": "))

    only(cfg, {"merge_method", "models", "base_model", "dtype", "parameters"}, "")
    only(cfg.get("parameters") or {}, {"normalize"}, "parameters")
    method = cfg.get("merge_method")
    if method not in METHODS:
        raise MergeError(f"{path}: merge_method must be linear or task_arithmetic, got {method!r}")
    entries = cfg.get("models")
    if not isinstance(entries, list) or not entries:
        raise MergeError(f"{path}: models must be a non-empty list")
    models, weights = [], []
    for i, e in enumerate(entries):
        only(e, {"model", "parameters"}, f"models[{i}]")
        only(e.get("parameters") or {}, {"weight"}, f"models[{i}].parameters")
        if not isinstance(e.get("model"), str):
            raise MergeError(f"{path}: models[{i}].model must be a path")
        wt = (e.get("parameters") or {}).get("weight", 1.0)
        if isinstance(wt, bool) or not isinstance(wt, (int, float)):
            raise MergeError(f"{path}: models[{i}].parameters.weight must be a number")
        models.append(e["model"])
        weights.append(float(wt))
    norm = (cfg.get("parameters") or {}).get("normalize")
    if norm is not None and not isinstance(norm, bool):
        raise MergeError(f"{path}: parameters.normalize must be true or false")
    return dict(models=models, weights=weights, method=method, base=cfg.get("base_model"),
                normalize=norm, dtype=cfg.get("dtype"))  # fmt: skip


def _model_arg(s: str) -> tuple[str, float | None]:
    path, _, w = s.rpartition(":")
    if path:
        try:
            return path, float(w)
        except ValueError:
            pass
    return s, None


def _cli_kwargs(ap: argparse.ArgumentParser, a: argparse.Namespace) -> dict:
    """merge_checkpoints keyword arguments from --config or from the individual flags."""
    if a.config:
        clash = [f for f in ("model", "method", "base", "normalize", "dtype") if getattr(a, f)]
        if clash:
            ap.error(f"--config excludes --{clash[0]}")
        return load_mergekit_yaml(a.config)
    if not a.model:
        ap.error("give --model PATH[:WEIGHT] (repeated) or --config merge.yaml")
    pairs = [_model_arg(m) for m in a.model]
    given = [w for _, w in pairs if w is not None]
    if given and len(given) != len(pairs):
        ap.error("give a :WEIGHT for every --model or for none")
    return dict(models=[p for p, _ in pairs], weights=given or None, method=a.method or "linear",
                base=a.base, normalize=None if a.normalize is None else a.normalize == "true",
                dtype=a.dtype)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m r7b_fast.merge",
        description="Merge safetensors checkpoints (linear / task_arithmetic) with a streaming C++ engine.",
    )
    ap.add_argument(
        "--out", required=True, help="output directory (must not exist unless --overwrite)"
    )
    ap.add_argument("--model", action="append", default=[], metavar="PATH[:WEIGHT]")
    ap.add_argument("--method", choices=METHODS, default=None, help="default linear")
    ap.add_argument("--base", default=None, help="base model (task_arithmetic; config source)")
    ap.add_argument("--normalize", choices=("true", "false"), default=None,
                    help="default: linear true, task_arithmetic false (as mergekit)")  # fmt: skip
    ap.add_argument("--dtype", default=None, help="bfloat16 | float16 | float32 (default: input)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--max-shard-size", default="5GB")
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--config", default=None, help="mergekit YAML (linear / task_arithmetic)")
    a = ap.parse_args(argv)
    try:
        kw = _cli_kwargs(ap, a)
        s = merge_checkpoints(**kw, out=a.out, threads=a.threads, max_shard_size=a.max_shard_size,
                              overwrite=a.overwrite)  # fmt: skip
    except (MergeError, FileExistsError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    gb = s["total_size"] / 1e9
    print(f"merged {s['tensors']} tensors ({gb:.3f} GB, {len(s['shards'])} shards) into "
          f"{s['out']} in {s['seconds']:.2f} s [{s['simd']}, {s['threads']} threads]")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
