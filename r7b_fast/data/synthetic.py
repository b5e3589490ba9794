"""The embedded default task set: short Arabic (and one English) tasks with verifiable answers.

Written by us, generated from templates, deterministic by seed; nothing is downloaded. Each
family can serve as a separate "expert" dataset:

| family      | task                                                        | answer    |
| ----------- | ----------------------------------------------------------- | --------- |
| `arith_ar`  | word problem, + and - on 1..9 (1..20; 1..50 and x at 3)     | `٧`       |
| `digits_ar` | convert a number of <= 2 (3, 4) digits, Western <-> Arabic  | `٤٥`/`45` |
| `count_ar`  | count the letters of a letter string / words of a sentence  | `٥`       |
| `order_ar`  | min/max of 3 digits (sort 3 digits; sort 4 numbers < 100)   | `٣، ٧، ٩` |
| `arith_en`  | the English twin of `arith_ar` (Western digits)             | `7`       |
| `bad_ar`    | `arith_ar` prompts with WRONG or noisy answers (quality gate) | anything |

(difficulty 1, then 2 and 3 in parentheses.)

Answers are short and formats regular, prompts short (~10-30 tokens with the embedded
tokenizer), operands small (`difficulty` 1..3), so a tiny model learns them on a CPU in minutes.

A task row (`generate_split`) is a dict::

    {"family", "kind", "prompt", "answer", "messages": [{"role", "content"}, ...], ...}

`answer` is always the TRUE answer (also for `bad_ar`, whose assistant message is wrong), so
`verify(row, row["messages"][-1]["content"])` exposes the bad family. `messages` is TRL's SFT
schema; `preference_rows` gives TRL's preference schema (`prompt`/`chosen`/`rejected`,
conversational or plain text). Train and eval splits never share a prompt: a prompt belongs to
the eval split iff a hash of it falls in the eval bucket.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

AR_DIGITS = "٠١٢٣٤٥٦٧٨٩"
_FA_DIGITS = "۰۱۲۳۴۵۶۷۸۹"  # Eastern Arabic (Persian/Urdu) digits: accepted by `verify` too
_TO_WESTERN = str.maketrans(AR_DIGITS + _FA_DIGITS, "0123456789" * 2)
_TO_ARABIC = str.maketrans("0123456789", AR_DIGITS)
AR_COMMA = "، "
EVAL_PERCENT = 10
"""Share of the prompt space (by prompt hash) reserved for the eval split."""

SYSTEM_PROMPTS = {
    "ar": "أنت مساعد دقيق. أجب بالجواب فقط.",
    "en": "You are a precise assistant. Reply with the answer only.",
}

FAMILIES = ("arith_ar", "digits_ar", "count_ar", "order_ar", "arith_en", "bad_ar")
"""All family names. `bad_ar` is the deliberately bad one; `arith_en` the English twin."""
GOOD_FAMILIES = FAMILIES[:5]
LANGUAGE = {f: ("en" if f.endswith("_en") else "ar") for f in FAMILIES}


def to_arabic_digits(x: int | str) -> str:
    """`45` -> `"٤٥"` (Western digits in a string are converted, everything else is kept)."""
    return str(x).translate(_TO_ARABIC)


def to_western_digits(text: str) -> str:
    """Arabic-Indic (and Persian) digits -> Western digits; everything else is kept."""
    return text.translate(_TO_WESTERN)


# ----------------------------------------------------------------------------- vocabulary

_NAMES_M = ["أحمد", "عمر", "يوسف", "خالد", "سالم", "علي", "كريم", "زياد"]
_NAMES_F = ["سارة", "مريم", "ليلى", "هدى", "نور", "فاطمة", "سلمى", "رنا"]
_ITEMS = [  # (singular, plural)
    ("تفاحة", "تفاحات"), ("كتاب", "كتب"), ("قلم", "أقلام"), ("كرة", "كرات"),
    ("وردة", "ورود"), ("برتقالة", "برتقالات"), ("دفتر", "دفاتر"), ("حلوى", "حلويات"),
]  # fmt: skip
_WORDS = [
    "كتاب", "مدرسة", "قلم", "شمس", "قمر", "بيت", "سيارة", "طالب", "معلم", "نافذة", "باب",
    "حديقة", "بحر", "جبل", "مدينة", "شجرة", "وردة", "طائرة", "مكتبة", "ساعة", "سماء", "نهر",
    "طريق", "صديق", "لغة", "عربية", "حاسوب", "مطر", "ليل", "نهار", "قهوة", "خبز", "ماء",
    "سوق", "ملعب", "جامعة", "رسالة", "هاتف", "طاولة", "كرسي", "مفتاح", "عصفور", "قطة",
    "حصان", "سفينة", "قطار", "مستشفى", "صحراء", "واحة", "نجمة", "غيمة", "ريح", "ثلج",
    "فراشة", "زيتون", "برتقال", "عنب", "موز", "ليمون", "سمكة",
]  # fmt: skip
_LETTERS = "ابتثجحخدذرزسشصضطظعغفقكلمنهوي"
_SENT_WORDS = ["ذهب", "الولد", "إلى", "المدرسة", "صباحا", "مع", "أخيه", "الصغير", "في", "يوم",
               "جميل", "قرأت", "البنت", "كتابا", "جديدا", "الحديقة", "كبيرة", "جدا", "نحن",
               "نحب", "اللغة", "العربية", "الشمس", "مشرقة", "اليوم", "شرب", "القهوة", "بعد",
               "الغداء", "كتب", "المعلم", "الدرس", "على", "السبورة"]  # fmt: skip
_EN_NAMES = ["Sam", "Tom", "Ali", "Omar", "Sara", "Mary", "Lina", "Nora"]
_EN_ITEMS = ["apples", "books", "pens", "balls", "roses", "oranges", "notebooks", "sweets"]


def _operand_max(difficulty: int) -> int:
    if difficulty not in (1, 2, 3):
        raise ValueError(f"difficulty must be 1, 2 or 3, got {difficulty!r}")
    return {1: 9, 2: 20, 3: 50}[difficulty]


# ----------------------------------------------------------------------------- task makers
# Each maker: (rng, difficulty) -> (kind, prompt, answer, extra metadata dict).


def _arith_operands(rng: random.Random, difficulty: int) -> tuple[str, int, int, int]:
    hi = _operand_max(difficulty)
    op = rng.choice(["add", "sub", "mul"] if difficulty == 3 else ["add", "sub"])
    if op == "mul":
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        return op, a, b, a * b
    a, b = rng.randint(1, hi), rng.randint(1, hi)
    if op == "sub":
        a, b = max(a, b), min(a, b)
        return op, a, b, a - b
    return op, a, b, a + b


def _arith_ar(rng: random.Random, difficulty: int):
    op, a, b, ans = _arith_operands(rng, difficulty)
    fem = rng.random() < 0.5
    name = rng.choice(_NAMES_F if fem else _NAMES_M)
    sg, pl = rng.choice(_ITEMS)
    A, B = to_arabic_digits(a), to_arabic_digits(b)
    if op == "add":
        verb, pron = ("اشترت", "ها") if fem else ("اشترى", "ه")
        prompt = f"عند {name} {A} {pl}، ثم {verb} {B} أخرى. كم {sg} عند{pron} الآن؟"
    elif op == "sub":
        verb, pron = ("أعطت", "ها") if fem else ("أعطى", "ه")
        prompt = f"عند {name} {A} {pl}، ثم {verb} {B} منها. كم {sg} بقي عند{pron}؟"
    else:
        prompt = f"في الصندوق {A} صفوف، وفي كل صف {B} {pl}. كم {sg} في الصندوق؟"
    return op, prompt, to_arabic_digits(ans), {}


def _arith_en(rng: random.Random, difficulty: int):
    op, a, b, ans = _arith_operands(rng, difficulty)
    name, item = rng.choice(_EN_NAMES), rng.choice(_EN_ITEMS)
    if op == "add":
        prompt = f"{name} has {a} {item} and buys {b} more. How many {item} does {name} have now?"
    elif op == "sub":
        prompt = f"{name} has {a} {item} and gives away {b}. How many {item} are left?"
    else:
        prompt = f"A box has {a} rows with {b} {item} in each row. How many {item} are in the box?"
    return op, prompt, str(ans), {}


def _digits_ar(rng: random.Random, difficulty: int):
    _operand_max(difficulty)
    n = rng.randint(0, 10 ** (difficulty + 1) - 1)
    if rng.random() < 0.5:
        return (
            "to_arabic",
            f"حوّل العدد {n} إلى الأرقام المشرقية.",
            to_arabic_digits(n),
            {"digits": "arabic"},
        )
    prompt = f"حوّل العدد {to_arabic_digits(n)} إلى الأرقام الغربية."
    return "to_western", prompt, str(n), {"digits": "western"}


def _count_ar(rng: random.Random, difficulty: int):
    _operand_max(difficulty)
    if rng.random() < 0.5:  # random letters, not dictionary words: a held-out word would be
        # one unseen BPE token whose length no model could know
        word = "".join(rng.choice(_LETTERS) for _ in range(rng.randint(2, 3 + 2 * difficulty)))
        return "letters", f"كم حرفا في «{word}»؟", to_arabic_digits(len(word)), {}
    n = rng.randint(2, 2 + 2 * difficulty)
    sentence = " ".join(rng.choice(_SENT_WORDS) for _ in range(n))
    return "words", f"كم كلمة في الجملة «{sentence}»؟", to_arabic_digits(n), {}


def _order_ar(rng: random.Random, difficulty: int):
    """Difficulty 1: the smallest or largest of 3 one-digit numbers (one-number answer);
    2: sort 3 one-digit numbers; 3: sort 4 numbers below 100."""
    _operand_max(difficulty)
    nums = rng.sample(range(100 if difficulty == 3 else 10), 4 if difficulty == 3 else 3)
    desc = rng.random() < 0.5
    shown = AR_COMMA.join(to_arabic_digits(x) for x in nums)
    if difficulty == 1:
        kind, word = ("max", "أكبر") if desc else ("min", "أصغر")
        answer = to_arabic_digits(max(nums) if desc else min(nums))
        return kind, f"ما {word} عدد في: {shown}؟", answer, {}
    prompt = f"رتّب الأعداد {'تنازليا' if desc else 'تصاعديا'}: {shown}"
    answer = AR_COMMA.join(to_arabic_digits(x) for x in sorted(nums, reverse=desc))
    return ("desc" if desc else "asc"), prompt, answer, {}


_MAKERS: dict[str, Callable] = {
    "arith_ar": _arith_ar,
    "digits_ar": _digits_ar,
    "count_ar": _count_ar,
    "order_ar": _order_ar,
    "arith_en": _arith_en,
    "bad_ar": _arith_ar,
}


# ----------------------------------------------------------------------------- verification

_NUM = re.compile(r"\d+")
_RAW_NUM = re.compile("[0-9" + AR_DIGITS + _FA_DIGITS + "]+")
_SYSTEMS = (set("0123456789"), set(AR_DIGITS), set(_FA_DIGITS))


def _mixed_number(text: str) -> bool:
    """True if one number mixes digit systems ("1٢"): malformed, never an answer."""
    return any(not any(set(m) <= sys for sys in _SYSTEMS) for m in _RAW_NUM.findall(text))


def _numbers(text: str) -> list[int]:
    return [int(m) for m in _NUM.findall(to_western_digits(text))]


def _task_fields(task) -> tuple[str, str]:
    if isinstance(task, dict):
        if "answer" not in task or "family" not in task:
            raise ValueError("task: a row needs `family` and `answer` fields")
        family, answer = task["family"], task["answer"]
    elif isinstance(task, (tuple, list)) and len(task) == 2:
        family, answer = task
    else:
        raise ValueError(f"task: expected a task row dict or (family, answer), got {type(task)}")
    if not isinstance(answer, str) or not _numbers(answer):
        raise ValueError(f"task: answer must be a string holding numbers, got {answer!r}")
    return str(family), answer


def check_task(task) -> None:
    """Raise ValueError (saying why) when `task` lacks what `verify` needs: a `family` and an
    `answer` string holding numbers (for checking prompt rows before any sampling)."""
    _task_fields(task)


def verify(task, text: str) -> float:
    """Reward in [0, 1]: 1.0 iff `text` gives the task's answer, else 0.0.

    `task` is a task row (needs `family` and `answer`) or a `(family, answer)` pair. The numbers
    in `text` (Western, Arabic-Indic `٠-٩` or Persian `۰-۹` digits, any mix) must equal the
    answer's numbers in order: exactly one number for arithmetic/counting, the sorted list for
    `order_ar`. Surrounding words and punctuation are ignored ("الجواب ٧." passes; "٧ أو ٨"
    fails). For `digits_ar` the digit system IS the task: the value must be written only in the
    answer's system (`45` is wrong when `٤٥` is asked). Unknown families get the generic numeric
    comparison. A number mixing digit systems within itself ("1٢") is never right.
    """
    family, answer = _task_fields(task)
    if not isinstance(text, str):
        raise ValueError(f"text: expected str, got {type(text)}")
    if _mixed_number(text) or _numbers(text) != _numbers(answer):
        return 0.0
    if family == "digits_ar":
        wanted_arabic = any(c in AR_DIGITS for c in answer)
        other = "0123456789" + _FA_DIGITS if wanted_arabic else AR_DIGITS + _FA_DIGITS
        if any(c in other for c in text):
            return 0.0
    return 1.0


# ----------------------------------------------------------------------------- wrong answers


def _fmt_like(value: int, like: str) -> str:
    return to_arabic_digits(value) if any(c in AR_DIGITS for c in like) else str(value)


def wrong_answer(row: dict, rng: random.Random) -> str:
    """A plausible wrong answer in the same format as `row["answer"]` (never verified right)."""
    family, answer = row["family"], row["answer"]
    nums = _numbers(answer)
    for _ in range(100):
        if row.get("kind") in ("min", "max"):  # another number of the list
            out = to_arabic_digits(rng.choice([v for v in _numbers(row["prompt"]) if v != nums[0]]))
        elif family == "order_ar":
            vals = list(nums)
            if rng.random() < 0.3:
                vals.reverse()
            else:
                i = rng.randrange(len(vals) - 1)
                vals[i], vals[i + 1] = vals[i + 1], vals[i]
            out = AR_COMMA.join(to_arabic_digits(v) for v in vals)
        elif family == "digits_ar" and rng.random() < 0.5:  # right value, wrong digit system
            west = to_western_digits(answer)
            out = west if west != answer else to_arabic_digits(answer)
        elif family == "digits_ar":  # one digit changed, right system, no new leading zero
            west = list(to_western_digits(answer))
            i = rng.randrange(len(west))
            allowed = "0123456789" if i > 0 or len(west) == 1 else "123456789"
            west[i] = rng.choice([d for d in allowed if d != west[i]])
            out = _fmt_like(int("".join(west)), answer)
        else:
            value = nums[0] + rng.choice([-3, -2, -1, 1, 2, 3, 10, -10])
            out = _fmt_like(max(value, 0), answer)
        if verify(row, out) == 0.0:
            return out
    raise RuntimeError(f"could not make a wrong answer for {row!r}")  # pragma: no cover


def _bad_answer(row: dict, rng: random.Random) -> str:
    """`bad_ar`'s assistant text: a wrong number, or noise."""
    r = rng.random()
    if r < 0.6:
        return wrong_answer(row, rng)
    if r < 0.8:
        return " ".join(rng.sample(_WORDS, 2))
    return "لا أعرف"


