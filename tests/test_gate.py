"""The dataset quality gate: decision rule (pure) and, end to end, bad vs good family."""

from __future__ import annotations

import pytest

from r7b_fast import gate

# ----------------------------------------------------------------------------- pure decision rule


def test_improvement_direction_from_name():
    assert gate.improvement("acc/arith_ar", 0.2, 0.5) == pytest.approx(0.3)
    assert gate.improvement("loss/arith_ar", 2.0, 1.5) == pytest.approx(0.5)  # lower is better
    assert gate.improvement("loss", 1.0, 1.25) == pytest.approx(-0.25)
    # explicit direction wins over the name
    assert gate.improvement("loss_like_score", 1.0, 2.0, higher_is_better=True) == 1.0
    with pytest.raises(ValueError, match="non-finite"):
        gate.improvement("acc", float("nan"), 0.1)


def test_keep_when_target_improves_and_nothing_regresses():
    base = {"loss/a": 2.0, "loss/b": 1.0, "acc/a": 0.1}
    cand = {"loss/a": 1.5, "loss/b": 1.005, "acc/a": 0.2}
    d = gate.decide("a_set", base, cand, target="loss/a", threshold=0.1, tolerance=0.01)
    assert d.keep
    assert d.deltas == pytest.approx({"loss/a": 0.5, "loss/b": -0.005, "acc/a": 0.1})


def test_reject_when_gain_not_above_threshold():
    base = {"loss/a": 2.0, "loss/b": 1.0}
    # gain exactly at the threshold is not "more than" it
    d = gate.decide("x", base, {"loss/a": 1.75, "loss/b": 1.0}, target="loss/a", threshold=0.25,
                    tolerance=0.1)  # fmt: skip
    assert not d.keep and "threshold" in d.reason
    d = gate.decide("x", base, {"loss/a": 2.1, "loss/b": 0.5}, target="loss/a", threshold=0.0,
                    tolerance=0.1)  # fmt: skip
    assert not d.keep


def test_reject_when_another_metric_drops_beyond_tolerance():
    base = {"loss/a": 2.0, "loss/b": 1.0, "loss/c": 1.0}
    cand = {"loss/a": 1.0, "loss/b": 1.05, "loss/c": 1.3}
    d = gate.decide("x", base, cand, target="loss/a", threshold=0.1, tolerance=0.1)
    assert not d.keep
    assert "loss/c" in d.reason  # the worst offender is named
    # only tracked metrics count
    d2 = gate.decide("x", base, cand, target="loss/a", threshold=0.1, tolerance=0.1,
                     tracked=["loss/a", "loss/b"])  # fmt: skip
    assert d2.keep


def test_decide_validates_arguments():
    with pytest.raises(ValueError, match="threshold"):
        gate.decide("x", {"a": 1}, {"a": 2}, target="a", threshold=-1, tolerance=0)
    with pytest.raises(ValueError, match="tolerance"):
        gate.decide("x", {"a": 1}, {"a": 2}, target="a", threshold=0, tolerance=float("inf"))
    with pytest.raises(ValueError, match="missing"):
        gate.decide("x", {"a": 1}, {"b": 2}, target="a", threshold=0, tolerance=0)


def test_decision_table_lists_every_candidate():
    base = {"loss/a": 2.0, "loss/b": 1.0}
    ds = [
        gate.decide(
            "good",
            base,
            {"loss/a": 1.0, "loss/b": 1.0},
            target="loss/a",
            threshold=0.1,
            tolerance=0.1,
        ),  # fmt: skip
        gate.decide(
            "bad",
            base,
            {"loss/a": 2.5, "loss/b": 1.0},
            target="loss/a",
            threshold=0.1,
            tolerance=0.1,
        ),  # fmt: skip
    ]
    table = gate.decision_table(ds).splitlines()
    assert len(table) == 4
    assert "| good |" in table[2] and "| keep |" in table[2]
    assert "| bad |" in table[3] and "| reject |" in table[3] and "-0.5000" in table[3]


def test_pick_best_answers_takes_highest_reward_first_on_ties():
    scored = [
        [("a", 0.0, "t1"), ("b", 1.0, "t2"), ("c", 1.0, "t1")],
        [("d", 0.2, "t1")],
        [],
    ]
    assert gate.pick_best_answers(scored) == [("b", 1.0, "t2"), ("d", 0.2, "t1"), None]
    assert gate.pick_best_answers(scored, min_score=0.5) == [("b", 1.0, "t2"), None, None]
    with pytest.raises(ValueError, match="expected"):
        gate.pick_best_answers([[("a", 1.0)]])


# ----------------------------------------------------------------------------- end to end

