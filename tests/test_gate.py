"""The dataset quality gate: decision rules (pure: one seed, several seeds against hand-computed
means and standard errors), the arbitrage loop's stopping, arbitrage's min_score default and,
end to end, bad vs good family over two seeds."""

from __future__ import annotations

import pytest

from r7b_fast import gate, gate_runner

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


# ----------------------------------------------------------------------------- several seeds

BASES = [{"loss/a": 2.0, "loss/b": 1.0}, {"loss/a": 2.2, "loss/b": 1.1}]
CANDS = [{"loss/a": 1.5, "loss/b": 1.05}, {"loss/a": 1.9, "loss/b": 1.0}]
# by hand: d(loss/a) = [0.5, 0.3]: mean 0.4, std sqrt(0.01 + 0.01) = 0.141421, SE 0.1;
#          d(loss/b) = [-0.05, 0.1]: mean 0.025, std sqrt(2 * 0.075^2) = 0.106066, SE 0.075


def test_mean_spread_against_hand_computed_values():
    assert gate.mean_spread([0.5, 0.3]) == pytest.approx((0.4, 0.1414213562, 0.1))
    # 3 values: deviations -0.2, -0.1, 0.3 -> var 0.14 / 2 = 0.07
    m, sd, se = gate.mean_spread([0.1, 0.2, 0.6])
    assert (m, sd, se) == pytest.approx((0.3, 0.07**0.5, (0.07 / 3) ** 0.5))
    assert gate.mean_spread([1.0, 1.0]) == (1.0, 0.0, 0.0)
    with pytest.raises(ValueError, match=">= 2"):
        gate.mean_spread([1.0])


def test_decide_seeds_means_spreads_and_noise_bar():
    d = gate.decide_seeds("c", BASES, CANDS, target="loss/a", threshold=0.1, tolerance=0.05, z=2.0)
    assert d.keep and d.n_seeds == 2
    assert d.deltas == pytest.approx({"loss/a": 0.4, "loss/b": 0.025})
    assert d.std == pytest.approx({"loss/a": 0.1414213562, "loss/b": 0.1060660172})
    assert d.se == pytest.approx({"loss/a": 0.1, "loss/b": 0.075})
    assert d.bar == pytest.approx(0.2)  # z * SE beats the threshold
    assert d.baseline == pytest.approx({"loss/a": 2.1, "loss/b": 1.05})
    assert d.with_candidate == pytest.approx({"loss/a": 1.7, "loss/b": 1.025})
    assert d.per_seed == [pytest.approx({"loss/a": 0.5, "loss/b": -0.05}),
                          pytest.approx({"loss/a": 0.3, "loss/b": 0.1})]  # fmt: skip
    # the same mean gain is rejected when the seeds disagree more than z allows: 0.4 <= 5 * 0.1
    d = gate.decide_seeds("c", BASES, CANDS, target="loss/a", threshold=0.1, tolerance=0.05, z=5.0)
    assert not d.keep and d.bar == pytest.approx(0.5) and "noise bar" in d.reason
    # ... or when the threshold is the larger bar
    d = gate.decide_seeds("c", BASES, CANDS, target="loss/a", threshold=0.45, tolerance=0.05)
    assert not d.keep and d.bar == 0.45 and "threshold 0.45" in d.reason
    # z = 0: the plain threshold rule on the mean
    d = gate.decide_seeds("c", BASES, CANDS, target="loss/a", threshold=0.39, tolerance=0.05, z=0)
    assert d.keep and d.bar == 0.39


def test_decide_seeds_regression_is_judged_on_the_mean():
    cands = [{"loss/a": 1.5, "loss/b": 1.15}, {"loss/a": 1.9, "loss/b": 1.05}]
    # d(loss/b) = [-0.15, 0.05]: one seed improves, the mean -0.05 drops beyond tolerance 0.04
    d = gate.decide_seeds("c", BASES, cands, target="loss/a", threshold=0.1, tolerance=0.04, z=1.0)
    assert not d.keep and "loss/b drops by 0.05" in d.reason
    d = gate.decide_seeds("c", BASES, cands, target="loss/a", threshold=0.1, tolerance=0.06, z=1.0)
    assert d.keep


def test_decide_seeds_validates_arguments():
    kw = {"target": "loss/a", "threshold": 0.1, "tolerance": 0.0}
    with pytest.raises(ValueError, match=">= 2 paired seeds"):
        gate.decide_seeds("c", BASES[:1], CANDS[:1], **kw)
    with pytest.raises(ValueError, match=">= 2 paired seeds"):
        gate.decide_seeds("c", BASES, CANDS[:1], **kw)
    with pytest.raises(ValueError, match="z must be"):
        gate.decide_seeds("c", BASES, CANDS, z=-1.0, **kw)
    with pytest.raises(ValueError, match="missing"):
        gate.decide_seeds("c", BASES, [CANDS[0], {"loss/b": 1.0}], **kw)


def _dec(keep: bool, name="c") -> gate.Decision:
    return gate.Decision(name, keep, "loss/a", 0.1, 0.0, {"loss/a": 0.5 if keep else -0.1},
                         {"loss/a": 2.0}, {"loss/a": 1.5}, "scripted", n_seeds=2)  # fmt: skip


