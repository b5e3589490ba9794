"""Load training rows from local files through `datasets`, validate TRL's schemas, count bad rows.

Inputs: JSONL/JSON (`.jsonl`, `.json`), Parquet (`.parquet`), or a directory written by
`Dataset.save_to_disk` / `DatasetDict.save_to_disk` (its `split`, default "train"). A JSONL
whose rows disagree in type cannot become one Arrow table; such a file is then read line by
line, so its bad rows are counted instead of failing the whole file.

Schemas (as TRL uses them):
- `kind="sft"`: `messages` = list of `{"role": "system"|"user"|"assistant", "content": str}`
  with at least one assistant turn. A ShareGPT row (`conversations` = list of `{"from":
  "human"|"gpt"|"system", "value": str}`, no `messages`) is converted to that schema.
- `kind="preference"`: `prompt`, `chosen`, `rejected`, either three strings, or a prompt
  conversation plus `chosen`/`rejected` conversations holding the assistant answer. TRL's
  "implicit prompt" rows (only `chosen`/`rejected` full conversations) are split at their
  longest common prefix.
- `kind="prompt"` (on-policy DPO): `prompt`, a string or a conversation (+ any task metadata).

Every skipped row is counted under one reason, checked in this order: `unparseable` (not JSON
/ not an object), `missing_field`, `wrong_type`, `bad_role`, `empty_turn` (empty or blank
content, or an empty conversation), `no_assistant_turn`, `too_long` (only when a tokenizer
and `max_len` are given: the rendered sequence, or for a preference pair the packed unit
2*prompt + chosen + rejected, exceeds `max_len`). Counts are returned and logged; a source
with no valid row is an error.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

from r7b_fast.data.chat import SequenceTooLong, render_preference, render_prompt, render_sft

log = logging.getLogger(__name__)
ROLES = ("system", "user", "assistant")
REASONS = (
    "unparseable",
    "missing_field",
    "wrong_type",
    "bad_role",
    "empty_turn",
    "no_assistant_turn",
    "too_long",
)
KINDS = ("sft", "preference", "prompt")
EXPECTED = {
    "sft": "'messages': [{role: system|user|assistant, content: str}, ...] with an assistant "
    "turn (ShareGPT 'conversations': [{from: human|gpt|system, value: str}, ...] is converted)",
    "preference": "'prompt', 'chosen', 'rejected': three strings, or a 'prompt' conversation "
    "plus 'chosen'/'rejected' assistant conversations (TRL's implicit-prompt rows too)",
    "prompt": "'prompt': a string or a conversation [{role, content}, ...] (+ task metadata)",
}
"""The schema each kind expects, in words (for error messages)."""
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


class _Bad(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# ----------------------------------------------------------------------------- reading


def _read_jsonl_lines(path: Path) -> list:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                rows.append(None)  # counted as unparseable
    return rows


def read_records(path):
    """All records of one source as a list of Python objects (dicts; None for an unparseable
    JSONL line), or the `DatasetDict` of a saved multi-split directory."""
    try:
        import datasets
    except ImportError as e:  # the `train` extra, not a core dependency
        raise ImportError("reading data files needs datasets: pip install 'r7b-fast[train]'") from e

    path = Path(path)
    if path.is_dir():
        ds = datasets.load_from_disk(str(path))
        return ds.to_list() if isinstance(ds, datasets.Dataset) else ds
    if not path.exists():
        raise ValueError(f"path: {path} does not exist")
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".json", ".parquet"):
        raise ValueError(f"path: {path}: expected .jsonl, .json, .parquet or a datasets directory")
    bars_were_off = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory(prefix="r7b_fast_ds.") as cache:
        builder = "parquet" if suffix == ".parquet" else "json"
        try:
            ds = datasets.load_dataset(
                builder, data_files=str(path), split="train", cache_dir=cache
            )
            return ds.to_list()
        except Exception as err:  # Arrow cannot type mixed rows: count them one by one
            if builder == "parquet":
                raise
            log.info("%s: datasets could not build one table (%s); reading lines", path, err)
        finally:
            if not bars_were_off:
                datasets.enable_progress_bars()
    return _read_jsonl_lines(path)


def _records(path_or_paths, split: str) -> list:
    paths = (
        [path_or_paths] if isinstance(path_or_paths, (str, os.PathLike)) else list(path_or_paths)
    )
    if not paths:
        raise ValueError("path_or_paths: no source given")
    out = []
    for p in paths:
        recs = read_records(p)
        if not isinstance(recs, list):  # a DatasetDict
            if split not in recs:
                raise ValueError(f"path: {p} has splits {list(recs)}, not {split!r}")
            recs = recs[split].to_list()
        out += recs
    return out


# ----------------------------------------------------------------------------- validation


def _check_conversation(msgs, *, need_assistant: bool) -> list[dict]:
    if msgs is None:
        raise _Bad("missing_field")
    if not isinstance(msgs, list):
        raise _Bad("wrong_type")
    if not msgs:
        raise _Bad("empty_turn")
    for m in msgs:
        if not isinstance(m, dict):
            raise _Bad("wrong_type")
        if m.get("role") is None or m.get("content") is None:
            raise _Bad("missing_field")
        if not isinstance(m["role"], str) or not isinstance(m["content"], str):
            raise _Bad("wrong_type")
    for m in msgs:
        if m["role"] not in ROLES:
            raise _Bad("bad_role")
    if any(not m["content"].strip() for m in msgs):
        raise _Bad("empty_turn")
    if need_assistant and not any(m["role"] == "assistant" for m in msgs):
        raise _Bad("no_assistant_turn")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def _split_implicit_prompt(row: dict) -> dict:
    chosen, rejected = row.get("chosen"), row.get("rejected")
    if not isinstance(chosen, list) or not isinstance(rejected, list):
        raise _Bad("missing_field")
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        raise _Bad("missing_field")
    return {**row, "prompt": chosen[:n], "chosen": chosen[n:], "rejected": rejected[n:]}


def _check_preference(row: dict) -> dict:
    if "prompt" not in row or row["prompt"] is None:
        row = _split_implicit_prompt(row)
    p, c, r = row.get("prompt"), row.get("chosen"), row.get("rejected")
    if p is None or c is None or r is None:
        raise _Bad("missing_field")
    if all(isinstance(x, str) for x in (p, c, r)):
        if not (p.strip() and c.strip() and r.strip()):
            raise _Bad("empty_turn")
        return row
    if not all(isinstance(x, list) for x in (p, c, r)):
        raise _Bad("wrong_type")
    p = _check_conversation(p, need_assistant=False)
    c = _check_conversation(c, need_assistant=True)
    r = _check_conversation(r, need_assistant=True)
    return {**row, "prompt": p, "chosen": c, "rejected": r}


def _check_prompt(row: dict) -> dict:
    p = row.get("prompt")
    if p is None:
        raise _Bad("missing_field")
    if isinstance(p, str):
        if not p.strip():
            raise _Bad("empty_turn")
        return row
    return {**row, "prompt": _check_conversation(p, need_assistant=False)}


def _check_length(row: dict, kind: str, tokenizer, max_len: int) -> None:
    try:
        if kind == "sft":
            render_sft(tokenizer, row["messages"], max_len)
        elif kind == "preference":
            p, c, r = render_preference(tokenizer, row)
            if 2 * len(p) + len(c) + len(r) > max_len:
                raise SequenceTooLong("pair")
        else:
            msgs = row["prompt"]
            msgs = [{"role": "user", "content": msgs}] if isinstance(msgs, str) else msgs
            if len(render_prompt(tokenizer, msgs)) > max_len:
                raise SequenceTooLong("prompt")
    except SequenceTooLong as err:
        raise _Bad("too_long") from err


def validate_row(row, kind: str = "sft", *, tokenizer=None, max_len: int | None = None) -> dict:
    """The row, normalised (messages reduced to role/content), or raise ValueError(reason)."""
    try:
        return _validate(row, kind, tokenizer, max_len)
    except _Bad as bad:
        raise ValueError(bad.reason) from None


def _from_sharegpt(row: dict) -> dict:
    """A ShareGPT row (`conversations` of from/value) as a `messages` row; other rows as given."""
    conv = row.get("conversations")
    if row.get("messages") is not None or not isinstance(conv, list):
        return row
    msgs = []
    for m in conv:
        if not isinstance(m, dict) or m.get("from") is None or m.get("value") is None:
            raise _Bad("missing_field")
        if m["from"] not in SHAREGPT_ROLES:
            raise _Bad("bad_role")
        msgs.append({"role": SHAREGPT_ROLES[m["from"]], "content": m["value"]})
    out = {k: v for k, v in row.items() if k != "conversations"}
    return {**out, "messages": msgs}


def _validate(row, kind, tokenizer, max_len):
    if not isinstance(row, dict):
        raise _Bad("unparseable")
    if kind == "sft":
        row = _from_sharegpt(row)
        row = {**row, "messages": _check_conversation(row.get("messages"), need_assistant=True)}
    elif kind == "preference":
        row = _check_preference(row)
    else:
        row = _check_prompt(row)
    if tokenizer is not None and max_len is not None:
        _check_length(row, kind, tokenizer, max_len)
    return row


def load_rows(
    path_or_paths,
    kind: str = "sft",
    *,
    tokenizer=None,
    max_len: int | None = None,
    split: str = "train",
    allow_empty: bool = False,
) -> tuple[list[dict], dict[str, int]]:
    """Load and validate rows: `(valid rows, counts)`.

    `path_or_paths`: one path or a list (concatenated in order). `kind`: "sft", "preference"
    or "prompt" (see the module docstring). With `tokenizer` and `max_len`, rows whose
    rendering is longer than `max_len` are skipped as `too_long`. `counts` has `total`, `kept`
    and one entry per reason in `REASONS` (0 when none). Raises ValueError when no row is
    valid (the message carries the counts), unless `allow_empty` (the caller reports it).
    """
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
    if (tokenizer is None) != (max_len is None):
        raise ValueError("max_len: give both tokenizer and max_len, or neither")
    records = _records(path_or_paths, split)
    counts = {"total": len(records), "kept": 0, **dict.fromkeys(REASONS, 0)}
    rows = []
    for rec in records:
        try:
            rows.append(_validate(rec, kind, tokenizer, max_len))
        except _Bad as bad:
            counts[bad.reason] += 1
    counts["kept"] = len(rows)
    skipped = {r: counts[r] for r in REASONS if counts[r]}
    msg = f"{path_or_paths} ({kind}): kept {len(rows)} of {len(records)} rows"
    if skipped:
        log.warning("%s; skipped %s", msg, skipped)
    else:
        log.info(msg)
    if not rows and not allow_empty:
        raise ValueError(
            f"no valid {kind} rows in {path_or_paths}: {counts}; {describe(counts, kind)}"
        )
    return rows, counts


def describe(counts: dict[str, int], kind: str, max_len: int | None = None) -> str:
    """The skipped rows per reason in words, and the expected schema, e.g. "32 missing field
    'messages' or a message's role/content (expected 'messages': ...)"."""
    main = {"sft": "'messages'", "preference": "'prompt'/'chosen'/'rejected'", "prompt": "'prompt'"}
    words = {
        "unparseable": "not a JSON object",
        "missing_field": f"missing field {main[kind]} (or a message's role/content)",
        "wrong_type": "a field of the wrong type",
        "bad_role": "a role outside system/user/assistant",
        "empty_turn": "an empty conversation or turn",
        "no_assistant_turn": "no assistant turn",
        "too_long": "too long" + (f" (> {max_len} tokens)" if max_len else ""),
    }
    parts = [f"{counts[r]} {words[r]}" for r in REASONS if counts.get(r)]
    return f"{', '.join(parts) or 'none skipped'} (expected {EXPECTED[kind]})"
