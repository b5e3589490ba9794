"""Packing: BFD against a brute-force reference, row invariants, unpacking, preference pairs,
efficiency on a lognormal length distribution, and the resumable iterator."""

from __future__ import annotations

import numpy as np
import pytest

from r7b_fast.data.packing import (
    IGNORE_INDEX,
    MicroBatchIterator,
    bfd_bins,
    naive_padding_efficiency,
    pack_preference,
    pack_sft,
    packing_efficiency,
)


def _reference_bfd_rooms(lengths, T):
    """Textbook best-fit decreasing, O(n * bins): the sorted list of final free room per bin."""
    rooms = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        fits = [b for b, r in enumerate(rooms) if r >= lengths[i]]
        if fits:
            best = min(fits, key=lambda b: rooms[b])
        else:
            rooms.append(T)
            best = len(rooms) - 1
        rooms[best] -= lengths[i]
    return sorted(rooms)


@pytest.mark.parametrize("seed", range(60))
def test_bfd_matches_reference(seed):
    rng = np.random.default_rng(seed)
    T = int(rng.integers(1, 70))
    lengths = rng.integers(1, T + 1, size=int(rng.integers(0, 120)))
    if seed % 3 == 0:  # many duplicates: exercises the equal-length runs
        lengths = rng.choice(rng.integers(1, T + 1, size=3), size=len(lengths))
    bins, n = bfd_bins(lengths, T)
    loads = np.bincount(bins, weights=lengths, minlength=n).astype(int)
    assert loads.max(initial=0) <= T
    # rows with equal room are interchangeable, so the multiset of rooms is BFD's exactly
    assert sorted((T - loads).tolist()) == _reference_bfd_rooms(lengths.tolist(), T)


def test_bfd_rejects_bad_lengths():
    with pytest.raises(ValueError, match="lengths"):
        bfd_bins([3, 9], 8)
    with pytest.raises(ValueError, match="lengths"):
        bfd_bins([0, 2], 8)
    with pytest.raises(ValueError, match="max_tokens"):
        bfd_bins([1], 0)


def _random_sft(rng, n, max_len):
    out = []
    for _ in range(n):
        L = int(rng.integers(1, max_len + 1))
        ids = rng.integers(3, 1000, size=L).tolist()
        mask = (rng.random(L) < 0.6).astype(int).tolist()
        out.append((ids, mask))
    return out


def _check_row(row, T):
    ids, pos, tgt = row["input_ids"].numpy(), row["position_ids"].numpy(), row["targets"].numpy()
    cu, sid = row["cu_seqlens"].numpy(), row["seq_ids"].numpy()
    assert ids.shape == pos.shape == tgt.shape == sid.shape == (T,)
    assert str(cu.dtype) == "int32"
    assert all(str(x.dtype) == "int64" for x in (ids, pos, tgt, sid))
    n = int(cu[-1])
    assert cu[0] == 0 and np.all(np.diff(cu) > 0)
    assert np.all(sid[n:] == -1) and np.all(pos[n:] == 0) and np.all(tgt[n:] == IGNORE_INDEX)
    for s in range(len(cu) - 1):
        a, b = cu[s], cu[s + 1]
        assert np.all(sid[a:b] == s)
        assert np.array_equal(pos[a:b], np.arange(b - a))  # restarts at every boundary
        assert tgt[b - 1] == IGNORE_INDEX  # nothing predicts across a boundary
    # every target is the next token of the same sequence
    t = np.flatnonzero(tgt != IGNORE_INDEX)
    assert np.all(sid[t] == sid[t + 1]) and np.array_equal(tgt[t], ids[t + 1])
    return n


@pytest.mark.parametrize("seed", range(5))
def test_sft_rows_invariants_and_unpacking(seed):
    rng = np.random.default_rng(seed)
    T = 64
    examples = _random_sft(rng, 200, T)
    packed = pack_sft(examples, T, pad_id=0)
    seen = []
    real = 0
    for r in range(len(packed)):
        row = packed.row(r)
        real += _check_row(row, T)
        cu, ids, tgt = row["cu_seqlens"].numpy(), row["input_ids"].numpy(), row["targets"].numpy()
        for s, ex in enumerate(row["example_ids"].tolist()):
            want_ids, want_mask = examples[ex]
            a, b = cu[s], cu[s + 1]
            assert ids[a:b].tolist() == want_ids  # unpacking recovers the sequence exactly
            want_tgt = [
                want_ids[t + 1] if want_mask[t + 1] else IGNORE_INDEX for t in range(b - a - 1)
            ]
            assert tgt[a : b - 1].tolist() == want_tgt
            seen.append(ex)
    assert sorted(seen) == list(range(len(examples)))  # each sequence exactly once
    lengths = [len(e[0]) for e in examples]
    assert real == sum(lengths)
    assert packed.efficiency == pytest.approx(sum(lengths) / (len(packed) * T))


def test_full_row_without_padding():
    packed = pack_sft([([5, 6, 7, 8], [0, 1, 1, 1]), ([9, 10, 11, 12], [1, 1, 1, 1])], 4)
    assert len(packed) == 2
    row = packed.row(0)
    assert row["targets"].tolist() == [6, 7, 8, IGNORE_INDEX]
    assert row["cu_seqlens"].tolist() == [0, 4]


def test_sft_too_long_is_an_error():
    with pytest.raises(ValueError, match="max_tokens"):
        pack_sft([([1] * 9, [1] * 9)], 8)


