"""The trainer's data plumbing: files -> packed rows -> device micro-batches (+ reference logps).

Builds on r7b_fast.data (sources, chat rendering, packing, the synthetic task generator); only
the trainer-specific parts live here: which files a stage reads, stacking `optim.micro_batch`
packed rows into one forward, and attaching reference log-probs to preference rows (computed
once per dataset, or per on-policy round, and stored in the run dir so a resumed run reuses
the reference of the original model instead of recomputing it from trained weights).
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import torch

from r7b_fast import distributed
from r7b_fast.config import Config, ConfigError
from r7b_fast.data.packing import MicroBatchIterator, PackedDataset

# Which generated file each stage trains on (r7b_fast.data.synthetic.make_dataset_dir).
SYNTHETIC_FILE = {"sft": "sft", "dpo": "pref", "online_dpo": "sft"}
SOURCE_KIND = {"sft": "sft", "dpo": "preference", "online_dpo": "prompt"}


def dataset_files(cfg: Config, out: Path, dist: distributed.Dist) -> list[str]:
    """`data.train`, or the synthetic families generated (by rank 0) into out/data."""
    if cfg.data.train:
        return list(cfg.data.train)
    from r7b_fast.data.synthetic import make_dataset_dir

    d = cfg.data
    if dist.is_main:
        make_dataset_dir(out / "data", d.synthetic_families, d.synthetic_train, d.synthetic_eval,
                         seed=cfg.run.seed)  # fmt: skip
    distributed.barrier(dist)
    kind = SYNTHETIC_FILE[cfg.run.stage]
    return [str(out / "data" / fam / f"{kind}.jsonl") for fam in d.synthetic_families]


def build_rows(cfg: Config, tokenizer, out: Path, dist: distributed.Dist, logger=None):
    """sft: a PackedDataset of SFT rows; dpo: a PackedDataset of preference rows; online_dpo:
    the list of prompt rows (dicts with `prompt` + task metadata)."""
    stage, max_tokens = cfg.run.stage, cfg.data.max_tokens
    files = dataset_files(cfg, out, dist)
    kw = {"tokenizer": tokenizer, "max_len": max_tokens} if stage != "online_dpo" else {}
    rows, counts = [], {}
    for label, path in zip(file_labels(cfg), files):
        got, c = load_checked(cfg, label, path, SOURCE_KIND[stage], kw)
        rows += got
        counts = {k: counts.get(k, 0) + v for k, v in c.items()}
    if stage == "online_dpo" and cfg.online.reward == "verifier":
        check_verifier_rows(cfg, rows)
    packed = pack_rows(cfg, tokenizer, rows) if stage != "online_dpo" else None
    if logger is not None:
        logger.event("data", files=files, counts=counts,
                     packing=packed.stats() if packed is not None else None)  # fmt: skip
    if packed is None:
        return rows
    if len(packed) < dist.world_size:
        raise ConfigError(f"data.train: {len(packed)} packed rows cannot feed {dist.world_size} "
                          "processes")  # fmt: skip
    return packed


def pack_rows(cfg: Config, tokenizer, rows: list[dict]) -> PackedDataset:
    """Validated rows of the stage's schema -> packed rows: SFT conversations for sft,
    preference rows otherwise (data.max_tokens per packed row)."""
    from r7b_fast.data.chat import render_preference, render_sft
    from r7b_fast.data.packing import pack_preference, pack_sft

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if cfg.run.stage == "sft":
        return pack_sft([render_sft(tokenizer, r["messages"]) for r in rows],
                        cfg.data.max_tokens, pad_id=pad)  # fmt: skip
    return pack_preference([render_preference(tokenizer, r) for r in rows], cfg.data.max_tokens,
                           pad_id=pad)  # fmt: skip


def file_labels(cfg: Config) -> list[str]:
    """The config key each data file comes from (for error messages)."""
    if cfg.data.train:
        return [f"data.train[{i}]" for i in range(len(cfg.data.train))]
    return [f"data.synthetic_families[{i}]" for i in range(len(cfg.data.synthetic_families))]


def load_checked(cfg: Config, label: str, path: str, kind: str, kw: dict):
    """load_rows on one file; ConfigError (naming the key, the file, the unusable rows per reason
    and the expected schema) when it cannot be read or drops more than
    data.max_dropped_fraction of its rows (any row: the run would silently train on less)."""
    from r7b_fast.data.sources import describe, load_rows

    try:
        rows, counts = load_rows(path, kind, allow_empty=True, **kw)
    except (ValueError, OSError) as e:
        raise ConfigError(f"{label} {path}: cannot read: {e}") from None
    total, bad = counts["total"], counts["total"] - counts["kept"]
    limit = cfg.data.max_dropped_fraction
    if total == 0 or not rows or bad > limit * total:
        raise ConfigError(
            f"{label} {path}: {bad} of {total} rows unusable for {cfg.run.stage}: "
            f"{describe(counts, kind, kw.get('max_len'))}"
            + ("" if not rows else f"; more than data.max_dropped_fraction={limit} of the rows")
        )
    return rows, counts


def check_verifier_rows(cfg: Config, rows: list[dict]) -> None:
    """online.reward=verifier scores answers against each prompt row's task metadata: refuse
    (before the model loads and sampling starts) rows that lack it."""
    from r7b_fast.data.synthetic import check_task

    bad = []
    for i, row in enumerate(rows):
        try:
            check_task(row)
        except ValueError as e:
            bad.append((i, str(e)))
    if bad:
        i, why = bad[0]
        raise ConfigError(
            f"online.reward: the verifier needs each prompt row's task metadata (`family` and "
            f"`answer`, as r7b_fast.data.synthetic writes them): {len(bad)} of {len(rows)} "
            f"prompt rows lack it (first: row {i}: {why}); use a `module:function` or "
            "reward-model online.reward for data without it"
        )


def pack_pairs(cfg: Config, tokenizer, pairs: list[dict]) -> PackedDataset:
    """Preference rows (TRL schema) -> packed rows (over-long pairs dropped by load_rows' rule)."""
    from r7b_fast.data.chat import SequenceTooLong, render_preference
    from r7b_fast.data.packing import pack_preference

    rendered = []
    for row in pairs:
        try:
            p, c, r = render_preference(tokenizer, row)
        except SequenceTooLong:
            continue
        if 2 * len(p) + len(c) + len(r) <= cfg.data.max_tokens:
            rendered.append((p, c, r))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return pack_preference(rendered, cfg.data.max_tokens, pad_id=pad)


def make_iterator(packed, cfg: Config, dist: distributed.Dist) -> MicroBatchIterator:
    """This rank's endless, resumable stream of packed rows (rank r takes rows r, r+W, ... of
    each epoch's seeded permutation, so one step covers the same rows for any world size)."""
    return MicroBatchIterator(packed, seed=cfg.run.seed, shuffle=cfg.data.shuffle, epochs=None,
                              rank=dist.rank, world_size=dist.world_size)  # fmt: skip


def flat_cu_seqlens(rows: list[dict]) -> torch.Tensor:
    """int32 boundaries over the rows' tokens laid end to end: each row's packed sequences, then
    its padding as ONE segment (attention treats it as one sequence, not one per pad token)."""
    out, offset = [torch.zeros(1, dtype=torch.int32)], 0
    for r in rows:
        cu, T = r["cu_seqlens"], len(r["input_ids"])
        out.append(cu[1:] + offset)
        if int(cu[-1]) < T:
            out.append(torch.tensor([offset + T], dtype=torch.int32))
        offset += T
    return torch.cat(out)


def collate(rows: list[dict], device) -> dict:
    """Concatenate packed rows into one packed row [1, B*T] on `device` (sequence ids offset so
    they stay unique), with `max_seqlen` (python int: the longest segment of `cu_seqlens`,
    padding included) computed from the host tensors, so the model reads nothing from the
    device to size attention, and `target_rows` (int64: indices of the trained tokens, targets
    != -100, in the flattened row; the fused head reads only those). Preference rows also get `chosen_index`/`rejected_index` (the
    pair's two sequences, in the same pair order), `seq_target_tokens` [S] and `ref_logps` [S].
    On CUDA the tensors are copied from pinned memory without blocking (a copy from pageable
    memory would wait for it); elsewhere `.to(device)` as is."""
    cat = lambda key: torch.cat([r[key] for r in rows])
    offsets, seq_ids, total = [], [], 0
    for r in rows:
        n = len(r["cu_seqlens"]) - 1
        seq_ids.append(torch.where(r["seq_ids"] >= 0, r["seq_ids"] + total, -1))
        offsets.append(total)
        total += n
    cu = flat_cu_seqlens(rows)  # on the host: reading it costs no device sync
    batch = {
        "input_ids": cat("input_ids")[None],
        "position_ids": cat("position_ids")[None],
        "cu_seqlens": cu,
        "max_seqlen": int(torch.diff(cu).max()) if len(cu) > 1 else 0,
        "targets": cat("targets")[None],
        "seq_ids": torch.cat(seq_ids)[None],
        "num_seqs": total,
    }
    # the trained tokens' indices, found on the host (on the device `nonzero` is a sync)
    batch["target_rows"] = (batch["targets"].reshape(-1) != -100).nonzero().flatten()
    if "is_chosen" in rows[0]:
        pair_ids, is_chosen = cat("pair_ids"), cat("is_chosen")
        chosen = torch.nonzero(is_chosen).flatten()
        rejected = torch.nonzero(~is_chosen).flatten()
        batch["chosen_index"] = chosen[torch.argsort(pair_ids[chosen])]
        batch["rejected_index"] = rejected[torch.argsort(pair_ids[rejected])]
        trained = batch["seq_ids"][0][batch["targets"][0] != -100]
        batch["seq_target_tokens"] = torch.bincount(trained, minlength=total)
        if "ref_logps" in rows[0]:
            batch["ref_logps"] = cat("ref_logps")
    pinned = torch.device(device).type == "cuda"
    move = lambda t: t.pin_memory().to(device, non_blocking=True) if pinned else t.to(device)
    return {k: move(v) if torch.is_tensor(v) else v for k, v in batch.items()}


class WithReference:
    """A PackedDataset whose rows also carry `ref_logps` fp32[S] (one per sequence)."""

    def __init__(self, packed: PackedDataset, ref: list[torch.Tensor]):
        if len(ref) != len(packed):
            raise ValueError(f"ref: {len(ref)} rows of reference logps for {len(packed)} rows")
        self.packed, self.ref = packed, ref

    def __len__(self) -> int:
        return len(self.packed)

    def stats(self) -> dict:
        return self.packed.stats()

    def row(self, i: int) -> dict:
        return {**self.packed.row(i), "ref_logps": self.ref[i]}


class Progress:
    """Progress of a pass that is not optimizer steps (reference log-probs, sampling): a tqdm
    bar on rank 0 when logging.progress_bar, and always one closing log line with the count
    and the time (so logs without a bar still show what the pause was)."""

    def __init__(self, s, total: int, desc: str, unit: str):
        self.s, self.total, self.desc, self.unit = s, total, desc, unit
        self.t0, self.done, self.bar = time.perf_counter(), 0, None
        if s.dist.is_main and s.cfg.logging.progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)

    def __call__(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        sec = time.perf_counter() - self.t0
        self.s.logger.message(f"{self.desc}: {self.done} of {self.total} {self.unit} in "
                              f"{sec:.1f} s")  # fmt: skip


@torch.no_grad()
def compute_reference(s, packed: PackedDataset) -> list[torch.Tensor]:
    """Sequence log-probs of every packed row under the current model (eval mode, no grad);
    rank r computes rows r, r+W, ... and all ranks receive all of them."""
    from r7b_fast import losses
    from r7b_fast.train_loss import packed_forward

    dist, model = s.dist, s.model
    was_training = model.training
    model.eval()
    n, world = len(packed), dist.world_size
    mine: dict[int, torch.Tensor] = {}
    progress = Progress(s, n, "reference log-probs", "rows")
    for k in range(-(-n // world)):  # every rank runs the same number of forwards (FSDP)
        i = min(k * world + dist.rank, n - 1)
        batch = collate([packed.row(i)], dist.device)
        with autocast(s):
            token_logps = packed_forward(model, batch)
        seq = losses.sequence_logps(token_logps[0].float(), batch["seq_ids"][0],
                                    batch["num_seqs"])  # fmt: skip
        mine[i] = seq  # kept on the device: one copy to the host after the last forward
        progress(min(world, n - k * world))  # rows done by all ranks at this forward
    if mine:
        keys = list(mine)
        host = torch.cat([mine[i] for i in keys]).cpu().split([mine[i].numel() for i in keys])
        mine = {i: t.clone() for i, t in zip(keys, host)}  # own storage each (save, pickle)
    progress.close()
    model.train(was_training)
    if not dist.distributed:
        return [mine[i] for i in range(n)]
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, mine)
    merged = {i: v for part in gathered for i, v in part.items()}
    return [merged[i] for i in range(n)]


def autocast(s):
    """bf16 autocast for one-process CUDA training with fp32 weights (FSDP casts by itself)."""
    if s.mixed and not s.dist.distributed:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def reference_rows(s, packed: PackedDataset, path: Path) -> WithReference:
    """`packed` with reference logps: loaded from `path` if a previous attempt stored them,
    else computed now (before any training step) and stored atomically by rank 0."""
    path = Path(path)
    if path.is_file():
        return WithReference(packed, torch.load(path))
    ref = compute_reference(s, packed)
    if s.dist.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(ref, tmp)
        os.replace(tmp, path)
    distributed.barrier(s.dist)
    return WithReference(packed, ref)


def round_prompts(cfg: Config, prompts: list[dict], r: int) -> list[dict]:
    """Round r's `online.prompts_per_round` prompts: consecutive slices of one seeded
    permutation of all prompts, wrapping around (no prompt repeats before all were used)."""
    n, k = len(prompts), cfg.online.prompts_per_round
    order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.run.seed)).tolist()
    return [prompts[order[(r * k + j) % n]] for j in range(k)]


