"""TRL's DPOTrainer vs TRL + Liger vs our drop-in (`r7b_fast.integrations.trl.DPOTrainer`).

The same preference data (random-word prompts and completions of lognormal lengths, as text:
TRL tokenizes it with the embedded tokenizer), the same seeded policy and reference models, the
same DPOConfig (sigmoid, beta 0.1, a reference model in memory, no gradient checkpointing);
only the trainer class (and `use_liger_kernel` for `trl_liger`) differs:

| variant   | what runs                                                                      |
| --------- | ------------------------------------------------------------------------------ |
| trl       | TRL 1.16: [2B, L] padded pairs, SDPA, TRL's chunked LM head                     |
| trl_liger | the same with `use_liger_kernel=True` (Liger's layer kernels where it has them: |
|           | none for Cohere2, reported as `liger_modules`)                                  |
| ours      | one packed row per micro-batch, varlen attention, fused linear log-prob head    |

Variants are interleaved: each round builds a fresh trainer per variant (on that variant's own
models) and runs `--steps` optimizer steps; the first step of a round (optimizer creation,
compilation) is not timed. Step time = `on_step_begin` .. `on_step_end` (CUDA synchronised):
forward + backward + optimizer over the step's micro-batches (collation is the dataloader's).
tokens/s counts real tokens (TRL's `num_tokens`: chosen + rejected, no padding), the same for
every variant; tokens_per_cpu_s divides by the process CPU time instead (steadier on a shared
CPU). Peak memory: CUDA `max_memory_allocated` during `train()` minus what was allocated
before; on the CPU the peak RSS (sampled every 2 ms) during `train()` minus the RSS before.
The learning rate defaults to 0 (the optimizer does its work, the weights stay), so every step
of every variant sees the same model and the losses must agree (`compare` in the JSON).

    python -m benchmarks.trl_dpo                        # GPU: R7B layer shapes (2 layers), bf16
    python -m benchmarks.trl_dpo --device cpu --tiny    # CPU: tiny model, trl vs ours
    python -m benchmarks.trl_dpo --dry-run              # CPU smoke test of every variant
"""

from __future__ import annotations

import copy
import gc
import tempfile
import threading
import time
import traceback

import numpy as np
import torch

from benchmarks._common import arg_parser, device_of, env_info, markdown_table, write_results

VARIANTS = ("trl", "trl_liger", "ours")
WORDS = [w for w in "the of and to in is was for on that with as by at from are this be or an "
         "which have it not his but they had were has their been one more will would also its "
         "new than first other some time two only into after most people about year".split()]  # fmt: skip


def parse_args(argv=None):
    ap = arg_parser(__doc__)
    ap.add_argument("--device", default=None)
    ap.add_argument("--tiny", action="store_true", help="the tiny Cohere2 (CPU measurement)")
    ap.add_argument("--dry-run", action="store_true", help="tiny, 1 round of 2 steps, CPU")
    ap.add_argument("--arch", default="cohere2", choices=("cohere2", "llama"))
    ap.add_argument("--layers", type=int, default=2, help="decoder layers at R7B shapes (GPU)")
    ap.add_argument("--variants", default=None,
                    help="default: all on CUDA and in --dry-run, trl,ours on the CPU (Liger's "
                    "Triton kernels need CUDA or the interpreter)")  # fmt: skip
    ap.add_argument("--backend", default=None, help="our kernels' backend (default auto; "
                    "torch in --dry-run: the interpreter would time the interpreter)")  # fmt: skip
    ap.add_argument("--pairs", type=int, default=None, help="pairs in the dataset")
    ap.add_argument("--batch", type=int, default=None, help="pairs per micro-batch")
    ap.add_argument("--accum", type=int, default=2, help="micro-batches per optimizer step")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per round")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--prompt-words", type=int, default=None, help="mean prompt length (words)")
    ap.add_argument("--completion-words", type=int, default=None)
    ap.add_argument("--max-length", type=int, default=None)
    ap.add_argument("--lr", type=float, default=0.0)
    ap.add_argument("--budget", type=float, default=None, help="seconds: no new round after it")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default=None)
    a = ap.parse_args(argv)
    if a.dry_run:
        a.device, a.tiny = "cpu", True
    gpu = device_of(a.device).type == "cuda"
    small = a.tiny or a.dry_run
    defaults = dict(pairs=(8 if a.dry_run else 64 if small else 256), batch=(2 if small else 4),
                    steps=(2 if a.dry_run else 4 if small else 5),
                    rounds=(1 if a.dry_run else 3), prompt_words=(8 if small else 400),
                    completion_words=(12 if small else 300), max_length=(64 if small else 2048),
                    budget=(60 if a.dry_run else 240 if gpu else 900),
                    variants=(",".join(VARIANTS) if gpu or a.dry_run else "trl,ours"),
                    backend=("torch" if a.dry_run else "auto"),
                    name=("trl_dpo_dryrun" if a.dry_run else "trl_dpo_cpu_tiny" if small
                          else f"trl_dpo_{a.arch}"))  # fmt: skip
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    return a


