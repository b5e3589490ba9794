"""Plan a merge: per-tensor fp32 coefficients and the HF-style output shard layout.

`coefficients` turns a method and weights into one weighted sum per tensor; `parse_size` reads
`max_shard_size`; `plan_shards` lays the output tensors out in shards (headers padded to 8
bytes) and produces the task tuples `r7b_fast._merge.Engine` executes. Pure Python, no I/O;
used by `r7b_fast.merge` (which re-exports the public names); must not import torch.
"""

from __future__ import annotations

import json
import re
import struct

from r7b_fast.merge_read import ITEMSIZE, SINGLE, MergeError

ENGINE_DTYPE = {"F32": 0, "F16": 1, "BF16": 2}  # floating dtypes the engine combines
NON_FLOAT = {"BOOL", "U8", "I8", "I16", "U16", "I32", "U32", "I64", "U64"}  # copied, never mixed
METHODS = ("linear", "task_arithmetic")


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


def plan_shards(tensors, terms, lead, out_dtype, drop_lm_head, max_shard):
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
