"""Merge benchmark: r7b_fast.merge vs mergekit vs the I/O floor, page cache warm.

    python benchmarks/merge.py                     # 3 experts x ~400 MB bf16, 4 shards each
    python benchmarks/merge.py --experts 3 --size-mb 400 --scale-experts 2,4,8 --big 4

Builds synthetic Cohere2-shaped bf16 experts (tied embeddings, vocab 32000, hidden 1024,
intermediate 4096, 8/2 heads; the layer count sets the size), reads every file once to warm the
page cache, then times each contender as a child process (wall clock; peak RSS from os.wait4):
- ours: `python -m r7b_fast.merge --config merge.yaml --out ...` (linear, equal weights);
- mergekit: `mergekit-yaml merge.yaml ...` (same YAML; the `peers` extra);
- floor: a child that reads every input file once (1 MiB reads, spread over as many threads as
  the merge uses) while writing an output file of the merged size.
Then ours + floor for other expert counts and for a `--big`x larger model (RSS stays flat).
Ratios: ours / floor and mergekit / ours. Results: benchmarks/results/merge.{json,md}.

    python benchmarks/merge.py --methods linear,ties,dare_linear,dare_ties,slerp --size-mb 100

instead times each merge method once (e0 is the base; ties / dare_*: e1.. with weights 0.6 /
0.5 / .. and density 0.5; slerp: e0 and e1, t 0.4) against mergekit-yaml and the I/O floor, with
peak RSS; results: benchmarks/results/merge_methods.{json,md}, with the CPU model.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import arg_parser, markdown_table, write_results  # noqa: E402

HIDDEN, INTER, VOCAB, HEADS, KV_HEADS = 1024, 4096, 32000, 8, 2
# The I/O floor: every input file read once (1 MiB reads, files spread over THREADS threads, as
# many as our merge uses) while one more thread writes an output file of the merged size.
FLOOR_CHILD = r"""
import os, sys, threading
out, files, n = sys.argv[1], sys.argv[2:], int(os.environ["FLOOR_THREADS"])
def read(part):
    buf = bytearray(1 << 20)
    for f in part:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass
def write(size):
    buf = memoryview(bytearray(1 << 20))
    with open(out, "wb", buffering=0) as fh:
        while size > 0:
            size -= fh.write(buf[: min(size, len(buf))])