GATE_SPEC = {
    "config": "demo_sft",
    "base": {"path": "tiny", "tiny_overrides": {"hidden_size": 64, "intermediate_size": 128,
             "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1}},
    "overrides": {"optim.max_steps": 20, "optim.lr": 1.0e-2, "optim.warmup_steps": 2,
                  "optim.global_batch": 4, "optim.micro_batch": 4, "data.max_tokens": 128,
                  "checkpoint.every_steps": 0, "logging.every_steps": 5,
                  # conftest sets TRITON_INTERPRET=1, where "auto" would pick the (slow)
                  # interpreter; the trainer's own tests cover the Triton path
                  "model.kernel_backend": "torch"},
    # the base mixture teaches Arabic arithmetic; candidates: digit conversion (a new skill) and
    # bad_ar (arith_ar prompts with wrong or noisy answers), each judged on the task it targets
    "mixture": ["arith_ar"],
    "candidates": [
        {"name": "digits_ar", "families": ["digits_ar"], "target": "loss/digits_ar"},
        {"name": "bad_ar", "families": ["bad_ar"], "target": "loss/arith_ar"},
    ],
    "data": {"n_train": 64, "n_eval": 16},
    "eval": {"families": ["arith_ar", "digits_ar"]},
    "threshold": 0.1,
    "tolerance": 0.3,
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gate_rejects_bad_family_keeps_good_one(tmp_path, seed):
    import yaml

    spec_path = tmp_path / "gate.yaml"
    spec_path.write_text(yaml.safe_dump({**GATE_SPEC, "work_dir": str(tmp_path / "w"),
                                         "seed": seed}))  # fmt: skip
    out = gate.run_gate(gate.load_gate_spec(str(spec_path)), log=lambda *a: None)
    by_name = {d.candidate: d for d in out["decisions"]}
    assert by_name["digits_ar"].keep, by_name["digits_ar"].reason
    assert not by_name["bad_ar"].keep, by_name["bad_ar"].reason
    # the decision follows the rule from the recorded metrics
    d = by_name["bad_ar"]
    assert d.deltas["loss/arith_ar"] == pytest.approx(
        d.baseline["loss/arith_ar"] - d.with_candidate["loss/arith_ar"]
    )
    assert (tmp_path / "w" / "gate.md").read_text().count("| reject |") == 1


def _reward_by_length(rows, texts):
    """An arbitrary but deterministic reward, so the selection is checkable."""
    return [float(len(t) % 7) for t in texts]


@pytest.mark.slow
def test_arbitrage_keeps_each_prompts_highest_reward_answer(tmp_path):
    from r7b_fast.data.chat import render_prompt
    from r7b_fast.data.synthetic import generate_split, write_jsonl
    from r7b_fast.data.tokenizer import load_tokenizer
    from r7b_fast.eval import read_jsonl
    from r7b_fast.generate import decode_completion, generate
    from r7b_fast.model import build_model, tiny_config

    tok = load_tokenizer()
    teachers = []
    for i in range(2):  # two different (random) teacher checkpoints
        d = tmp_path / f"teacher{i}"
        build_model(tiny_config(hidden_size=32, intermediate_size=64, num_hidden_layers=1),
                    seed=10 + i).save_pretrained(d)  # fmt: skip
        tok.save_pretrained(d)
        teachers.append(str(d))
    rows = generate_split("bad_ar", 4, 0, "train")
    src = write_jsonl(rows, tmp_path / "bad.jsonl")
    arb = {"teachers": teachers, "num_samples": 3, "temperature": 1.0, "max_new_tokens": 6,
           "reward": _reward_by_length}  # fmt: skip
    out = gate.arbitrage({"seed": 5, "arbitrage": arb}, [src], tmp_path / "regen.jsonl")
    got = read_jsonl(out)
    assert len(got) == len(rows)
    # independent selection: every (teacher, sample) candidate, first maximum wins
    cands = [[] for _ in rows]
    for t in teachers:
        model = build_model(tiny_config(hidden_size=32, intermediate_size=64, num_hidden_layers=1),
                            seed=10 + teachers.index(t))  # fmt: skip
        prompts = [render_prompt(tok, r["messages"][:-1]) for r in rows]
        outs = generate(model, tok, prompts, max_new_tokens=6, num_samples=3, temperature=1.0,
                        seed=5)  # fmt: skip
        for i, comps in enumerate(outs):
            cands[i] += [(decode_completion(tok, c), t) for c in comps]
    for r, g, cs in zip(rows, got, cands):
        best = max(cs, key=lambda c: len(c[0]) % 7)  # max() keeps the first maximum
        assert g["messages"][:-1] == r["messages"][:-1]
        assert g["messages"][-1] == {"role": "assistant", "content": best[0]}
        assert g["arbitrage"] == {"teacher": best[1], "reward": float(len(best[0]) % 7)}
        assert g["answer"] == r["answer"]  # task metadata kept
