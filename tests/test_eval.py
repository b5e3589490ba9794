"""r7b_fast.eval: held-out loss against an independent float64 reference, greedy accuracy against
a naive decoding loop + the verifier, aggregation per family/language, and the report files."""

from __future__ import annotations

import json

import pytest
import torch

from r7b_fast import eval as ev
from r7b_fast.data.synthetic import generate_split


@pytest.fixture(scope="module")
def tok():
    from r7b_fast.data.tokenizer import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="module")
def model():
    from r7b_fast.model import build_model, tiny_config

    return build_model(tiny_config(hidden_size=64, intermediate_size=128, num_hidden_layers=2),
                       seed=3)  # fmt: skip


@pytest.fixture(scope="module")
def rows():
    return generate_split("arith_ar", 3, 0, "eval") + generate_split("arith_en", 2, 0, "eval")


def _reference_nll(model, tok, rows):
    """Per family: (sum of -log p over assistant targets, count), from HF logits in float64."""
    from r7b_fast.data.chat import render_sft

    out = {}
    with torch.no_grad():
        for r in rows:
            ids, mask = render_sft(tok, r["messages"])
            logits = model(input_ids=torch.tensor([ids])).logits[0].double()
            logp = torch.log_softmax(logits, -1)
            s, n = out.get(r["family"], (0.0, 0))
            for t in range(len(ids) - 1):
                if mask[t + 1]:
                    s -= float(logp[t, ids[t + 1]])
                    n += 1
            out[r["family"]] = (s, n)
    return out


def test_heldout_loss_matches_float64_reference(model, tok, rows):
    model.train()
    got = ev.heldout_loss(model, tok, rows, batch_size=2)  # batches mix lengths: padding path
    assert model.training  # the mode is restored
    model.eval()
    ref = _reference_nll(model, tok, rows)
    # fp32 model vs the same weights in a float64 log-softmax: ~1e-6 relative; 1e-4 is loose
    # enough for fp32 matmul-order differences and tight enough to catch a shifted target.
    for fam, (s, n) in ref.items():
        assert got[f"loss/{fam}"] == pytest.approx(s / n, rel=1e-4)
    total = sum(s for s, _ in ref.values()) / sum(n for _, n in ref.values())
    assert got["loss"] == pytest.approx(total, rel=1e-4)
    with pytest.raises(ValueError, match="empty"):
        ev.heldout_loss(model, tok, [])


def _naive_greedy(model, tok, prompt_ids, max_new):
    ids = list(prompt_ids)
    out = []
    with torch.no_grad():
        for _ in range(max_new):
            nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            out.append(nxt)
            ids.append(nxt)
            if nxt == 4:  # <|END_OF_TURN_TOKEN|>
                break
    return tok.decode(out, skip_special_tokens=True).strip()


def test_task_accuracy_outputs_match_naive_greedy(model, tok, rows):
    from r7b_fast.data.chat import render_prompt
    from r7b_fast.data.synthetic import verify

    got = ev.task_accuracy(model, tok, rows, max_new_tokens=6, return_samples=True)
    for r, s in zip(rows, got["samples"]):
        want = _naive_greedy(model, tok, render_prompt(tok, r["messages"][:-1]), 6)
        assert s["output"] == want
        assert s["score"] == verify(r, want)


def test_accuracy_aggregates_per_family_and_language(monkeypatch, tok, rows):
    """generate is replaced by one that answers right exactly for rows 0, 1 and 3."""
    import r7b_fast.generate as gen

    right = {0, 1, 3}
    answers = [r["answer"] if i in right else "٩٩٩" for i, r in enumerate(rows)]

    def fake_generate(model, tokenizer, prompts, **kw):
        assert kw["temperature"] == 0 and kw["num_samples"] == 1
        assert len(prompts) == len(rows)
        return [[tokenizer(a, add_special_tokens=False)["input_ids"] + [4]] for a in answers]

    monkeypatch.setattr(gen, "generate", fake_generate)
    got = ev.task_accuracy(None, tok, rows)
    # rows: arith_ar x3 (right: 0, 1), arith_en x2 (right: 3)
    assert got["acc/arith_ar"] == pytest.approx(2 / 3)
    assert got["acc/arith_en"] == pytest.approx(1 / 2)
    assert got["acc_lang/ar"] == pytest.approx(2 / 3)
    assert got["acc_lang/en"] == pytest.approx(1 / 2)
    assert got["acc/mean"] == pytest.approx((2 / 3 + 1 / 2) / 2)


def test_language_and_subsample():
    assert ev.language_of({"family": "arith_en"}) == "en"
    assert ev.language_of({"family": "count_ar"}) == "ar"
    assert ev.language_of({"family": "x", "lang": "fr"}) == "fr"
    rows = [{"family": f, "i": i} for i, f in enumerate("aabab")]
    assert [r["i"] for r in ev.subsample(rows, 1)] == [0, 2]
    assert len(ev.subsample(rows, None)) == 5
    with pytest.raises(ValueError, match="n_per_family"):
        ev.subsample(rows, 0)


def test_write_report_files_and_table(tmp_path):
    results = [
        (
            "base",
            {
                "acc/a_ar": 0.0,
                "acc/b_en": 0.25,
                "acc/mean": 0.125,
                "acc_lang/ar": 0.0,
                "acc_lang/en": 0.25,
                "loss": 3.0,
            },
        ),  # fmt: skip
        (
            "sft",
            {
                "acc/a_ar": 0.5,
                "acc/b_en": 0.75,
                "acc/mean": 0.625,
                "acc_lang/ar": 0.5,
                "acc_lang/en": 0.75,
                "loss": 1.5,
                "samples": [{"x": 1}],
            },
        ),  # fmt: skip
    ]
    mf = tmp_path / "metrics.jsonl"
    mf.write_text("".join(json.dumps({"step": s, "loss": 3.0 / s}) + "\n" for s in range(1, 6)))
    mf_text = mf.read_text() + json.dumps({"event": "done"}) + "\n"
    mf.write_text(mf_text)
    paths = ev.write_report(results, tmp_path / "rep", metrics_files={"sft": mf},
                            extra={"note": "x"}, extra_md="## more")  # fmt: skip
    for key in ("json", "md", "accuracy_png", "loss_png"):
        assert key in paths
    for key in ("accuracy_png", "loss_png"):
        with open(paths[key], "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    data = json.loads(open(paths["json"]).read())
    assert data["note"] == "x" and [s["stage"] for s in data["stages"]] == ["base", "sft"]
    assert "samples" not in data["stages"][1]["metrics"]
    md = open(paths["md"]).read()
    assert "| sft | 0.500 | 0.750 | 0.625 | 0.500 | 0.750 | 1.500 |" in md
    assert md.rstrip().endswith("## more")
    xs, ys = ev.read_metrics(mf)
    assert xs == [1, 2, 3, 4, 5] and ys[-1] == pytest.approx(0.6)
    # missing values render as "-"
    assert "| x | - |" in ev.accuracy_table([("x", {"acc/a": None})], loss=False)
