"""Host syncs in the training loop (issue #16): CPU tokens/s and reads per step, before/after.

    python -m benchmarks.host_sync --before df259e4 [--steps 40 --rounds 3 --every 10]

"after" is a copy of this checkout taken at start (others may edit it meanwhile). "before" is
the same copy with the loop as it was at REV: train.py's train_steps, check_finite and
step_metrics, train_data.py's collate and compute_reference, and train_loss.py (everything
else, e.g. the optimizer, is the same in both). Each measurement is a fresh process
(PYTHONPATH = the tree) training sft_tiny's tiny model (tests/_train_helpers sizes, 2
micro-batches of 128 tokens per step) for --steps steps on the CPU with
logging.every_steps=--every. tokens/s = the run's tokens / the wall time of its step loop
(run_offline, minus the checkpoint save at the end). Each round runs both trees, in ABBA order
(a steady drift in the load of a shared machine cancels); the ratio reported is the median of
the per-round after/before ratios, in wall time and in the process's CPU time (one torch
thread: CPU time tracks the work done, less disturbed by other jobs than wall time). Reads: one more process per tree counts `.item()`,
`.tolist()`, `.cpu()`, ... per step after step 1 on the code paths a CUDA run takes (as
tests/test_host_sync.py does). On the CPU a read costs no device sync, so the CPU speed-up
should be small: the count is the point; the GPU gain needs a GPU run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SWAPPED = {
    "r7b_fast/train.py": ("train_steps", "check_finite", "step_metrics"),
    "r7b_fast/train_data.py": ("collate", "compute_reference"),
    "r7b_fast/train_loss.py": None,
}  # fmt: skip  (None: the whole file)
READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")
HF_MASK = "find_packed_sequence_indices"  # transformers' own per-forward check (see the test)
TINY = ("model.tiny_overrides={hidden_size: 32, intermediate_size: 64, num_attention_heads: 2, "
        "num_key_value_heads: 1}")  # fmt: skip


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, check=True, capture_output=True,
                          text=True).stdout  # fmt: skip


def _block(src: str, name: str) -> tuple[int, int]:
    """[start, end) of top-level function `name` in `src` (to the next top-level line)."""
    m = re.search(rf"^def {name}\(", src, re.M)
    if m is None:
        raise ValueError(f"no top-level def {name}")
    nxt = re.compile(r"^(def |class |@|#|[A-Za-z_])", re.M).search(src, src.index("\n", m.start()))
    return m.start(), nxt.start() if nxt else len(src)


def copy_tree(dest: Path, rev: str | None = None) -> Path:
    """A copy of the checkout (tracked and untracked, not ignored files; others may edit it
    while this runs), with SWAPPED as at `rev` when given."""
    for rel in _git("ls-files", "-co", "--exclude-standard").splitlines():
        src, dst = REPO / rel, dest / rel
        if not os.path.lexists(src):
            continue  # deleted in the checkout
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            os.symlink(os.readlink(src), dst)
        else:
            shutil.copy2(src, dst)
    for rel, names in SWAPPED.items() if rev else ():
        old = _git("show", f"{rev}:{rel}")
        if names is None:
            (dest / rel).write_text(old)
            continue
        new = (dest / rel).read_text()
        for name in names:
            a, b = _block(new, name)
            c, d = _block(old, name)
            new = new[:a] + old[c:d] + new[b:]
        (dest / rel).write_text(new)
    return dest


def child(mode: str, out: str, steps: int, every: int) -> dict:
    """One training run in this process (PYTHONPATH decides the tree): its tokens/s, or (mode
    'count') its reads per step after step 1 on the CUDA code paths."""
    import collections
    import time
    import traceback

    import torch

    from r7b_fast import checkpoint, train
    from r7b_fast.config import load_config

    torch.set_num_threads(1)
    state = {"step": 0, "paused": 0, "ckpt_s": 0.0, "ckpt_cpu_s": 0.0}
    counts = collections.Counter()

    def paused(fn, timed=False):
        def call(*a, **k):
            state["paused"] += 1
            t, c = time.perf_counter(), time.process_time()
            try:
                return fn(*a, **k)
            finally:
                state["paused"] -= 1
                if timed:
                    state["ckpt_s"] += time.perf_counter() - t
                    state["ckpt_cpu_s"] += time.process_time() - c

        return call

    checkpoint.save = paused(checkpoint.save, timed=True)
    if mode == "count":
        from r7b_fast.kernels import attention, fused_logprobs

        attention.host_value_checks = fused_logprobs.host_value_checks = lambda t: False
        attention._torch_path = attention._banded
        real_adamw = torch.optim.AdamW

        class FusedAdamW(real_adamw):
            def __init__(self, params, **kw):
                kw.pop("foreach", None)
                kw.pop("fused", None)
                super().__init__(params, fused=True, **kw)

        torch.optim.AdamW = FusedAdamW

        def counting(name, real):
            def read(self, *a, **k):
                if state["step"] >= 2 and not state["paused"]:
                    counts[(name, traceback.extract_stack(limit=2)[0].name)] += 1
                return real(self, *a, **k)

            return read

        for name in READS:
            setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
        real_acc = train.accumulate_gradients

        def acc(*a, **k):
            state["step"] += 1
            return real_acc(*a, **k)

        train.accumulate_gradients = acc
        train.collate = paused(train.collate)
    real_offline, loop = train.run_offline, {}

    def offline(*a, **k):
        t, c = time.perf_counter(), time.process_time()
        try:
            return real_offline(*a, **k)
        finally:
            loop["s"] = time.perf_counter() - t - state["ckpt_s"]
            loop["cpu_s"] = time.process_time() - c - state["ckpt_cpu_s"]

    train.run_offline = offline
    cfg = load_config("sft_tiny", [
        TINY, "model.kernel_backend=torch", "data.max_tokens=128", "data.synthetic_eval=1",
        "logging.progress_bar=false", "run.cpu_threads=1", f"run.output_dir={out}",
        "data.synthetic_families=[digits_ar]", "data.synthetic_train=32", "optim.global_batch=2",
        "optim.micro_batch=1", f"optim.max_steps={steps}", f"logging.every_steps={every}",
        "checkpoint.every_steps=0", "checkpoint.export_hf=false", "logging.tensorboard=false"])  # fmt: skip
    done = train.run(cfg)
    tokens = json.loads((Path(out) / "done.json").read_text())["tokens"]
    if mode == "count":
        hf = sum(n for (_, caller), n in counts.items() if caller == HF_MASK)
        loop_reads = {f"{m} in {c}": n for (m, c), n in counts.items() if c != HF_MASK}
        return {"steps_counted": steps - 1, "reads": sum(loop_reads.values()),
                "by_call": loop_reads, "hf_mask_reads": hf}  # fmt: skip
    return {"tokens": tokens, "seconds": loop["s"], "tokens_per_s": tokens / loop["s"],
            "cpu_seconds": loop["cpu_s"], "tokens_per_cpu_s": tokens / loop["cpu_s"],
            "steps": done["steps"]}  # fmt: skip


def run_child(tree: Path, mode: str, args, work: Path) -> dict:
    out = tempfile.mkdtemp(dir=work)
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--out", out,
           "--steps", str(args.steps), "--every", str(args.every)]  # fmt: skip
    r = subprocess.run(cmd, env=env, cwd=tree, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{mode} run in {tree} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> int:
    from benchmarks._common import arg_parser, env_info, write_results

    p = arg_parser(__doc__)
    p.add_argument("--before", required=True, help="git revision of the loop before the change")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--every", type=int, default=10, help="logging.every_steps in both runs")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--name", default="cpu_host_sync")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        trees = {
            "before": copy_tree(work / "before", args.before),
            "after": copy_tree(work / "after"),
        }
        reads = {k: run_child(t, "count", args, work) for k, t in trees.items()}
        timed = {"before": [], "after": []}
        for i in range(args.rounds):  # ABBA order: a steady drift in load cancels in pairs
            for k in ("before", "after") if i % 2 == 0 else ("after", "before"):
                timed[k].append(run_child(trees[k], "time", args, work))
                print(k, timed[k][-1], flush=True)
    med = {k: statistics.median(r["tokens_per_s"] for r in v) for k, v in timed.items()}
    pairs = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(timed["after"], timed["before"])]
    cpu_pairs = [a["tokens_per_cpu_s"] / b["tokens_per_cpu_s"]
                 for a, b in zip(timed["after"], timed["before"])]  # fmt: skip
    payload = {
        "args": vars(args),
        "machine": "this 2-core CPU, shared with other jobs",
        "tokens_per_s_median": med,
        "ratio_after_over_before": statistics.median(pairs),
        "ratio_per_round": pairs,
        "cpu_time_ratio_after_over_before": statistics.median(cpu_pairs),
        "cpu_time_ratio_per_round": cpu_pairs,
        "reads_per_step_after_warmup": {
            k: r["reads"] / r["steps_counted"] for k, r in reads.items()
        },
        "reads": reads,
        "runs": timed,
        "env": env_info("cpu"),
    }
    md = (f"# Host reads in the training loop (CPU, tiny sft, every_steps={args.every})\n\n"
          "| tree | tokens/s (median of {r}) | reads/step after warm-up |\n|---|---|---|\n"
          .format(r=args.rounds)
          + "".join(f"| {k} | {med[k]:.0f} | {payload['reads_per_step_after_warmup'][k]:.2f} |\n"
                    for k in trees)
          + f"\nratio after/before (median of the per-round ratios "
          f"{', '.join(f'{r:.2f}' for r in pairs)}): {payload['ratio_after_over_before']:.3f} "
          f"({payload['machine']})\n"
          f"\nsame, in tokens per CPU-second of the process (less sensitive to other jobs): "
          f"{', '.join(f'{r:.2f}' for r in cpu_pairs)} -> "
          f"{payload['cpu_time_ratio_after_over_before']:.3f}\n")  # fmt: skip
    for path in write_results(args.name, payload, md):
        print(path)
    print(md)
    return 0


if __name__ == "__main__":
    if "--child" in sys.argv:
        a = dict(zip(sys.argv[1::2], sys.argv[2::2]))
        result = child(a["--child"], a["--out"], int(a["--steps"]), int(a["--every"]))
        print(json.dumps(result))
        sys.exit(0)
    sys.exit(main())
