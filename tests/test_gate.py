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
