"""Merge expert checkpoints (sharded safetensors): Python plans, the C++ engine moves bytes.

`merge_checkpoints(models, out, ...)` and `python -m r7b_fast.merge --out DIR --model P[:W] ...`
(or `--config merge.yaml`, mergekit's YAML for `linear`, `task_arithmetic`, `ties`,
`dare_linear`, `dare_ties`, `slerp`).

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
   ties / dare_linear / dare_ties / slerp (mergekit's semantics, written out in
   `r7b_fast.merge_plan.method_plan`) are planned by `method_plan` instead: the engine first
   makes a per-tensor pass where needed (TIES' magnitude threshold, DARE's L1 rescale, SLERP's
   angle), holding at most one fp32 copy of a tensor (TIES' trim, one at a time whatever the
   threads: csrc/engine_methods.cpp), then streams the per-element work (sign election,
   masked sums, rescaling, interpolation) chunk by chunk.
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

Steps 1-2 live in `r7b_fast/merge_read.py`, step 3 and the shard layout of step 4 in
`r7b_fast/merge_plan.py`; this module writes the files, runs the engine and holds the CLI, and
re-exports the public names of both. None of them may import torch (it starts in well under
a second).
"""

from __future__ import annotations

import argparse
import json
import math
import numbers
import os
import re
import shutil
import sys
import threading
import time
import uuid
from pathlib import Path

from r7b_fast.merge_plan import (
    ENGINE_DTYPE,
    METHODS,
    NON_FLOAT,
    WEIGHTED_SUMS,
    coefficients,
    dare_key,
    method_plan,
    parse_size,
    plan_shards,
)
from r7b_fast.merge_read import (
    INDEX,
    ITEMSIZE,
    MAX_HEADER,
    SINGLE,
    MergeError,
    Tensor,
    check_agree,
    read_header,
    read_model,
)

__all__ = [  # the public names, including those defined in merge_read / merge_plan
    "BUFFER_BUDGET", "COPIED_FILES", "DTYPE_NAMES", "ENGINE_DTYPE", "INDEX", "ITEMSIZE",
    "MAX_HEADER", "MAX_SOURCES", "METHODS", "MIN_CHUNK", "NON_FLOAT", "SINGLE", "MergeError",
    "Tensor", "check_agree", "coefficients", "dare_key", "load_mergekit_yaml", "main",
    "merge_checkpoints", "method_plan", "parse_size", "read_header", "read_model",
]  # fmt: skip

DTYPE_NAMES = {
    "bfloat16": "BF16", "bf16": "BF16", "float16": "F16", "fp16": "F16", "half": "F16",
    "float32": "F32", "fp32": "F32", "float": "F32",
}  # fmt: skip
BUFFER_BUDGET = 128 << 20  # the engine's buffers, whatever the number of models or threads
MAX_SOURCES = 256  # models read per tensor, base included (csrc/engine.cpp kMaxSources)
MIN_CHUNK = 64  # the engine's smallest chunk_bytes; the chunk is rounded down to a multiple of it
COPIED_FILES = re.compile(
    r"^(config\.json|generation_config\.json|tokenizer.*|special_tokens_map\.json|"
    r"added_tokens\.json|chat_template.*|vocab.*|merges\.txt|.*\.jinja)$"
)


