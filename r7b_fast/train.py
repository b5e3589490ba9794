"""Training: `python -m r7b_fast.train CONFIG [section.key=value ...]` (also under torchrun).

CONFIG is a YAML path or a built-in name from r7b_fast/configs/ (sft_tiny, dpo_tiny,
online_dpo_tiny, sft_r7b, dpo_r7b, online_dpo_r7b); `--help` lists every key.

One loop for every stage (`train_steps`); a stage only decides its data (packed SFT rows, or
packed preference rows carrying precomputed reference log-probs) and its loss
(r7b_fast.train_loss: `sft_loss`, `dpo_loss`). `online_dpo` repeats rounds of: sample pairs from the current policy
(r7b_fast.online_dpo), reference log-probs, `train_steps`.

Exact averaging: each optimizer step's loss is a sum over every micro-batch on every rank
divided by the step's GLOBAL count (target tokens for SFT, pairs for DPO, and chosen target
tokens for DPO's optional SFT term), counted before the first forward; gradient accumulation
and any world size therefore give the same update.

Run directory (`run.output_dir`), the contract with the pipeline:
    config.yaml     resolved config          metrics.jsonl   start event, per-step metrics
    checkpoints/    DCP resume checkpoints   hf/             final HF export (+ tokenizer)
    data/           generated synthetic data reference/ and online/: reference log-probs
                                                             and on-policy pairs, for resume
    run.json        the run's fingerprint    .lock           flock held by the live trainer
    done.json       written last, atomically: the stage is complete iff it exists

Exit status of `main`: 0 done; 2 config or data error (one message, no traceback); 3 NaN/Inf
loss or gradient norm; 4 CUDA out of memory; 5 online_dpo trained nothing (every round's
samples tied: NoPairsError).

A directory belongs to one run (r7b_fast.rundir): the data, model and tokenizer are validated
and the fingerprint compared before anything in it changes; a different config is refused
(exit 2, naming the keys) unless listed in run.allow_changes, and a finished run with the same
fingerprint is left as is ("already done").
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from r7b_fast import checkpoint, distributed, rundir, train_eval
from r7b_fast.config import (
    Config,
    ConfigError,
    check_world,
    help_text,
    load_config,
    to_dict,
)
from r7b_fast.logging import MetricsLogger, flops_per_token, peak_flops, versions
from r7b_fast.optim import build_optimizer
from r7b_fast.step_metrics import StepWindow, optimizer_step, reduce_step
from r7b_fast.train_data import autocast, build_rows, collate, make_iterator, reference_rows
from r7b_fast.train_loss import (  # noqa: F401 (re-exported: r7b_fast.train.sft_loss...)
    STAGE_LOSS,
    dpo_count,
    dpo_loss,
    sft_count,
    sft_loss,
)


class NonFiniteError(RuntimeError):
    """A NaN/Inf loss or gradient norm: the run stops without stepping or checkpointing."""


class NoPairsError(RuntimeError):
    """online_dpo: every round's samples tied (no preference pair): nothing was trained."""


class DebugStop(RuntimeError):
    """debug.stop_after_step: the run stopped on purpose after that step's checkpoint (a
    deterministic stand-in for a kill, for resume tests)."""


@dataclass
class Session:
    """What the loop works with (plain data; the behaviour lives in the functions below)."""

    cfg: Config
    dist: distributed.Dist
    out: Path
    logger: MetricsLogger
    tokenizer: object
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    accum: int
    """Micro-batches per optimizer step on each rank."""
    mixed: bool
    """bf16 compute with fp32 weights on CUDA."""
    flops_per_token: float
    peak: float | None
    """Peak FLOP/s per device (None: no MFU)."""
    tokens: float = 0.0
    """Real (non-padding) tokens trained so far, all ranks."""
    eval_rows: object = None
    """Packed eval rows for eval.every_steps (r7b_fast.train_eval), None when off."""
    eval_denom: torch.Tensor | None = None
    """The eval split's global loss normaliser (same units as a training step's)."""
    trained_steps: int | None = None
    """Optimizer steps that actually trained (online_dpo skips rounds without pairs); None =
    every step of the stage."""


