"""Data the trainer refuses, clearly and before the model loads: one ConfigError naming the file,
the unusable rows per reason and the expected schema; ShareGPT rows converted; too many dropped
rows stop the run; verifier prompts without task metadata. Plus the checks that guard resume
data, rewards, the verifier's digit rules and task-arithmetic normalisation."""

import json
import math

import pytest
from _train_helpers import COMMON

from r7b_fast import train
from r7b_fast.config import ConfigError, load_config
from r7b_fast.data.packing import MicroBatchIterator, pack_sft
from r7b_fast.data.sources import load_rows, validate_row
from r7b_fast.data.synthetic import verify
from r7b_fast.data.tokenizer import load_tokenizer
from r7b_fast.merge import MergeError
from r7b_fast.merge_plan import coefficients
from r7b_fast.rewards import get_reward


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def sft_row(answer="٤"):
    return {"messages": [{"role": "user", "content": "كم ٢ + ٢؟"},
                         {"role": "assistant", "content": answer}]}  # fmt: skip


@pytest.fixture
def no_model(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the model was built before the data error")

    monkeypatch.setattr(train, "build_model", boom)


def test_sharegpt_rows_become_messages(tmp_path):
    row = {"conversations": [{"from": "system", "value": "كن موجزا"},
                             {"from": "human", "value": "كم ٢ + ٢؟"},
                             {"from": "gpt", "value": "٤"}], "id": 7}  # fmt: skip
    got = validate_row(row, "sft")
    assert got["messages"] == [{"role": "system", "content": "كن موجزا"},
                               {"role": "user", "content": "كم ٢ + ٢؟"},
                               {"role": "assistant", "content": "٤"}]  # fmt: skip
    assert got["id"] == 7 and "conversations" not in got
    bad = {"conversations": [{"from": "human", "value": "x"}, {"from": "bot", "value": "y"}]}
    with pytest.raises(ValueError, match="bad_role"):
        validate_row(bad, "sft")
    rows, counts = load_rows(write_jsonl(tmp_path / "s.jsonl", [row, row, bad]), "sft")
    assert len(rows) == 2 and counts["bad_role"] == 1


def test_wrong_schema_is_one_config_error_naming_file_and_schema(tmp_path, capsys, no_model):
    path = write_jsonl(tmp_path / "x.jsonl", [{"dialog": ["hi", "hello"]}] * 32)
    rc = train.main(["sft_tiny", f"run.output_dir={tmp_path / 'run'}", f"data.train=[{path}]",
                     "data.synthetic_families=[]"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert (
        f"data.train[0] {path}: 32 of 32 rows unusable for sft: 32 missing field 'messages'" in err
    )
    assert "expected 'messages': [{role: system|user|assistant, content: str}" in err
    assert "ShareGPT 'conversations'" in err


def test_too_many_dropped_rows_stop_before_training(tmp_path, no_model):
    # 7 short rows and 3 that exceed max_tokens=64: 30% dropped > the default 10%
    rows = [sft_row()] * 7 + [sft_row("٤ " * 80)] * 3
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    args = [*COMMON, f"run.output_dir={tmp_path / 'run'}", f"data.train=[{path}]",
            "data.max_tokens=64", "data.synthetic_families=[]"]  # fmt: skip
    with pytest.raises(ConfigError, match=r"data.train\[0\] .*d.jsonl: 3 of 10 rows unusable for "
                       r"sft: 3 too long \(> 64 tokens\).*max_dropped_fraction=0.1"):  # fmt: skip
        train.run(load_config("sft_tiny", args))
    # allowed at 0.3: the run gets past the data (to the model, stubbed out here)
    with pytest.raises(AssertionError, match="model was built"):
        train.run(load_config("sft_tiny", [*args, "data.max_dropped_fraction=0.3"]))


def test_verifier_prompts_without_task_metadata_fail_before_model(tmp_path, capsys, no_model):
    prompts = [{"prompt": "كم ٢ + ٢؟", "family": "arith_ar", "answer": "٤"},
               {"prompt": "كم ٣ + ٣؟"},
               {"prompt": "كم ١ + ١؟", "family": "arith_ar"}]  # fmt: skip
    path = write_jsonl(tmp_path / "p.jsonl", prompts)
    rc = train.main(["online_dpo_tiny", f"run.output_dir={tmp_path / 'run'}",
                     f"data.train=[{path}]", "data.synthetic_families=[]"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "online.reward: the verifier needs" in err
    assert "2 of 3 prompt rows lack it (first: row 1" in err


def test_iterator_refuses_resume_onto_a_different_row_count():
    tok = load_tokenizer()
    from r7b_fast.data.chat import render_sft

    seqs = [render_sft(tok, sft_row(str(i))["messages"]) for i in range(6)]
    a, b = pack_sft(seqs, 16), pack_sft(seqs[:3], 16)
    assert len(a) != len(b)
    it = MicroBatchIterator(a, seed=0, shuffle=True, epochs=None)
    next(it)
    fresh = MicroBatchIterator(b, seed=0, shuffle=True, epochs=None)
    with pytest.raises(ValueError, match=f"num_rows={len(a)} does not match .*{len(b)}"):
        fresh.load_state_dict(it.state_dict())
    same = MicroBatchIterator(pack_sft(seqs, 16), seed=0, shuffle=True, epochs=None)
    same.load_state_dict(it.state_dict())
    assert next(same)["input_ids"].tolist() == next(it)["input_ids"].tolist()


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_reward_rejects_non_finite_scores(bad):
    reward = get_reward(lambda rows, texts: [1.0, bad])
    with pytest.raises(ValueError, match=r"non-finite score for completion\(s\) \[1\]"):
        reward([{}, {}], ["a", "b"])


def test_verifier_digit_systems_follow_its_docstring():
    arabic = {"family": "digits_ar", "answer": "٤٥"}
    assert verify(arabic, "٤٥") == 1.0
    assert verify(arabic, "۴۵") == 0.0  # Persian digits are not the Arabic-Indic asked for
    assert verify(arabic, "45") == 0.0
    generic = {"family": "arith_ar", "answer": "٤٥"}
    assert verify(generic, "۴۵") == 1.0 and verify(generic, "45") == 1.0  # any one system
    assert verify(generic, "4۵") == 0.0  # Western + Persian inside one number
    assert verify(generic, "٤5") == 0.0


@pytest.mark.parametrize("weights", [[0.0, 1.0, -1.0], [0.0, 1.0, -1.0 + 1e-9], [0.0, 0.0, 0.0]])
def test_task_arithmetic_normalize_refuses_weights_summing_to_zero(weights):
    with pytest.raises(MergeError, match="sum to .*normalize=False"):
        coefficients("task_arithmetic", 3, weights, 0, True)
    # a sum far from 0 still normalises (1 / 0.5: base coefficient 1 - (2 - 1) = 0, dropped)
    assert coefficients("task_arithmetic", 3, [0.0, 1.0, -0.5], 0, True) == [(1, 2.0), (2, -1.0)]
    # and without normalize a zero sum is fine: base + tau_1 - tau_2
    assert coefficients("task_arithmetic", 3, [0.0, 1.0, -1.0], 0, False) == [
        (0, 1.0), (1, 1.0), (2, -1.0)]  # fmt: skip


def test_linear_coefficients_normalise_by_the_weight_sum():
    # w / sum(w) in fp32, each model kept in order; without normalize the weights as given
    assert coefficients("linear", 3, [1.0, 2.0, 1.0], None, None) == [(0, 0.25), (1, 0.5),
                                                                       (2, 0.25)]  # fmt: skip
    assert coefficients("linear", 2, [1.5, -0.25], None, False) == [(0, 1.5), (1, -0.25)]
    with pytest.raises(MergeError, match="sum to 0"):
        coefficients("linear", 2, [1.0, -1.0], None, True)
