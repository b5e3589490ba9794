"""Regional torch.compile x activation checkpointing, our SFT step (`train_step.py --matrix`).

Each cell (compile off/on x checkpointing none/full/selective) runs in its own process
(`--matrix-cell COMPILE,AC`), so its compilation, caches and peak memory are its own; the parent
runs the cells one after the other and writes one table. Every cell builds the same seeded model
and the same packed rows, applies `apply_kernels`, then `distributed.apply_activation_checkpointing`
and `r7b_fast.compile.compile_model` in the trainer's order, and times AdamW steps:

- first_step_s: the first step, compilation included (inductor's on-disk cache is cold unless an
  earlier run of the same shapes filled it: the cells do not share shapes' graphs in one run);
- tokens_per_s (wall) and tokens_per_cpu_s (process CPU time, steadier on a shared machine)
  over the timed steps after `--warmup` steps (the first of which compiles);
- peak_extra: memory beyond what was resident before the timed steps (weights, AdamW state,
  compiled code): on CUDA `max_memory_allocated`; on the CPU the process RSS sampled every 2 ms
  by a thread during the timed steps (peak - start, MiB; `ru_maxrss` would include the
  compilation's own peak), with `MALLOC_MMAP_THRESHOLD_=65536` so that freed tensors leave the
  RSS (this costs some page faults, the same in every cell);
- mfu on CUDA (model FLOPs of the real tokens, `_e2e.step_flops`, no recompute counted).

`--mid` (CPU): a mid-size Cohere2 (hidden 512, 8 layers, 8 q / 2 kv heads, MLP 1792, vocab 32000,
window 256 on 3 of 4 layers) on one packed row of 512 tokens. On the GPU the R7B layer shapes
(`_e2e.model_config`) with `--layers` (default 4) layers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import numpy as np
import torch

CELLS = [(c, ac) for c in ("off", "on") for ac in ("none", "full", "selective")]
MID = dict(hidden_size=512, intermediate_size=1792, num_hidden_layers=8, num_attention_heads=8,
           num_key_value_heads=2, vocab_size=32000, sliding_window=256)  # fmt: skip


def add_args(ap) -> None:
    """train_step's options for the matrix."""
    g = ap.add_argument_group("compile x activation checkpointing (benchmarks/_compile_matrix.py)")
    g.add_argument("--matrix", action="store_true", help="ours, SFT: compile x checkpointing")
    g.add_argument("--matrix-cell", default=None, help=argparse.SUPPRESS)  # COMPILE,AC (a child)
    g.add_argument("--mid", action="store_true", help="CPU: the mid-size Cohere2 (hidden 512)")
    g.add_argument("--compile-modes", default="off,on")
    g.add_argument("--ac-modes", default=None, help="default none,full,selective (GPU: none)")
    g.add_argument("--compile-backend", default=None, help="inductor (dry-run: eager, dynamo only)")


def defaults(args):
    """--matrix: CPU with --mid or --dry-run (tiny, 2 layers), else CUDA at R7B layer shapes."""
    cpu = args.mid or args.dry_run or args.tiny
    if cpu:
        args.device = "cpu"
    args.ac_modes = args.ac_modes or ("none,full,selective" if cpu else "none")
    args.compile_backend = args.compile_backend or ("eager" if args.dry_run else "inductor")
    args.backend = args.backend or ("torch" if cpu else "auto")
    args.max_tokens = args.max_tokens or (128 if args.dry_run else 512 if cpu else 8192)
    args.median_len = args.median_len or (24 if args.dry_run else 96 if cpu else 500)
    args.rows = args.rows or 1
    args.warmup = max(args.warmup, 2)  # the first step compiles
    args.reps = 1 if args.dry_run else args.reps
    args.layers = args.layers if args.layers != "auto" else "4"
    args.name = args.name or ("compile_step_dryrun" if args.dry_run else
                              "cpu_train_step_compile" if cpu else "compile_step")  # fmt: skip
    return args


def model_config(args):
    from benchmarks import _e2e
    from r7b_fast.model import tiny_config

    if args.mid:
        return tiny_config(**MID)
    if args.tiny or args.dry_run:
        return tiny_config(num_hidden_layers=2)
    return _e2e.model_config(int(args.layers) if args.layers != "auto" else 4, tiny=False)


