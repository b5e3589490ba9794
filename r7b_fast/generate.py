"""Batched sampling from an HF causal LM (Cohere2 or Llama-family), gpt-fast style.

`generate` samples `num_samples` completions per prompt: prompts are sorted by length and cut into
left-padded batches (attention mask + position ids that skip the padding), one prefill, then
`decode_one_token` steps on the KV cache until every row has emitted a stop token or
`max_new_tokens` is reached. The model is put in eval mode for the call and restored after; the
cache is used even if `config.use_cache` is False (that flag is for training).

KV cache (`cache=`): "static" (the default) preallocates transformers' `StaticCache` once per
call and batch row count, sized longest prompt + max_new_tokens (sliding-window layers hold only
their window), and resets it between batches: no per-step concatenation or reallocation.
"dynamic" is HF's `DynamicCache` (grows by concatenation, a fresh one per batch). Both give the
same tokens (tests/test_sampling.py; benchmarks/sampling.py measures the speed).

Sampling noise is counter-based: the exponential variate for (seed, prompt index, sample index,
step, token id) comes from an integer hash, so a completion does not depend on the batch size,
on the order of the other prompts or on the device's RNG state; `temperature=0` is greedy (argmax,
lowest id on ties). Under torch.distributed with several ranks every rank runs the same number of
forward calls (padding with dummy batches and steps), so FSDP-sharded models do not deadlock.
"""

from __future__ import annotations

import contextlib
import inspect

import torch

# Attention implementations that handle padded batches with a KV cache; anything else (e.g. the
# packed-rows-only varlen attention installed by r7b_fast.hf_attention) is swapped for SDPA.
_CACHE_SAFE_ATTN = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")
_M32 = 0xFFFFFFFF


def stop_token_ids(model, tokenizer=None) -> list[int]:
    """The ids that end a completion: the tokenizer's `<|END_OF_TURN_TOKEN|>` (the Cohere chat
    template's end of an assistant turn) if it has one, its `eos_token_id`, and the model config's
    `eos_token_id` (an int or a list). Id 4 for the embedded tiny tokenizer / config."""
    ids: set[int] = set()
    if tokenizer is not None:
        vocab = tokenizer.get_vocab()
        if "<|END_OF_TURN_TOKEN|>" in vocab:
            ids.add(int(vocab["<|END_OF_TURN_TOKEN|>"]))
        if tokenizer.eos_token_id is not None:
            ids.add(int(tokenizer.eos_token_id))
    eos = getattr(model.config, "eos_token_id", None)
    ids.update([eos] if isinstance(eos, int) else list(eos or []))
    if not ids:
        raise ValueError("stop_token_ids: neither the tokenizer nor model.config defines an eos id")
    return sorted(ids)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for int64 x in [0, 2**32), without int64 overflow (16-bit halves of c)."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash with good avalanche (Wellons' lowbias32), on int64 tensors."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def sampling_noise(seed: int, row_keys: torch.Tensor, step: int, vocab: int) -> torch.Tensor:
    """Exponential(1) variates, fp32[B, vocab], a pure function of (seed, row key, step, token id).

    `row_keys` int64[B] identify the completions (prompt index * num_samples + sample index)."""
    dev = row_keys.device
    h = _mix32(torch.tensor(seed & _M32, dtype=torch.int64, device=dev))
    h = _mix32(h ^ (row_keys & _M32))
    h = _mix32(h ^ (step & _M32))  # (B,)
    v = _mix32(torch.arange(vocab, dtype=torch.int64, device=dev) + 0x9E3779B9)
    x = _mix32((h[:, None] + v[None, :]) & _M32)  # (B, V)
    u = ((x >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))  # uniform in (0, 1), 24 bits
    return -torch.log(u)


