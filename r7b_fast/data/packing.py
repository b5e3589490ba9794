"""Best-fit-decreasing packing of token sequences into rows of `max_tokens`, and the resumable
micro-batch iterator the trainer consumes.

A packed row is a dict of 1-D torch tensors (T = max_tokens, S = sequences in the row):

| key           | dtype/shape   | meaning                                                            |
| ------------- | ------------- | ------------------------------------------------------------------ |
| input_ids     | int64 [T]     | the sequences back to back, then `pad_id`                          |
| position_ids  | int64 [T]     | 0, 1, ... restarting at every sequence; 0 on padding               |
| targets       | int64 [T]     | input_ids[t+1] iff t+1 is in the same sequence AND trained, else -100 (already shifted: no HF shift later; nothing crosses a boundary; padding is -100) |
| cu_seqlens    | int32 [S+1]   | sequence boundaries, flash-attn style; cu_seqlens[-1] = real tokens (padding is after it, not covered) |
| seq_ids       | int64 [T]     | 0..S-1 = the sequence of token t within the row, -1 on padding       |
| example_ids   | int64 [S]     | each sequence's index in the packed dataset (SFT: the example; preference: the pair) |
| pair_ids      | int64 [S]     | preference only: the pair's index in the dataset (= example_ids)   |
| is_chosen     | bool [S]      | preference only: True for the chosen sequence, False for the rejected |

Preference pairs are packed as one unit, chosen sequence then rejected sequence, so both halves
of a pair are always in the same row (hence the same micro-batch).

Best-fit decreasing, exactly: sequences sorted by decreasing length (ties by index) each go to
the open row with the least room that still fits them, else to a new row. It runs in
O(distinct lengths x distinct room values) Python steps plus numpy, not O(n) Python steps:
rows with equal room are interchangeable, so rows live in buckets by remaining room, and a run
of k equal-length sequences fills the smallest fitting bucket's rows one after another (a row
with room c takes floor(c/L) of them: after each, it is still the best fit). 1M lengths: well
under a second.
"""

from __future__ import annotations

import bisect
import logging
import math
from collections.abc import Iterable

import numpy as np

IGNORE_INDEX = -100
log = logging.getLogger(__name__)


class _RoomBuckets:
    """Open rows bucketed by remaining room (> 0), with the sorted list of non-empty rooms."""

    def __init__(self):
        self.buckets: dict[int, list[int]] = {}
        self.rooms: list[int] = []

    def put(self, room: int, bins) -> None:
        if room <= 0:
            return
        if room in self.buckets:
            self.buckets[room].extend(bins)
        else:
            self.buckets[room] = list(bins)
            bisect.insort(self.rooms, room)

    def fill(self, L: int, k: int, chunks: list, moved: list) -> int:
        """Place k items of length L best-fit into existing rows; returns how many are left.

        Walks the buckets from the least room >= L up; a row with room c takes floor(c/L)
        items (it stays the best fit until it has room < L). Rows that took items are listed
        in `moved` with their new room (< L, so they cannot be visited again in this run)."""
        buckets, rooms = self.buckets, self.rooms
        j = i = bisect.bisect_left(rooms, L)
        while k and j < len(rooms):
            c = rooms[j]
            q, bins = c // L, buckets[c]
            if len(bins) * q <= k:  # every row of this bucket takes q items
                chunks.append((bins, q))
                moved.append((c - q * L, bins))
                k -= len(bins) * q
                del buckets[c]
                j += 1
                continue
            m, rem = divmod(k, q)  # m rows take q items, then one row takes rem
            chunks.append((bins[:m], q))
            moved.append((c - q * L, bins[:m]))
            if rem:
                chunks.append((bins[m : m + 1], rem))
                moved.append((c - rem * L, bins[m : m + 1]))
            rest = bins[m + (rem > 0) :]
            if rest:
                buckets[c] = rest
            else:
                del buckets[c]
                j += 1
            k = 0
        del rooms[i:j]
        return k


