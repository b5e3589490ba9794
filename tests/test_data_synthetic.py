"""The embedded task generator: determinism, held-out split, answer formats, `verify`,
preference pairs, the bad family, and what the demo needs (short prompts)."""

from __future__ import annotations

import random
import re

import pytest

from r7b_fast.data import synthetic as S
from r7b_fast.data.chat import render_prompt
from r7b_fast.data.tokenizer import load_tokenizer

AR_ONLY = set(S.AR_DIGITS)
WESTERN = set("0123456789")


@pytest.mark.parametrize("family", S.FAMILIES)
def test_deterministic_by_seed(family):
    a = S.generate_split(family, 40, seed=7, difficulty=2, system=True)
    assert a == S.generate_split(family, 40, seed=7, difficulty=2, system=True)
    assert a != S.generate_split(family, 40, seed=8, difficulty=2, system=True)
    assert S.preference_rows(family, 20, seed=7) == S.preference_rows(family, 20, seed=7)


@pytest.mark.parametrize("family", S.FAMILIES)
def test_eval_split_is_held_out(family):
    train = {r["prompt"] for r in S.generate_split(family, 400, seed=0)}
    held = {r["prompt"] for r in S.generate_split(family, 60, seed=0, split="eval")}
    assert held and not (train & held)


@pytest.mark.parametrize("family", S.GOOD_FAMILIES)
def test_rows_are_correct_and_formatted(family):
    for r in S.generate_split(family, 200, seed=1, difficulty=3):
        assert r["messages"][-1] == {"role": "assistant", "content": r["answer"]}
        assert r["messages"][0] == {"role": "user", "content": r["prompt"]}
        digits = set(r["answer"]) & (AR_ONLY | WESTERN)
        if family == "arith_en" or r.get("digits") == "western":
            assert digits <= WESTERN
        else:
            assert digits <= AR_ONLY  # Arabic families answer in Arabic-Indic digits
        assert S.verify(r, r["answer"]) == 1.0


def _independent_answer(row):
    """Recompute the answer from the prompt text alone."""
    nums = [int(x) for x in re.findall(r"\d+", S.to_western_digits(row["prompt"]))]
    k = row["kind"]
    if k in ("add", "sub", "mul"):
        a, b = nums
        return [{"add": a + b, "sub": a - b, "mul": a * b}[k]]
    if k in ("min", "max"):
        return [min(nums) if k == "min" else max(nums)]
    if k in ("asc", "desc"):
        return sorted(nums, reverse=k == "desc")
    if k in ("to_arabic", "to_western"):
        return nums
    quoted = row["prompt"].split("«")[1].split("»")[0]
    return [len(quoted) if k == "letters" else len(quoted.split())]


@pytest.mark.parametrize("family", S.GOOD_FAMILIES)
def test_answers_match_an_independent_solver(family):
    for r in S.generate_split(family, 200, seed=2, difficulty=3):
        got = [int(x) for x in re.findall(r"\d+", S.to_western_digits(r["answer"]))]
        assert got == _independent_answer(r), r


def test_verify_both_digit_systems_and_rejects_wrong():
    assert S.verify(("arith_ar", "١٢"), "١٢") == 1.0
    assert S.verify(("arith_ar", "١٢"), "12") == 1.0
    assert S.verify(("arith_en", "12"), "١٢") == 1.0
    assert S.verify(("arith_ar", "١٢"), "۱۲") == 1.0  # Persian digits
    assert S.verify(("arith_ar", "١٢"), " الجواب: ١٢.") == 1.0
    assert S.verify(("count_ar", "٥"), "5") == 1.0
    for wrong in ("١٣", "13", "1٢ ", "١٢ أو ١٣", "", "لا أعرف", "112"):
        assert S.verify(("arith_ar", "١٢"), wrong) == 0.0, wrong
    assert S.verify(("order_ar", "٣، ٧، ٩"), "3, 7, 9") == 1.0
    assert S.verify(("order_ar", "٣، ٧، ٩"), "٣، ٧، ٩") == 1.0
    assert S.verify(("order_ar", "٣، ٧، ٩"), "٧، ٣، ٩") == 0.0
    assert S.verify(("order_ar", "٣، ٧، ٩"), "٣، ٧") == 0.0
    # conversion: the digit system is the task itself
    assert S.verify(("digits_ar", "٤٥"), "٤٥") == 1.0
    assert S.verify(("digits_ar", "٤٥"), "45") == 0.0
    assert S.verify(("digits_ar", "45"), "45") == 1.0
    assert S.verify(("digits_ar", "45"), "٤٥") == 0.0
    with pytest.raises(ValueError, match="task"):
        S.verify({"answer": "1"}, "1")