def sample_next(
    logits: torch.Tensor,
    noise: torch.Tensor | None,
    *,
    temperature: float,
    top_p: float,
) -> torch.Tensor:
    """Next token ids int64[B] from logits[B, V]: argmax if temperature == 0, else the
    exponential race argmax(p / noise) over the smallest set of tokens whose probability mass
    reaches top_p (the most likely token is always kept)."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = (sorted_p.cumsum(dim=-1) - sorted_p) >= top_p  # mass before this token already >= p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    return (probs / noise).argmax(dim=-1)


@contextlib.contextmanager
def generation_mode(model):
    """Eval mode and a cache-capable attention implementation for the duration; both restored."""
    was_training = model.training
    impl = getattr(model.config, "_attn_implementation", None)
    swap = impl is not None and impl not in _CACHE_SAFE_ATTN
    model.eval()
    if swap:
        model.set_attn_implementation("sdpa")
    try:
        with torch.no_grad():
            yield model
    finally:
        if swap:
            model.set_attn_implementation(impl)
        model.train(was_training)


def _cache_kwarg(model) -> str:
    """transformers renamed `past_key_values` to `cache` (5.2x); accept both."""
    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def prefill(model, input_ids, attention_mask, cache, cache_kw: str) -> torch.Tensor:
    """Runs the left-padded prompts (B, T) through the model, filling `cache`; the last logits (B, V)."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=True,
        logits_to_keep=1,
        **{cache_kw: cache},
    )
    return out.logits[:, -1]


def decode_one_token(model, tokens, attention_mask, cache, cache_kw: str) -> torch.Tensor:
    """One cached step: tokens (B,) appended; `attention_mask` (B, past + 1) already includes them."""
    position_ids = attention_mask.sum(-1, keepdim=True) - 1
    out = model(
        input_ids=tokens[:, None],
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=True,
        **{cache_kw: cache},
    )
    return out.logits[:, -1]


def _all_done(done: torch.Tensor, sync: bool) -> bool:
    """True when every row here (and, with `sync`, on every rank) has finished."""
    pending = (~done).any().to(torch.int32)
    if sync:
        torch.distributed.all_reduce(pending, op=torch.distributed.ReduceOp.MAX)
    return not bool(pending.item())