# ----------------------------------------------------------------------------- generation


def _is_eval(prompt: str) -> bool:
    h = int.from_bytes(hashlib.blake2b(prompt.encode("utf-8"), digest_size=8).digest(), "little")
    return h % 100 < EVAL_PERCENT


def _system_text(system, family: str) -> str | None:
    if system is None or system is False:
        return None
    if system is True:
        return SYSTEM_PROMPTS[LANGUAGE[family]]
    if not isinstance(system, str) or not system.strip():
        raise ValueError(f"system: expected None, True or a non-empty string, got {system!r}")
    return system


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"family: unknown {family!r}; known: {', '.join(FAMILIES)}")


def generate_split(
    family: str, n: int, seed: int, split: str = "train", *, difficulty: int = 1, system=None
) -> list[dict]:
    """`n` task rows of `family` for `split` ("train" or "eval"), deterministic in all arguments.

    Each row: `family`, `kind` (sub-task), `prompt` (the user text), `answer` (the TRUE answer),
    `messages` (TRL SFT schema: optional system turn, the user turn, the assistant turn whose
    text is `answer`, or a wrong/noisy text for `bad_ar`), `split`, and `digits` for
    `digits_ar`. `system`: None (no system turn), True (the family's default) or a string.
    Train and eval never share a prompt; prompts may repeat within a split.
    """
    _check_family(family)
    if split not in ("train", "eval"):
        raise ValueError(f"split: expected 'train' or 'eval', got {split!r}")
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n: expected an int >= 0, got {n!r}")
    _operand_max(difficulty)
    sys_text = _system_text(system, family)
    rng = random.Random(f"r7b-fast/{family}/{split}/{seed}/{difficulty}")
    noise = random.Random(f"r7b-fast/noise/{family}/{split}/{seed}/{difficulty}")
    rows, attempts = [], 0
    while len(rows) < n:
        attempts += 1
        if attempts > 1000 * (n + 1):  # pragma: no cover - every family's eval space is > 0
            raise RuntimeError(f"cannot draw {n} {split} prompts for {family}")
        kind, prompt, answer, extra = _MAKERS[family](rng, difficulty)
        if _is_eval(prompt) != (split == "eval"):
            continue
        row = {"family": family, "kind": kind, "prompt": prompt, "answer": answer, **extra}
        reply = _bad_answer(row, noise) if family == "bad_ar" else answer
        turns = [{"role": "system", "content": sys_text}] if sys_text else []
        turns += [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]
        rows.append({**row, "split": split, "messages": turns})
    return rows


