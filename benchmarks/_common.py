"""Helpers shared by the benchmark scripts: timing, peak memory, environment, tables, JSON.

    from benchmarks._common import bench, peak_memory, env_info, markdown_table, write_results

    t = bench(lambda: step(), device)            # {'median_ms', 'p20_ms', 'p80_ms', 'reps'}
    mem = peak_memory(lambda: step(), device)    # {'peak_bytes', 'extra_bytes'} (None on CPU)
    md = markdown_table(rows, ["name", "median_ms", "tflops"])
    paths = write_results("linear_logprobs", {"rows": rows}, md)

Timing: on CUDA, CUDA events around each call (device work is asynchronous), warm-up calls
first, the median of the timed calls reported; on the CPU, `time.perf_counter` around each call.
Results go to `results_dir()`: `$R7B_RESULTS_DIR` if set (gpu_suite.sh points every part at one
scratch folder and consolidates it, because only 8 files come back from the device machine),
else `$OUT` (the device machine's return folder), else `benchmarks/results/`.

Summary convention: a payload may carry `"summary": [goal_row(...), ...]`, the headline numbers
against the issue's goals; gpu_suite.sh puts every part's summary rows into the table it prints
last (and into the README's performance table via render_results.py).

    payload["summary"] = [goal_row("linear_logprobs fwd+bwd TFLOP/s (N=8192,H=4096,V=256000)",
                                   tflops, 600, higher_is_better=True)]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from r7b_fast.logging import PEAK_BF16_FLOPS, peak_flops  # noqa: F401 (one table, re-exported)

REPO = Path(__file__).resolve().parent.parent


def device_of(device: str | torch.device | None = None) -> torch.device:
    """`device` as a torch.device; None -> cuda when available, else cpu."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def bench(
    fn: Callable[[], object],
    device: str | torch.device,
    *,
    warmup: int = 2,
    reps: int = 10,
    max_seconds: float = 20.0,
) -> dict:
    """Time `fn()`: `warmup` untimed calls, then up to `reps` timed calls (stopping early once
    the timed calls took `max_seconds`). Returns {'median_ms', 'p20_ms', 'p80_ms', 'min_ms',
    'reps'}; times in milliseconds of wall time on the CPU and device time on CUDA."""
    if reps < 1 or warmup < 0:
        raise ValueError(f"bench: need reps >= 1 and warmup >= 0, got reps={reps} warmup={warmup}")
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    sync(device)
    times: list[float] = []
    spent = 0.0
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            ms = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            fn()
            ms = (time.perf_counter() - t0) * 1e3
        times.append(ms)
        spent += ms / 1e3
        if spent >= max_seconds:
            break
    return summarize_ms(times)


def summarize_ms(times: Sequence[float]) -> dict:
    """{'median_ms', 'p20_ms', 'p80_ms', 'min_ms', 'reps'} of a list of times in ms."""
    if not times:
        raise ValueError("summarize_ms: times is empty")
    s = sorted(times)

    def q(f: float) -> float:
        return s[min(len(s) - 1, max(0, round(f * (len(s) - 1))))]

    return {
        "median_ms": statistics.median(s),
        "p20_ms": q(0.2),
        "p80_ms": q(0.8),
        "min_ms": s[0],
        "reps": len(s),
    }


def peak_memory(fn: Callable[[], object], device: str | torch.device) -> dict:
    """Run `fn()` once and report CUDA memory: {'peak_bytes': the allocator's high-water mark
    during the call, 'extra_bytes': that minus what was allocated before it}. Both None on the
    CPU (no comparable counter)."""
    device = torch.device(device)
    if device.type != "cuda":
        fn()
        return {"peak_bytes": None, "extra_bytes": None}
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated(device)
    return {"peak_bytes": peak, "extra_bytes": peak - before}


def _git_commit() -> str | None:
    try:
        r = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return r.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def env_info(device: str | torch.device | None = None) -> dict:
    """Versions and hardware: torch, triton, transformers, CUDA, GPU name/driver/memory, CPU
    count, git commit, UTC time."""
    device = device_of(device)
    info = {
        "utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpu_count": os.cpu_count(),
        "git": _git_commit(),
        "device": str(device),
    }
    from importlib import metadata

    for mod, dist in (
        ("triton", "triton"),
        ("transformers", "transformers"),
        ("liger_kernel", "liger-kernel"),
        ("trl", "trl"),
    ):
        try:
            info[mod] = metadata.version(dist)
        except metadata.PackageNotFoundError:  # not installed: the report says so
            info[mod] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["sm_count"] = props.multi_processor_count
        info["capability"] = f"{props.major}.{props.minor}"
        try:
            r = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            )
            info["driver"] = r.stdout.strip().splitlines()[0] if r.stdout.strip() else None
        except (OSError, subprocess.SubprocessError):
            info["driver"] = None
    else:
        info["gpu"] = None
    return info


