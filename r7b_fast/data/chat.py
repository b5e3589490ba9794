"""Render conversations with a tokenizer's chat template into token ids and loss masks.

Works with any Hugging Face fast tokenizer (offsets are needed) that has a chat template
(ours, Command R7B's, Llama's, ChatML...). The assistant spans are found by rendering PREFIXES of the conversation as text:
an assistant message i occupies the characters between
`render(messages[:i], add_generation_prompt=True)` and `render(messages[:i+1])`, so the span
holds the assistant's content and whatever the template closes the turn with (our
`<|END_OF_TURN_TOKEN|>`, so the model learns to stop). The full text is tokenised once, with
offsets, and a token is trained iff its characters overlap an assistant span. Nothing assumes
particular special tokens, and BPE merges across the template's plain-text markers are fine.
Text is always tokenised with `add_special_tokens=False`: the template carries BOS itself.
"""

from __future__ import annotations


class SequenceTooLong(ValueError):
    """A rendered sequence exceeds `max_len` (sources count these as `too_long`)."""


def _render_text(tokenizer, messages, add_generation_prompt: bool = False) -> str:
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("tokenizer: has no chat template")
    return tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _encode(tokenizer, text: str, offsets: bool = False):
    if offsets and not getattr(tokenizer, "is_fast", False):
        raise ValueError("tokenizer: a fast tokenizer is needed (offset mapping)")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=offsets)
    return (enc["input_ids"], enc["offset_mapping"]) if offsets else enc["input_ids"]


def assistant_char_spans(tokenizer, messages) -> tuple[str, list[tuple[int, int]]]:
    """(full rendered text, [(start, end) character span of each assistant turn])."""
    text = _render_text(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        before = _render_text(tokenizer, messages[:i], add_generation_prompt=True)
        upto = _render_text(tokenizer, messages[: i + 1])
        if not (text.startswith(before) and text.startswith(upto) and len(before) <= len(upto)):
            raise ValueError(
                "tokenizer: its chat template does not render conversations prefix-stably; "
                "cannot locate assistant turns"
            )
        spans.append((len(before), len(upto)))
    return text, spans


def render_sft(tokenizer, messages, max_len: int | None = None) -> tuple[list[int], list[int]]:
    """Tokenise a conversation: `(input_ids, assistant_mask)`, two lists of the same length.

    `messages`: TRL's SFT schema, a list of `{"role": system|user|assistant, "content": str}`.
    `assistant_mask[t]` is 1 iff token t belongs to an assistant turn (its content and the
    template's turn-closing tokens, e.g. `<|END_OF_TURN_TOKEN|>`), 0 for the system/user turns,
    BOS and role headers. Multi-turn conversations get every assistant turn masked in.
    Raises `SequenceTooLong` when `max_len` is given and the sequence is longer.
    """
    if not messages:
        raise ValueError("messages: empty conversation")
    text, spans = assistant_char_spans(tokenizer, messages)
    ids, offsets = _encode(tokenizer, text, offsets=True)
    if max_len is not None and len(ids) > max_len:
        raise SequenceTooLong(f"sequence of {len(ids)} tokens > max_len={max_len}")
    mask = [0] * len(ids)
    for t, (s, e) in enumerate(offsets):
        if e > s and any(s < b and e > a for a, b in spans):
            mask[t] = 1
    return ids, mask


def render_prompt(tokenizer, messages) -> list[int]:
    """Token ids of `messages` followed by the template's generation prompt (for sampling)."""
    if not messages:
        raise ValueError("messages: empty conversation")
    return _encode(tokenizer, _render_text(tokenizer, messages, add_generation_prompt=True))


def render_preference(tokenizer, row: dict, max_len: int | None = None):
    """A TRL preference row -> `(prompt_ids, chosen_ids, rejected_ids)`.

    Conversational rows (`prompt` a list of messages, `chosen`/`rejected` lists of assistant
    messages): prompt_ids = the prompt rendered with the generation prompt; chosen_ids = the
    tokens of the rest of `render(prompt + chosen)` (the answer and its end-of-turn token).
    Plain-text rows: prompt_ids = BOS (when the tokenizer has one) + the prompt's tokens;
    chosen_ids = the completion's tokens + EOS. The trained sequences are `prompt_ids +
    chosen_ids` and `prompt_ids + rejected_ids`. Raises `SequenceTooLong` when the longer of
    the two exceeds `max_len`.
    """
    prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
    if isinstance(prompt, str):
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        p = bos + _encode(tokenizer, prompt)
        c, r = _encode(tokenizer, chosen) + eos, _encode(tokenizer, rejected) + eos
    else:
        prompt_text = _render_text(tokenizer, prompt, add_generation_prompt=True)
        p = _encode(tokenizer, prompt_text)
        c, r = (_completion_ids(tokenizer, prompt, prompt_text, x) for x in (chosen, rejected))
    if max_len is not None and len(p) + max(len(c), len(r)) > max_len:
        raise SequenceTooLong(
            f"pair of {len(p)} + {max(len(c), len(r))} tokens > max_len={max_len}"
        )
    return p, c, r


def _completion_ids(tokenizer, prompt, prompt_text: str, completion) -> list[int]:
    full = _render_text(tokenizer, list(prompt) + list(completion))
    if not full.startswith(prompt_text):
        raise ValueError("tokenizer: the rendered conversation does not start with its prompt")
    return _encode(tokenizer, full[len(prompt_text) :])