def _config(model_dir: Path) -> dict:
    p = model_dir / "config.json"
    try:
        return json.loads(p.read_text("utf-8")) if p.is_file() else {}
    except (OSError, ValueError) as e:
        raise MergeError(f"{p}: unreadable config ({e})") from e


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
    with that list or None). A base that is not among `models` gets weight 0 in a linear merge.
    At most MAX_SOURCES models in all: a non-floating tensor is read from every one of them."""
    base_path = Path(base).resolve() if base is not None else None
    everyone = list(paths)
    if base_path is not None and base_path not in everyone:
        everyone.append(base_path)
    if len(everyone) > MAX_SOURCES:
        raise MergeError(
            f"models: at most {MAX_SOURCES} sources (base included), got {len(everyone)}"
        )
    base_index = everyone.index(base_path) if base_path is not None else None
    if weights is not None and (
        not isinstance(weights, (list, tuple))
        or not all(isinstance(x, numbers.Real) and not isinstance(x, bool) for x in weights)
        or not all(math.isfinite(x) for x in weights)
    ):
        raise MergeError(f"weights must be a list of finite numbers, got {weights!r}")
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
    density=None,
    rescale: bool | None = None,
    t: float | None = None,
    seed: int = 0,
) -> dict:
    """Merge HF safetensors checkpoints `models` (directories) into directory `out`.

    weights: one per model (default 1 each). method: "linear" | "task_arithmetic" | "ties" |
    "dare_linear" | "dare_ties" | "slerp" (semantics: `r7b_fast.merge_plan.method_plan`).
    base: base model directory (required except for linear; for linear it only supplies
    config/tokenizer and non-floating tensors unless also listed in `models`).
    normalize: None = the method's mergekit default (linear, ties True; others False).
    density (ties / dare_*): the kept fraction, in (0, 1], one for all or one per model
    (default 1). rescale (ties / dare_*): mergekit's L1 rescale (default: dare_* True, ties
    False). t (slerp, required): in [0, 1]. seed (dare_*): the drop masks' seed (`dare_key`).
    dtype: output dtype of floating tensors ("bfloat16"/"float16"/"float32"; default: each
    tensor's input dtype). threads: engine threads (default min(cpu count, 8)).
    max_shard_size: "5GB"-style or bytes. overwrite: replace an existing `out` (never one that
    is, lies inside or contains an input model: a MergeError).
    progress: None = a bar on a terminal, True/False, or callable(done_bytes, total_bytes).
    simd: "auto" (honours R7B_MERGE_SIMD) | "scalar" | "avx2" | "avx512".
    chunk_bytes: bytes per buffer (an int >= 64, rounded down to a multiple of 64; lowered, not
    below 64 KiB, so that all the engine's buffers fit in BUFFER_BUDGET = 128 MiB).
    At most MAX_SOURCES = 256 models, base included (the engine's limit).
    Returns a summary dict (coefficients, tensors, shards, bytes, seconds, simd, threads).
    Raises MergeError (a ValueError) for invalid input, FileExistsError for an existing `out`,
    OSError naming the file for I/O failures; `out` is untouched on any failure."""
    t0 = time.perf_counter()
    from r7b_fast._merge import Engine

    paths, out, out_dtype, threads, max_shard = _check_args(
        models, out, dtype, threads, max_shard_size, chunk_bytes
    )
    everyone, base_index, w = _participants(paths, base, weights, method)
    _check_out(out, everyone, overwrite)
    if method in WEIGHTED_SUMS:
        mplan, terms = None, coefficients(method, len(everyone), w, base_index, normalize)
        _no_method_params(method, density=density, rescale=rescale, t=t)
    else:
        if isinstance(density, (list, tuple)) and len(density) == len(paths) < len(everyone):
            density = [*density, 1.0]  # the base, appended by _participants: unused
        mplan = method_plan(method, len(everyone), w, base_index, normalize, density, rescale,
                            t, seed)  # fmt: skip
        terms = list(zip(mplan.sources, mplan.weights))
    tensors = [read_model(p) for p in everyone]
    check_agree([str(p) for p in everyone], tensors)
    src_dir = everyone[base_index if base_index is not None else 0]
    drop = _config(src_dir).get("tie_word_embeddings") is True
    lead = base_index if base_index is not None else 0
    plan, inputs = plan_shards(tensors, terms, lead, out_dtype, drop, max_shard, mplan)
    engine = _write_merged(Engine, out, plan, inputs, src_dir, out_dtype, threads,
                           len(everyone), chunk_bytes, simd, progress)  # fmt: skip
    return {
        "out": str(out),
        "method": method,
        "coefficients": {str(everyone[i]): c for i, c in terms},
        "tensors": sum(len(p[2]) for p in plan),
        "shards": [p[0] for p in plan],
        "total_size": sum(p[3] for p in plan),
        "seconds": time.perf_counter() - t0,
        "simd": engine.simd,
        "threads": threads,
    }


def _no_method_params(method: str, **given) -> None:
    for key, value in given.items():
        if value is not None:
            raise MergeError(f"{key} does not apply to {method}")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_args(models, out, dtype, threads, max_shard_size, chunk_bytes):
    """(resolved model paths, resolved out, output dtype or None, threads, max shard bytes);
    a MergeError naming the argument for a bad one (bools are not numbers here)."""
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
    if not _is_int(threads) or threads < 1:
        raise MergeError(f"threads must be a positive integer, got {threads!r}")
    if isinstance(max_shard_size, bool):
        raise MergeError(
            f"max_shard_size must be bytes or a size like '5GB', got {max_shard_size!r}"
        )
    max_shard = parse_size(max_shard_size)
    if max_shard <= 0:
        raise MergeError("max_shard_size must be positive")
    if not _is_int(chunk_bytes) or chunk_bytes < MIN_CHUNK:
        raise MergeError(f"chunk_bytes must be an integer >= {MIN_CHUNK}, got {chunk_bytes!r}")
    return paths, out, out_dtype, threads, max_shard


def _check_out(out: Path, everyone: list[Path], overwrite: bool) -> None:
    """`out` must not be, lie inside or contain an input model (replacing it would delete the
    input), nor exist unless `overwrite`. Paths are resolved (symlinks followed)."""
    for p in everyone:
        if out == p or p in out.parents or out in p.parents:
            raise MergeError(
                f"out {str(out)!r} must not be, lie inside or contain input model {str(p)!r}"
            )
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise FileExistsError(f"out {str(out)!r} exists (pass overwrite=True / --overwrite)")


def _write_merged(Engine, out, plan, inputs, src_dir, out_dtype, threads, n_sources, chunk_bytes,
                  simd, progress):  # fmt: skip
    """Write the merge into a hidden temporary sibling of `out`, run the engine there and
    rename it onto `out` when complete (removed on any failure). `Engine` is
    `r7b_fast._merge.Engine`; returns the engine that ran."""
    out.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(out)
    tmp = out.parent / f".{out.name}.merge-tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _write_files(tmp, plan, src_dir, out_dtype)
        tasks = [t for _, _, ts, _ in plan for t in ts]
        outputs = [str(tmp / p[0]) for p in plan]
        # engine buffers: 2 * threads slots of (sources + 1) chunks, kept under BUFFER_BUDGET
        per_chunk = BUFFER_BUDGET // (2 * threads * (n_sources + 1))
        chunk = min(chunk_bytes, max(64 << 10, per_chunk)) // MIN_CHUNK * MIN_CHUNK
        engine = Engine(inputs, outputs, tasks, threads, chunk, simd)
        _run_engine(engine, progress)
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return engine


def _replace(tmp: Path, out: Path) -> None:
    if out.exists() or out.is_symlink():
        trash = out.parent / f".{out.name}.merge-old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.rename(out, trash)
        os.rename(tmp, out)
        shutil.rmtree(trash, ignore_errors=True) if trash.is_dir() else trash.unlink()
    else:
        os.rename(tmp, out)


# mergekit YAML keys accepted per method: (top-level `parameters`, per-model `parameters`)
YAML_PARAMS = {
    "linear": ({"normalize"}, {"weight"}),
    "task_arithmetic": ({"normalize"}, {"weight"}),
    "ties": ({"normalize", "rescale", "density", "weight"}, {"weight", "density"}),
    "dare_linear": ({"normalize", "rescale", "density", "weight", "seed"}, {"weight", "density"}),
    "dare_ties": ({"normalize", "rescale", "density", "weight", "seed"}, {"weight", "density"}),
    "slerp": ({"t"}, set()),
}


def load_mergekit_yaml(path: str | os.PathLike) -> dict:
    """mergekit's YAML (the methods of YAML_PARAMS) -> merge_checkpoints keyword arguments.

    Accepted keys: merge_method, models[].model, base_model, dtype, and the method's
    `parameters` (YAML_PARAMS): top-level ones apply to every model (normalize, rescale, t, and
    `seed`, this project's DARE seed, are top-level only); a model's own weight / density
    override them. Any other key, or a value of the wrong type, is a MergeError naming it."""
    import yaml

    try:
        cfg = yaml.safe_load(Path(path).read_text("utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise MergeError(f"{path}: cannot read YAML ({e})") from e

    def only(obj, allowed, where):
        if not isinstance(obj, dict):
            raise MergeError(f"{path}: {where or 'the document'} must be a mapping")
        bad = sorted(set(obj) - allowed, key=str)
        if bad:
            raise MergeError(f"{path}: unsupported key {where}.{bad[0]}".replace(": .", ": "))

    only(cfg, {"merge_method", "models", "base_model", "dtype", "parameters"}, "")
    method = cfg.get("merge_method")
    if method not in METHODS:
        raise MergeError(
            f"{path}: merge_method must be one of {', '.join(METHODS)}, got {method!r}"
        )
    top_keys, model_keys = YAML_PARAMS[method]
    top = cfg.get("parameters") or {}
    only(top, top_keys, "parameters")
    entries = cfg.get("models")
    if not isinstance(entries, list) or not entries:
        raise MergeError(f"{path}: models must be a non-empty list")
    base = cfg.get("base_model")
    if base is not None and not isinstance(base, str):
        raise MergeError(f"{path}: base_model must be a path")
    models, weights, densities = [], [], []
    for i, e in enumerate(entries):
        only(e, {"model", "parameters"}, f"models[{i}]")
        p = e.get("parameters") or {}
        only(p, model_keys, f"models[{i}].parameters")
        if not isinstance(e.get("model"), str):
            raise MergeError(f"{path}: models[{i}].model must be a path")
        for key, out in (("weight", weights), ("density", densities)):
            v = p.get(key, top.get(key, 1.0))
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise MergeError(f"{path}: models[{i}].parameters.{key} must be a number")
            out.append(float(v))
        models.append(e["model"])
    kw = dict(models=models, method=method, base=base, dtype=cfg.get("dtype"))
    if method == "slerp":  # mergekit lists the base among the models; it carries no weight
        return {**kw, "t": top.get("t")}
    norm = top.get("normalize")
    if norm is not None and not isinstance(norm, bool):
        raise MergeError(f"{path}: parameters.normalize must be true or false")
    kw.update(weights=weights, normalize=norm)
    if method in WEIGHTED_SUMS:
        return kw
    for key in ("rescale", "seed"):
        if key in top:
            kw[key] = top[key]
    return {**kw, "density": densities}


def _model_arg(s: str) -> tuple[str, float | None]:
    path, _, w = s.rpartition(":")
    if path:
        try:
            return path, float(w)
        except ValueError:
            pass
    return s, None


def _cli_weights(given: list[float | None]) -> list[float] | None:
    """The CLI's weights from the `:WEIGHT` suffixes (None where a --model has none).

    None given: None (merge_checkpoints' default, 1 each). All given: as given. Some given: the
    unweighted models share what is left of 1.0 equally, so `--model a --model b:0.3` is
    a: 0.7, b: 0.3; a MergeError when the given weights leave nothing (sum >= 1), since the
    unweighted models would get a weight <= 0 that nobody asked for."""
    known = [w for w in given if w is not None]
    if not known or len(known) == len(given):
        return known or None
    left = 1.0 - sum(known)
    if not left > 0:  # also catches NaN
        raise MergeError(
            f"the :WEIGHTs given sum to {sum(known):g}, which leaves nothing (1 - sum <= 0) for "
            f"the {len(given) - len(known)} --model(s) without one: weight every --model"
        )
    share = left / (len(given) - len(known))
    return [share if w is None else w for w in given]


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
    try:
        weights = _cli_weights([w for _, w in pairs])
    except MergeError as e:
        ap.error(str(e))
    return dict(models=[p for p, _ in pairs], weights=weights, method=a.method or "linear",
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
    ap.add_argument("--model", action="append", default=[], metavar="PATH[:WEIGHT]",
                    help="a model directory (repeat); models without :WEIGHT share what the given "
                         "weights leave of 1.0 equally (all without: 1 each)")  # fmt: skip
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