class RssPeak:
    """Peak resident set size (bytes) of this process while the block runs, sampled by a thread."""

    def __init__(self, every_s: float = 0.002):
        self.every_s, self.peak, self._stop = every_s, 0, threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.every_s)

    def __enter__(self):
        self.start = self.peak = self.rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def run_cell(args, compile_mode: str, ac: str) -> dict:
    """One cell in this process: build, transform, time; returns its row."""
    from benchmarks import _e2e
    from benchmarks._common import device_of, peak_flops
    from benchmarks.train_step import make_step
    from r7b_fast import distributed
    from r7b_fast.compile import compile_model
    from r7b_fast.model import apply_kernels

    device = device_of(None if args.device == "auto" else args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    cfg = model_config(args)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    data = _e2e.data_to_device(
        _e2e.make_data("sft", cfg, args, np.random.default_rng(args.seed)), device
    )
    model = _e2e.build(cfg, device, dtype)
    apply_kernels(model, backend=args.backend)
    distributed.apply_activation_checkpointing(model, ac)
    if compile_mode == "on":
        compile_model(model, backend=args.compile_backend)
    opt = _e2e.AdamWFp32State(list(model.parameters()), lr=args.lr)
    step, losses = make_step("sft", "ours", model, data, opt, args.backend)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    t0 = time.perf_counter()
    step()
    sync()
    first = time.perf_counter() - t0
    for _ in range(args.warmup - 1):
        step()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        resident = torch.cuda.memory_allocated(device)
    wall, cpu = [], []
    with RssPeak() as rss:
        for _ in range(args.reps):
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            sync()
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    sec, peak = statistics.median(wall), peak_flops(device)
    extra = (torch.cuda.max_memory_allocated(device) - resident) if cuda else rss.peak - rss.start
    return {
        "compile": compile_mode, "activation_checkpointing": ac, "layers": cfg.num_hidden_layers,
        "tokens_per_s": data["real_tokens"] / sec,
        "tokens_per_cpu_s": data["real_tokens"] / statistics.median(cpu),
        "first_step_s": first, "step_ms": 1e3 * sec, "reps": args.reps,
        "mfu": data["flops"] / sec / peak if peak else None,
        "peak_extra_mib": extra / 2**20, "loss": float(losses[0]),
        "real_tokens": data["real_tokens"],
    }  # fmt: skip


def main(args) -> int:
    """Parent: every cell in a child process, then the table (`<name>.json/.md`)."""
    from benchmarks._common import device_of, env_info, markdown_table, write_results

    if args.matrix_cell:
        compile_mode, ac = args.matrix_cell.split(",")
        print("MATRIX_ROW " + json.dumps(run_cell(args, compile_mode, ac)), flush=True)
        return 0
    device = device_of(None if args.device == "auto" else args.device)
    cfg = model_config(args)
    rows: list[dict] = []
    payload = {"config": {k: getattr(cfg, k) for k in ("num_hidden_layers", "hidden_size",
               "intermediate_size", "num_attention_heads", "num_key_value_heads", "vocab_size",
               "sliding_window")}, "args": vars(args), "rows": rows, "env": env_info(device)}  # fmt: skip
    base = [a for a in sys.argv[1:] if a != "--matrix"]
    # CPU: every allocation above 64 KiB gets its own mapping, returned to the OS when freed, so
    # the RSS follows the live tensors (glibc would keep freed heap, hiding later peaks)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"} if device.type == "cpu" else None
    for compile_mode, ac in CELLS:
        if compile_mode not in args.compile_modes.split(",") or ac not in args.ac_modes.split(","):
            continue
        cmd = [sys.executable, "-m", "benchmarks.train_step", *base, "--matrix-cell",
               f"{compile_mode},{ac}"]  # fmt: skip
        r = subprocess.run(
            cmd, capture_output=True, text=True, env=env, preexec_fn=_die_with_parent
        )
        found = [ln for ln in r.stdout.splitlines() if ln.startswith("MATRIX_ROW ")]
        if r.returncode or not found:
            tail = (r.stdout + r.stderr).strip().splitlines()[-5:]
            row = {"compile": compile_mode, "activation_checkpointing": ac,
                   "error": " | ".join(tail)[-300:]}  # fmt: skip
        else:
            row = json.loads(found[-1].removeprefix("MATRIX_ROW "))
        rows.append(row)
        print(f"[train_step --matrix] {row}", flush=True)
        _ratios(rows, "tokens_per_s" if device.type == "cuda" else "tokens_per_cpu_s")
        payload["summary"] = _summary(rows, device)
        write_results(args.name, payload, markdown_table(rows, COLUMNS))
    print(markdown_table(rows, COLUMNS))
    return 0 if rows and all("error" not in r for r in rows) else 1


COLUMNS = ["compile", "activation_checkpointing", "tokens_per_s", "tokens_per_cpu_s",
           "vs_eager_none", "first_step_s", "mfu", "peak_extra_mib", "loss", "error"]  # fmt: skip


def _ratios(rows: list[dict], key: str) -> None:
    """`key` (tokens/s on CUDA, per CPU second on the CPU) of each cell over compile=off,
    checkpointing none (the plain eager step)."""
    base = next((r for r in rows if r.get("compile") == "off"
                 and r.get("activation_checkpointing") == "none" and "error" not in r), None)  # fmt: skip
    for r in rows:
        if base and "error" not in r:
            r["vs_eager_none"] = r[key] / base[key]


def _summary(rows: list[dict], device) -> list[dict]:
    """The suite's headline rows: each compiled cell's speed over eager, and MFU on CUDA."""
    from benchmarks._common import goal_row

    out = []
    for r in rows:
        if r.get("compile") == "on" and "vs_eager_none" in r:
            name = (
                f"SFT step compile on / eager, AC {r['activation_checkpointing']} ({device.type})"
            )
            out.append(goal_row(name, r["vs_eager_none"], None))
            if r.get("mfu") is not None:
                out.append(goal_row(f"SFT MFU compiled, AC {r['activation_checkpointing']}",
                                    r["mfu"], None))  # fmt: skip
    return out


def _die_with_parent() -> None:
    """In the child: SIGTERM when the parent dies (gpu_suite's `timeout` kills only the parent;
    an orphaned cell would hold the GPU)."""
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:  # not glibc Linux: the child may outlive a killed parent
        pass