def bfd_bins(lengths, max_tokens: int) -> tuple[np.ndarray, int]:
    """Best-fit-decreasing assignment: `(bin_of_item int64[N], num_bins)`.

    `lengths`: 1-D ints in [1, max_tokens]. Bins are numbered in creation order (the first
    holds the longest sequence). Equal lengths are placed in index order; among rows with the
    same (least sufficient) room the choice is deterministic but unspecified -- such rows are
    interchangeable, so the multiset of row loads is exactly best-fit-decreasing's.
    """
    lengths = np.asarray(lengths)
    if lengths.ndim != 1 or not np.issubdtype(lengths.dtype, np.integer):
        raise ValueError("lengths: expected a 1-D integer array")
    if not isinstance(max_tokens, (int, np.integer)) or max_tokens < 1:
        raise ValueError(f"max_tokens: expected an int >= 1, got {max_tokens!r}")
    if lengths.size == 0:
        return np.zeros(0, dtype=np.int64), 0
    if lengths.min() < 1 or lengths.max() > max_tokens:
        raise ValueError(
            f"lengths: every length must be in [1, max_tokens={max_tokens}], got "
            f"[{lengths.min()}, {lengths.max()}]"
        )
    order = np.argsort(-lengths.astype(np.int64), kind="stable")
    sorted_len = lengths[order]
    cut = np.flatnonzero(np.diff(sorted_len)) + 1
    group_len = sorted_len[np.concatenate(([0], cut))].tolist()
    group_cnt = np.diff(np.concatenate(([0], cut, [len(sorted_len)]))).tolist()

    rows = _RoomBuckets()
    chunks: list = []  # (rows, items each), in placement order
    num_bins = 0
    for L, k in zip(group_len, group_cnt):
        moved: list = []  # (new room, rows): re-bucketed after the run, below L anyway
        k = rows.fill(L, k, chunks, moved)
        if k:  # open new rows, each filled with q items
            q = max_tokens // L
            m, rem = divmod(k, q)
            chunks.append((range(num_bins, num_bins + m), q))
            moved.append((max_tokens - q * L, range(num_bins, num_bins + m)))
            if rem:
                chunks.append((range(num_bins + m, num_bins + m + 1), rem))
                moved.append((max_tokens - rem * L, range(num_bins + m, num_bins + m + 1)))
            num_bins += m + (rem > 0)
        for room, bins in moved:
            rows.put(room, bins)

    ids = np.fromiter((b for bins, _ in chunks for b in bins), dtype=np.int64)
    reps = np.repeat([q for _, q in chunks], [len(bins) for bins, _ in chunks])
    out = np.empty(len(lengths), dtype=np.int64)
    out[order] = np.repeat(ids, reps)
    return out, num_bins


def packing_efficiency(lengths, num_rows: int, max_tokens: int) -> float:
    """Share of real tokens in `num_rows` rows of `max_tokens`: sum(lengths) / (rows * T)."""
    return float(np.sum(lengths)) / max(1, num_rows * max_tokens)


