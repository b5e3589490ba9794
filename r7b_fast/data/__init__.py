"""Data: sources, chat rendering, packing, the embedded Arabic task set and tokenizer.

From files to micro-batches::

    rows, counts = sources.load_rows(paths, "sft", tokenizer=tok, max_len=max_tokens)
    seqs = [chat.render_sft(tok, r["messages"]) for r in rows]        # (input_ids, assistant_mask)
    packed = packing.pack_sft(seqs, max_tokens, pad_id=tok.pad_token_id)
    for row in packing.MicroBatchIterator(packed, seed=seed, epochs=2):  # resumable
        ...  # row: input_ids, position_ids, targets (shifted), cu_seqlens, seq_ids, example_ids

Preference data: `sources.load_rows(paths, "preference", ...)`, `chat.render_preference`,
`packing.pack_preference` (chosen and rejected of a pair share a row; `pair_ids`, `is_chosen`).
The embedded default: `synthetic` (task families, `verify`, `make_dataset_dir`) and
`tokenizer.load_tokenizer()` (byte-level BPE, Command-R chat template, cached on disk).
Submodules are imported explicitly (`from r7b_fast.data import packing`); nothing heavy here.
"""
