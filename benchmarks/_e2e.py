"""Pieces of the end-to-end step benchmark (benchmarks/train_step.py): model sizes and the memory
plan, FLOP counting, synthetic data with realistic lengths, padded HF-style batches, and AdamW with
fp32 state over bf16 parameters.

Everything here is deterministic for a seed and runs on the CPU too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from transformers import Cohere2Config

from benchmarks._common import attended_pairs  # noqa: F401 (re-exported: tests use _e2e's)
from r7b_fast.model import R7B_SHAPES, tiny_config

GIB = 2**30
IGNORE = -100

# Bytes of saved activations per token per decoder layer, HF Cohere2 in bf16 with SDPA at R7B's
# shapes (hidden 4096, MLP 14336): measured with autograd's saved-tensor hooks (unique storages,
# parameters excluded) as the difference between a 2-layer and a 1-layer model: 192,900 B.
ACT_BYTES_PER_TOKEN_LAYER = 193_000
# HF's loss at its peak (backward of cross_entropy), bytes per logit: bf16 scaled logits held by
# the output (2) + fp32 log_softmax output saved (4) + its gradient (4) + the input gradient (4) +
# one fp32 temporary (4).
HF_LOSS_BYTES_PER_LOGIT = 18
BYTES_PER_PARAM = 12  # bf16 parameter + bf16 gradient + fp32 exp_avg + fp32 exp_avg_sq


def model_config(layers: int | None, tiny: bool) -> Cohere2Config:
    """Command R7B's layer shapes with `layers` decoder layers (every 4th global), or the tiny
    test config (`tiny=True`; `layers` None keeps its 4)."""
    if tiny:
        return tiny_config(**({} if layers is None else {"num_hidden_layers": layers}))
    if layers is None or layers < 1:
        raise ValueError(f"layers: need an int >= 1 for the R7B shapes, got {layers!r}")
    from r7b_fast.model import BOS_ID, END_OF_TURN_ID, PAD_ID

    return Cohere2Config(
        **{**R7B_SHAPES, "num_hidden_layers": layers},
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=END_OF_TURN_ID,
    )


def layer_matmul_params(cfg: Cohere2Config) -> int:
    """Parameters in one decoder layer's matrix products (q, k, v, o, gate, up, down)."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    d = getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads
    q = h * cfg.num_attention_heads * d
    kv = 2 * h * cfg.num_key_value_heads * d
    return 2 * q + kv + 3 * h * i