def prepare_eval(s: Session):
    """Eval rows and their normaliser for eval.every_steps (before any step: DPO's eval
    reference is the model the stage starts from); (None, None) when off."""
    return train_eval.prepare_eval(s, STAGE_LOSS[s.cfg.run.stage][0])


# ----------------------------------------------------------------------------- set-up


def compute_dtypes(cfg: Config, device: torch.device) -> tuple[torch.dtype, bool]:
    """(parameter dtype, bf16 mixed precision?) for `model.dtype` on `device`."""
    if cfg.model.dtype == "bfloat16":
        return torch.bfloat16, False
    if cfg.model.dtype == "float32":
        return torch.float32, False
    return torch.float32, device.type == "cuda"


def load_tokenizer(cfg: Config):
    """The tokenizer for `data.tokenizer`: `auto` = the checkpoint's own tokenizer (the embedded
    one for model.path=tiny; a checkpoint without tokenizer files is a ConfigError naming
    data.tokenizer), `embedded`, or a tokenizer directory."""
    from transformers import AutoTokenizer

    from r7b_fast.data.tokenizer import load_tokenizer as embedded

    choice = rundir.tokenizer_source(cfg)
    return embedded() if choice == "embedded" else AutoTokenizer.from_pretrained(choice)


def build_model(cfg: Config, dist: distributed.Dist, tokenizer):
    """Load/build the model, then the transforms in order: kernels, activation checkpointing,
    regional torch.compile (model.compile), FSDP2 (distributed.parallelize documents the last
    three). Under torchrun a checkpoint is built on the meta device, sharded, then filled from
    rank 0's copy of the weights."""
    from r7b_fast.compile import enabled as compile_enabled
    from r7b_fast.model import apply_kernels, fresh_buffers, load_model, read_hf_weights

    dtype, mixed = compute_dtypes(cfg, dist.device)
    attn = "sdpa" if cfg.model.attention == "varlen" else cfg.model.attention
    sharded_load = dist.distributed and cfg.model.path != "tiny"
    path = rundir.resolve_model_path(cfg.model.path)  # a no-op after run(); direct callers too
    model = load_model(
        path,
        dtype,
        tiny_overrides=cfg.model.tiny_overrides,
        seed=cfg.run.seed,
        attn_implementation=attn,
        device="meta" if sharded_load else dist.device,
    )
    if len(tokenizer) > model.config.vocab_size:
        raise ConfigError(
            f"data.tokenizer: {len(tokenizer)} tokens > model vocab {model.config.vocab_size}"
        )
    buffers = fresh_buffers(model) if sharded_load else None
    apply_kernels(
        model,
        attention=cfg.model.attention == "varlen",
        loss=True,
        backend=cfg.model.kernel_backend,
    )
    distributed.parallelize(
        model,
        dist,
        mixed_precision=mixed,
        activation_checkpointing=cfg.model.activation_checkpointing,
        activation_checkpointing_every=cfg.model.activation_checkpointing_every,
        compile=compile_enabled(cfg.model.compile, dist.device),
        fsdp=cfg.fsdp,
    )
    if sharded_load:
        weights = read_hf_weights(path, dtype) if dist.is_main else {}
        distributed.materialize(model, dist, weights, buffers)
    return model


# ----------------------------------------------------------------------------- the loop


