"""Sources: every kind of bad row is skipped and counted; all-bad raises; JSONL, Parquet and
saved `datasets` directories; preference and prompt schemas."""

from __future__ import annotations

import json

import pytest

from r7b_fast.data import synthetic as S
from r7b_fast.data.sources import REASONS, load_rows, validate_row
from r7b_fast.data.tokenizer import load_tokenizer

U = {"role": "user", "content": "سؤال"}
A = {"role": "assistant", "content": "جواب"}
GOOD = {"messages": [{"role": "system", "content": "نظام"}, U, A]}
LONG = {"messages": [U, {"role": "assistant", "content": "جواب طويل جدا " * 40}]}

SFT_BAD = {  # reason -> rows that must be skipped for it
    "missing_field": [{"other": 1}, {"messages": [{"role": "user"}, A]}],
    "wrong_type": [
        {"messages": "نص"},
        {"messages": [U, "نص"]},
        {"messages": [U, {"role": "assistant", "content": 5}]},
    ],
    "bad_role": [{"messages": [{"role": "robot", "content": "x"}, A]}],
    "empty_turn": [{"messages": []}, {"messages": [{"role": "user", "content": "  "}, A]}],
    "no_assistant_turn": [{"messages": [U]}],
    "too_long": [LONG],
}


def _write_jsonl(path, rows, extra_lines=()):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        for line in extra_lines:
            f.write(line + "\n")
    return path


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(tmp_path_factory.getbasetemp() / "r7b_fast_tok")


def test_every_bad_sft_row_counted(tmp_path, tok, caplog):
    bad = [r for rows in SFT_BAD.values() for r in rows]
    path = _write_jsonl(tmp_path / "mixed.jsonl", [GOOD, *bad, GOOD], extra_lines=["{not json"])
    with caplog.at_level("WARNING"):
        rows, counts = load_rows(path, "sft", tokenizer=tok, max_len=64)
    assert len(rows) == 2 and rows[0]["messages"] == GOOD["messages"]
    want = {r: len(v) for r, v in SFT_BAD.items()} | {"unparseable": 1}
    assert {r: counts[r] for r in REASONS} == want
    assert counts["total"] == 2 + len(bad) + 1 and counts["kept"] == 2
    assert "skipped" in caplog.text and "too_long" in caplog.text
    # without a tokenizer there is no length check: the long row is kept
    rows, counts = load_rows(path, "sft")
    assert counts["too_long"] == 0 and len(rows) == 3


def test_all_bad_raises(tmp_path, tok):
    path = _write_jsonl(tmp_path / "bad.jsonl", [r for rows in SFT_BAD.values() for r in rows])
    with pytest.raises(ValueError, match="no valid sft rows"):
        load_rows(path, "sft", tokenizer=tok, max_len=64)
    empty = _write_jsonl(tmp_path / "empty.jsonl", [])
    with pytest.raises(ValueError, match="no valid"):
        load_rows(empty, "sft")


def test_validate_row_names_the_reason():
    for reason, rows in SFT_BAD.items():
        if reason == "too_long":
            continue
        for r in rows:
            with pytest.raises(ValueError, match=reason):
                validate_row(r, "sft")


def test_preference_rows(tmp_path, tok):
    conv = {"prompt": [U], "chosen": [A], "rejected": [{"role": "assistant", "content": "خطأ"}]}
    plain = {"prompt": "١+١=", "chosen": "٢", "rejected": "٣"}
    implicit = {"chosen": [U, A], "rejected": [U, {"role": "assistant", "content": "خطأ"}]}
    bad = {
        "missing_field": [{"prompt": "x", "chosen": "y"}],
        "wrong_type": [{"prompt": "x", "chosen": [A], "rejected": "z"}],
        "empty_turn": [{"prompt": "x", "chosen": "", "rejected": "z"}],
        "no_assistant_turn": [{"prompt": [U], "chosen": [U], "rejected": [A]}],
        "too_long": [{"prompt": [U], "chosen": LONG["messages"][1:], "rejected": [A]}],
    }
    path = _write_jsonl(
        tmp_path / "pref.jsonl", [conv, plain, implicit, *[r for v in bad.values() for r in v]]
    )
    rows, counts = load_rows(path, "preference", tokenizer=tok, max_len=64)
    assert len(rows) == 3
    assert rows[2]["prompt"] == [U] and rows[2]["chosen"] == [A]  # implicit prompt split off
    assert {r: counts[r] for r in bad} == {r: 1 for r in bad}


def test_prompt_rows(tmp_path):
    rows = S.generate_split("arith_ar", 5, 0)
    for r in rows:
        r["prompt"] = r.pop("messages")[:-1]
    path = _write_jsonl(tmp_path / "p.jsonl", rows + [{"prompt": ""}, {"answer": "1"}])
    got, counts = load_rows(path, "prompt")
    assert len(got) == 5 and got[0]["answer"] == rows[0]["answer"]
    assert counts["empty_turn"] == 1 and counts["missing_field"] == 1


def test_parquet_and_datasets_dir(tmp_path):
    import datasets

    rows = S.generate_split("count_ar", 12, 0)
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds, "test": ds.select(range(3))}).save_to_disk(
        str(tmp_path / "dd")
    )
    for src in (tmp_path / "d.parquet", tmp_path / "saved", tmp_path / "dd"):
        got, counts = load_rows(src, "sft")
        assert counts["kept"] == 12
        assert [g["messages"] for g in got] == [r["messages"] for r in rows]
    got, _ = load_rows(tmp_path / "dd", "sft", split="test")
    assert len(got) == 3
    both, counts = load_rows([tmp_path / "d.parquet", tmp_path / "saved"], "sft")
    assert counts["total"] == 24


def test_synthetic_files_load_clean(tmp_path, tok):
    paths = S.make_dataset_dir(tmp_path, ["order_ar", "bad_ar"], n_train=20, n_eval=5, seed=0)
    for fam in paths:
        for kind, key in (("sft", "sft"), ("preference", "pref"), ("sft", "eval")):
            _, counts = load_rows(paths[fam][key], kind, tokenizer=tok, max_len=128)
            assert counts["kept"] == counts["total"]


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="kind"):
        load_rows(tmp_path / "x.jsonl", "rl")
    with pytest.raises(ValueError, match="does not exist"):
        load_rows(tmp_path / "x.jsonl", "sft")
    with pytest.raises(ValueError, match="max_len"):
        load_rows(tmp_path / "x.jsonl", "sft", max_len=4)