def card_tag(info: dict) -> str:
    """A short file-name-safe tag for the hardware: 'h100', 'h200', ... or 'cpu'."""
    gpu = info.get("gpu")
    if not gpu:
        return "cpu"
    for tag in ("H100", "H200", "A100", "L40S", "A10"):
        if tag in gpu:
            return tag.lower()
    return "".join(c for c in gpu.lower() if c.isalnum())[:16] or "gpu"


def fmt(x: object, digits: int = 3) -> str:
    """A table cell: floats to `digits` significant digits, None as '-'."""
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        if math.isnan(x):
            return "nan"
        if x == 0 or 1e-3 <= abs(x) < 1e6:
            return f"{x:.{digits}g}" if abs(x) < 10**digits else f"{x:.0f}"
        return f"{x:.{digits}e}"
    return str(x)


def markdown_table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    """A GitHub markdown table of `rows` (dicts); `columns` picks and orders the keys (default:
    every key, in first-seen order). Missing values print as '-'."""
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
    head = "| " + " | ".join(columns) + " |"
    sep = "| " + " | ".join("---" for _ in columns) + " |"
    body = ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def goal_row(
    metric: str,
    value: float | None,
    goal: float | None,
    *,
    higher_is_better: bool = True,
    unit: str = "",
) -> dict:
    """One summary row: {'metric', 'value', 'goal' (e.g. '>= 600'), 'ok' (None when either is
    missing)}. Use it for the headline numbers the issues set goals on."""
    ok = None
    if value is not None and goal is not None:
        ok = bool(value >= goal) if higher_is_better else bool(value <= goal)
    goal_s = (
        None if goal is None else f"{'>=' if higher_is_better else '<='} {fmt(float(goal))}{unit}"
    )
    return {"metric": metric, "value": value, "goal": goal_s, "ok": ok}


def attended_pairs(n: int, window: int | None) -> int:
    """(query, key) pairs a causal sequence of n tokens attends, with HF's window (i - w < j <= i)."""
    if window is None or window >= n:
        return n * (n + 1) // 2
    return window * (window + 1) // 2 + (n - window) * window


def arg_parser(doc: str | None) -> argparse.ArgumentParser:
    """The benchmarks' CLI parser: the module docstring as the help text, line breaks kept."""
    return argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def results_dir() -> Path:
    """Where results go: $R7B_RESULTS_DIR, else $OUT, else benchmarks/results/ (created)."""
    d = (
        os.environ.get("R7B_RESULTS_DIR")
        or os.environ.get("OUT")
        or str(REPO / "benchmarks" / "results")
    )
    path = Path(d)
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_results(name: str, payload: dict, table_md: str | None = None) -> list[Path]:
    """Write `<results_dir>/<name>.json` (payload plus an 'env' entry when it has none) and,
    given a table, `<name>.md`, each atomically (a temp file renamed: a benchmark killed while
    writing leaves the previous complete file). Returns the paths written."""
    if not name or any(c in name for c in "/\\ "):
        raise ValueError(f"write_results: name must be a plain file stem, got {name!r}")
    out = results_dir()
    payload = dict(payload)
    payload.setdefault("env", env_info())
    texts = {f"{name}.json": json.dumps(payload, indent=1, default=str) + "\n"}
    if table_md is not None:
        texts[f"{name}.md"] = table_md.rstrip() + "\n"
    paths = []
    for fname, text in texts.items():
        tmp = out / f".{fname}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / fname)
        paths.append(out / fname)
    return paths


PEERS = ("liger_kernel", "trl", "datasets", "mergekit", "r7b_fast._merge", "r7b_fast.kernels")


def _print_env(imports: bool = True) -> int:
    """`python -m benchmarks._common --env [--no-imports]`: print env_info() and whether each
    peer imports; also writes env.json into results_dir() (gpu_suite.sh consolidates it)."""
    import importlib

    info = env_info()
    for mod in PEERS if imports else ():
        try:
            importlib.import_module(mod)
            info[f"import {mod}"] = "ok"
        except Exception as e:  # report every broken peer, keep going
            info[f"import {mod}"] = f"{type(e).__name__}: {e}"[:200]
    for k, v in info.items():
        print(f"{k:>26}: {v}")
    (results_dir() / "env.json").write_text(json.dumps(info, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] != ["--env"] or sys.argv[2:] not in ([], ["--no-imports"]):
        sys.exit("usage: python -m benchmarks._common --env [--no-imports]")
    sys.exit(_print_env(imports=sys.argv[2:] == []))