def warn_no_pairs(s, r: int, stats: dict, pairs: int) -> None:
    """A round that trains nothing: a loud line and a `no_pairs` event with the round's stats."""
    why = ("every prompt's samples tied" if pairs == 0 else
           f"its {pairs} pair(s) did not fit data.max_tokens / the world size")  # fmt: skip
    s.logger.event("no_pairs", round=r, prompts=int(stats["num_prompts"]),
                   samples=int(stats["num_samples"]), ties=int(stats["num_tied"]),
                   reward_rate=stats["reward_mean"], pairs=pairs)  # fmt: skip
    s.logger.message(
        f"WARNING: online round {r}: no preference pairs ({why}: {int(stats['num_tied'])} of "
        f"{int(stats['num_prompts'])} prompts tied over {int(stats['num_samples'])} samples, "
        f"mean reward {stats['reward_mean']:.3f}); its {s.cfg.optim.max_steps} steps are "
        "skipped (the learning-rate schedule still advances)"
    )


def online_round_rows(s, prompts: list[dict], r: int):
    """Round r's training rows (WithReference), or None when it produced no usable pair.

    First attempt: sample from the current policy (r7b_fast.online_dpo.build_pairs), pack the
    pairs, compute their reference log-probs under the same policy, store everything in
    out/online/round_NNN.pt. A resumed run loads that file instead, so it trains on the same
    pairs and reference the interrupted run had. Sampling runs on `online.backend`, inside
    `r7b_fast.sampling.gathered` (FSDP parameters all-gathered once for the phase) when
    `online.gather_for_sampling`; the round's stats include the batching's padding fractions."""
    from r7b_fast.online_dpo import build_pairs
    from r7b_fast.sampling import gathered, get_backend

    cfg, path = s.cfg, s.out / "online" / f"round_{r:03d}.pt"
    if path.is_file():
        saved = torch.load(path, weights_only=False)
        packed = pack_pairs(cfg, s.tokenizer, saved["pairs"]) if saved["pairs"] else None
        return WithReference(packed, saved["ref"]) if packed is not None else None
    o = cfg.online
    was_training = s.model.training
    s.model.eval()
    mine = len(range(s.dist.rank, o.prompts_per_round, s.dist.world_size)) * o.num_samples
    progress = Progress(s, mine, f"online round {r}: sampling", "samples")
    with autocast(s), gathered(s.model, o.gather_for_sampling) as resident:
        # resident: no collective in any forward, so ranks decode without staying in step
        backend = get_backend(o.backend, s.model, s.tokenizer, batch_size=o.batch_size,
                              cache=o.cache, progress=progress, sync=False if resident else None)  # fmt: skip
        pairs, stats = build_pairs(s.model, s.tokenizer, round_prompts(cfg, prompts, r),
                                   o.reward, k=o.num_samples, max_new_tokens=o.max_new_tokens,
                                   temperature=o.temperature, seed=cfg.run.seed * 1000 + r,
                                   backend=backend)  # fmt: skip
    progress.close()
    s.model.train(was_training)
    packed = pack_pairs(cfg, s.tokenizer, pairs) if pairs else None
    if packed is not None and len(packed) < s.dist.world_size:
        packed = None
    ref = compute_reference(s, packed) if packed is not None else []
    s.logger.event("round", round=r, prompts=int(stats["num_prompts"]),
                   pairs=len(pairs), skipped_ties=int(stats["num_tied"]), **stats)  # fmt: skip
    s.logger.scalars(r, stats, prefix="online")
    if packed is None:
        warn_no_pairs(s, r, stats, len(pairs))
    if s.dist.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save({"pairs": pairs, "stats": stats, "ref": ref}, tmp)
        os.replace(tmp, path)
    distributed.barrier(s.dist)
    return WithReference(packed, ref) if packed is not None else None
