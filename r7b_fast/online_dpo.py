"""One on-policy DPO round's data: sample k answers per prompt from the current policy, score
them, and turn best vs worst into preference rows (DESIGN.md §6).

    pairs, stats = build_pairs(model, tokenizer, prompt_rows, reward_fn, k=4, max_new_tokens=32,
                               seed=round_seed)

The trainer then renders the pairs (`r7b_fast.data.chat.render_preference`), computes reference
log-probs under the same policy and trains. Under torch.distributed with several ranks every rank
calls this with the SAME prompt rows: rank r samples and scores prompts r, r+W, ..., the pairs
and stats are all-gathered, and every rank returns the full, identical result in prompt order
(the sampling noise is keyed by the prompt's global index, so the result does not depend on the
world size beyond floating-point differences).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from r7b_fast.generate import decode_completion, padding_stats, stop_token_ids
from r7b_fast.rewards import get_reward, prompt_messages

# Row fields that describe the conversation itself, not task metadata carried into the pair.
_CONVERSATION_KEYS = ("prompt", "messages", "chosen", "rejected")


def _preference_row(row: dict, best: str, worst: str, best_score: float, worst_score: float):
    """A conversational TRL preference row (+ the prompt row's task metadata and the scores)."""
    meta = {key: v for key, v in row.items() if key not in _CONVERSATION_KEYS}
    return {
        **meta,
        "prompt": prompt_messages(row),
        "chosen": [{"role": "assistant", "content": best}],
        "rejected": [{"role": "assistant", "content": worst}],
        "chosen_reward": best_score,
        "rejected_reward": worst_score,
    }


def select_pairs(
    rows: Sequence[dict],
    texts: Sequence[Sequence[str]],
    scores: Sequence[Sequence[float]],
    *,
    min_margin: float = 0.0,
) -> tuple[list[dict | None], list[bool]]:
    """Best vs worst per prompt: (pair or None per prompt, tied flag per prompt).

    A prompt is skipped (tied) when max - min of its scores is <= min_margin (all scores equal
    with the default) or when its best and worst texts are identical. Ties between equal scores
    go to the earliest sample."""
    pairs, tied = [], []
    for row, ts, ss in zip(rows, texts, scores):
        hi = max(range(len(ss)), key=lambda j: ss[j])
        lo = min(range(len(ss)), key=lambda j: ss[j])
        skip = ss[hi] - ss[lo] <= min_margin or ts[hi] == ts[lo]
        tied.append(skip)
        pairs.append(None if skip else _preference_row(row, ts[hi], ts[lo], ss[hi], ss[lo]))
    return pairs, tied


def _dist_world() -> tuple[int, int]:
    d = torch.distributed
    if d.is_available() and d.is_initialized():
        return d.get_rank(), d.get_world_size()
    return 0, 1


def _gather(items: list) -> list:
    """Concatenation of every rank's list (rank order); the list itself on one process."""
    rank, world = _dist_world()
    if world == 1:
        return items
    parts = [None] * world
    torch.distributed.all_gather_object(parts, items)
    return [x for part in parts for x in part]


def _sample_and_score(backend, tokenizer, rows, indices, reward_fn, opts) -> list[dict]:
    """For each prompt: its global index, texts, raw rewards, completion lengths, truncation."""
    from r7b_fast.data.chat import render_prompt

    k = opts["k"]
    prompt_ids = [render_prompt(tokenizer, prompt_messages(r)) for r in rows]
    stop = set(opts["stop_ids"])
    comps = backend.sample(prompt_ids, k, opts["max_new_tokens"], opts["temperature"],
                           opts["top_p"], opts["seed"], opts["stop_ids"], prompt_keys=indices)  # fmt: skip
    if len(comps) != len(rows) or any(len(c) != k for c in comps):
        raise ValueError(
            f"build_pairs: the sampling backend returned {[len(c) for c in comps]} completions "
            f"for {len(rows)} prompts x k={k}"
        )
    texts = [[decode_completion(tokenizer, c) for c in per] for per in comps]
    flat_rows = [r for r in rows for _ in range(k)]
    flat = reward_fn(flat_rows, [t for per in texts for t in per]) if rows else []
    return [
        {
            "index": i,
            "texts": texts[n],
            "rewards": [float(x) for x in flat[n * k : (n + 1) * k]],
            "lengths": [len(c) for c in comps[n]],
            "truncated": [not (c and c[-1] in stop) for c in comps[n]],
        }
        for n, i in enumerate(indices)
    ]


def _stats(results: list[dict], pairs: list, tied: list[bool]) -> dict[str, float]:
    rewards = [x for r in results for x in r["rewards"]]
    mean = sum(rewards) / len(rewards)
    made = [p for p in pairs if p is not None]
    margins = [p["chosen_reward"] - p["rejected_reward"] for p in made]
    flags = [t for r in results for t in r["truncated"]]
    lengths = [n for r in results for n in r["lengths"]]
    return {
        "reward_mean": mean,
        "reward_std": math.sqrt(sum((x - mean) ** 2 for x in rewards) / len(rewards)),
        "reward_best_mean": sum(max(r["rewards"]) for r in results) / len(results),
        "num_prompts": float(len(results)),
        "num_samples": float(len(rewards)),
        "num_pairs": float(len(made)),
        "num_tied": float(sum(tied)),
        "frac_tied": sum(tied) / len(tied),
        "margin_mean": sum(margins) / len(margins) if margins else 0.0,
        "frac_truncated": sum(flags) / len(flags),
        "completion_len_mean": sum(lengths) / len(lengths),
    }


def build_pairs(
    model,
    tokenizer,
    prompt_rows: Sequence[dict],
    reward_fn: Callable | str,
    *,
    k: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 32,
    min_margin: float = 0.0,
    missing_eos_penalty: float | None = None,
    stop_ids: list[int] | None = None,
    progress=None,
    backend=None,
) -> tuple[list[dict], dict[str, float]]:
    """Samples k answers per prompt from `model` (the current policy), scores them with
    `reward_fn`, and returns (preference_rows, stats).

    prompt_rows: task rows (`messages`, or `prompt` as messages or text, plus metadata such as
        `family`/`answer` for the verifier); `prompt_messages(row)` is what the policy sees.
    reward_fn: a reward from `r7b_fast.rewards.get_reward`, or a spec string for it.
    k >= 2 samples per prompt at `temperature` / `top_p`; `seed` keys the sampling noise (use a
        different one per round). `batch_size` rows (prompt x sample) per generation forward.
    min_margin: a prompt whose best - worst score is <= this is skipped (counted as tied).
    missing_eos_penalty: subtracted from the score of a sample that hit max_new_tokens without
        its end-of-turn token, for choosing best/worst only (stats report the raw reward).
    stop_ids: the ids that end an answer (default `generate.stop_token_ids(model, tokenizer)`).
    progress: optional callable given the number of this rank's samples each generation batch
        finished (`generate`'s progress hook).
    backend: what samples (r7b_fast.sampling: `sample(prompt_ids, k, ...)`); default an
        `HFBackend(model, tokenizer, batch_size=batch_size, progress=progress)` (then
        batch_size and progress configure it; a given backend carries its own).

    preference_rows: in prompt order, one per non-tied prompt, TRL conversational schema as
        `chat.render_preference` accepts: `prompt` (messages), `chosen`/`rejected`
        ([{"role": "assistant", "content": text}]), the prompt row's metadata (family, answer,
        ...) and `chosen_reward`/`rejected_reward` (the scores that chose them).
    stats (floats): reward_mean / reward_std over all samples, reward_best_mean (mean over
        prompts of the best sample), num_prompts, num_samples (prompts x k), num_pairs,
        num_tied, frac_tied, margin_mean (best - worst over the pairs), frac_truncated (samples
        without a stop token), completion_len_mean (tokens, stop token included); with a
        backend that counts (`hf`), frac_prompt_padding and frac_decode_idle summed over the
        ranks (`generate.padding_stats`; these depend on the batching, so on the world size).
    """
    if not prompt_rows:
        raise ValueError("build_pairs: prompt_rows is empty")
    if not isinstance(k, int) or k < 2:
        raise ValueError(f"build_pairs: k must be an int >= 2 (best vs worst), got {k!r}")
    if not temperature > 0:
        raise ValueError(
            f"build_pairs: temperature must be > 0 for distinct samples, got {temperature!r}"
        )
    reward_fn = get_reward(reward_fn)  # a spec is loaded; a callable gets the score checks
    rank, world = _dist_world()
    indices = list(range(rank, len(prompt_rows), world))
    opts = dict(k=k, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                seed=seed, stop_ids=list(stop_ids or stop_token_ids(model, tokenizer)))  # fmt: skip
    if backend is None:
        from r7b_fast.sampling import HFBackend

        backend = HFBackend(model, tokenizer, batch_size=batch_size, progress=progress)
    counts = getattr(backend, "stats", None)
    before = dict(counts) if counts is not None else None
    mine = _sample_and_score(backend, tokenizer, [prompt_rows[i] for i in indices], indices,
                             reward_fn, opts)  # fmt: skip
    results = sorted(_gather(mine), key=lambda r: r["index"])
    batching = None
    if counts is not None:  # this call's counters, summed over the ranks
        parts = _gather([{key: n - before.get(key, 0) for key, n in counts.items()}])
        keys = {key for p in parts for key in p}  # a rank with no prompt counted nothing
        batching = padding_stats({key: sum(p.get(key, 0) for p in parts) for key in keys})
    chosen_by = [
        [x - (missing_eos_penalty or 0.0) * t for x, t in zip(r["rewards"], r["truncated"])]
        for r in results
    ]
    rows = [prompt_rows[r["index"]] for r in results]
    pairs, tied = select_pairs(
        rows, [r["texts"] for r in results], chosen_by, min_margin=min_margin
    )
    return [p for p in pairs if p is not None], {**_stats(results, pairs, tied), **(batching or {})}