def _left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask int64[B, T_max], prompts right-aligned."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(prompts), width), dtype=torch.int64)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.int64)
        mask[i, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


class _Caches:
    """KV caches for one `generate` call: a fresh DynamicCache per batch, or one StaticCache per
    batch row count (the full batches and a last, smaller one), sized `max_len` and reset before
    each reuse (StaticCache fixes its batch size at its first update)."""

    def __init__(self, model, kind: str, max_len: int):
        self.config, self.kind, self.max_len = model.config, kind, max_len
        self.static: dict[int, object] = {}

    def get(self, rows: int):
        from transformers import DynamicCache, StaticCache

        if self.kind == "dynamic":
            return DynamicCache(config=self.config)
        cache = self.static.get(rows)
        if cache is None:
            cache = self.static[rows] = StaticCache(config=self.config, max_cache_len=self.max_len)
        else:
            cache.reset()
        return cache


def _generate_batch(model, prompts, row_keys, done, *, opts: dict) -> list[list[int]]:
    """Completions for one left-padded batch; rows with done[i] set from the start are dummies."""
    device = next(model.parameters()).device
    ids, mask = _left_pad(prompts, opts["pad_id"], device)
    keys = torch.tensor(row_keys, dtype=torch.int64, device=device)
    stop = torch.tensor(opts["stop_ids"], dtype=torch.int64, device=device)
    done = torch.tensor(done, dtype=torch.bool, device=device)
    cache, kw = opts["caches"].get(len(prompts)), _cache_kwarg(model)
    logits = prefill(model, ids, mask, cache, kw)
    steps, out = opts["max_new_tokens"], []
    for step in range(steps):
        noise = None
        if opts["temperature"] > 0:
            noise = sampling_noise(opts["seed"], keys, step, logits.shape[-1])
        tok = sample_next(logits, noise, temperature=opts["temperature"], top_p=opts["top_p"])
        tok = tok.masked_fill(done, opts["pad_id"])
        out.append(tok)
        done = done | torch.isin(tok, stop)
        if step == steps - 1 or _all_done(done, opts["sync"]):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        logits = decode_one_token(model, tok, mask, cache, kw)
    _count(opts["stats"], ids.numel() - sum(map(len, prompts)), len(out), len(prompts))
    rows = torch.stack(out, dim=1).tolist()
    stop_set = set(opts["stop_ids"])
    result = []
    for row in rows:
        end = next((j + 1 for j, t in enumerate(row) if t in stop_set), len(row))
        result.append(row[:end])
    return result


def _count(stats: dict | None, padding: int, steps: int, rows: int) -> None:
    """Adds one batch to the caller's stats dict (see `generate`)."""
    if stats is not None:
        for key, n in (("batches", 1), ("padding_tokens", padding), ("decode_steps", steps),
                       ("row_steps", rows * steps)):  # fmt: skip
            stats[key] = stats.get(key, 0) + n


def _check_args(
    prompt_ids, prompt_keys, max_new_tokens, num_samples, temperature, top_p, batch_size
) -> None:
    if not isinstance(prompt_ids, (list, tuple)) or not all(
        isinstance(p, (list, tuple)) and len(p) > 0 for p in prompt_ids
    ):
        raise ValueError("generate: prompt_ids must be a list of non-empty lists of token ids")
    if prompt_keys is not None and len(prompt_keys) != len(prompt_ids):
        raise ValueError(
            f"generate: prompt_keys has {len(prompt_keys)} entries for {len(prompt_ids)} prompts"
        )
    for name, value in (
        ("max_new_tokens", max_new_tokens),
        ("num_samples", num_samples),
        ("batch_size", batch_size),
    ):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"generate: {name} must be an int >= 1, got {value!r}")
    if not temperature >= 0:
        raise ValueError(f"generate: temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"generate: top_p must be in (0, 1], got {top_p!r}")


def generate(
    model,
    tokenizer,
    prompt_ids: list[list[int]],
    *,
    max_new_tokens: int,
    num_samples: int = 1,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 32,
    stop_ids: list[int] | None = None,
    prompt_keys: list[int] | None = None,
    progress=None,
    cache: str = "static",
    sync: bool | None = None,
    stats: dict | None = None,
) -> list[list[list[int]]]:
    """Samples `num_samples` completions for each prompt.

    prompt_ids: token ids per prompt (already chat-rendered, generation prompt included).
    tokenizer: gives the pad id and the stop ids (`stop_token_ids`); may be None (model.config's).
    temperature: 0 = greedy; top_p: nucleus mass in (0, 1]; seed: completion (i, j) depends only
    on (seed, prompt_keys[i], j), the model and the prompt, not on batch_size or the other
    prompts. prompt_keys: an int per prompt keying its noise (default: its index i), e.g. the
    prompt's global index when prompts are sharded over ranks.
    stop_ids: ids that end a completion (default `stop_token_ids(model, tokenizer)`).
    batch_size: rows (prompt x sample) per forward; prompts are sorted by length to cut padding.
    progress: optional callable, called with the number of rows (prompt x sample) each finished
    batch completed (for a progress bar). An empty prompt list returns [] (under torch.distributed it still joins the other ranks'
    forwards). Returns out[i][j] = the completion ids of sample j of prompt i, without the
    prompt, ending with the stop token that ended it (absent if max_new_tokens came first).
    cache: "static" (preallocated StaticCache, reused across batches) or "dynamic" (DynamicCache);
    same tokens either way (module docstring).
    sync: keep the ranks in step (same number of forwards; an all-reduce per decode step). None
    = under torch.distributed with several ranks. False is only safe when the forward does no
    collective, e.g. inside `r7b_fast.sampling.gathered` (FSDP parameters already gathered).
    stats: optional dict, incremented in place with this call's counts: prompt_tokens,
    padding_tokens (left padding in the prefills), batches, decode_steps (sum over batches),
    row_steps (rows x steps: token slots decoded, padding rows included), new_tokens (sum of the
    completions' lengths). `padding_stats` turns them into fractions.
    """
    _check_args(
        prompt_ids, prompt_keys, max_new_tokens, num_samples, temperature, top_p, batch_size
    )
    if cache not in ("static", "dynamic"):
        raise ValueError(f"generate: cache must be 'static' or 'dynamic', got {cache!r}")
    if sync is None:
        dist = torch.distributed
        sync = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is None:
        pad_id = getattr(model.config, "pad_token_id", None) or 0
    opts = dict(
        max_new_tokens=max_new_tokens,
        temperature=float(temperature),
        top_p=float(top_p),
        seed=int(seed),
        pad_id=int(pad_id),
        stop_ids=list(stop_ids) if stop_ids else stop_token_ids(model, tokenizer),
        sync=sync,
        stats=stats,
        caches=_Caches(model, cache, max(map(len, prompt_ids), default=1) + max_new_tokens),
    )
    keys = list(range(len(prompt_ids))) if prompt_keys is None else list(prompt_keys)
    batches = _plan_batches(model, prompt_ids, num_samples, batch_size, sync)
    out: list[list[list[int]]] = [[[] for _ in range(num_samples)] for _ in prompt_ids]
    with generation_mode(model):
        for batch in batches:
            if not batch:  # dummy batch: keeps this rank in step with the others
                _generate_batch(
                    model, [[opts["pad_id"]]], [0], [True], opts={**opts, "stats": None}
                )
                continue
            prompts = [list(prompt_ids[i]) for i, _ in batch]
            row_keys = [keys[i] * num_samples + j for i, j in batch]
            done = [False] * len(batch)
            for (i, j), comp in zip(
                batch, _generate_batch(model, prompts, row_keys, done, opts=opts)
            ):
                out[i][j] = comp
            if progress is not None:
                progress(len(batch))
    if stats is not None:
        stats["prompt_tokens"] = stats.get("prompt_tokens", 0) + num_samples * sum(
            map(len, prompt_ids)
        )
        stats["new_tokens"] = stats.get("new_tokens", 0) + sum(len(c) for per in out for c in per)
    return out


def padding_stats(stats: dict) -> dict[str, float]:
    """Fractions from `generate`'s stats counters: frac_prompt_padding (padding / prefill slots)
    and frac_decode_idle (decoded row slots that added no completion token: rows that had
    stopped, carried along until the rest of their batch stopped)."""
    prefill = stats.get("prompt_tokens", 0) + stats.get("padding_tokens", 0)
    slots = stats.get("row_steps", 0)
    return {
        "frac_prompt_padding": stats.get("padding_tokens", 0) / prefill if prefill else 0.0,
        "frac_decode_idle": 1.0 - stats.get("new_tokens", 0) / slots if slots else 0.0,
    }


def _plan_batches(model, prompt_ids, num_samples: int, batch_size: int, sync: bool) -> list:
    """Rows (prompt i, sample j) sorted by prompt length (less padding), cut into batches; under
    `sync`, empty batches are appended so every rank runs as many as the busiest one (FSDP
    all-gathers parameters inside each forward: a rank that stopped early would hang the rest)."""
    rows = [(i, j) for i in range(len(prompt_ids)) for j in range(num_samples)]
    rows.sort(key=lambda r: -len(prompt_ids[r[0]]))
    batches = [rows[b : b + batch_size] for b in range(0, len(rows), batch_size)]
    if sync:
        n = torch.tensor(len(batches), device=next(model.parameters()).device)
        torch.distributed.all_reduce(n, op=torch.distributed.ReduceOp.MAX)
        batches += [[] for _ in range(int(n.item()) - len(batches))]
    return batches


def _as_messages(prompt) -> list[dict]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, (list, tuple)) and all(isinstance(m, dict) for m in prompt):
        return list(prompt)
    raise ValueError("generate_text: each prompt must be a string or a list of chat messages")


def decode_completion(tokenizer, ids: list[int]) -> str:
    """The completion's text: special tokens (the stop token) dropped, outer whitespace stripped."""
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def generate_text(model, tokenizer, prompts: list, **kwargs) -> list[list[str]]:
    """`generate` on chat prompts: each a user string or a list of {"role", "content"} messages,
    rendered by `r7b_fast.data.chat.render_prompt` (the tokenizer's chat template plus its
    generation prompt). Same keyword arguments as `generate`; returns out[i][j] = the decoded
    text of sample j of prompt i (`decode_completion`)."""
    from r7b_fast.data.chat import render_prompt

    ids = [render_prompt(tokenizer, _as_messages(p)) for p in prompts]
    completions = generate(model, tokenizer, ids, **kwargs)
    return [[decode_completion(tokenizer, c) for c in per_prompt] for per_prompt in completions]