def test_refine_stops_when_kept_or_out_of_iterations():
    calls = []

    def regenerate(k):
        calls.append(("regen", k))
        return f"data{k}", 5, 8

    def gate_again(data, k, keep_at=2):
        calls.append(("gate", data, k))
        return _dec(k == keep_at)

    # kept as given: no regeneration at all
    assert [d.round for d in gate.refine(_dec(True), regenerate, gate_again, 3)] == [0]
    assert calls == []
    # rejected, rejected again, kept at iteration 2: stops although 3 were allowed
    out = gate.refine(_dec(False), regenerate, gate_again, 3)
    assert [(d.round, d.keep) for d in out] == [(0, False), (1, False), (2, True)]
    assert calls == [("regen", 1), ("gate", "data1", 1), ("regen", 2), ("gate", "data2", 2)]
    assert (out[2].rows_kept, out[2].rows_total) == (5, 8)
    # never kept: exactly max_iterations regenerations; 0 iterations: the first decision only
    out = gate.refine(_dec(False), regenerate, lambda data, k: _dec(False), 2)
    assert [d.round for d in out] == [0, 1, 2] and not out[-1].keep
    assert len(gate.refine(_dec(False), regenerate, gate_again, 0)) == 1


def test_refine_iteration_without_kept_rows_is_not_gated():
    gated = []
    out = gate.refine(_dec(False), lambda k: (None, 0, 8),
                      lambda data, k: gated.append(k) or _dec(True), 2)  # fmt: skip
    assert gated == [] and [d.keep for d in out] == [False, False, False]
    assert "kept 0 of 8 rows" in out[1].reason and out[1].deltas == {}
    table = gate.decision_table(out)  # a row without training renders with dashes
    assert "| c | 1 | 2 | loss/a | - | - | - | - | - | 0/8 | reject |" in table


def test_decision_table_shows_mean_and_se():
    d = gate.decide_seeds("c", BASES, CANDS, target="loss/a", threshold=0.1, tolerance=0.05)
    row = gate.decision_table([d]).splitlines()[2]
    assert row.startswith("| c | 0 | 2 | loss/a | 2.1000 | 1.7000 | +0.4000 ± 0.1000 | 0.2000 |")
    assert "loss/b +0.0250 ± 0.0750" in row and "| keep |" in row


def _zero_reward(rows, texts):
    return [0.0 for _ in texts]


def test_arbitrage_min_score_default_drops_zero_reward_answers(tmp_path):
    """Default min_score 1.0 (the verifier's full score): a prompt whose best answer scores 0 is
    dropped; min_score null keeps every prompt's best answer (the teacher: a random tiny model)."""
    from r7b_fast.data.synthetic import generate_split, write_jsonl
    from r7b_fast.data.tokenizer import load_tokenizer
    from r7b_fast.model import build_model, tiny_config

    teacher = tmp_path / "teacher"
    build_model(tiny_config(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=1), seed=3).save_pretrained(teacher)  # fmt: skip
    load_tokenizer().save_pretrained(teacher)
    src = write_jsonl(generate_split("bad_ar", 3, 0, "train"), tmp_path / "bad.jsonl")
    arb = {"teachers": [str(teacher)], "num_samples": 2, "max_new_tokens": 3,
           "reward": _zero_reward}  # fmt: skip
    assert gate_runner.ARB_DEFAULTS["min_score"] == 1.0
    out, kept, total = gate_runner.arbitrage(arb, [src], tmp_path / "a.jsonl", seed=0)
    assert (kept, total) == (0, 3) and read_jsonl_(out) == []
    out, kept, total = gate_runner.arbitrage(
        {**arb, "min_score": None}, [src], tmp_path / "b.jsonl", seed=0
    )
    assert (kept, total) == (3, 3) and [r["arbitrage"]["reward"] for r in read_jsonl_(out)] == [
        0.0
    ] * 3


def read_jsonl_(path):
    from r7b_fast.eval import read_jsonl

    return read_jsonl(path)


# ----------------------------------------------------------------------------- end to end

GATE_SPEC = {
    "config": "demo_sft",
    "base": {"path": "tiny", "tiny_overrides": {"hidden_size": 64, "intermediate_size": 128,
             "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1}},
    "overrides": {"optim.max_steps": 20, "optim.lr": 1.0e-2, "optim.warmup_steps": 2,
                  "optim.global_batch": 4, "optim.micro_batch": 4, "data.max_tokens": 128,
                  "checkpoint.every_steps": 0, "logging.every_steps": 5, "run.cpu_threads": 1,
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
    by_name = out["final"]
    assert by_name["digits_ar"].keep, by_name["digits_ar"].reason
    assert not by_name["bad_ar"].keep, by_name["bad_ar"].reason
    # the decision follows the rule from the recorded metrics (means over the 2 seeds)
    d = by_name["bad_ar"]
    assert d.n_seeds == 2 and len(d.per_seed) == 2
    assert d.deltas["loss/arith_ar"] == pytest.approx(
        d.baseline["loss/arith_ar"] - d.with_candidate["loss/arith_ar"]
    )
    assert out["files"] == {"digits_ar": gate_runner_files(tmp_path, "digits_ar"), "bad_ar": []}
    assert (tmp_path / "w" / "gate.md").read_text().count("| reject |") == 1


def gate_runner_files(tmp_path, fam):
    return [tmp_path / "w" / "data" / fam / "sft.jsonl"]


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
           "reward": _reward_by_length, "min_score": None}  # fmt: skip
    out, kept, total = gate_runner.arbitrage(arb, [src], tmp_path / "regen.jsonl", seed=5)
    assert kept == total == len(rows)
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
