"""Chat rendering: assistant masks (multi-turn, system prompt) against token sequences written
out by hand, another template, prompts for generation, preference rows."""

from __future__ import annotations

import copy

import pytest

from r7b_fast.data.chat import SequenceTooLong, render_preference, render_prompt, render_sft
from r7b_fast.data.tokenizer import (
    BOS_ID,
    CHATBOT_ID,
    END_OF_TURN_ID,
    START_OF_TURN_ID,
    SYSTEM_ID,
    USER_ID,
    load_tokenizer,
)

CONV = [
    {"role": "system", "content": "أنت مساعد دقيق."},
    {"role": "user", "content": "كم ٣ + ٤؟"},
    {"role": "assistant", "content": "٧"},
    {"role": "user", "content": "And 10 - 2?"},
    {"role": "assistant", "content": "8, بالتأكيد"},
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(tmp_path_factory.getbasetemp() / "r7b_fast_tok")


def _enc(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_multi_turn_mask_with_system(tok):
    ids, mask = render_sft(tok, CONV)
    role = {"system": SYSTEM_ID, "user": USER_ID, "assistant": CHATBOT_ID}
    want_ids, want_mask = [BOS_ID], [0]
    for m in CONV:  # the Command-R layout, written out turn by turn
        head, body = [START_OF_TURN_ID, role[m["role"]]], _enc(tok, m["content"]) + [END_OF_TURN_ID]
        trained = int(m["role"] == "assistant")
        want_ids += head + body
        want_mask += [0, 0] + [trained] * len(body)  # the closing END_OF_TURN is trained too
    assert ids == want_ids
    assert mask == want_mask


def test_other_template_with_merges_across_markers(tok):
    """A ChatML-like template whose markers are plain text (BPE may merge across them)."""
    other = copy.deepcopy(tok)
    other.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    ids, mask = render_sft(other, CONV)
    assert len(ids) == len(mask)
    trained = other.decode([i for i, k in zip(ids, mask) if k])
    assert trained == "٧<|im_end|>\n8, بالتأكيد<|im_end|>\n"
    untrained = other.decode([i for i, k in zip(ids, mask) if not k])
    for m in CONV:
        if m["role"] != "assistant":
            assert m["content"] in untrained


def test_render_prompt_and_too_long(tok):
    p = render_prompt(tok, CONV[:2])
    assert p[-2:] == [START_OF_TURN_ID, CHATBOT_ID]
    full, mask = render_sft(tok, CONV[:3])
    assert full[: len(p)] == p and mask[: len(p)] == [0] * len(p) and all(mask[len(p) :])
    with pytest.raises(SequenceTooLong):
        render_sft(tok, CONV, max_len=len(render_sft(tok, CONV)[0]) - 1)
    assert render_sft(tok, CONV, max_len=len(render_sft(tok, CONV)[0]))[0]
    with pytest.raises(ValueError, match="messages"):
        render_sft(tok, [])


def test_preference_conversational(tok):
    row = {
        "prompt": CONV[:2],
        "chosen": [{"role": "assistant", "content": "٧"}],
        "rejected": [{"role": "assistant", "content": "٨"}],
    }
    p, c, r = render_preference(tok, row)
    assert p == render_prompt(tok, CONV[:2])
    assert p + c == render_sft(tok, CONV[:3])[0]
    assert c == _enc(tok, "٧") + [END_OF_TURN_ID] and r == _enc(tok, "٨") + [END_OF_TURN_ID]
    with pytest.raises(SequenceTooLong):
        render_preference(tok, row, max_len=len(p) + len(c) - 1)


def test_preference_plain_text(tok):
    p, c, r = render_preference(tok, {"prompt": "١ + ١ =", "chosen": " ٢", "rejected": " ٣"})
    assert p == [BOS_ID] + _enc(tok, "١ + ١ =")
    assert c == _enc(tok, " ٢") + [tok.eos_token_id] and r == _enc(tok, " ٣") + [tok.eos_token_id]