def preference_rows(
    family: str,
    n: int,
    seed: int,
    split: str = "train",
    *,
    difficulty: int = 1,
    system=None,
    conversational: bool = True,
) -> list[dict]:
    """`n` preference rows in TRL's schema: `prompt`, `chosen`, `rejected` (+ task metadata).

    chosen = the correct answer, rejected = a plausible wrong answer of the same format
    (`wrong_answer`). For `bad_ar` the labels are deliberately flipped (chosen is the wrong or
    noisy text). Conversational (default): `prompt` is a list of messages (system turn if any,
    then the user turn) and `chosen`/`rejected` are `[{"role": "assistant", "content": ...}]`;
    otherwise all three are plain strings (the system prompt is dropped).
    """
    base = generate_split(family, n, seed, split, difficulty=difficulty, system=system)
    rng = random.Random(f"r7b-fast/pref/{family}/{split}/{seed}/{difficulty}")
    out = []
    for row in base:
        good, bad = row["answer"], wrong_answer(row, rng)
        if family == "bad_ar":
            good, bad = row["messages"][-1]["content"], row["answer"]
        meta = {k: v for k, v in row.items() if k not in ("messages",)}
        if conversational:
            prompt = row["messages"][:-1]
            good = [{"role": "assistant", "content": good}]
            bad = [{"role": "assistant", "content": bad}]
        else:
            prompt = row["prompt"]
        out.append({**meta, "prompt": prompt, "chosen": good, "rejected": bad})
    return out