def naive_padding_efficiency(lengths, batch_size: int) -> float:
    """Real-token share when batches of `batch_size` consecutive sequences are each padded to
    their longest sequence (what a padding collator does)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    n = len(lengths)
    padded = np.zeros(-(-n // batch_size) * batch_size, dtype=np.int64)
    padded[:n] = lengths
    longest = padded.reshape(-1, batch_size).max(axis=1)
    slots = longest * batch_size
    slots[-1] = longest[-1] * (n - (len(longest) - 1) * batch_size)
    return float(lengths.sum()) / max(1, int(slots.sum()))


def _flat(seqs, dtype) -> np.ndarray:
    if not len(seqs):
        return np.zeros(0, dtype=dtype)
    return np.concatenate([np.asarray(s, dtype=dtype) for s in seqs])


class PackedDataset:
    """Sequences packed into rows; `row(i)` builds row i's tensors on demand.

    Holds the flat token buffer, the trained-token flags and the BFD plan. Units (an SFT
    sequence, or a preference pair = two sequences) are what BFD packs; `len()` is the number
    of rows. `efficiency` = real tokens / (rows x max_tokens).
    """

    def __init__(self, seqs, trained, unit_of_seq, is_chosen, max_tokens: int, pad_id: int):
        lens = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
        if lens.size and lens.min() < 1:
            raise ValueError("sequences: every sequence needs at least one token")
        self.max_tokens, self.pad_id = int(max_tokens), int(pad_id)
        self.starts = np.concatenate(([0], np.cumsum(lens)[:-1])).astype(np.int64)
        self.lengths = lens
        self.tokens = _flat(seqs, np.int64)
        self.trained = _flat(trained, bool)
        if len(self.trained) != len(self.tokens):
            raise ValueError("sequences: token and mask lengths differ")
        self.unit_of_seq = np.asarray(unit_of_seq, dtype=np.int64)
        self.is_chosen = None if is_chosen is None else np.asarray(is_chosen, dtype=bool)
        unit_len = np.bincount(self.unit_of_seq, weights=lens).astype(np.int64)
        if unit_len.size and unit_len.max() > max_tokens:
            bad = int(np.argmax(unit_len))
            raise ValueError(
                f"max_tokens: example {bad} needs {unit_len[bad]} tokens > max_tokens={max_tokens}"
                " (filter over-long rows first: sources.load_rows(..., max_len=...))"
            )
        bin_of_unit, self.num_rows = bfd_bins(unit_len, max_tokens)
        bin_of_seq = bin_of_unit[self.unit_of_seq]
        # sequences grouped by row; within a row in index order (a pair: chosen, then rejected)
        self.seq_order = np.argsort(bin_of_seq, kind="stable")
        self.row_offsets = np.concatenate(
            ([0], np.cumsum(np.bincount(bin_of_seq, minlength=self.num_rows)))
        )
        self.efficiency = packing_efficiency(lens, self.num_rows, max_tokens)

    def __len__(self) -> int:
        return self.num_rows

    def stats(self) -> dict:
        """num_sequences, num_rows, real_tokens, trained_tokens, efficiency."""
        return {
            "num_sequences": int(len(self.lengths)),
            "num_rows": int(self.num_rows),
            "real_tokens": int(self.lengths.sum()),
            "trained_tokens": int(self.trained.sum()),
            "efficiency": self.efficiency,
        }

    def row(self, i: int) -> dict:
        """Row `i` as a dict of 1-D tensors (see the module docstring)."""
        import torch

        if not 0 <= i < self.num_rows:
            raise IndexError(f"row {i} out of range [0, {self.num_rows})")
        seqs = self.seq_order[self.row_offsets[i] : self.row_offsets[i + 1]]
        lens, starts = self.lengths[seqs], self.starts[seqs]
        n, T = int(lens.sum()), self.max_tokens
        idx = np.repeat(starts - np.cumsum(np.concatenate(([0], lens[:-1]))), lens) + np.arange(n)
        seq_ids = np.full(T, -1, dtype=np.int64)
        seq_ids[:n] = np.repeat(np.arange(len(seqs)), lens)
        input_ids = np.full(T, self.pad_id, dtype=np.int64)
        input_ids[:n] = self.tokens[idx]
        cu = np.concatenate(([0], np.cumsum(lens))).astype(np.int32)
        position_ids = np.zeros(T, dtype=np.int64)
        position_ids[:n] = np.arange(n) - np.repeat(cu[:-1].astype(np.int64), lens)
        targets = np.full(T, IGNORE_INDEX, dtype=np.int64)
        # target of t: token t+1 iff it is in the same sequence and trained
        keep = (seq_ids[1:n] == seq_ids[: n - 1]) & self.trained[idx[1:]]
        targets[: n - 1][keep] = input_ids[1:n][keep]
        out = {
            "input_ids": torch.from_numpy(input_ids),
            "position_ids": torch.from_numpy(position_ids),
            "targets": torch.from_numpy(targets),
            "cu_seqlens": torch.from_numpy(cu),
            "seq_ids": torch.from_numpy(seq_ids),
            "example_ids": torch.from_numpy(self.unit_of_seq[seqs].copy()),
        }
        if self.is_chosen is not None:
            out["pair_ids"] = out["example_ids"].clone()
            out["is_chosen"] = torch.from_numpy(self.is_chosen[seqs].copy())
        return out


def _as_sft(example) -> tuple[list[int], list[int]]:
    if isinstance(example, dict):
        return example["input_ids"], example["assistant_mask"]
    ids, mask = example
    return ids, mask


def pack_sft(examples: Iterable, max_tokens: int, *, pad_id: int = 0) -> PackedDataset:
    """Pack SFT sequences with best-fit decreasing.

    `examples`: `(input_ids, assistant_mask)` pairs (as `chat.render_sft` returns) or dicts
    with those keys; each at most `max_tokens` long (else ValueError). Only tokens with mask 1
    are targets. Logs the packing efficiency.
    """
    seqs, masks = [], []
    for k, ex in enumerate(examples):
        ids, mask = _as_sft(ex)
        if len(ids) != len(mask):
            raise ValueError(f"examples[{k}]: input_ids and assistant_mask lengths differ")
        seqs.append(ids)
        masks.append(mask)
    packed = PackedDataset(seqs, masks, np.arange(len(seqs)), None, max_tokens, pad_id)
    log.info("packed %d SFT sequences into %d rows of %d: efficiency %.2f%%",
             len(seqs), len(packed), max_tokens, 100 * packed.efficiency)  # fmt: skip
    return packed


def pack_preference(pairs: Iterable, max_tokens: int, *, pad_id: int = 0) -> PackedDataset:
    """Pack preference pairs: each `(prompt_ids, chosen_ids, rejected_ids)` (as
    `chat.render_preference` returns) becomes two sequences, prompt+chosen (is_chosen True)
    and prompt+rejected, packed together as one unit so they share a row; only the completion
    tokens are targets. A pair needs 2*len(prompt) + len(chosen) + len(rejected) <= max_tokens.
    """
    seqs, masks, units, chosen = [], [], [], []
    for k, (p, c, r) in enumerate(pairs):
        if not c or not r:
            raise ValueError(f"pairs[{k}]: empty chosen or rejected completion")
        for comp, flag in ((c, True), (r, False)):
            seqs.append(list(p) + list(comp))
            masks.append([0] * len(p) + [1] * len(comp))
            units.append(k)
            chosen.append(flag)
    packed = PackedDataset(seqs, masks, units, chosen, max_tokens, pad_id)
    log.info("packed %d preference pairs into %d rows of %d: efficiency %.2f%%",
             len(seqs) // 2, len(packed), max_tokens, 100 * packed.efficiency)  # fmt: skip
    return packed


class MicroBatchIterator:
    """Resumable iterator over the rows of a `PackedDataset` (one row = one micro-batch).

    Epoch e visits this rank's share of the rows in the order of a permutation seeded by
    `(seed, e)` (identity when `shuffle=False`). With `world_size` > 1 each epoch's order is
    split round-robin and cut to a multiple of `world_size`, so every rank gets
    `steps_per_epoch` rows. `epochs` may be fractional: the iterator stops after
    `total_steps = ceil(epochs * steps_per_epoch)` rows (`len(it)`); `epochs=None` cycles
    forever (`total_steps` None). `state_dict()` after k rows,
    restored with `load_state_dict()` into a fresh iterator built on the same packed data,
    continues with exactly row k+1.
    """

    def __init__(
        self,
        packed: PackedDataset,
        *,
        seed: int = 0,
        shuffle: bool = True,
        epochs: float | None = 1,
        rank: int = 0,
        world_size: int = 1,
    ):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"rank/world_size: need 0 <= rank < world_size, got {rank}/{world_size}"
            )
        if len(packed) < world_size:
            raise ValueError(f"packed: {len(packed)} rows cannot feed world_size={world_size}")
        if epochs is not None and not epochs > 0:
            raise ValueError(f"epochs: expected None or > 0, got {epochs}")
        self.packed, self.seed, self.shuffle, self.epochs = packed, int(seed), shuffle, epochs
        self.rank, self.world_size = rank, world_size
        self.steps_per_epoch = len(packed) // world_size
        self.total_steps = None if epochs is None else math.ceil(epochs * self.steps_per_epoch)
        self.epoch, self.index = 0, 0
        self._order_epoch, self._order = None, None

    def _epoch_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            n = len(self.packed)
            order = np.arange(n)
            if self.shuffle:
                order = np.random.default_rng([self.seed, self.epoch]).permutation(n)
            self._order = order[: self.steps_per_epoch * self.world_size][
                self.rank :: self.world_size
            ]
            self._order_epoch = self.epoch
        return self._order

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.index >= self.steps_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        if self.total_steps is not None and self.steps_done() >= self.total_steps:
            raise StopIteration
        row = self.packed.row(int(self._epoch_order()[self.index]))
        self.index += 1
        return row

    def steps_done(self) -> int:
        """Rows yielded so far (over all epochs)."""
        return self.epoch * self.steps_per_epoch + self.index

    def __len__(self) -> int:
        if self.total_steps is None:
            raise TypeError("an iterator with epochs=None has no length")
        return self.total_steps

    def state_dict(self) -> dict:
        """Plain ints/bools: epoch, index (rows consumed in this epoch), seed, shuffle,
        num_rows, rank, world_size."""
        return {
            "epoch": self.epoch,
            "index": self.index,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "num_rows": len(self.packed),
            "rank": self.rank,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a position; the data, seed, shuffle and world layout must be the same."""
        for key in ("seed", "shuffle", "num_rows", "rank", "world_size"):
            mine = self.state_dict()[key]
            if state.get(key) != mine:
                raise ValueError(
                    f"state: {key}={state.get(key)!r} does not match this iterator's {mine!r}"
                )
        if not 0 <= state["index"] <= self.steps_per_epoch or state["epoch"] < 0:
            raise ValueError(
                f"state: position epoch={state['epoch']} index={state['index']} out of range"
            )
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