def test_preference_pairs_share_a_row():
    rng = np.random.default_rng(0)
    T = 96
    pairs = []
    for _ in range(150):
        p = rng.integers(3, 900, size=int(rng.integers(1, 20))).tolist()
        c = rng.integers(3, 900, size=int(rng.integers(1, 20))).tolist()
        r = rng.integers(3, 900, size=int(rng.integers(1, 20))).tolist()
        pairs.append((p, c, r))
    packed = pack_preference(pairs, T)
    seen = {}
    for i in range(len(packed)):
        row = packed.row(i)
        _check_row(row, T)
        cu, ids, tgt = row["cu_seqlens"].numpy(), row["input_ids"].numpy(), row["targets"].numpy()
        assert row["pair_ids"].tolist() == row["example_ids"].tolist()
        for s, (pid, chosen) in enumerate(zip(row["pair_ids"].tolist(), row["is_chosen"].tolist())):
            p, c, r = pairs[pid]
            comp = c if chosen else r
            a, b = cu[s], cu[s + 1]
            assert ids[a:b].tolist() == p + comp
            # only completion tokens are targets: prompt's last token predicts the first answer token
            assert tgt[a : b - 1].tolist() == [IGNORE_INDEX] * (len(p) - 1) + comp
            seen.setdefault(pid, []).append((i, chosen))
    assert sorted(seen) == list(range(len(pairs)))
    for where in seen.values():  # both halves, in the same row (= same micro-batch)
        assert len(where) == 2 and where[0][0] == where[1][0]
        assert sorted(w[1] for w in where) == [False, True]


def test_efficiency_lognormal():
    """>= 99% real tokens with max_tokens 8192 on lognormal lengths with median ~500."""
    rng = np.random.default_rng(0)
    lengths = np.clip(np.round(rng.lognormal(np.log(500), 1.0, 100_000)), 1, 8192).astype(np.int64)
    assert 450 < np.median(lengths) < 550
    bins, n = bfd_bins(lengths, 8192)
    eff = packing_efficiency(lengths, n, 8192)
    naive = naive_padding_efficiency(lengths, batch_size=16)
    print(f"\nBFD efficiency {eff:.4%}  vs naive padding (batches of 16) {naive:.4%}")
    assert eff >= 0.99
    assert np.bincount(bins, weights=lengths).max() <= 8192
    # the padding baseline, written out: pad each batch of 16 to its longest
    ref = lengths.sum() / sum(
        lengths[i : i + 16].max() * len(lengths[i : i + 16]) for i in range(0, len(lengths), 16)
    )
    assert naive == pytest.approx(ref, rel=1e-12)


def _ids(it, k=None):
    out = []
    for row in it:
        out.append(tuple(row["example_ids"].tolist()))
        if k is not None and len(out) == k:
            break
    return out


def test_iterator_resume_and_determinism():
    rng = np.random.default_rng(1)
    packed = pack_sft(_random_sft(rng, 120, 32), 32)
    n = len(packed)
    full = _ids(MicroBatchIterator(packed, seed=3, epochs=3))
    assert len(full) == 3 * n
    assert full == _ids(MicroBatchIterator(packed, seed=3, epochs=3))  # deterministic
    assert full[:n] != _ids(MicroBatchIterator(packed, seed=4, epochs=1))  # the seed matters
    assert full[:n] != full[n : 2 * n]  # a new order each epoch
    assert sorted(full[:n]) == sorted(full[n : 2 * n])  # each epoch covers every row once
    for k in (0, 1, n - 1, n, n + 5, 3 * n):  # including epoch boundaries and the very end
        it = MicroBatchIterator(packed, seed=3, epochs=3)
        head = _ids(it, k) if k else []
        state = it.state_dict()
        resumed = MicroBatchIterator(packed, seed=3, epochs=3)
        resumed.load_state_dict(state)
        assert head + _ids(resumed) == full
    with pytest.raises(ValueError, match="seed"):
        MicroBatchIterator(packed, seed=5).load_state_dict(state)


def test_iterator_ranks_split_rows():
    rng = np.random.default_rng(2)
    packed = pack_sft(_random_sft(rng, 101, 32), 32)
    per_rank = [_ids(MicroBatchIterator(packed, seed=0, rank=r, world_size=3)) for r in range(3)]
    assert len({len(x) for x in per_rank}) == 1 and len(per_rank[0]) == len(packed) // 3
    flat = [x for rank in per_rank for x in rank]
    assert len(set(flat)) == len(flat)  # disjoint
    ordered = _ids(MicroBatchIterator(packed, seed=0, shuffle=False))
    assert ordered == [tuple(packed.row(i)["example_ids"].tolist()) for i in range(len(packed))]


def test_iterator_fractional_epochs():
    rng = np.random.default_rng(3)
    packed = pack_sft(_random_sft(rng, 60, 32), 32)
    n = len(packed)
    it = MicroBatchIterator(packed, seed=1, epochs=1.5)
    assert len(it) == -(-3 * n // 2)
    rows = _ids(it)
    assert len(rows) == len(it) and it.steps_done() == len(it)
    assert rows == _ids(MicroBatchIterator(packed, seed=1, epochs=2))[: len(rows)]
    forever = MicroBatchIterator(packed, seed=1, epochs=None)
    assert len(_ids(forever, 5 * n)) == 5 * n
    with pytest.raises(ValueError, match="epochs"):
        MicroBatchIterator(packed, epochs=0)