@pytest.mark.parametrize("family", S.GOOD_FAMILIES)
def test_preference_pairs(family):
    rows = S.preference_rows(family, 150, seed=3, difficulty=2, system=True)
    for r in rows:
        assert r["prompt"][0]["role"] == "system" and r["prompt"][-1]["role"] == "user"
        chosen, rejected = r["chosen"][0]["content"], r["rejected"][0]["content"]
        assert S.verify(r, chosen) == 1.0 and S.verify(r, rejected) == 0.0
        # plausible: same shape (as many numbers) and only digits of one system
        assert len(S._numbers(rejected)) == len(S._numbers(chosen))
        assert not (set(rejected) & AR_ONLY and set(rejected) & WESTERN)
    plain = S.preference_rows(family, 5, seed=3, conversational=False)
    assert all(isinstance(r[k], str) for r in plain for k in ("prompt", "chosen", "rejected"))


def test_wrong_answer_never_right():
    rng = random.Random(0)
    for fam in S.GOOD_FAMILIES:
        for r in S.generate_split(fam, 100, seed=4, difficulty=1):
            assert S.verify(r, S.wrong_answer(r, rng)) == 0.0


def test_bad_family_is_bad():
    rows = S.generate_split("bad_ar", 300, seed=0)
    right = sum(S.verify(r, r["messages"][-1]["content"]) for r in rows)
    assert right == 0  # every target is wrong or noise, while `answer` stays the truth
    assert all(S.verify(r, r["answer"]) == 1.0 for r in rows)
    prefs = S.preference_rows("bad_ar", 50, seed=0)
    assert all(S.verify(r, r["chosen"][0]["content"]) == 0.0 for r in prefs)  # flipped labels


def test_prompts_short_for_the_tiny_model(tmp_path_factory):
    tok = load_tokenizer(tmp_path_factory.getbasetemp() / "r7b_fast_tok")
    for fam in S.FAMILIES:
        for r in S.generate_split(fam, 50, seed=0, difficulty=1, system=None):
            assert len(render_prompt(tok, r["messages"][:-1])) <= 40
            assert len(tok(r["messages"][-1]["content"])["input_ids"]) <= 12


def test_make_dataset_dir(tmp_path):
    paths = S.make_dataset_dir(tmp_path, ["arith_ar", "arith_en"], n_train=10, n_eval=4, seed=0)
    assert set(paths) == {"arith_ar", "arith_en"}
    rows = S.read_jsonl(paths["arith_ar"]["sft"])
    assert rows == S.generate_split("arith_ar", 10, 0)
    assert len(S.read_jsonl(paths["arith_en"]["eval"])) == 4
    assert S.read_jsonl(paths["arith_ar"]["pref"]) == S.preference_rows("arith_ar", 10, 0)
    assert "\\u06" not in paths["arith_ar"]["sft"].read_text(encoding="utf-8")


def test_bad_arguments():
    with pytest.raises(ValueError, match="family"):
        S.generate_split("nope", 1, 0)
    with pytest.raises(ValueError, match="split"):
        S.generate_split("arith_ar", 1, 0, split="test")
    with pytest.raises(ValueError, match="difficulty"):
        S.generate_split("arith_ar", 1, 0, difficulty=4)
