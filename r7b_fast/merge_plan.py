"""Plan a merge: per-tensor fp32 coefficients and the HF-style output shard layout.

`coefficients` turns a method and weights into one weighted sum per tensor (linear,
task_arithmetic); `method_plan` validates and describes a TIES / DARE / SLERP merge (the
semantics are in `method_plan`'s docstring); `parse_size` reads `max_shard_size`; `plan_shards`
lays the output tensors out in shards (headers padded to 8 bytes) and produces the task tuples
`r7b_fast._merge.Engine` executes. Pure Python, no I/O; used by `r7b_fast.merge` (which
re-exports the public names); must not import torch.
"""

from __future__ import annotations

import json
import math
import numbers
import re
import struct

from r7b_fast.merge_read import ITEMSIZE, SINGLE, MergeError

ENGINE_DTYPE = {"F32": 0, "F16": 1, "BF16": 2}  # floating dtypes the engine combines
NON_FLOAT = {"BOOL", "U8", "I8", "I16", "U16", "I32", "U32", "I64", "U64"}  # copied, never mixed
METHODS = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "slerp")
WEIGHTED_SUMS = ("linear", "task_arithmetic")  # one fp32 weighted sum per tensor (`coefficients`)


def _f32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", x))[0]


def coefficients(
    method: str, n_models: int, weights: list[float] | None, base_index: int | None, normalize
) -> list[tuple[int, float]]:
    """[(model index, fp32 coefficient)] in accumulation order (base first for task arithmetic).

    `base_index` indexes the participating models list; for task_arithmetic it is required and
    that model's own weight is ignored. Zero coefficients are dropped (one source always kept)."""
    if method not in WEIGHTED_SUMS:
        raise MergeError(f"coefficients: method must be one of {WEIGHTED_SUMS}, got {method!r}")
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
        # Dividing by a sum that cancels to ~0 multiplies every task vector by ~1/s (1e9 for
        # weights [1, -1 + 1e-9]); mergekit silently skips the division below 1e-8 instead.
        if normalize and abs(s) <= 1e-6 * sum(abs(w[i]) for i in experts):
            raise MergeError(
                f"weights: the task weights sum to {s:g}, ~0 against their magnitudes; "
                "normalize=True would divide the task vectors by it (pass normalize=False)"
            )
        div = s if normalize else 1.0
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


def plan_shards(tensors, terms, lead, out_dtype, drop_lm_head, max_shard, method=None):
    """Output shards [(file name, header bytes, [engine task tuples], data bytes)] and the list
    of input files. `lead` (base or first model) comes first among a copy task's sources.
    `method` (a `MethodPlan`, or None for the weighted sum `terms`) plans floating tensors."""
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
                order = [i for i, _ in terms] if method is None else method.sources
                src = [tensors[i][name] for i in order]
                numel = nbytes // ITEMSIZE[dt]
                task = (name, 0, k, out_off, ENGINE_DTYPE[dt], numel, [fid(s.file) for s in src],
                        [s.offset for s in src], ENGINE_DTYPE[src[0].dtype])  # fmt: skip
                if method is None:
                    tasks.append((*task, [c for _, c in terms]))
                else:
                    tasks.append((*task, *method.task(name, src[0].shape)))
        plan.append((fname, head, tasks, sum(e[3] for e in shard)))
    return plan, list(files)


# ------------------------------------------------------------------ TIES / DARE / SLERP

_GTA, _SLERP = 1, 2  # csrc/engine.h Method
_KEEP_ALL, _MAGNITUDE, _RANDOM = 0, 1, 2  # csrc/kernels.h Sparsify
# method -> (sparsification, sign consensus, mergekit's normalize default, rescale default)
GTA_METHODS = {
    "ties": (_MAGNITUDE, True, True, False),
    "dare_ties": (_RANDOM, True, False, True),
    "dare_linear": (_RANDOM, False, False, True),
}
_M64 = (1 << 64) - 1