def train_steps(
    s: Session,
    rows: list[dict],
    first: int,
    last: int,
    *,
    data_state=None,
    extra_state: dict | None = None,
) -> dict:
    """Optimizer steps `first..last` (global, 1-based, inclusive) over `rows` (this stage's packed
    rows, identical on every rank); checkpoints as configured; returns the last step's metrics.

    No host sync inside a step: the step's values stay on the device until a read-back point
    (logging.every_steps, a checkpoint, eval or debug.stop_after_step step, the last step),
    which reads every step since the previous one BEFORE its optimizer step; a NaN/Inf loss or
    gradient norm raises NonFiniteError there (`check_finite`), before any checkpoint, eval,
    record or export. Between read-backs a non-finite step is skipped on the device by fused
    AdamW and taken by the others (never saved): see r7b_fast.step_metrics for the trade-off.
    logging.every_steps=1 reads back every step, so no non-finite step is ever taken."""
    cfg, dist, model = s.cfg, s.dist, s.model
    count_fn, loss_fn = STAGE_LOSS[cfg.run.stage]
    it = make_iterator(rows, cfg, dist)
    if data_state is not None:
        it.load_state_dict(data_state)
    metrics = {}
    window = StepWindow(dist.world_size, s.flops_per_token, s.peak)
    model.train()
    for step in range(first, last + 1):
        micro = [collate([next(it) for _ in range(cfg.optim.micro_batch)], dist.device)
                 for _ in range(s.accum)]  # fmt: skip
        # one all-reduce of the step's global normalizer(s), before the first forward
        denom = (
            distributed.all_reduce_sum(
                torch.stack([count_fn(b) for b in micro]).sum(0).double(), dist
            )
            .clamp(min=1)
            .float()
        )
        loss_sum, metric_sums = accumulate_gradients(s, micro, denom, loss_fn, step)
        if cfg.debug.inf_grad_at_step == step:  # a finite loss with an Inf gradient
            g = next(p for p in model.parameters() if p.grad is not None).grad
            (g.to_local() if hasattr(g, "to_local") else g).view(-1)[:1].fill_(math.inf)
        grad_norm = clip_grad_norm(model, cfg.optim.grad_clip)
        tokens = torch.stack([(b["seq_ids"] >= 0).sum() for b in micro]).sum()
        loss, tokens, step_values = reduce_step(loss_sum, tokens, metric_sums, denom, dist)
        lr = s.scheduler.get_last_lr()[0]
        finite = window.add(step, lr, loss, grad_norm, tokens, step_values)
        every, stop = cfg.checkpoint.every_steps, cfg.debug.stop_after_step
        save = bool(every and step % every == 0) or step == last or step == stop
        evaluate = s.eval_rows is not None and (step % cfg.eval.every_steps == 0 or step == last)
        read = save or evaluate or step % cfg.logging.every_steps == 0
        if read:
            records, seconds = window.read_back()
            check_finite(s, step, records)
        optimizer_step(s.optimizer, None if read else finite)
        s.scheduler.step()
        s.optimizer.zero_grad(set_to_none=True)
        if cfg.debug.step_sleep:
            time.sleep(cfg.debug.step_sleep)
        if not read:
            s.logger.advance()
            continue
        metrics = step_metrics(s, window, records, seconds, last)
        t = time.perf_counter()  # eval and checkpoint time is not training time (tokens/s)
        if evaluate:
            train_eval.evaluate(s, s.eval_rows, s.eval_denom, loss_fn, step)
        s.logger.advance()
        if save:
            save_checkpoint(s, step, it, {**(extra_state or {}), "metrics": metrics})
        window.exclude(time.perf_counter() - t)
        if step == stop:
            raise DebugStop(f"debug.stop_after_step={stop}: stopped after its checkpoint")
    return metrics


def accumulate_gradients(s: Session, micro: list[dict], denom, loss_fn, step: int):
    """Forward/backward every micro-batch; returns (this rank's loss sum, metric sums).

    Under FSDP2, `fsdp.grad_accumulation` decides when gradients are reduce-scattered:
    `reduce_scatter` after every micro-batch (FSDP adds each into the sharded gradient, so only
    shards are held), `unsharded` only after the last (FSDP keeps an unsharded gradient of every
    parameter until then). Either way the step's gradient is the same sum (exact averaging)."""
    loss_sum = torch.zeros((), device=s.dist.device)
    metric_sums: dict[str, torch.Tensor] = {}
    every = s.cfg.fsdp.grad_accumulation == "reduce_scatter"
    for i, batch in enumerate(micro):
        if s.dist.distributed:
            s.model.set_requires_gradient_sync(every or i == len(micro) - 1)
        with autocast(s):
            loss, metrics = loss_fn(s.model, batch, denom, s.cfg)
        if s.cfg.debug.nan_at_step == step:
            loss = loss * float("nan")
        # FSDP averages gradients over ranks; the loss is already a global mean: undo that.
        (loss * s.dist.world_size).backward()
        loss_sum += loss.detach().float()
        for k, v in metrics.items():
            metric_sums[k] = metric_sums.get(k, 0.0) + v
    return loss_sum, metric_sums