def build_model(args, dtype, device, seed):
    """The seeded policy (the reference is a deep copy): tiny Cohere2/Llama on the CPU, else
    Command R7B's layer shapes (vocab 256000) with `--layers` layers, or a Llama-3-8B-shaped one."""
    torch.manual_seed(seed)
    if args.arch == "cohere2":
        from benchmarks._e2e import model_config

        cfg = model_config(None if args.tiny else args.layers, tiny=args.tiny)
        from transformers import Cohere2ForCausalLM as cls
    else:
        from transformers import LlamaConfig
        from transformers import LlamaForCausalLM as cls

        shape = (dict(vocab_size=1024, hidden_size=128, intermediate_size=256, num_attention_heads=4,
                      num_key_value_heads=2, num_hidden_layers=4) if args.tiny else
                 dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                      num_attention_heads=32, num_key_value_heads=8,
                      num_hidden_layers=args.layers))  # fmt: skip
        cfg = LlamaConfig(**shape, pad_token_id=0, bos_token_id=1, eos_token_id=4, use_cache=False)
    cfg._attn_implementation = "sdpa"
    return cls(cfg).to(device=device, dtype=dtype)


def make_data(args, rng):
    """Preference pairs as text (TRL tokenizes them): prompt, chosen, rejected word strings."""
    from datasets import Dataset

    def text(mean):
        n = max(1, int(rng.lognormal(np.log(mean), 0.5)))
        return " ".join(rng.choice(WORDS, size=n))

    rows = [{"prompt": text(args.prompt_words), "chosen": " " + text(args.completion_words),
             "rejected": " " + text(args.completion_words)} for _ in range(args.pairs)]  # fmt: skip
    return Dataset.from_list(rows)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_timer(device):
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.cpu_times, self._t0 = [], [], None

        def on_step_begin(self, *a, **k):
            sync(device)
            self._t0 = (time.perf_counter(), time.process_time())

        def on_step_end(self, *a, **k):
            sync(device)
            self.times.append(time.perf_counter() - self._t0[0])
            self.cpu_times.append(time.process_time() - self._t0[1])

    return StepTimer()


class PeakRss:
    """Peak resident set size of this process while the block runs, sampled every 2 ms."""

    def __enter__(self):
        import psutil

        self._proc, self._stop = psutil.Process(), threading.Event()
        self.before = self.peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def run_round(variant, models, data, tok, args, device, dtype):
    """One fresh trainer of `variant` for `args.steps` steps; its per-step figures."""
    import trl
    from trl import DPOConfig

    from r7b_fast.integrations import trl as ours
    from r7b_fast.kernels import kernel_calls

    policy, ref = models
    cfg = DPOConfig(output_dir=tempfile.mkdtemp(prefix="trl_dpo_"), report_to=[],
                    use_cpu=device.type == "cpu", bf16=dtype == torch.bfloat16,
                    max_steps=args.steps, per_device_train_batch_size=args.batch,
                    gradient_accumulation_steps=args.accum, logging_steps=1, save_strategy="no",
                    learning_rate=args.lr, gradient_checkpointing=False, max_length=args.max_length,
                    seed=args.seed, disable_tqdm=True, dataloader_num_workers=0,
                    use_liger_kernel=variant == "trl_liger")  # fmt: skip
    cls, kw = trl.DPOTrainer, {}
    if variant == "ours":
        cls, kw = ours.DPOTrainer, {"kernel_backend": args.backend}
    timer = step_timer(device)
    trainer = cls(model=policy, ref_model=ref, args=cfg, train_dataset=data, processing_class=tok,
                  callbacks=[timer], **kw)  # fmt: skip
    liger = sum(type(m).__module__.startswith("liger_kernel") for m in policy.modules())
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    with kernel_calls() as calls, PeakRss() as rss:
        trainer.train()
    if device.type == "cuda":
        extra = torch.cuda.max_memory_allocated(device) - before
    else:
        extra = rss.peak - rss.before
    logs = [h for h in trainer.state.log_history if "loss" in h]
    tokens = np.diff([0.0] + [h["num_tokens"] for h in logs])
    del trainer
    return {"times": timer.times[1:], "cpu_times": timer.cpu_times[1:], "tokens": tokens[1:].tolist(),
            "losses": [h["loss"] for h in logs], "extra_bytes": extra, "liger_modules": liger,
            "kernel_calls": {k: v for k, v in calls.items() if ":" in k}}  # fmt: skip


