"""End-to-end training-step benchmark: ours vs HF transformers vs HF + Liger, SFT and DPO.

A Cohere2 with Command R7B's layer shapes (hidden 4096, 32 q / 8 kv heads, head_dim 128, MLP
14336, vocab 256000, window 4096, logit_scale, tied embeddings) and as many layers as fit the
memory budget (default 78 GiB: one 80 GB card) with AdamW in bf16 params + fp32 state
(`_e2e.plan_layers`: 6 layers fit every variant at 8192-token micro-batches, HF's materialised
logits being the binding term; 14 fit ours alone, run as `ours_max`). One optimizer step covers
`--rows` packed rows of `--max-tokens` tokens drawn from realistic (lognormal) lengths; every
variant trains on exactly the same sequences, so the same real tokens:

| variant   | SFT                                                    | DPO (sigmoid, beta 0.1)                     |
| --------- | ------------------------------------------------------ | ------------------------------------------- |
| hf        | sdpa, padded micro-batches, `model(labels=...)`        | TRL-style: [2B, L] padded pairs, `.logits`, TRL's `selective_log_softmax` |
| hf_liger  | sdpa, padded, Liger fused linear cross-entropy          | sdpa, padded pairs, Liger fused linear DPO   |
| ours      | `apply_kernels`: packed rows, varlen attention, `linear_logprobs` | the same on packed pairs, `r7b_fast.losses.dpo_loss` |
| ours_max  | ours, SFT, at `plan['layers_ours']` layers (GPU)        | -                                           |

Padded micro-batches keep the data order and grow while batch x longest <= max_tokens (a
generous baseline: no sort by length). DPO references are precomputed for every variant (fixed
per pair), so no reference model is in memory; Liger's DPO gets `use_ref_model=False`, which
costs the same as precomputed references. The learning rate defaults to 0: the optimizer does
all its arithmetic but the weights stay put, so every variant sees the same model and their
first-step losses must agree (`compare` in the JSON: `*_loss_ok`; exit code 1 otherwise).

Reported per variant: tokens/s of real (non-pad) tokens, MFU = model FLOPs of the real tokens
(`_e2e.step_flops`) / time / the card's dense bf16 peak, peak memory (and beyond weights +
optimizer state), loss. Ours runs first, on its own model (apply_kernels patches in place); the
HF variants get a fresh model with the same seeded weights; results are written after every
variant, so a run cut short by its time budget keeps what it measured.

    python -m benchmarks.train_step                      # GPU: R7B shapes
    python -m benchmarks.train_step --device cpu --tiny  # CPU: tiny model, ours vs HF, interleaved
    python -m benchmarks.train_step --dry-run            # CPU smoke test of every path (ours on
                                                         # its torch twins, Liger interpreted)
    python -m benchmarks.train_step --matrix [--mid]     # ours: torch.compile off/on x activation
                                                         # checkpointing (benchmarks/_compile_matrix.py)
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
import traceback

import numpy as np
import torch

from benchmarks import _e2e
from benchmarks._common import (
    arg_parser,
    bench,
    device_of,
    env_info,
    markdown_table,
    peak_flops,
    write_results,
)

VARIANTS = ("hf", "hf_liger", "ours")
BETA = 0.1


# ----------------------------------------------------------------------------- SFT steps
# Each returns a function doing one step's forward+backward over all micro-batches and giving the
# step's loss (mean over the step's target tokens), detached.


def sft_hf(model, batches, n_targets):
    def run():
        total = 0.0
        for b in batches:
            n = (b["labels"][:, 1:] != -100).sum()
            out = model(
                input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]
            )
            loss = out.loss * (n / n_targets)
            loss.backward()
            total += loss.detach()
            del out, loss  # else the logits live on through the next micro-batch's forward
        return total

    return run


def sft_liger(model, batches, n_targets):
    from liger_kernel.transformers.fused_linear_cross_entropy import (
        LigerFusedLinearCrossEntropyLoss,
    )

    flce = LigerFusedLinearCrossEntropyLoss(reduction="sum")
    scale, w = model.config.logit_scale, model.lm_head.weight

    def run():
        total = 0.0
        for b in batches:
            h = model.model(
                input_ids=b["input_ids"], attention_mask=b["attention_mask"]
            ).last_hidden_state
            h = h[:, :-1].reshape(-1, h.shape[-1]) * scale  # s * (h @ W.T) == (s * h) @ W.T
            loss = flce(w, h, b["labels"][:, 1:].reshape(-1)) / n_targets
            loss.backward()
            total += loss.detach()
            del h, loss
        return total

    return run


def packed_logps(model, row: dict) -> torch.Tensor:
    """fp32 [1, T] log p(target) of one packed row through a model patched by apply_kernels,
    with the boundaries the trainer passes (`train_data.flat_cu_seqlens`: padding as one
    segment), computed once per row and kept in it, outside the timed steps."""
    if "cu_flat" not in row:
        from r7b_fast.train_data import flat_cu_seqlens

        row["cu_flat"] = flat_cu_seqlens([row]).to(row["input_ids"].device)
    return model(
        row["input_ids"][None], position_ids=row["position_ids"][None],
        targets=row["targets"][None], cu_seqlens=row["cu_flat"],
    ).token_logps  # fmt: skip


def sft_ours(model, rows, n_targets, backend="auto"):
    from r7b_fast.model import apply_kernels

    apply_kernels(model, backend=backend)

    def run():
        total = 0.0
        for r in rows:
            loss = -packed_logps(model, r).sum() / n_targets
            loss.backward()
            total += loss.detach()
            del loss
        return total

    return run


# ----------------------------------------------------------------------------- DPO steps


def _dpo_sigmoid(pc, pr, rc, rr):
    """-log sigmoid(beta * ((pc - rc) - (pr - rr))) per pair (the DPO paper's loss, as TRL)."""
    return -torch.nn.functional.logsigmoid(BETA * ((pc - rc) - (pr - rr)))


def _selective_log_softmax():
    try:
        from trl.trainer.utils import selective_log_softmax

        return selective_log_softmax
    except Exception:  # TRL missing or broken here: the same computation, plainly
        return lambda logits, idx: torch.gather(logits.log_softmax(-1), -1, idx[..., None])[..., 0]


def dpo_hf(model, batches, ref, n_pairs):
    sls = _selective_log_softmax()

    def run():
        total = 0.0
        for b in batches:
            B = len(b["pair_index"])
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            labels = torch.roll(b["labels"], shifts=-1, dims=1)  # as TRL: no [:, :-1] copy
            labels[:, -1] = -100
            mask = labels != -100
            logp = sls(logits, labels.clamp(min=0)) * mask
            seq = logp.float().sum(-1)  # TRL's fused kernel gives fp32 log-probs on CUDA
            rc, rr = ref[b["pair_index"], 0], ref[b["pair_index"], 1]
            loss = _dpo_sigmoid(seq[:B], seq[B:], rc, rr).sum() / n_pairs
            loss.backward()
            total += loss.detach()
            del logits, logp, seq, loss
        return total

    return run


def dpo_liger(model, batches, ref, n_pairs):
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    on_cuda = model.lm_head.weight.is_cuda
    dpo = LigerFusedLinearDPOLoss(beta=BETA, use_ref_model=False, compiled=on_cuda)
    scale, w = model.config.logit_scale, model.lm_head.weight

    def run():
        total = 0.0
        for b in batches:
            B = len(b["pair_index"])
            h = model.model(
                input_ids=b["input_ids"], attention_mask=b["attention_mask"]
            ).last_hidden_state
            out = dpo(w, h[:, :-1] * scale, b["labels"][:, 1:])
            loss = (out[0] if isinstance(out, tuple) else out) * (B / n_pairs)
            loss.backward()
            total += loss.detach()
            del h, out, loss
        return total

    return run


def dpo_ours(model, rows, ref, n_pairs, backend="auto"):
    from r7b_fast import losses
    from r7b_fast.model import apply_kernels

    apply_kernels(model, backend=backend)
    # each row's chosen / rejected sequences and their references, gathered once (no boolean
    # indexing, a host sync on a GPU, inside the timed steps; the trainer's collate does the same)
    split = []
    for r in rows:
        ch = torch.nonzero(r["is_chosen"]).flatten()
        rj = torch.nonzero(~r["is_chosen"]).flatten()
        pairs = r["pair_ids"][ch]
        split.append((ch, rj, ref[pairs, 0], ref[pairs, 1], len(pairs) / n_pairs))

    def run():
        total = 0.0
        for r, (ch, rj, ref_c, ref_r, weight) in zip(rows, split):
            seq = losses.sequence_logps(packed_logps(model, r)[0], r["seq_ids"], len(r["pair_ids"]))
            loss, _ = losses.dpo_loss(seq[ch], seq[rj], ref_c, ref_r, beta=BETA, kind="sigmoid")
            loss = loss * weight
            loss.backward()
            total += loss.detach()
            del seq, loss
        return total

    return run


# ----------------------------------------------------------------------------- running


STEP_FNS = {
    "sft": {"hf": sft_hf, "hf_liger": sft_liger, "ours": sft_ours, "ours_max": sft_ours},
    "dpo": {"hf": dpo_hf, "hf_liger": dpo_liger, "ours": dpo_ours, "ours_max": dpo_ours},
}


def make_step(stage: str, variant: str, model, data: dict, opt, backend: str = "auto"):
    """One optimizer step of `variant` on the stage's data: zero grads, fwd+bwd, AdamW."""
    ours = variant.startswith("ours")
    inputs = data["rows"] if ours else data["batches"]
    kw = {"backend": backend} if ours else {}
    if stage == "sft":
        fwd_bwd = STEP_FNS[stage][variant](model, inputs, data["n_targets"], **kw)
    else:
        fwd_bwd = STEP_FNS[stage][variant](model, inputs, data["ref"], data["n_pairs"], **kw)
    losses = []

    def step():
        opt.zero_grad()
        losses.append(fwd_bwd())
        opt.step()

    return step, losses


def run_variant(stage, variant, model, data, opt, device, args) -> dict:
    """Time one variant; an error (OOM included) is recorded in the row, not raised."""
    row = {"stage": stage, "variant": variant}
    cuda = device.type == "cuda"
    try:
        step, losses = make_step(stage, variant, model, data, opt, args.backend)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            resident = torch.cuda.memory_allocated(device)  # weights + optimizer state
        t = bench(step, device, warmup=args.warmup, reps=args.reps, max_seconds=args.max_seconds)
        sec = t["median_ms"] / 1e3
        peak = peak_flops(device)
        row.update(
            step_ms=t["median_ms"],
            step_ms_p20_p80=[round(t["p20_ms"], 2), round(t["p80_ms"], 2)],
            reps=t["reps"],
            tokens_per_s=data["real_tokens"] / sec,
            mfu=data["flops"] / sec / peak if peak else None,
            peak_mem_gib=torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
            # beyond weights + optimizer state: activations, logits, gradients, temporaries
            peak_extra_gib=(torch.cuda.max_memory_allocated(device) - resident) / 2**30
            if cuda
            else None,
            loss=float(losses[0]),
        )
    except Exception as e:  # noqa: BLE001 - one failing variant must not stop the others
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        tb = traceback.format_exc(limit=-8)
        print(
            f"[train_step] {stage}/{variant} FAILED: {row['error']}\n{tb}",
            file=sys.stderr,
            flush=True,
        )
    finally:
        opt.zero_grad()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def parse_args(argv=None):
    ap = arg_parser(__doc__)
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="the tiny test model (CPU measurement)")
    ap.add_argument(
        "--dry-run",
        action="store_true",
        help="CPU smoke test: tiny model, 1 row, 1 rep, Triton interpreter",
    )
    ap.add_argument("--layers", default="auto", help="decoder layers, or 'auto' (fit --budget-gib)")
    ap.add_argument("--budget-gib", type=float, default=78.0, help="GPU memory to plan for")
    ap.add_argument(
        "--max-tokens", type=int, default=None, help="packed row length (8192; tiny 512)"
    )
    ap.add_argument(
        "--median-len", type=int, default=None, help="median sequence length (500; tiny 48)"
    )
    ap.add_argument(
        "--rows", type=int, default=None, help="packed rows per optimizer step (4; tiny 2)"
    )
    ap.add_argument("--stages", default="sft,dpo")
    ap.add_argument(
        "--variants", default=None, help="default: all on GPU/dry-run; hf,ours with --tiny"
    )
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument(
        "--max-seconds", type=float, default=30.0, help="stop timing a variant after this"
    )
    ap.add_argument(
        "--lr", type=float, default=0.0, help="0: weights stay put (see the module doc)"
    )
    ap.add_argument(
        "--name", default=None, help="results file stem (default train_step[_cpu_tiny])"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--ours-max",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="GPU: also SFT with ours alone at the most layers it fits (variant ours_max)",
    )
    ap.add_argument(
        "--interleave",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="alternate the variants' steps (default: on with --tiny on the CPU)",
    )
    ap.add_argument("--dtype", default=None, choices=["bf16", "fp32"], help="default: bf16 on CUDA")
    ap.add_argument(
        "--backend",
        default=None,
        choices=["auto", "triton", "torch"],
        help="our kernels' backend (default auto; torch with --dry-run, see below)",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads (1: the shared 2-core CI machine is "
        "oversubscribed; more threads ran 10x slower there)",
    )
    from benchmarks import _compile_matrix

    _compile_matrix.add_args(ap)
    args = ap.parse_args(argv)
    if args.matrix or args.matrix_cell:
        return _compile_matrix.defaults(args)
    if args.dry_run:
        args.tiny, args.device = True, "cpu"
        args.warmup, args.reps = 0, 1
        args.max_tokens = args.max_tokens or 128
        args.median_len = args.median_len or 24
        args.rows = args.rows or 1
        # Through the Triton interpreter one tiny step of ours takes minutes on a 2-core CI
        # machine; the suite's check steps run the Triton paths, this proves the plumbing.
        args.backend = args.backend or "torch"
    args.backend = args.backend or "auto"
    if args.interleave is None:
        args.interleave = args.tiny and not args.dry_run and args.device == "cpu"
    small = args.tiny
    args.variants = args.variants or (
        "hf,ours" if small and not args.dry_run else ",".join(VARIANTS)
    )
    args.max_tokens = args.max_tokens or (512 if small else 8192)
    args.median_len = args.median_len or (48 if small else 500)
    args.rows = args.rows or (2 if small else 4)
    args.name = args.name or (
        "train_step_dryrun" if args.dry_run else "train_step_cpu_tiny" if small else "train_step"
    )
    return args


def setup(args) -> torch.device:
    device = device_of(None if args.device == "auto" else args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    if args.dry_run and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        # The interpreter must be on before `import triton` (transformers may already have
        # imported it: triton.language's own @jit helpers are then compiled-mode): start afresh.
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        argv = [sys.executable, "-m", "benchmarks.train_step", *sys.argv[1:]]
        os.execve(sys.executable, argv, env)
    return device


CONFIG_KEYS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
               "num_key_value_heads", "vocab_size", "sliding_window", "logit_scale")  # fmt: skip
DATA_KEYS = ("real_tokens", "n_targets", "padded_tokens", "micro_batches_hf", "flops")


def run_interleaved(variants, stages, cfg, data, device, dtype, args, rows, save) -> int:
    """CPU timing on a shared machine: one model per variant, their steps alternated (A B A B
    ...) so load drifts hit every variant alike; wall and process-CPU medians are both kept."""
    import statistics

    models = {v: _e2e.build(cfg, device, dtype) for v in variants}  # same seed: same weights
    opts = {v: _e2e.AdamWFp32State(list(m.parameters()), lr=args.lr) for v, m in models.items()}
    for stage in stages:
        d = data[stage]
        steps = {v: make_step(stage, v, models[v], d, opts[v], args.backend) for v in variants}
        wall = {v: [] for v in variants}
        cpu = {v: [] for v in variants}
        for k in range(args.warmup + args.reps):
            for v, (step, _) in steps.items():
                t0, c0 = time.perf_counter(), time.process_time()
                step()
                if k >= args.warmup:
                    wall[v].append(time.perf_counter() - t0)
                    cpu[v].append(time.process_time() - c0)
        for v, (_, losses) in steps.items():
            sec = statistics.median(wall[v])
            slots = args.rows * args.max_tokens if v == "ours" else d["padded_tokens"]
            rows.append({"stage": stage, "variant": v, "step_ms": 1e3 * sec, "reps": args.reps,
                         "step_ms_p20_p80": [round(1e3 * x, 2) for x in np.quantile(wall[v], [0.2, 0.8])],
                         "tokens_per_s": d["real_tokens"] / sec,
                         "tokens_per_cpu_s": d["real_tokens"] / statistics.median(cpu[v]),
                         "mfu": None, "peak_mem_gib": None, "loss": float(losses[0]), "layers": cfg.num_hidden_layers,
                         "real_tokens": d["real_tokens"], "pad_fraction": 1 - d["real_tokens"] / slots})  # fmt: skip
            print(f"[train_step] {stage}/{v}: {rows[-1]}", flush=True)
        save()
    return sum(p.numel() for p in next(iter(models.values())).parameters())


def run_group(variants, stages, cfg, data, device, dtype, args, rows, save) -> int:
    """Build a fresh model (seeded: every group gets the same weights) and run `variants` x
    `stages` on it; free it afterwards. Returns the parameter count."""
    t0 = time.perf_counter()
    model = _e2e.build(cfg, device, dtype)
    opt = _e2e.AdamWFp32State(list(model.parameters()), lr=args.lr)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[train_step] {cfg.num_hidden_layers} layers, {n_params / 1e9:.3f} B params, {dtype}, "
          f"{device}; built in {time.perf_counter() - t0:.1f}s", flush=True)  # fmt: skip
    for variant in variants:
        for stage in stages:
            d = data[stage]
            r = run_variant(stage, variant, model, d, opt, device, args)
            packed = variant.startswith("ours")
            slots = args.rows * args.max_tokens if packed else d["padded_tokens"]
            r.update(real_tokens=d["real_tokens"], pad_fraction=1 - d["real_tokens"] / slots)
            r["layers"] = cfg.num_hidden_layers
            rows.append(r)
            print(f"[train_step] {stage}/{variant}: {r}", flush=True)
            save()
    del model, opt
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return n_params


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.matrix or args.matrix_cell:
        from benchmarks import _compile_matrix

        return _compile_matrix.main(args)
    device = setup(args)
    plan = None if args.tiny else _e2e.plan_layers(args.budget_gib, args.max_tokens)
    layers = None if args.tiny else (plan["layers"] if args.layers == "auto" else int(args.layers))
    cfg = _e2e.model_config(layers, tiny=args.tiny)
    bf16 = args.dtype == "bf16" or (args.dtype is None and device.type == "cuda")
    dtype = torch.bfloat16 if bf16 else torch.float32
    stages = [s for s in args.stages.split(",") if s]
    variants = [v for v in args.variants.split(",") if v]
    bad = [s for s in stages if s not in STEP_FNS] + [v for v in variants if v not in VARIANTS]
    if bad:
        raise ValueError(f"--stages/--variants: unknown {bad}")
    print(f"[train_step] memory plan: {plan}", flush=True)
    rng = np.random.default_rng(args.seed)
    data = {s: _e2e.data_to_device(_e2e.make_data(s, cfg, args, rng), device) for s in stages}
    # First-step loss agreement, ours vs HF, relative. fp32: summation order only. bf16: HF rounds
    # the logits to bf16 (~4e-3 relative each); the SFT mean averages that away, but the DPO loss
    # is a difference of log-prob sums over hundreds of tokens (errors ~ sqrt(len) x 4e-3, times
    # beta), about 1e-2 of the loss at R7B lengths: 5e-2 for DPO. A wrong kernel misses by far more.
    tol = {"sft": 2e-2, "dpo": 5e-2} if dtype == torch.bfloat16 else {"sft": 1e-4, "dpo": 1e-4}
    rows: list[dict] = []
    payload = {
        "config": {k: getattr(cfg, k) for k in CONFIG_KEYS},
        "dtype": str(dtype),
        "plan": plan,
        "args": vars(args),
        "data": {s: {k: data[s][k] for k in DATA_KEYS} for s in stages},
        "rows": rows,
        "loss_tolerance": tol,
        "env": env_info(device),
    }
    cols = ["stage", "variant", "layers", "tokens_per_s", "tokens_per_cpu_s", "mfu", "peak_mem_gib",
            "peak_extra_gib", "step_ms", "pad_fraction", "loss", "error"]  # fmt: skip

    def save() -> str:  # after every variant: a run killed by its time budget keeps its rows
        payload["compare"] = _e2e.compare(rows, tol)
        table = markdown_table(rows, cols)
        if payload["compare"]:
            table += "\n\n" + markdown_table([payload["compare"]])
        write_results(args.name, payload, table)
        return table

    # Ours first (the numbers that matter most if the time budget runs out), on its own model:
    # apply_kernels patches in place, so the HF variants get a fresh model with the same weights.
    if args.interleave:
        payload["params"] = run_interleaved(
            variants, stages, cfg, data, device, dtype, args, rows, save
        )
    groups = [[v for v in variants if v == "ours"], [v for v in variants if v != "ours"]]
    for group in filter(None, groups) if not args.interleave else ():
        payload["params"] = run_group(group, stages, cfg, data, device, dtype, args, rows, save)
    if args.ours_max and "ours" in variants and "sft" in stages and (plan or args.dry_run):
        # The largest model our path alone fits (plan['layers_ours']): SFT, same tokens (the
        # dry-run exercises this path with a tiny model of twice the layers).
        big = _e2e.model_config(
            plan["layers_ours"] if plan else 2 * cfg.num_hidden_layers, tiny=not plan
        )
        d = dict(
            data["sft"],
            flops=_e2e.step_flops(big, data["sft"]["seq_lens"], data["sft"]["n_targets"]),
        )
        run_group(["ours_max"], ["sft"], big, {"sft": d}, device, dtype, args, rows, save)
    table = save()
    print(table)
    ok = all("error" not in r for r in rows if r["variant"] == "ours") and all(
        v for k, v in payload["compare"].items() if k.endswith("_loss_ok")
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