def _mix64(z: int) -> int:
    """splitmix64's finaliser (csrc/kernels.h mix64)."""
    z &= _M64
    z ^= z >> 30
    z = (z * 0xBF58476D1CE4E5B9) & _M64
    z ^= z >> 27
    z = (z * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def dare_key(seed: int, name: str, j: int) -> int:
    """DARE hash key of expert `j` (1-based position among the experts, in the order the models
    are given) for tensor `name`: mix64(mix64(seed) ^ mix64(fnv1a64(utf-8 name) + j)). Element i
    of that expert's task vector is kept iff (mix64(key + (i + 1) * 0x9E3779B97F4A7C15) >> 40)
    < density * 2^24 (uint64 arithmetic modulo 2^64): reproducible from (seed, name, j, i)
    alone, whatever the threads, chunking or SIMD path."""
    h = 0xCBF29CE484222325
    for byte in name.encode("utf-8"):
        h = ((h ^ byte) * 0x100000001B3) & _M64
    return _mix64(_mix64(seed) ^ _mix64(h + j))


class MethodPlan:
    """A validated TIES / DARE / SLERP merge: `sources` (participant indices, base first) and,
    per tensor, the engine's coefficients and method tuple (`task`)."""

    def __init__(self, method, sources, weights, densities, rescale, normalize, seed, t):
        self.method, self.sources, self.seed, self.t = method, sources, seed, t
        self.weights = [0.0] + [_f32(w) for w in weights]  # base first; its weight unused
        self.densities = [1.0] + [float(d) for d in densities]
        self.rescale, self.normalize = rescale, normalize
        s = sum(weights)
        # mergekit: without sign consensus, normalize divides by sum(w) unless |sum(w)| < 1e-8
        self.divisor = _f32(s) if normalize and abs(s) >= 1e-8 else 1.0

    def task(self, name: str, shape: tuple) -> tuple[list[float], tuple]:
        if self.method == "slerp":  # mergekit-yaml: one angle per tensor (the engine's 1 row)
            return [0.0, 0.0], (_SLERP, _KEEP_ALL, False, False, False, 1.0, [1.0, 1.0], [],
                                1, self.t)  # fmt: skip
        sparsify, consensus, _, _ = GTA_METHODS[self.method]
        keys = []
        if sparsify == _RANDOM:
            keys = [0] + [dare_key(self.seed, name, j) for j in range(1, len(self.sources))]
        return self.weights, (_GTA, sparsify, consensus, self.rescale, self.normalize,
                              self.divisor, self.densities, keys, 1, 0.0)  # fmt: skip


def _number(x, what: str) -> float:
    if isinstance(x, bool) or not isinstance(x, numbers.Real) or not math.isfinite(x):
        raise MergeError(f"{what} must be a finite number, got {x!r}")
    return float(x)


def _per_model(x, n: int, what: str, default: float) -> list[float]:
    if x is None:
        return [default] * n
    if isinstance(x, (list, tuple)):
        if len(x) != n:
            raise MergeError(f"{what}: got {len(x)} for {n} models")
        return [_number(v, what) for v in x]
    return [_number(x, what)] * n


def method_plan(method, n_models, weights, base_index, normalize=None, density=None,
                rescale=None, t=None, seed=0) -> MethodPlan:  # fmt: skip
    """Validate a TIES / DARE / SLERP merge of `n_models` participants (weights and density:
    one per participant or one for all; the base's own are ignored). Semantics (as mergekit
    0.1.5, computed per element in fp32 in this order; tau_j = x_j - base for every expert j):

    - ties: trim each tau_j to its k = max(1, int(density_j * numel)) largest |tau| (per tensor,
      per expert; NaN counts as largest; ties at the k-th value kept by lower element index;
      density 1 keeps all); wt_j = w_j * trimmed tau_j; elected sign = + iff sum_j wt_j >= 0;
      mixed = sum of the wt_j with the elected sign (zeros never count), divided when
      `normalize` (default true) by the sum of those w_j (1 when that is 0); out = base + mixed.
    - dare_linear: keep each element of tau_j iff its seeded draw (`dare_key`) < density_j;
      mixed = sum_j w_j * kept tau_j, divided by sum_j w_j when `normalize` (default false;
      1 when |sum| < 1e-8). dare_ties: the same drop, then ties' sign election and disjoint
      mean (normalize default false).
    - rescale (default false for ties, true for dare_*): mergekit's L1 rescale, kept tau_j *
      (||tau_j||_1 / ||kept tau_j||_1) per tensor (fp64 sums in element order, factor rounded
      to fp32; none when either norm < 1e-7) -- E[factor] ~ 1/density, the DARE paper's rescale.
    - slerp: base and one other model, t in [0, 1]; per tensor, on the flattened vectors (as
      mergekit-yaml feeds its slerp): norms and dot in fp64 (element order), norms <= 1e-8 read
      as 1, cos = dot / (|a| |b|) clamped to [-1, 1]; |cos| > 0.9995: lerp (1 - t, t), else
      (sin((1-t) theta), sin(t theta)) / sin(theta); with those coefficients rounded to fp32,
      c0 and c1, each element is fma(c1, other, c0 * base) in fp32.

    Raises MergeError naming the parameter."""
    if method not in GTA_METHODS and method != "slerp":
        raise MergeError(f"merge_method must be one of {METHODS}, got {method!r}")
    if base_index is None:
        raise MergeError(f"merge_method {method} needs a base model (base=... / base_model)")
    experts = [i for i in range(n_models) if i != base_index]
    if not experts:
        raise MergeError(f"merge_method {method} needs at least one model besides the base")
    if normalize is not None and not isinstance(normalize, bool):
        raise MergeError(f"normalize must be true or false, got {normalize!r}")
    if rescale is not None and not isinstance(rescale, bool):
        raise MergeError(f"rescale must be true or false, got {rescale!r}")
    if method == "slerp":
        return _slerp_plan(experts, base_index, weights, density, rescale, normalize, t)
    if t is not None:
        raise MergeError(f"t applies to slerp only, not {method}")
    if not (type(seed) is int and 0 <= seed <= _M64):
        raise MergeError(f"seed must be an integer in [0, 2^64), got {seed!r}")
    w = _per_model(weights, n_models, "weights", 1.0)
    d = _per_model(density, n_models, "density", 1.0)
    for i in experts:
        if not 0.0 < d[i] <= 1.0:
            raise MergeError(f"density must be in (0, 1], got {d[i]!r} (model {i})")
    sparsify, _, norm_default, rescale_default = GTA_METHODS[method]
    return MethodPlan(method, [base_index, *experts], [w[i] for i in experts],
                      [d[i] for i in experts], rescale_default if rescale is None else rescale,
                      norm_default if normalize is None else normalize, seed, None)  # fmt: skip


def _slerp_plan(experts, base_index, weights, density, rescale, normalize, t) -> MethodPlan:
    if len(experts) != 1:
        raise MergeError(f"slerp merges the base with exactly one model, got {len(experts)}")
    for value, key in ((weights, "weights"), (density, "density"), (rescale, "rescale"),
                       (normalize, "normalize")):  # fmt: skip
        if value is not None:
            raise MergeError(f"{key} does not apply to slerp (it takes t)")
    if t is None:
        raise MergeError("slerp needs t (a number in [0, 1])")
    t = _number(t, "t")
    if not 0.0 <= t <= 1.0:
        raise MergeError(f"t must be in [0, 1], got {t!r}")
    return MethodPlan("slerp", [base_index, experts[0]], [1.0], [1.0], False, False, 0, t)