files.sort(key=os.path.getsize, reverse=True)
ts = [threading.Thread(target=read, args=(files[i::n],)) for i in range(n)]
ts.append(threading.Thread(target=write, args=(int(os.environ["FLOOR_OUT_BYTES"]),)))
[t.start() for t in ts]
[t.join() for t in ts]
"""


def cohere2_tensors(layers: int) -> list[tuple[str, tuple[int, ...]]]:
    hd = HIDDEN // HEADS
    t = [("model.embed_tokens.weight", (VOCAB, HIDDEN)), ("model.norm.weight", (HIDDEN,))]
    for i in range(layers):
        p = f"model.layers.{i}."
        t += [(p + "input_layernorm.weight", (HIDDEN,)),
              (p + "self_attn.q_proj.weight", (HEADS * hd, HIDDEN)),
              (p + "self_attn.k_proj.weight", (KV_HEADS * hd, HIDDEN)),
              (p + "self_attn.v_proj.weight", (KV_HEADS * hd, HIDDEN)),
              (p + "self_attn.o_proj.weight", (HIDDEN, HEADS * hd)),
              (p + "mlp.gate_proj.weight", (INTER, HIDDEN)),
              (p + "mlp.up_proj.weight", (INTER, HIDDEN)),
              (p + "mlp.down_proj.weight", (HIDDEN, INTER))]  # fmt: skip
    return t


def layers_for(size_mb: float) -> int:
    per_layer = sum(int(np.prod(s)) for _, s in cohere2_tensors(1)[2:])
    return max(1, round((size_mb * 1e6 / 2 - VOCAB * HIDDEN) / per_layer))


def write_expert(d: Path, layers: int, shards: int, seed: int) -> int:
    """One bf16 expert in `shards` files + index + config; returns its tensor bytes."""
    from transformers import Cohere2Config

    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pool = (rng.standard_normal(1 << 22).astype(np.float32) * 0.02).view(np.uint32) >> 16
    pool = pool.astype(np.uint16)
    tensors = cohere2_tensors(layers)
    total = sum(int(np.prod(s)) * 2 for _, s in tensors)
    groups, cur, size = [], [], 0
    for name, shape in tensors:
        cur.append((name, shape))
        size += int(np.prod(shape)) * 2
        if size >= total / shards and len(groups) < shards - 1:
            groups.append(cur)
            cur, size = [], 0
    groups.append(cur)
    wm = {}
    for k, group in enumerate(groups):
        fname = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        head, pos = {}, 0
        for name, shape in group:
            n = int(np.prod(shape)) * 2
            head[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [pos, pos + n]}
            pos += n
            wm[name] = fname
        h = json.dumps(head).encode()
        h += b" " * (-len(h) % 8)
        with open(d / fname, "wb") as f:
            f.write(struct.pack("<Q", len(h)) + h)
            for _, shape in group:
                n = int(np.prod(shape))
                off = int(rng.integers(0, pool.size))
                f.write(np.resize(np.roll(pool, off), n).tobytes())
    idx = {"metadata": {"total_size": total}, "weight_map": wm}
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    cfg = Cohere2Config(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER,
                        num_hidden_layers=layers, num_attention_heads=HEADS,
                        num_key_value_heads=KV_HEADS, tie_word_embeddings=True)  # fmt: skip
    cfg.architectures = ["Cohere2ForCausalLM"]
    cfg.torch_dtype = "bfloat16"
    cfg.save_pretrained(d)
    return total


# Children are started through this small shim: ru_maxrss counts the memory a process had
# before its exec, so a child exec'd straight from this (large) parent would report the
# parent's RSS. The shim's own footprint (~10 MiB) is the floor of what can be measured.
SHIM = r"""
import json, os, shutil, sys
exe = shutil.which(sys.argv[2])
pid = os.posix_spawn(exe, sys.argv[2:], os.environ)
_, status, ru = os.wait4(pid, 0)
open(sys.argv[1], "w").write(json.dumps({"rc": os.waitstatus_to_exitcode(status), "maxrss_kb": ru.ru_maxrss}))
"""


def timed(cmd: list[str], env=None) -> dict:
    """Wall seconds, peak RSS (MiB, of the command alone) and stdout of a child process."""
    with tempfile.NamedTemporaryFile("r", suffix=".json") as rep:
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", SHIM, rep.name, *cmd], env=env,
                           capture_output=True, text=True)  # fmt: skip
        wall = time.perf_counter() - t0
        info = json.loads(rep.read() or "{}")
    if r.returncode != 0 or info.get("rc") != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed: {r.stderr[-3000:]}")
    return {"wall_s": wall, "rss_mib": info["maxrss_kb"] / 1024, "stdout": r.stdout}


def warm(files: list[Path]) -> None:
    """Page cache warm for `files`; earlier outputs flushed so their writeback does not overlap."""
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.read(16 << 20):
                pass
    os.sync()


def yaml_for(experts: list[Path], path: Path, method: str = "linear") -> Path:
    """mergekit YAML: linear (equal weights), or `method` with experts[0] as the base."""
    lines = [f"merge_method: {method}", "dtype: bfloat16", "models:"]
    if method == "linear":
        lines += [f"  - model: {e}\n    parameters: {{weight: 1.0}}" for e in experts]
    elif method == "slerp":
        lines = [*lines, f"  - model: {experts[0]}", f"  - model: {experts[1]}",
                 f"base_model: {experts[0]}", "parameters: {t: 0.4}"]  # fmt: skip
    else:
        lines += [f"  - model: {e}\n    parameters: {{weight: {0.6 - 0.1 * k:.1f}, density: 0.5}}"
                  for k, e in enumerate(experts[1:])]  # fmt: skip
        lines.append(f"base_model: {experts[0]}")
    path.write_text("\n".join(lines) + "\n")
    return path


def measure(
    experts: list[Path], work: Path, tag: str, *, mergekit: bool, reps: int, threads,
    method: str = "linear",
) -> dict:  # fmt: skip
    """Best-of-`reps` wall for ours and the floor (one mergekit run), page cache warm."""
    if method == "slerp":
        experts = experts[:2]
    files = sorted(f for e in experts for f in e.glob("*.safetensors"))
    in_bytes = sum(f.stat().st_size for f in files)
    y = yaml_for(experts, work / f"{tag}.yaml", method)
    out = work / f"out-{tag}"
    ours_cmd = [sys.executable, "-m", "r7b_fast.merge", "--config", str(y), "--out", str(out)]
    ours_cmd += ["--threads", str(threads)] if threads else []
    res = {"case": tag, "method": method, "experts": len(experts), "in_GB": in_bytes / 1e9}
    nthreads = threads or min(os.cpu_count() or 1, 8)  # the merge's default
    floor_cmd = [sys.executable, "-c", FLOOR_CHILD, str(work / "floor.bin"), *map(str, files)]
    runs, floors = [], []
    for _ in range(reps):  # interleaved, so a burst of load on the shared machine hits both
        shutil.rmtree(out, ignore_errors=True)
        warm(files)
        runs.append(timed(ours_cmd))
        out_bytes = sum(f.stat().st_size for f in out.glob("*.safetensors"))
        env = {**os.environ, "FLOOR_OUT_BYTES": str(out_bytes), "FLOOR_THREADS": str(nthreads)}
        warm(files)
        floors.append(timed(floor_cmd, env))
        (work / "floor.bin").unlink()
    shutil.rmtree(out, ignore_errors=True)
    best = min(runs, key=lambda r: r["wall_s"])
    fl = min(floors, key=lambda r: r["wall_s"])
    res.update(ours_s=best["wall_s"], ours_rss_MiB=max(r["rss_mib"] for r in runs))
    res["ours_engine_s"] = float(best["stdout"].split(" in ")[-1].split(" s ")[0])
    res.update(floor_s=fl["wall_s"], floor_rss_MiB=fl["rss_mib"])
    res["ours_over_floor"] = res["ours_s"] / fl["wall_s"]
    if mergekit:
        exe = shutil.which("mergekit-yaml", path=os.path.dirname(sys.executable)) or "mergekit-yaml"
        warm(files)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        mk = timed([exe, str(y), str(work / f"mk-{tag}")], env)
        shutil.rmtree(work / f"mk-{tag}", ignore_errors=True)
        res.update(mergekit_s=mk["wall_s"], mergekit_rss_MiB=mk["rss_mib"],
                   mergekit_over_ours=mk["wall_s"] / res["ours_s"])  # fmt: skip
    return res


def main(argv=None) -> None:
    ap = arg_parser(__doc__)
    ap.add_argument("--experts", type=int, default=3)
    ap.add_argument("--size-mb", type=float, default=400, help="approximate size of one expert")
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--scale-experts", default="2,4,8", help="other expert counts ('' = none)")
    ap.add_argument(
        "--big", type=float, default=4, help="also a model this many times larger (0 = no)"
    )
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-mergekit", action="store_true")
    ap.add_argument("--workdir", default=None, help="default: a temp dir, removed at the end")
    ap.add_argument("--methods", default="", help="comma list: time these methods instead")
    a = ap.parse_args(argv)
    if a.methods:
        return main_methods(a)
    work = Path(a.workdir or tempfile.mkdtemp(prefix="r7b-merge-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        counts = sorted({a.experts, *[int(x) for x in a.scale_experts.split(",") if x]})
        layers = layers_for(a.size_mb)
        experts = [work / f"e{k}" for k in range(max(counts))]
        for k, e in enumerate(experts):
            write_expert(e, layers, a.shards, seed=k)
        print(f"experts: {layers} layers, {write_expert.__name__} done", file=sys.stderr)
        for n in counts:
            rows.append(measure(experts[:n], work, f"{n}x{a.size_mb:g}MB",
                                mergekit=(n == a.experts and not a.no_mergekit), reps=a.reps, threads=a.threads))  # fmt: skip
            print(rows[-1], file=sys.stderr)
        for e in experts[a.experts :]:
            shutil.rmtree(e)
        if a.big:
            big = [work / f"big{k}" for k in range(a.experts)]
            for k, e in enumerate(big):
                write_expert(e, layers_for(a.size_mb * a.big), a.shards, seed=100 + k)
            for e in experts[: a.experts]:
                shutil.rmtree(e)
            rows.append(measure(big, work, f"{a.experts}x{a.size_mb * a.big:g}MB", mergekit=False,
                                reps=1, threads=a.threads))  # fmt: skip
            print(rows[-1], file=sys.stderr)
    finally:
        if a.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    cols = ["case", "in_GB", "ours_s", "ours_engine_s", "floor_s", "ours_over_floor", "mergekit_s",
            "mergekit_over_ours", "ours_rss_MiB", "floor_rss_MiB", "mergekit_rss_MiB"]  # fmt: skip
    load = os.getloadavg()
    note = f"\nCPU cores: {os.cpu_count()}; load average at end: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}\n"
    _report("merge", rows, cols, note, args=vars(a), loadavg=load)


def _report(name: str, rows: list, cols: list, note: str, **extra) -> None:
    """Print the markdown table of `rows` + `note` and write it with `rows` and `extra`."""
    md = markdown_table(rows, cols)
    print(md + note)
    write_results(name, {"rows": rows, **extra}, md + note)


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def main_methods(a) -> None:
    """Each of `a.methods` on `a.experts` experts (e0 the base), once, vs mergekit and the floor."""
    work = Path(a.workdir or tempfile.mkdtemp(prefix="r7b-merge-methods-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        experts = [work / f"e{k}" for k in range(a.experts)]
        for k, e in enumerate(experts):
            write_expert(e, layers_for(a.size_mb), a.shards, seed=k)
        for method in a.methods.split(","):
            rows.append(measure(experts, work, method, mergekit=not a.no_mergekit, reps=a.reps,
                                threads=a.threads, method=method))  # fmt: skip
            print(rows[-1], file=sys.stderr)
    finally:
        if a.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    cols = ["method", "experts", "in_GB", "ours_s", "floor_s", "ours_over_floor", "mergekit_s",
            "mergekit_over_ours", "ours_rss_MiB", "floor_rss_MiB", "mergekit_rss_MiB"]  # fmt: skip
    load = os.getloadavg()
    machine = f"{cpu_model()}, {os.cpu_count()} CPU cores (shared), page cache warm"
    note = (f"\nMachine: {machine}; load average at end: {load[0]:.1f} {load[1]:.1f} "
            f"{load[2]:.1f}. Wall seconds of one run each (--reps {a.reps}), bf16 experts of "
            f"~{a.size_mb:g} MB; ours_s includes Python start-up and planning.\n")  # fmt: skip
    _report("merge_methods", rows, cols, note, args=vars(a), loadavg=load, machine=machine)


if __name__ == "__main__":
    main()
