"""r7b_fast.rewards: the verifier, an HF sequence-classification reward model (tiny, random,
saved to tmp), "module:function" specs, and the errors for bad specs and bad scores."""

import math

import pytest
import torch

from r7b_fast.data.chat import render_sft
from r7b_fast.data.synthetic import generate_split
from r7b_fast.data.tokenizer import load_tokenizer
from r7b_fast.rewards import get_reward, prompt_messages


@pytest.fixture(scope="module")
def rows():
    return generate_split("arith_ar", 3, 0, "train") + generate_split("order_ar", 2, 0, "train")


def test_verifier_scores_right_and_wrong_answers(rows):
    reward = get_reward("verifier")
    right = [r["answer"] for r in rows]
    wrong = ["١" + r["answer"] for r in rows]  # a leading 1: 0 -> 10, "3, 4, 8" -> "13, 4, 8"
    assert reward(rows, right) == [1.0] * len(rows)
    assert reward(rows, wrong) == [0.0] * len(rows)
    assert reward(rows[:1], ["الجواب " + rows[0]["answer"] + "."]) == [1.0]  # words around: fine
    with pytest.raises(ValueError, match="prompt row 0"):
        reward([{"prompt": "x"}], ["1"])  # no family/answer metadata


def test_prompt_messages_forms():
    user = {"role": "user", "content": "q"}
    system = {"role": "system", "content": "s"}
    answer = {"role": "assistant", "content": "a"}
    assert prompt_messages({"prompt": [system, user], "chosen": [answer]}) == [system, user]
    assert prompt_messages({"prompt": "q", "messages": [system, user, answer]}) == [system, user]
    assert prompt_messages({"prompt": "q"}) == [user]
    with pytest.raises(ValueError, match="prompt row"):
        prompt_messages({"answer": "1"})


def _write_module(tmp_path, monkeypatch, body: str) -> str:
    (tmp_path / "my_rewards_mod.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_rewards_mod"


def test_module_function_spec_and_score_checks(tmp_path, monkeypatch, rows):
    mod = _write_module(
        tmp_path,
        monkeypatch,
        "def length(rows, texts):\n    return [len(t) for t in texts]\n"
        "def short(rows, texts):\n    return [1.0]\n"
        "def nan(rows, texts):\n    return [float('nan')] * len(texts)\n"
        "NOT_CALLABLE = 3\n",
    )
    reward = get_reward(f"{mod}:length")
    assert reward(rows[:3], ["a", "bbb", ""]) == [1.0, 3.0, 0.0]
    with pytest.raises(ValueError, match="3 prompt rows but 2 completions"):
        reward(rows[:3], ["a", "b"])
    with pytest.raises(ValueError, match="returned 1 scores for 2"):
        get_reward(f"{mod}:short")(rows[:2], ["a", "b"])
    with pytest.raises(ValueError, match="non-finite"):
        get_reward(f"{mod}:nan")(rows[:2], ["a", "b"])
    with pytest.raises(ValueError, match="no callable 'NOT_CALLABLE'"):
        get_reward(f"{mod}:NOT_CALLABLE")
    with pytest.raises(ValueError, match="no callable 'missing'"):
        get_reward(f"{mod}:missing")


@pytest.mark.parametrize(
    "spec, match",
    [
        ("", "reward spec"),
        (42, "reward spec"),
        ("verfier", "not found"),
        ("no_such_module_r7b:f", "cannot import module 'no_such_module_r7b'"),
        (":f", "expected"),
    ],
)
def test_bad_specs_are_clear_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        get_reward(spec)


def test_directory_without_config_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        get_reward(str(tmp_path))


def _tiny_rm(path, num_labels):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=1024,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_labels=num_labels,
        pad_token_id=0,
        initializer_range=0.5,  # scores spread well beyond float noise
    )
    model = LlamaForSequenceClassification(cfg).eval()
    model.save_pretrained(path)
    load_tokenizer().save_pretrained(path)
    return model


@pytest.mark.parametrize("num_labels", [1, 2])
def test_hf_reward_model_scores_each_conversation(tmp_path, rows, num_labels):
    model = _tiny_rm(tmp_path / "rm", num_labels)
    reward = get_reward(str(tmp_path / "rm"), device="cpu", batch_size=3)
    texts = ["٧", "الجواب هو ١٢ تقريباً", "", "5", "١، ٢، ٣ ثم أشياء أخرى كثيرة"]
    got = reward(rows, texts)
    # Reference: each conversation alone (no padding), tokenised by the data engineer's renderer,
    # the head's output at the last token. fp32 on both sides; batching/padding only changes the
    # matmul shapes, so agreement to 1e-4 relative is expected.
    tok = load_tokenizer()
    want = []
    for row, text in zip(rows, texts):
        ids, _ = render_sft(tok, prompt_messages(row) + [{"role": "assistant", "content": text}])
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].double()
        want.append(float(logits[0] if num_labels == 1 else logits[1] - logits[0]))
    assert all(math.isclose(g, w, rel_tol=1e-4, abs_tol=1e-5) for g, w in zip(got, want)), (
        got,
        want,
    )
    assert max(want) - min(want) > 1e-2  # the scores really depend on the conversation
