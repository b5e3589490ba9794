"""Rewards for on-policy DPO: `get_reward(spec)` -> `reward(prompt_rows, completions) -> list[float]`.

A reward scores one completion (text) per prompt row: `len(prompt_rows) == len(completions)`,
row i pairs with completion i (repeat a row k times to score k samples of it). Three kinds:

- `"verifier"`: the synthetic tasks' checker, `r7b_fast.data.synthetic.verify(row, text)`; rows
  need the `family` and `answer` metadata the task generator writes (1.0 right, 0.0 wrong).
- a directory holding an HF sequence-classification model (`config.json`, weights, tokenizer
  with a chat template): the conversation `prompt_messages(row) + [assistant: completion]` is
  rendered with the reward model's own chat template and scored by its head: the logit when
  `num_labels == 1`, the log-odds logit[1] - logit[0] when `num_labels == 2`.
- `"package.module:function"`: any callable with the reward signature above.

Every reward is wrapped so that a wrong number of scores or a NaN/Inf score is an error.
"""

from __future__ import annotations

import importlib
import math
import os
from collections.abc import Callable, Sequence

RewardFn = Callable[[Sequence[dict], Sequence[str]], list[float]]

_SPECS = '"verifier", an HF sequence-classification model directory, or "module:function"'


def prompt_messages(row: dict) -> list[dict]:
    """The chat prompt of a task or preference row, as a list of {"role", "content"} messages.

    - `prompt` is a list of messages (TRL conversational preference rows): that list;
    - else `messages` (TRL SFT rows, synthetic task rows): the turns before the last assistant
      turn (system and user turns kept);
    - else `prompt` is a string: one user turn.
    """
    if not isinstance(row, dict):
        raise ValueError(f"prompt row: expected a dict, got {type(row).__name__}")
    prompt = row.get("prompt")
    if isinstance(prompt, list):
        return list(prompt)
    messages = row.get("messages")
    if isinstance(messages, list) and messages:
        last = max(
            (i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None
        )
        turns = messages[:last] if last is not None else list(messages)
        if turns:
            return turns
    if isinstance(prompt, str) and prompt:
        return [{"role": "user", "content": prompt}]
    raise ValueError("prompt row: needs `prompt` (messages or text) or `messages` with a user turn")


def _checked(fn: RewardFn, name: str) -> RewardFn:
    """Wraps `fn`: arguments of equal length in, one finite float per completion out."""

    def reward(prompt_rows: Sequence[dict], completions: Sequence[str]) -> list[float]:
        if len(prompt_rows) != len(completions):
            raise ValueError(
                f"reward {name}: {len(prompt_rows)} prompt rows but {len(completions)} completions"
            )
        if not all(isinstance(c, str) for c in completions):
            raise ValueError(f"reward {name}: completions must be strings")
        scores = [float(s) for s in fn(list(prompt_rows), list(completions))]
        if len(scores) != len(completions):
            raise ValueError(
                f"reward {name}: returned {len(scores)} scores for {len(completions)} completions"
            )
        bad = [i for i, s in enumerate(scores) if not math.isfinite(s)]
        if bad:
            raise ValueError(f"reward {name}: non-finite score for completion(s) {bad[:5]}")
        return scores

    reward.spec = name
    return reward


def verifier_reward(prompt_rows: Sequence[dict], completions: Sequence[str]) -> list[float]:
    """`synthetic.verify(row, text)` per (row, completion): 1.0 if the answer is right, else 0.0."""
    from r7b_fast.data.synthetic import verify

    out = []
    for i, (row, text) in enumerate(zip(prompt_rows, completions)):
        try:
            out.append(verify(row, text))
        except ValueError as e:
            raise ValueError(f"reward verifier: prompt row {i}: {e}") from e
    return out


class RewardModel:
    """An HF `AutoModelForSequenceClassification` reward model loaded from `path`.

    Calling it scores conversations in batches of `batch_size` (padded; the HF head reads the
    last non-pad token, so the config needs `pad_token_id`; without one rows go one by one).
    `max_length` truncates long conversations from the left (keeps the answer); None = no limit.
    """

    def __init__(self, path: str, *, device=None, dtype=None, batch_size: int = 8, max_length=None):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise ValueError(f"reward model {path}: its tokenizer has no chat template")
        self.tokenizer.truncation_side = "left"
        kw = {} if dtype is None else {"dtype": dtype}
        self.model = AutoModelForSequenceClassification.from_pretrained(path, **kw)
        self.model.to(self.device).eval()
        self.num_labels = self.model.config.num_labels
        if self.num_labels not in (1, 2):
            raise ValueError(
                f"reward model {path}: num_labels must be 1 or 2, got {self.num_labels}"
            )
        has_pad = (
            self.model.config.pad_token_id is not None and self.tokenizer.pad_token_id is not None
        )
        self.batch_size = batch_size if has_pad else 1
        self.max_length = max_length

    def texts(self, prompt_rows: Sequence[dict], completions: Sequence[str]) -> list[str]:
        """The rendered conversations (prompt turns + the completion as the assistant turn)."""
        return [
            self.tokenizer.apply_chat_template(
                prompt_messages(r) + [{"role": "assistant", "content": c}], tokenize=False
            )
            for r, c in zip(prompt_rows, completions)
        ]

    def __call__(self, prompt_rows: Sequence[dict], completions: Sequence[str]) -> list[float]:
        import torch

        texts, scores = self.texts(prompt_rows, completions), []
        for b in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(
                texts[b : b + self.batch_size],
                add_special_tokens=False,  # the template carries BOS itself
                padding=True,
                truncation=self.max_length is not None,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            with torch.no_grad():
                logits = self.model(**enc).logits.float()  # (B, num_labels)
            s = logits[:, 0] if self.num_labels == 1 else logits[:, 1] - logits[:, 0]
            scores.extend(s.tolist())
        return scores


def _load_function(spec: str) -> RewardFn:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"reward spec {spec!r}: expected {_SPECS}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"reward spec {spec!r}: cannot import module {module_name!r}: {e}") from e
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        raise ValueError(f"reward spec {spec!r}: {module_name} has no callable {attr!r}")
    return fn


def get_reward(spec, **model_kwargs) -> RewardFn:
    """The reward named by `spec` (see the module doc), wrapped with argument/score checks.

    spec: "verifier", a reward-model directory (`model_kwargs` go to `RewardModel`: device,
    dtype, batch_size, max_length), "module:function", or already a callable (wrapped as is).
    Raises ValueError naming the spec when it matches none of these or cannot be loaded.
    """
    if callable(spec):
        return _checked(spec, getattr(spec, "__name__", "callable"))
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"reward spec: expected {_SPECS}, got {spec!r}")
    if spec == "verifier":
        return _checked(verifier_reward, spec)
    if os.path.isdir(spec):
        if not os.path.isfile(os.path.join(spec, "config.json")):
            raise ValueError(
                f"reward spec {spec!r}: directory has no config.json (not an HF model)"
            )
        return _checked(RewardModel(spec, **model_kwargs), spec)
    if ":" in spec and os.path.sep not in spec.partition(":")[0]:
        return _checked(_load_function(spec), spec)
    raise ValueError(f"reward spec {spec!r}: not found; expected {_SPECS}")
