"""The embedded tokenizer: a small byte-level BPE trained on the synthetic corpus.

Command-R-style special tokens come first, with ids fixed to match `r7b_fast.model`:

    <PAD>=0  <BOS_TOKEN>=1  <EOS_TOKEN>=2  <|START_OF_TURN_TOKEN|>=3  <|END_OF_TURN_TOKEN|>=4
    <|USER_TOKEN|>=5  <|CHATBOT_TOKEN|>=6  <|SYSTEM_TOKEN|>=7

The chat template renders (one line here, no newlines in reality)::

    <BOS_TOKEN><|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>{system}<|END_OF_TURN_TOKEN|>
    <|START_OF_TURN_TOKEN|><|USER_TOKEN|>{user}<|END_OF_TURN_TOKEN|>
    <|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>{assistant}<|END_OF_TURN_TOKEN|>

and `add_generation_prompt=True` appends `<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>`. An
assistant turn ends with `<|END_OF_TURN_TOKEN|>`, which is therefore the tokenizer's
`eos_token` (the generation stop token, as `r7b_fast.model`'s `eos_token_id`); `<EOS_TOKEN>`
stays in the vocabulary for Cohere compatibility. No normaliser and a byte-level alphabet: any
UTF-8 text (Arabic diacritics, Arabic-Indic digits, mixed scripts) round-trips exactly.
Encoding never adds BOS/EOS by itself (the template does), so `tokenizer(text).input_ids` is
plain BPE.

Training takes about a second; the result is cached under `cache_dir` (default
`$R7B_FAST_CACHE` or `~/.cache/r7b_fast`) in a directory named by a hash of every setting, and
published by an atomic rename, so concurrent processes never see a half-written tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

SPECIAL_TOKENS = (
    "<PAD>",
    "<BOS_TOKEN>",
    "<EOS_TOKEN>",
    "<|START_OF_TURN_TOKEN|>",
    "<|END_OF_TURN_TOKEN|>",
    "<|USER_TOKEN|>",
    "<|CHATBOT_TOKEN|>",
    "<|SYSTEM_TOKEN|>",
)
PAD_ID, BOS_ID, EOS_ID, START_OF_TURN_ID, END_OF_TURN_ID, USER_ID, CHATBOT_ID, SYSTEM_ID = range(8)
TOKENIZER_VERSION = 3
"""Bump when the corpus, the trainer settings or the template change: it is part of the cache key."""

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set role = '<|SYSTEM_TOKEN|>' %}"
    "{% elif message['role'] == 'user' %}{% set role = '<|USER_TOKEN|>' %}"
    "{% elif message['role'] == 'assistant' %}{% set role = '<|CHATBOT_TOKEN|>' %}"
    "{% else %}{{ raise_exception('unknown role: ' + message['role']) }}{% endif %}"
    "<|START_OF_TURN_TOKEN|>{{ role }}{{ message['content'] }}<|END_OF_TURN_TOKEN|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>{% endif %}"
)


def train_tokenizer(texts: list[str], vocab_size: int = 1024, min_frequency: int = 2):
    """Train a byte-level BPE on `texts`; returns a `PreTrainedTokenizerFast` (not saved).

    `vocab_size` counts the 8 special tokens and the 256 byte symbols (so 264 < vocab_size);
    the result may be smaller when the corpus has fewer useful merges. Deterministic: the same
    texts and settings give the same vocabulary and merges.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if not isinstance(vocab_size, int) or vocab_size <= len(SPECIAL_TOKENS) + 256:
        raise ValueError(
            f"vocab_size: must be an int > {len(SPECIAL_TOKENS) + 256}, got {vocab_size!r}"
        )
    if not texts:
        raise ValueError("texts: need a non-empty corpus")
    tok = Tokenizer(models.BPE())
    # One token per digit (Western and Arabic-Indic alike): arithmetic and digit conversion
    # become per-digit problems a tiny model can learn.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    for i, t in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(t) != i:  # pragma: no cover - guaranteed by BpeTrainer's ordering
            raise RuntimeError(f"special token {t} got id {tok.token_to_id(t)}, expected {i}")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<BOS_TOKEN>",
        eos_token="<|END_OF_TURN_TOKEN|>",
        pad_token="<PAD>",
        additional_special_tokens=[
            t for t in SPECIAL_TOKENS if t not in ("<BOS_TOKEN>", "<PAD>", "<|END_OF_TURN_TOKEN|>")
        ],
        chat_template=CHAT_TEMPLATE,
        padding_side="right",
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 20,
    )


def _settings(vocab_size: int, seed: int, n_per_family: int) -> dict:
    import tokenizers

    return {
        "version": TOKENIZER_VERSION,
        "vocab_size": vocab_size,
        "seed": seed,
        "n_per_family": n_per_family,
        "tokenizers": tokenizers.__version__.split(".")[0:2],
    }


def default_cache_dir() -> Path:
    """`$R7B_FAST_CACHE` if set, else `~/.cache/r7b_fast`."""
    env = os.environ.get("R7B_FAST_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "r7b_fast"


def tokenizer_dir(
    cache_dir=None, *, vocab_size: int = 1024, seed: int = 0, n_per_family: int = 1000
) -> Path:
    """Path of the cached embedded tokenizer, training and saving it first if missing."""
    settings = _settings(vocab_size, seed, n_per_family)
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = root / f"tokenizer-{key}"
    if (final / "tokenizer.json").exists():
        return final
    from r7b_fast.data.synthetic import corpus

    root.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(corpus(seed, n_per_family), vocab_size=vocab_size)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".tokenizer-{key}."))
    try:
        tok.save_pretrained(tmp)
        (tmp / "r7b_fast_settings.json").write_text(json.dumps(settings, indent=1))
        try:
            os.rename(tmp, final)  # atomic publish; fails if a concurrent writer won the race
        except OSError:
            if not (final / "tokenizer.json").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def load_tokenizer(
    cache_dir=None, *, vocab_size: int = 1024, seed: int = 0, n_per_family: int = 1000
):
    """The embedded tokenizer (`PreTrainedTokenizerFast`), trained once and cached on disk.

    `vocab_size` <= 1024 fits `r7b_fast.model`'s tiny config. The same settings always give
    the same tokenizer; different settings get a different cache entry.
    """
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(
        str(tokenizer_dir(cache_dir, vocab_size=vocab_size, seed=seed, n_per_family=n_per_family))
    )