def plan_layers(budget_gib: float, tokens: int, reserve_gib: float = 4.0) -> dict:
    """How many R7B-shaped layers fit `budget_gib` of GPU memory with AdamW (bf16 params and
    grads, fp32 exp_avg/exp_avg_sq: 12 B/param), a micro-batch of `tokens` tokens, no activation
    checkpointing, and `reserve_gib` for the CUDA context, cuBLAS workspaces and fragmentation.

    Returns {'layers': the count every compared variant fits (HF's materialised logits are the
    binding term), 'layers_ours': the count our fused loss alone would fit, and the terms}."""
    cfg = model_config(1, tiny=False)
    v, h = cfg.vocab_size, cfg.hidden_size
    per_layer = (
        BYTES_PER_PARAM * (layer_matmul_params(cfg) + 2 * h) + tokens * ACT_BYTES_PER_TOKEN_LAYER
    )
    fixed = BYTES_PER_PARAM * v * h + reserve_gib * GIB
    hf_loss = tokens * v * HF_LOSS_BYTES_PER_LOGIT
    ours_loss = 4 * v * h + tokens * h * 8  # fp32 dW accumulator + a few [tokens, H] buffers
    budget = budget_gib * GIB
    return {
        "layers": max(1, int((budget - fixed - hf_loss) // per_layer)),
        "layers_ours": max(1, int((budget - fixed - ours_loss) // per_layer)),
        "budget_gib": budget_gib,
        "per_layer_gib": per_layer / GIB,
        "embedding_state_gib": BYTES_PER_PARAM * v * h / GIB,
        "hf_loss_gib": hf_loss / GIB,
        "ours_loss_gib": ours_loss / GIB,
        "reserve_gib": reserve_gib,
    }


def step_flops(cfg: Cohere2Config, seq_lens: list[int], n_targets: int) -> float:
    """Model FLOPs (forward + backward = 3x forward, no recompute) of one step over sequences of
    `seq_lens` real tokens: 6 x tokens x layer matmul params, attention 12 x Hq x D per attended
    pair on each layer (window on sliding layers), and the LM head 6 x H x V on the `n_targets`
    tokens that have a target (the only rows a loss needs)."""
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    tokens = sum(seq_lens)
    dense = 6 * tokens * layer_matmul_params(cfg) * cfg.num_hidden_layers
    attn = 0
    for kind in cfg.layer_types:
        w = cfg.sliding_window if kind == "sliding_attention" else None
        attn += sum(attended_pairs(n, w) for n in seq_lens)
    return float(
        dense
        + 12 * cfg.num_attention_heads * d * attn
        + 6 * n_targets * cfg.hidden_size * cfg.vocab_size
    )


# ----------------------------------------------------------------------------- data


def _lognormal(rng: np.random.Generator, n: int, median: float, sigma: float, lo: int, hi: int):
    x = np.exp(rng.normal(math.log(median), sigma, size=n))
    return np.clip(np.round(x), lo, hi).astype(np.int64)


def sample_sft(rng: np.random.Generator, n: int, vocab: int, median: float, max_tokens: int):
    """`n` SFT examples as (input_ids, assistant_mask) lists: lengths lognormal (median `median`,
    sigma 1.0, clipped to [16, max_tokens]); the first 15-50% of each is the prompt (mask 0)."""
    lens = _lognormal(rng, n, median, 1.0, 16, max_tokens)
    out = []
    for n_tok in lens:
        ids = rng.integers(8, vocab, size=int(n_tok)).tolist()
        p = int(n_tok * rng.uniform(0.15, 0.5))
        out.append((ids, [0] * p + [1] * (int(n_tok) - p)))
    return out


def sample_pref(rng: np.random.Generator, n: int, vocab: int, median: float, max_tokens: int):
    """`n` preference pairs (prompt_ids, chosen_ids, rejected_ids): prompt lognormal (median
    `median`/2), completions lognormal (median `median`), sigma 0.8; a pair (2 x prompt + both
    completions) fits `max_tokens`."""
    out = []
    p_lens = _lognormal(rng, n, median / 2, 0.8, 8, max_tokens // 4)
    c_lens = _lognormal(rng, 2 * n, median, 0.8, 4, max_tokens // 4)
    for k in range(n):
        p, c, r = int(p_lens[k]), int(c_lens[2 * k]), int(c_lens[2 * k + 1])
        tok = lambda m: rng.integers(8, vocab, size=m).tolist()
        out.append((tok(p), tok(c), tok(r)))
    return out


def pick_rows(packed, rows: int, rng: np.random.Generator, min_fill: float = 0.95) -> list[dict]:
    """`rows` rows of a PackedDataset drawn at random among those at least `min_fill` full
    (best-fit decreasing puts the longest sequences first: drawing avoids that bias)."""
    fills = np.array([packed.row(i)["cu_seqlens"][-1].item() for i in range(len(packed))])
    ok = np.flatnonzero(fills >= min_fill * packed.max_tokens)
    if len(ok) < rows:
        raise ValueError(
            f"rows: only {len(ok)} packed rows are >= {min_fill:.0%} full, need {rows}"
        )
    return [packed.row(int(i)) for i in sorted(rng.choice(ok, size=rows, replace=False))]


def pad_batches(
    seqs: list[tuple[list[int], list[int]]], budget: int, pad_id: int = 0
) -> list[dict]:
    """HF-style padded micro-batches of (input_ids, label_mask) sequences in the given order:
    each batch grows while batch_size x longest <= `budget` tokens, then is right-padded to its
    longest. Returns dicts of input_ids/attention_mask/labels [B, L] (labels: the token where the
    mask is 1, else -100, unshifted as HF expects)."""
    batches, cur = [], []

    def flush():
        if not cur:
            return
        width = max(len(s[0]) for s in cur)
        ids = torch.full((len(cur), width), pad_id, dtype=torch.long)
        att = torch.zeros((len(cur), width), dtype=torch.long)
        lab = torch.full((len(cur), width), IGNORE, dtype=torch.long)
        for b, (s, m) in enumerate(cur):
            t = torch.tensor(s)
            ids[b, : len(s)], att[b, : len(s)] = t, 1
            lab[b, : len(s)] = torch.where(torch.tensor(m, dtype=torch.bool), t, IGNORE)
        batches.append({"input_ids": ids, "attention_mask": att, "labels": lab})
        cur.clear()

    for s in seqs:
        width = max([len(s[0])] + [len(c[0]) for c in cur])
        if cur and width * (len(cur) + 1) > budget:
            flush()
        cur.append(s)
    flush()
    return batches


def pad_pair_batches(pairs: list[tuple], budget: int, pad_id: int = 0) -> list[dict]:
    """TRL-style concatenated DPO micro-batches: B pairs -> [2B, L] rows (the B prompt+chosen
    rows, then the B prompt+rejected rows), right-padded, 2B x L <= `budget`. Each dict also
    carries `pair_index` [B] (the pairs' positions in `pairs`)."""
    out, cur = [], []

    def flush():
        if not cur:
            return
        seqs = [(p + c, [0] * len(p) + [1] * len(c)) for _, (p, c, _r) in cur]
        seqs += [(p + r, [0] * len(p) + [1] * len(r)) for _, (p, _c, r) in cur]
        (b,) = pad_batches(seqs, budget=10**12, pad_id=pad_id)
        b["pair_index"] = torch.tensor([k for k, _ in cur])
        out.append(b)
        cur.clear()

    for k, (p, c, r) in enumerate(pairs):
        width = max(
            [len(p) + max(len(c), len(r))] + [len(q[0]) + max(len(q[1]), len(q[2])) for _, q in cur]
        )
        if cur and 2 * width * (len(cur) + 1) > budget:
            flush()
        cur.append((k, (p, c, r)))
    flush()
    return out


def make_data(stage: str, cfg, args, rng) -> dict:
    """The step's data for every variant: packed rows (ours) and padded batches (HF) holding the
    same sequences; counts of real tokens, targets, pairs; the model FLOPs of one step."""
    from r7b_fast.data.packing import pack_preference, pack_sft

    T, median = args.max_tokens, args.median_len
    n = max(64, 4 * args.rows * T // median)
    if stage == "sft":
        examples = sample_sft(rng, n, cfg.vocab_size, median, T)
        rows = pick_rows(pack_sft(examples, T), args.rows, rng)
        chosen = [int(i) for r in rows for i in r["example_ids"]]
        rng.shuffle(chosen)  # HF sees them in a data-loader order, not packed order
        seqs = [examples[i] for i in chosen]
        batches = pad_batches(seqs, T)
        lens = [len(s[0]) for s in seqs]
        n_targets = sum(sum(m[1:]) for _, m in seqs)
        extra = {}
    else:
        pairs = sample_pref(rng, n, cfg.vocab_size, median, T)
        rows = pick_rows(pack_preference(pairs, T), args.rows, rng)
        ids = sorted({int(i) for r in rows for i in r["pair_ids"]})
        local = {pid: k for k, pid in enumerate(ids)}
        for r in rows:  # pair ids -> 0..P-1 so they index the reference table
            r["pair_ids"] = torch.tensor([local[int(i)] for i in r["pair_ids"]])
        order = rng.permutation(len(ids))
        sel = [pairs[ids[k]] for k in order]
        batches = pad_pair_batches(sel, T)
        for b in batches:  # batch positions -> the same 0..P-1 pair numbering
            b["pair_index"] = torch.as_tensor(order[b["pair_index"].numpy()])
        lens = [len(p) + len(c) for p, c, _ in sel] + [len(p) + len(r) for p, _, r in sel]
        n_targets = sum(len(c) + len(r) for _, c, r in sel)
        # precomputed reference log-probs, about what a random-init model gives per token
        comp = torch.tensor(
            [[len(c), len(r)] for p, c, r in (pairs[i] for i in ids)], dtype=torch.float32
        )
        ref = -np.log(cfg.vocab_size) * comp + torch.randn(
            comp.shape, generator=torch.Generator().manual_seed(1)
        )
        extra = {"ref": ref, "n_pairs": len(ids)}
    padded = sum(b["input_ids"].numel() for b in batches)
    return {
        "rows": rows,
        "batches": batches,
        "real_tokens": sum(lens),
        "n_targets": n_targets,
        "padded_tokens": padded,
        "micro_batches_hf": len(batches),
        "flops": step_flops(cfg, lens, n_targets),
        "seq_lens": lens,
        **extra,
    }


def compare(rows: list[dict], tol: dict) -> dict:
    """Ratios of ours to each peer (tokens/s, peak memory) and the first-step loss agreement."""
    out = {}
    for stage in ("sft", "dpo"):
        by = {r["variant"]: r for r in rows if r["stage"] == stage and "error" not in r}
        ours = by.get("ours")
        if not ours:
            continue
        for peer in ("hf", "hf_liger"):
            if peer not in by:
                continue
            p = by[peer]
            out[f"{stage}_speedup_vs_{peer}"] = ours["tokens_per_s"] / p["tokens_per_s"]
            if ours.get("tokens_per_cpu_s") and p.get("tokens_per_cpu_s"):
                cpu_ratio = ours["tokens_per_cpu_s"] / p["tokens_per_cpu_s"]
                out[f"{stage}_cpu_time_speedup_vs_{peer}"] = cpu_ratio
            if ours.get("peak_mem_gib") and p.get("peak_mem_gib"):
                out[f"{stage}_memory_vs_{peer}"] = ours["peak_mem_gib"] / p["peak_mem_gib"]
                extra = ours["peak_extra_gib"] / p["peak_extra_gib"]
                out[f"{stage}_extra_memory_vs_{peer}"] = extra
        if "hf" in by:  # Liger's DPO runs without references, so only hf is comparable there
            rel = abs(ours["loss"] - by["hf"]["loss"]) / max(abs(by["hf"]["loss"]), 1e-12)
            out[f"{stage}_loss_rel_diff"] = rel
            out[f"{stage}_loss_ok"] = rel <= tol[stage]
    return out


# ----------------------------------------------------------------------------- model and devices


def build(cfg, device: torch.device, dtype: torch.dtype):
    """A randomly initialised Cohere2ForCausalLM made directly on `device` in `dtype`, with SDPA
    attention and a config of its own (apply_kernels switches the attention through the model's
    config: a shared one would switch every model built from it)."""
    import copy

    from transformers import Cohere2ForCausalLM

    cfg = copy.deepcopy(cfg)
    cfg._attn_implementation = "sdpa"
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        torch.manual_seed(0)
        with torch.device(device):
            model = Cohere2ForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    return model.train()


def to_dev(d: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in d.items()}


def data_to_device(data: dict, device) -> dict:
    data["rows"] = [to_dev(r, device) for r in data["rows"]]
    data["batches"] = [to_dev(b, device) for b in data["batches"]]
    if "ref" in data:
        data["ref"] = data["ref"].to(device)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return data


# ----------------------------------------------------------------------------- optimizer


@dataclass
class AdamWFp32State:
    """AdamW over bf16 (or any dtype) parameters with fp32 exp_avg / exp_avg_sq and the update
    computed in fp32, then rounded to the parameter's dtype (no fp32 master copy: 12 B/param with
    bf16 params and grads). Large tensors are updated in chunks of `chunk` elements so the fp32
    temporaries stay small next to the 1B-parameter embedding."""

    params: list
    lr: float = 1e-5
    betas: tuple = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.0
    chunk: int = 1 << 26

    def __post_init__(self):
        self.params = [p for p in self.params if p.requires_grad]
        self.exp_avg = [
            torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in self.params
        ]
        self.exp_avg_sq = [torch.zeros_like(m) for m in self.exp_avg]
        self.steps = 0

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        self.steps += 1
        b1, b2 = self.betas
        bc1, bc2 = 1 - b1**self.steps, 1 - b2**self.steps
        for p, m, v in zip(self.params, self.exp_avg, self.exp_avg_sq):
            if p.grad is None:
                continue
            pf, gf, mf, vf = p.view(-1), p.grad.view(-1), m.view(-1), v.view(-1)
            for s in range(0, pf.numel(), self.chunk):
                sl = slice(s, s + self.chunk)
                g = gf[sl].float()
                mf[sl].lerp_(g, 1 - b1)
                vf[sl].mul_(b2).addcmul_(g, g, value=1 - b2)
                denom = vf[sl].sqrt().div_(math.sqrt(bc2)).add_(self.eps)
                w = pf[sl].float()
                if self.weight_decay:
                    w.mul_(1 - self.lr * self.weight_decay)
                w.addcdiv_(mf[sl], denom, value=-self.lr / bc1)
                pf[sl].copy_(w)