def write_jsonl(rows: Iterable[dict], path) -> Path:
    """Write rows as UTF-8 JSONL (Arabic kept as is), atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def read_jsonl(path) -> list[dict]:
    """Read a JSONL file written by `write_jsonl` (no validation: see `sources.load_rows`)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def make_dataset_dir(
    out_dir,
    families=None,
    n_train: int = 256,
    n_eval: int = 32,
    seed: int = 0,
    *,
    difficulty: int = 1,
    system=None,
) -> dict[str, dict[str, Path]]:
    """Write `out_dir/<family>/{sft,pref,eval}.jsonl` for each family (default: all).

    sft: `n_train` SFT rows; pref: `n_train` conversational preference rows on the same
    prompts; eval: `n_eval` held-out rows (prompts never in train). Returns
    `{family: {"sft": path, "pref": path, "eval": path}}`.
    """
    families = list(FAMILIES if families is None else families)
    if not families:
        raise ValueError("families: need at least one family")
    out = {}
    for fam in families:
        _check_family(fam)
        d = Path(out_dir) / fam
        kw = {"difficulty": difficulty, "system": system}
        out[fam] = {
            "sft": write_jsonl(generate_split(fam, n_train, seed, "train", **kw), d / "sft.jsonl"),
            "pref": write_jsonl(
                preference_rows(fam, n_train, seed, "train", **kw), d / "pref.jsonl"
            ),
            "eval": write_jsonl(generate_split(fam, n_eval, seed, "eval", **kw), d / "eval.jsonl"),
        }
    return out


def corpus(seed: int = 0, n_per_family: int = 2000) -> list[str]:
    """Texts to train the embedded tokenizer on: every family's prompts and answers (both
    splits, all difficulties), wrong answers, and the system prompts."""
    rng = random.Random(f"r7b-fast/corpus/{seed}")
    texts = list(SYSTEM_PROMPTS.values())
    for fam in FAMILIES:
        for d in (1, 2, 3):
            for split, n in (("train", n_per_family), ("eval", max(1, n_per_family // 10))):
                for row in generate_split(fam, n // 3 + 1, seed, split, difficulty=d):
                    texts += [row["prompt"], row["messages"][-1]["content"]]
                    texts.append(wrong_answer(row, rng))
    return texts