def check_finite(s: Session, step: int, records: list) -> None:
    """Raise NonFiniteError if a step read back at step `step` (before its optimizer step) had a
    NaN/Inf loss or gradient norm, naming the first such step; checkpoints stay good (see
    train_steps for the live weights between read-backs)."""
    bad = next((r for r in records if not r.finite), None)
    if bad is None:
        return
    s.optimizer.zero_grad(set_to_none=True)
    last_good = checkpoint.latest(s.out / "checkpoints")
    where = (
        "stopped before the optimizer step"
        if bad.step == step
        else f"found at step {step}'s read-back (logging.every_steps={s.cfg.logging.every_steps}),"
        " before its optimizer step; nothing was saved or logged after it"
    )
    raise NonFiniteError(
        f"step {bad.step}: non-finite loss ({bad.values['loss']}) or gradient norm "
        f"({bad.values['grad_norm']}); {where}. Last good checkpoint: {last_good or 'none'} "
        "(resume from it with a lower learning rate: optim.lr=<new> run.allow_changes=[optim.lr]; "
        "or check the data)."
    )


def clip_grad_norm(model, max_norm: float) -> torch.Tensor:
    """Global gradient norm (over all shards), clipped to `max_norm` when > 0; a plain tensor."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2
        norm = norm.full_tensor()
    return norm.detach().float()


def step_metrics(s: Session, window: StepWindow, records: list, seconds: float, last: int) -> dict:
    """Log the read-back `records` that fall on the logging cadence (every logging.every_steps-th
    step and the last); add their tokens to `s.tokens`; returns the newest step's metrics."""
    for r in records:
        s.tokens += r.values["tokens"]
        if r.step % s.cfg.logging.every_steps == 0 or r.step == last:
            s.logger.log(r.step, window.log_values(r, records, seconds))
    return window.log_values(records[-1], records, seconds)


def save_checkpoint(s: Session, step: int, it, extra_state: dict) -> None:
    state = {
        "step": step,
        "scheduler": s.scheduler.state_dict(),
        "data": it.state_dict() if it is not None else None,
        "tokens": s.tokens,
        **extra_state,
    }
    checkpoint.save(
        s.out / "checkpoints",
        step,
        s.model,
        s.optimizer,
        state,
        s.dist,
        keep_last=s.cfg.checkpoint.keep_last,
    )


# ----------------------------------------------------------------------------- stages


def run_offline(s: Session, rows: list[dict], total: int, resume_state: dict | None) -> dict:
    """sft / dpo: steps 1..total over one dataset (dpo rows carry reference log-probs)."""
    start = resume_state["step"] if resume_state else 0
    if start >= total:
        return resume_state.get("metrics", {})
    s.logger.start_bar(total, start, s.cfg.run.stage)
    data_state = resume_state["data"] if resume_state else None
    return train_steps(s, rows, start + 1, total, data_state=data_state)


