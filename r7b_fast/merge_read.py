"""Read merge inputs: strict safetensors headers, model directories, cross-model agreement.

`read_header` validates one file, `read_model` a model directory (single file or index + shards),
`check_agree` that all models have the same tensor names, shapes and dtypes. Nothing here reads
tensor data. Used by `r7b_fast.merge` (which re-exports these names); must not import torch.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

# safetensors dtype -> bytes per element (sub-byte float formats are not supported).
ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
    "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}  # fmt: skip
MAX_HEADER = 100 * 1000 * 1000
SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"


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