def summarise(variant, rounds, args):
    times = [t for r in rounds for t in r["times"]]
    tokens = [n for r in rounds for n in r["tokens"]]
    row = {"arch": args.arch, "variant": variant, "steps_timed": len(times)}
    if times:
        row["tokens_per_s"] = sum(tokens) / sum(times)
        # process CPU time (all threads): on a shared CPU, less sensitive to other jobs' load
        row["tokens_per_cpu_s"] = sum(tokens) / sum(t for r in rounds for t in r["cpu_times"])
        row["step_ms_median"] = 1e3 * float(np.median(times))
    row["peak_extra_gib"] = max(r["extra_bytes"] for r in rounds) / 2**30
    row["loss_first"] = rounds[0]["losses"][0]
    row["liger_modules"] = rounds[0]["liger_modules"]
    row["kernel_calls"] = ", ".join(
        f"{k}={v}" for k, v in sorted(rounds[0]["kernel_calls"].items())
    )
    return row


def main(argv=None) -> int:
    args = parse_args(argv)
    device = device_of(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    variants = [v for v in args.variants.split(",") if v]
    if bad := [v for v in variants if v not in VARIANTS]:
        raise ValueError(f"--variants: unknown {bad}")
    from r7b_fast.data.tokenizer import load_tokenizer

    tok = load_tokenizer()
    data = make_data(args, np.random.default_rng(args.seed))
    base = build_model(args, dtype, device, args.seed)
    models = {v: (copy.deepcopy(base), copy.deepcopy(base)) for v in variants}
    del base
    results = {v: [] for v in variants}
    rows, errors = [], {}
    # the losses agree to summation order in fp32; bf16 rounds activations differently per path
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    payload = {"args": vars(args), "dtype": str(dtype), "rows": rows, "errors": errors,
               "loss_tolerance": tol, "env": env_info(device)}  # fmt: skip
    start = time.time()
    for rnd in range(args.rounds):
        if rnd and time.time() - start > args.budget:
            print(f"[trl_dpo] budget {args.budget}s reached after {rnd} rounds", flush=True)
            break
        for v in variants:
            if v in errors:
                continue
            try:
                results[v].append(run_round(v, models[v], data, tok, args, device, dtype))
            except Exception as e:  # one variant failing (e.g. Liger) must not lose the others
                traceback.print_exc()
                errors[v] = f"{type(e).__name__}: {e}"[:500]
        rows[:] = [summarise(v, results[v], args) for v in variants if results[v]]
        compare(payload, results, tol)
        write_results(args.name, payload, table(payload))
        print(table(payload), flush=True)
    return 0 if payload.get("compare", {}).get("loss_ok", True) and not errors else 1


def compare(payload, results, tol):
    """Every step's loss, ours vs TRL (same weights and data at lr 0): the max relative gap."""
    if not (results.get("trl") and results.get("ours")):
        return
    a = np.array([x for r in results["trl"] for x in r["losses"]])
    b = np.array([x for r in results["ours"] for x in r["losses"]])
    gap = float(np.max(np.abs(a - b) / np.maximum(np.abs(a), 1e-12)))
    speed = {r["variant"]: r.get("tokens_per_s") for r in payload["rows"]}
    ratio = speed["ours"] / speed["trl"] if speed.get("ours") and speed.get("trl") else None
    cpu = {r["variant"]: r.get("tokens_per_cpu_s") for r in payload["rows"]}
    cpu_ratio = cpu["ours"] / cpu["trl"] if cpu.get("ours") and cpu.get("trl") else None
    payload["compare"] = {"loss_max_rel_gap": gap, "loss_ok": gap <= tol,
                          "speedup_ours_vs_trl": ratio, "cpu_time_speedup": cpu_ratio}  # fmt: skip
    if payload["dtype"] == str(torch.bfloat16):  # the headline rows of a GPU run
        from benchmarks._common import goal_row

        shape = f"{payload['args']['arch']}, {payload['args']['layers']} layers at full width"
        payload["summary"] = [
            goal_row(f"TRL DPO drop-in: tokens/s ours / TRL ({shape})", ratio, 1.0),
            goal_row(f"TRL DPO drop-in: loss ours vs TRL, max rel gap ({shape})", gap, tol,
                     higher_is_better=False),
        ]  # fmt: skip


def table(payload) -> str:
    cols = ["arch", "variant", "tokens_per_s", "tokens_per_cpu_s", "step_ms_median", "peak_extra_gib", "loss_first",
            "steps_timed", "liger_modules", "kernel_calls"]  # fmt: skip
    md = markdown_table(payload["rows"], cols)
    if payload.get("compare"):
        md += "\n\n" + markdown_table([payload["compare"]])
    if payload["errors"]:
        md += "\n\n" + "\n".join(f"- {v}: {e}" for v, e in payload["errors"].items())
    return md


if __name__ == "__main__":
    raise SystemExit(main())