def run_online(s: Session, prompts: list[dict], resume_state: dict | None) -> dict:
    """online_dpo: rounds of (pairs from the current policy -> reference log-probs -> train),
    `optim.max_steps` optimizer steps per round; a round's pairs are stored in the run dir so a
    resumed run trains on the same ones."""
    from r7b_fast.train_data import online_round_rows

    per_round, rounds = s.cfg.optim.max_steps, s.cfg.online.rounds
    done = resume_state["step"] if resume_state else 0
    s.logger.start_bar(per_round * rounds, done, "online_dpo")
    metrics = resume_state.get("metrics", {}) if resume_state else {}
    empty = list(resume_state.get("empty_rounds", [])) if resume_state else []
    for r in range(done // per_round, rounds):
        rows = online_round_rows(s, prompts, r)
        first, last = r * per_round + 1, (r + 1) * per_round
        if rows is None:  # every prompt tied (or no pair fits): nothing to learn this round
            empty.append(r)
            for _ in range(per_round):
                s.scheduler.step()
            s.logger.advance(per_round)
            save_checkpoint(s, last, None, {"round": r, "empty_rounds": empty, "metrics": metrics})
            continue
        mid_round = resume_state is not None and done >= first
        data_state = resume_state["data"] if mid_round else None
        metrics = train_steps(s, rows, max(first, done + 1), last, data_state=data_state,
                              extra_state={"round": r, "empty_rounds": empty})  # fmt: skip
    s.trained_steps = per_round * (rounds - len(empty))
    if len(empty) == rounds:
        raise NoPairsError(
            f"online_dpo: all {rounds} round(s) produced no preference pair (every prompt's "
            "samples tied, see the 'round' events in metrics.jsonl): nothing was trained and no "
            "export was written. Raise online.temperature / online.num_samples, use prompts the "
            "policy sometimes solves, or a denser online.reward."
        )
    return metrics


def total_steps(cfg: Config, rows: list[dict]) -> int:
    """Optimizer steps of the whole stage."""
    if cfg.run.stage == "online_dpo":
        return cfg.optim.max_steps * cfg.online.rounds
    if cfg.optim.max_steps:
        return cfg.optim.max_steps
    return max(1, math.ceil(cfg.optim.epochs * len(rows) / cfg.optim.global_batch))


def prepare_run_dir(cfg: Config, dist: distributed.Dist, decision: dict, lock) -> Path:
    """Apply the checked decision (rundir.commit: config.yaml, run.json, removals), once the
    data, model and tokenizer are validated; records the lock holder."""
    out = Path(cfg.run.output_dir)
    if dist.is_main:
        lock.record()
        rundir.commit(cfg, decision["fingerprint"], decision)
    distributed.barrier(dist)
    return out


def write_done(s: Session, metrics: dict, total: int, seconds: float) -> None:
    """done.json, written last and atomically (temp file + rename) on rank 0."""
    if not s.dist.is_main:
        return
    record = {
        "stage": s.cfg.run.stage,
        "steps": total,
        "tokens": s.tokens,
        "seconds": seconds,
        "final": metrics,
        "hf": str(s.out / "hf"),
    }
    tmp = s.out / "done.json.tmp"
    tmp.write_text(json.dumps(record, indent=1, default=str))
    os.replace(tmp, s.out / "done.json")


def run(cfg: Config) -> dict:
    """Run one stage end to end (see the module docstring); returns done.json's content."""
    dist = distributed.init(cfg.run.device, cfg.run.cpu_threads)
    logger = lock = None
    try:
        accum = check_world(cfg, dist.world_size)
        # validate the model, tokenizer and data before anything in the run dir changes
        cfg.model.path = rundir.resolve_model_path(cfg.model.path)
        tokenizer = load_tokenizer(cfg)
        rundir.check_model(cfg, tokenizer)
        decision, lock = rundir.lock_and_check(cfg, dist)
        out = Path(cfg.run.output_dir)
        if decision["mode"] == "done":
            return rundir.already_done(out, dist)
        t0 = time.time()
        torch.manual_seed(cfg.run.seed)
        deferred = rundir.Deferred(dist)
        rows = build_rows(cfg, tokenizer, out, dist, deferred)
        prepare_run_dir(cfg, dist, decision, lock)
        lg = cfg.logging
        logger = MetricsLogger(
            out, enabled=dist.is_main, tensorboard=lg.tensorboard, progress_bar=lg.progress_bar
        )
        logger.event(
            "start",
            config=to_dict(cfg),
            versions=versions(),
            world_size=dist.world_size,
            device=str(dist.device),
        )
        for name, fields in deferred.events:
            logger.event(name, **fields)
        if decision["changes"]:  # deliberate changes (run.allow_changes), old -> new
            changes = {k: {"old": a, "new": b} for k, (a, b) in decision["changes"].items()}
            logger.event("config_change", changes=changes)
            logger.message(f"continuing {out} with changes: {changes}")
        logger.message(
            f"r7b_fast.train: {cfg.run.stage} on {dist.world_size} x {dist.device}, "
            f"{accum} micro-batch(es) of {cfg.optim.micro_batch} x {cfg.data.max_tokens} tokens "
            f"per step per process -> {out}"
        )
        total = total_steps(cfg, rows)
        model = build_model(cfg, dist, tokenizer)
        optimizer, scheduler = build_optimizer(cfg, model, total)
        mixed = compute_dtypes(cfg, dist.device)[1]
        # MFU counts attention over data.max_tokens-long contexts: an upper bound for packed rows.
        s = Session(
            cfg,
            dist,
            out,
            logger,
            tokenizer,
            model,
            optimizer,
            scheduler,
            accum,
            mixed,
            flops_per_token(model.config, cfg.data.max_tokens),
            peak_flops(dist.device, lg.peak_tflops),
        )
        if cfg.run.stage == "dpo":
            rows = reference_rows(s, rows, out / "reference" / "dpo.pt")
        s.eval_rows, s.eval_denom = prepare_eval(s)
        resume_state = resume(s)
        if cfg.run.stage == "online_dpo":
            metrics = run_online(s, rows, resume_state)
        else:
            metrics = run_offline(s, rows, total, resume_state)
        logger.close_bar()
        if cfg.checkpoint.export_hf:
            export_dtype = torch.bfloat16 if mixed else None
            checkpoint.export_hf(
                model,
                out / "hf",
                dist,
                tokenizer=tokenizer,
                dtype=export_dtype,
                max_shard_size=cfg.checkpoint.hf_max_shard_size,
            )
        total = total if s.trained_steps is None else s.trained_steps  # steps that trained
        write_done(s, metrics, total, time.time() - t0)
        if dist.is_main:  # after done.json: a kill in between leaves a complete run
            checkpoint.prune(out / "checkpoints", cfg.checkpoint.keep_after_done)
        logger.event("done", steps=total, tokens=s.tokens, seconds=time.time() - t0)
        # every rank finishes its last collective before any tears the process group down (a
        # rank destroying gloo while its peer is still mid-send aborted once in CI)
        distributed.barrier(dist)
        return {"steps": total, "metrics": metrics}
    except BaseException as e:
        if logger is not None:
            logger.event("error", type=type(e).__name__, message=str(e))
        raise
    finally:
        if logger is not None:
            logger.close()
        if lock is not None:
            lock.release()
        distributed.shutdown()


def resume(s: Session) -> dict | None:
    """Load the latest complete checkpoint (if any and checkpoint.resume); its trainer state.

    The optimizer's hyperparameters (lr, betas, eps, weight decay) and the schedule's base lr
    come from this run's config, not the checkpoint: a deliberate change (run.allow_changes)
    takes effect from the resumed step (the same config gives bit-identical values). Step
    records logged after the checkpoint by an interrupted attempt are dropped (logger)."""
    if not s.cfg.checkpoint.resume:
        return None
    path = checkpoint.agree_on_latest(s.out / "checkpoints", s.dist)
    if path is None:
        return None
    fresh = [{k: v for k, v in g.items() if k != "params"} for g in s.optimizer.param_groups]
    state = checkpoint.load(path, s.model, s.optimizer, s.dist)
    s.scheduler.load_state_dict(state["scheduler"])
    sch = s.scheduler
    sch.base_lrs = [f["initial_lr"] for f in fresh]
    lrs = [base * fn(sch.last_epoch) for base, fn in zip(sch.base_lrs, sch.lr_lambdas)]
    for group, f, lr in zip(s.optimizer.param_groups, fresh, lrs):
        group.update({**f, "lr": lr})
    sch._last_lr = lrs
    s.tokens = state.get("tokens", 0.0)
    s.logger.resumed_at(state["step"])
    s.logger.event("resume", checkpoint=str(path), step=state["step"])
    s.logger.message(f"resumed from {path} (step {state['step']})")
    return state


def oom_message(cfg: Config) -> str:
    o, d = cfg.optim, cfg.data
    return (
        f"CUDA out of memory with optim.micro_batch={o.micro_batch} packed rows x "
        f"data.max_tokens={d.max_tokens} tokens per forward pass. Lower optim.micro_batch "
        f"(optim.global_batch={o.global_batch} is kept by accumulating more), lower "
        f"data.max_tokens, or set model.activation_checkpointing=true."
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        print(help_text())
        return 0
    try:
        cfg = load_config(argv[0], argv[1:])
        run(cfg)
    except ConfigError as e:
        print(f"r7b_fast.train: config error: {e}", file=sys.stderr)
        return 2
    except NonFiniteError as e:
        print(f"r7b_fast.train: {e}", file=sys.stderr)
        return 3
    except NoPairsError as e:
        print(f"r7b_fast.train: {e}", file=sys.stderr)
        return 5
    except torch.OutOfMemoryError:
        print(f"r7b_fast.train: {oom_message(cfg)}", file=sys.stderr)
        return 4
    return 0


if __name__ == "__main__":
    sys.exit(main())
