"""Preference experts (`dpo.experts`, `online_dpo.experts`, `merge_with_start`), `--seed`, and the
report's paired lifts: the stage graph and merge specs from `build_stages`, validation errors
naming the key, the single form's stage specs unchanged, the paired standard error against
numpy, and one micro pipeline run with experts (real trainers and merges, checked vs numpy)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from test_pipeline import MICRO, read_model, write_spec

from r7b_fast import pipeline as pl
from r7b_fast.pipeline_lift import lift_markdown, lift_rows, paired_lift

EXPERTS = [
    {"name": "math", "families": ["arith_ar"], "overrides": {"dpo.beta": 0.3}},
    {"name": "skills", "families": ["digits_ar"]},
]


def stages(tmp_path, seed=None, **changes) -> dict[str, pl.Stage]:
    yml = write_spec(tmp_path / "p.yaml", tmp_path / "w", **changes)
    return {s.name: s for s in pl.build_stages(pl.load_pipeline(str(yml), seed=seed))}


def test_single_form_keeps_its_stages_and_specs(tmp_path):
    """Without `experts`: one `dpo` run merged with its start, the rounds chained and the last
    merged with the DPO generalist: the specs the pipeline had before experts existed."""
    st = stages(tmp_path)
    ov = {**MICRO["train_overrides"], "run.seed": 0}
    assert st["dpo"].spec["model"] == "sft_merge" and st["dpo"].spec["data"] == [
        ["arith_ar", "pref"]
    ]
    assert st["dpo"].spec["overrides"] == ov
    assert st["dpo_merge"].deps == ["dpo", "sft_merge"]
    assert st["dpo_merge"].spec == {"models": ["dpo", "sft_merge"], "weights": [0.7, 0.3]}
    assert st["online_r1"].spec["model"] == "dpo_merge"
    assert st["online_merge"].spec == {"models": ["online_r1", "dpo_merge"], "weights": None}
    assert st["online_r1"].spec["overrides"]["online.rounds"] == 1
    assert (
        st["dpo_merge"].label == "DPO merged" and st["eval_dpo_merge"].label == "offline DPO merged"
    )


def test_dpo_experts_from_one_start_merged_equal_weight(tmp_path):
    dpo = {
        "config": "demo_dpo",
        "experts": EXPERTS,
        "overrides": {"dpo.beta": 0.1, "optim.lr": 1e-4},
    }
    st = stages(tmp_path, dpo=dpo)
    names = list(st)
    assert names.index("eval_sft_merge") < names.index("dpo_math") < names.index("dpo_skills")
    assert names.index("dpo_skills") < names.index("dpo_merge") < names.index("online_r1")
    assert "dpo" not in st
    for e, fam in (("dpo_math", "arith_ar"), ("dpo_skills", "digits_ar")):
        assert st[e].kind == "train" and st[e].spec["model"] == "sft_merge"
        assert st[e].spec["data"] == [[fam, "pref"]]
        assert st[e].spec["overrides"]["optim.lr"] == 1e-4  # the section's overrides ...
    assert st["dpo_math"].spec["overrides"]["dpo.beta"] == 0.3  # ... under the expert's
    assert st["dpo_skills"].spec["overrides"]["dpo.beta"] == 0.1
    # merge_with_start defaults to false with experts: the experts alone, equal weights
    assert st["dpo_merge"].deps == ["dpo_math", "dpo_skills"]
    assert st["dpo_merge"].spec == {"models": ["dpo_math", "dpo_skills"], "weights": None}
    assert st["eval_dpo_math"].label == "offline DPO expert math"
    assert st["online_r1"].spec["model"] == "dpo_merge"


def test_merge_with_start_and_weights_including_it(tmp_path):
    dpo = {"config": "demo_dpo", "experts": EXPERTS, "merge_with_start": True,
           "merge_weights": [0.25, 0.25, 0.5]}  # fmt: skip
    st = stages(tmp_path, dpo=dpo)
    assert st["dpo_merge"].spec == {"models": ["dpo_math", "dpo_skills", "sft_merge"],
                                    "weights": [0.25, 0.25, 0.5]}  # fmt: skip
    # the single form without its start: the DPO model alone
    one = {"config": "demo_dpo", "families": ["arith_ar"], "merge_with_start": False}
    assert stages(tmp_path, dpo=one)["dpo_merge"].spec == {"models": ["dpo"], "weights": None}


def test_ties_merge_of_experts_uses_the_start_as_base(tmp_path):
    dpo = {"config": "demo_dpo", "experts": EXPERTS, "merge": {"method": "ties", "density": 0.5}}
    st = stages(tmp_path, dpo=dpo)["dpo_merge"]
    assert st.spec["models"] == ["dpo_math", "dpo_skills"] and st.spec["base"] == "sft_merge"
    assert st.deps == ["dpo_math", "dpo_skills", "sft_merge"]  # the base is an input


def test_online_experts_per_round_start_from_the_previous_merge(tmp_path):
    onl = dict(MICRO["online_dpo"], rounds=2, experts=[
        {"name": "ar", "families": ["arith_ar"]}, {"name": "en", "families": ["arith_en"]}])  # fmt: skip
    del onl["families"]
    st = stages(tmp_path, seed=4, online_dpo=onl)
    names = list(st)
    order = ["online_r1_ar", "online_r1_en", "online_r1_merge", "online_r2_ar", "online_r2_en",
             "online_merge"]  # fmt: skip
    assert [n for n in names if n.startswith("online_")] == order
    for r, start in ((1, "dpo_merge"), (2, "online_r1_merge")):
        for e in ("ar", "en"):
            s = st[f"online_r{r}_{e}"].spec
            assert s["model"] == start and s["overrides"]["online.rounds"] == 1
            assert s["overrides"]["run.seed"] == 4 + r - 1  # each round its own sampling seed
    assert st["online_r1_merge"].spec["models"] == ["online_r1_ar", "online_r1_en"]
    assert st["online_merge"].spec["models"] == ["online_r2_ar", "online_r2_en"]
    assert "arith_en" in st["data"].spec["families"]  # the experts' families are generated
    onl["merge_with_start"] = True  # each round's merge includes that round's start
    st = stages(tmp_path, online_dpo=onl)
    assert st["online_merge"].spec["models"] == ["online_r2_ar", "online_r2_en", "online_r1_merge"]


def test_seed_overrides_init_data_and_trainers(tmp_path):
    st = stages(tmp_path, seed=7)
    assert st["init"].spec["seed"] == st["data"].spec["seed"] == 7
    assert st["sft_math"].spec["overrides"]["run.seed"] == 7
    assert st["online_r1"].spec["overrides"]["run.seed"] == 7
    yml = write_spec(tmp_path / "q.yaml", tmp_path / "w")
    assert pl.main([str(yml), "--seed", "3", "--list"]) == 0
    assert pl.main([str(yml), "--seed", "-1", "--list"]) == 2  # "seed: expected an int >= 0"
    pre = {"config": "demo_sft", "families": ["arith_ar"], "data_seed": 5}
    with pytest.raises(pl.PipelineError, match=r"base\.pretrain\.data_seed"):
        stages(tmp_path, seed=5, **{"base.pretrain": pre})


@pytest.mark.parametrize(
    "sec, value, match",
    [
        ("dpo", {"config": "demo_dpo", "experts": []}, r"dpo\.experts: expected a non-empty"),
        ("dpo", {"config": "demo_dpo", "experts": EXPERTS, "families": ["arith_ar"]},
         r"dpo\.families: with dpo\.experts"),
        ("dpo", {"config": "demo_dpo", "experts": [EXPERTS[1], EXPERTS[1]]},
         r"dpo\.experts\[1\]\.name: 'skills' is used twice"),
        ("dpo", {"config": "demo_dpo", "experts": [{"name": "a b", "families": ["arith_ar"]}]},
         r"dpo\.experts\[0\]\.name"),
        ("dpo", {"config": "demo_dpo", "experts": [{"name": "a"}]}, r"dpo\.experts\[0\]: needs"),
        ("dpo", {"config": "demo_dpo", "experts": [{"name": "a", "families": ["x"], "lr": 1}]},
         r"dpo\.experts\[0\]: unknown keys \['lr'\]"),
        ("online_dpo", {"config": "demo_online_dpo", "experts": [{"name": "a", "families": ["x"]}]},
         r"online_dpo\.experts\[0\]\.families: unknown families \['x'\]"),
        ("dpo", {"config": "demo_dpo", "experts": EXPERTS, "merge_with_start": "yes"},
         r"dpo\.merge_with_start: expected true or false"),
        ("dpo", {"config": "demo_dpo", "experts": EXPERTS, "merge_with_start": True,
                 "merge_weights": [0.5, 0.5]}, r"dpo\.merge_weights: expected a list of 3"),
        ("dpo", {"config": "demo_dpo", "families": ["arith_ar"], "merge_weights": [1.0]},
         r"dpo\.merge_weights: expected a list of 2"),
        ("online_dpo", {"config": "demo_online_dpo", "experts": EXPERTS,
                        "merge": {"method": "slerp"}}, r"online_dpo\.merge: slerp"),
    ],
)  # fmt: skip
def test_expert_validation_names_the_key(tmp_path, sec, value, match):
    with pytest.raises(pl.PipelineError, match=match):
        stages(tmp_path, **{sec: value})


def test_paired_lift_matches_numpy():
    rng = np.random.default_rng(0)
    before = rng.integers(0, 2, 300).astype(float)
    after = np.where(rng.random(300) < 0.2, 1.0, before)  # some prompts flip to correct
    got = paired_lift(before.tolist(), after.tolist())
    d = after - before
    se = d.std(ddof=1) / math.sqrt(len(d))
    assert got["delta"] == pytest.approx(d.mean(), rel=1e-12)
    assert got["se"] == pytest.approx(se, rel=1e-12)  # float64 sums of 300 terms
    assert got["z"] == pytest.approx(d.mean() / se, rel=1e-12)
    # the paired SE is below the unpaired one when before and after agree on most prompts
    unpaired = math.sqrt(before.var(ddof=1) / 300 + after.var(ddof=1) / 300)
    assert got["se"] < unpaired
    assert paired_lift([1.0, 0.0], [1.0, 0.0])["z"] == 0.0
    assert paired_lift([0.0, 0.0], [1.0, 1.0])["z"] == math.inf
    with pytest.raises(ValueError, match="equal-length"):
        paired_lift([1.0, 0.0], [1.0])


def _write_samples(d: Path, rows):
    d.mkdir(parents=True)
    (d / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_lift_rows_pair_each_stage_with_its_start(tmp_path):
    """dpo_merge (experts without the start) is compared with the experts' start, sft_merge;
    its targeted families are the experts' families; prompts must match one to one."""
    dpo = {"config": "demo_dpo", "experts": EXPERTS}
    yml = write_spec(tmp_path / "p.yaml", tmp_path / "w", dpo=dpo, online_dpo=None)
    st = pl.build_stages(pl.load_pipeline(str(yml)))
    work = tmp_path / "w"

    def rows(scores):
        return [{"family": f, "prompt": f"{f}{i}", "score": s}
                for f, ss in scores.items() for i, s in enumerate(ss)]  # fmt: skip

    _write_samples(
        work / "eval_sft_merge", rows({"arith_ar": [0, 0, 1, 0], "digits_ar": [1, 1, 0, 0]})
    )
    _write_samples(
        work / "eval_dpo_merge", rows({"arith_ar": [1, 1, 1, 0], "digits_ar": [1, 0, 0, 1]})
    )
    got = {r["stage"]: r for r in lift_rows(work, st)}
    assert set(got) == {"dpo_merge"}  # the other evals are absent
    r = got["dpo_merge"]
    assert r["start"] == "sft_merge" and r["targeted_families"] == ["arith_ar", "digits_ar"]
    assert r["families"]["arith_ar"] == paired_lift([0, 0, 1, 0], [1, 1, 1, 0])
    assert r["targeted"] == paired_lift([0, 0, 1, 0, 1, 1, 0, 0], [1, 1, 1, 0, 1, 0, 0, 1])
    assert "| dpo_merge | sft_merge | 8 | +0.250 |" in lift_markdown(list(got.values()))
    bad = rows({"arith_ar": [0, 0, 1, 0], "digits_ar": [1, 1, 0, 0]})
    bad[0]["prompt"] = "another prompt"
    (work / "eval_sft_merge" / "samples.jsonl").write_text(
        "".join(json.dumps(x) + "\n" for x in bad)
    )
    with pytest.raises(ValueError, match="different prompts"):
        lift_rows(work, st)


@pytest.mark.slow
def test_micro_pipeline_with_preference_experts(tmp_path):
    """Real trainers: two offline DPO experts merged equal-weight (checked against numpy), one
    on-policy round of two experts; the report carries the lift, DPO and round tables."""
    tests_dir = str(Path(__file__).parent)  # _train_helpers, for the trainer subprocesses
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (tests_dir, old) if p)
    onl = dict(MICRO["online_dpo"], experts=[{"name": "a", "families": ["arith_ar"]},
                                             {"name": "b", "families": ["digits_ar"]}])  # fmt: skip
    del onl["families"]
    spec = json.loads(json.dumps(MICRO))
    spec.update(work_dir=str(tmp_path / "w"), online_dpo=onl,
                dpo={"config": "demo_dpo", "experts": [{"name": "math", "families": ["arith_ar"]},
                                                       {"name": "skills", "families": ["digits_ar"]}]})  # fmt: skip
    spec["sft"] = {"config": "demo_sft", "experts": MICRO["sft"]["experts"]}  # no ablations
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(spec))
    try:
        out = pl.run_pipeline(pl.load_pipeline(str(tmp_path / "p.yaml")), log=lambda *a: None)
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old
    work = tmp_path / "w"
    experts = [read_model(work / e / "hf") for e in ("dpo_math", "dpo_skills")]
    merged = read_model(work / "dpo_merge" / "hf")
    assert set(merged) == set(experts[0])
    for name, x in merged.items():
        want = 0.5 * experts[0][name].astype(np.float64) + 0.5 * experts[1][name]
        np.testing.assert_allclose(x, want, rtol=1e-6, atol=1e-7)  # fp32, 2 terms
    rep = json.loads(Path(out["report"]["json"]).read_text())
    assert [r["stage"] for r in rep["rounds"]] == ["online_r1_a", "online_r1_b"]
    for r in rep["rounds"]:
        assert r["pairs"] + r["ties"] == r["prompts"] == 4
        assert r["chosen_score"] > r["rejected_score"]  # length reward: best vs worst
    assert {r["stage"] for r in rep["dpo"]} >= {"dpo_math", "dpo_skills", "online_r1_a"}
    lift = {r["stage"]: r for r in rep["lift"]}
    assert lift["dpo_merge"]["start"] == "sft_merge"
    assert lift["online_merge"]["start"] == "dpo_merge"
    assert lift["online_merge"]["targeted_families"] == ["arith_ar", "digits_ar"]
    md = Path(out["report"]["md"]).read_text()
    assert "## Lift per stage vs its start" in md and "## On-policy rounds" in md


def test_demo_seeds_aggregates_reports_over_seeds():
    """benchmarks/demo_seeds: mean / sample std / min-max per stage and metric over the seeds'
    reports (vs the statistics module), each seed's targeted lift kept, the markdown rendered."""
    import statistics

    from benchmarks.demo_seeds import aggregate, markdown

    def report(acc, delta):
        lift = paired_lift([0.0, 1.0, 0.0], [1.0, 1.0, 0.0 + delta])
        return {"stages": [{"stage": "base", "metrics": {"acc/arith_ar": acc, "acc/mean": acc,
                                                         "loss": 1.0, "other": 5}}],
                "lift": [{"stage": "dpo_merge", "start": "sft_merge", "targeted_families":
                          ["arith_ar"], "targeted": lift, "families": {"arith_ar": lift}}]}  # fmt: skip

    accs = [0.3, 0.5, 0.4]
    agg = aggregate({s: report(a, s % 2) for s, a in enumerate(accs)})
    got = agg["metrics"]["base"]["acc/arith_ar"]
    assert got["mean"] == pytest.approx(statistics.mean(accs), rel=1e-12)
    assert got["std"] == pytest.approx(statistics.stdev(accs), rel=1e-12)
    assert (got["min"], got["max"], got["n"]) == (0.3, 0.5, 3)
    assert "other" not in agg["metrics"]["base"]  # only acc/*, acc_lang/* and loss
    row = agg["lifts"]["dpo_merge"]
    assert [row["seeds"][s]["targeted"]["delta"] for s in range(3)] == pytest.approx(
        [1 / 3, 2 / 3, 1 / 3]
    )
    assert row["targeted_delta"]["mean"] == pytest.approx(4 / 9)
    run = {"run": {"seconds": 1.0, "load_before": 1.0, "load_after": 2.0},
           "times": {"kinds": {"train": 1.0}}}  # fmt: skip
    md = markdown({"seeds": {s: run for s in range(3)}, "aggregate": agg, "env": {},
                   "machine": "m", "pipeline": "p"})  # fmt: skip
    assert "| base | 0.400 ± 0.100 (0.300-0.500) |" in md
    assert "| dpo_merge | sft_merge | arith_ar | +0.333 (+1.0) |" in md


def test_round_and_dpo_rows_read_the_stage_files(tmp_path):
    """round_rows: the round event's stats and, from online/round_000.pt, the mean verifier score
    of chosen vs rejected answers (no greedy re-scoring for rows without family + answer);
    dpo_rows: first logged step and the mean of the last quarter of metrics.jsonl."""
    import torch

    from r7b_fast.pipeline_lift import dpo_markdown, dpo_rows, round_rows

    st = stages(tmp_path)
    d = tmp_path / "w" / "online_r1"
    (d / "online").mkdir(parents=True)
    pairs = [{"prompt": [], "chosen_reward": c, "rejected_reward": r}
             for c, r in ((1.0, 0.0), (1.0, 0.5), (0.5, 0.0))]  # fmt: skip
    torch.save({"pairs": pairs, "stats": {}, "ref": []}, d / "online" / "round_000.pt")
    ev = {"event": "round", "num_prompts": 4.0, "num_samples": 8.0, "reward_mean": 0.4,
          "reward_best_mean": 0.8, "num_tied": 1.0, "margin_mean": 2 / 3}  # fmt: skip
    steps = [{"step": i, "loss": 1.0 - i / 10, "rewards/accuracies": i / 8} for i in range(1, 9)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in [ev, *steps]))
    (got,) = round_rows(tmp_path / "w", list(st.values()))
    assert (got["pairs"], got["ties"], got["prompts"], got["samples"]) == (3, 1, 4, 8)
    assert got["chosen_score"] == pytest.approx(2.5 / 3) and got["rejected_score"] == 0.5 / 3
    assert got["trained_prompts"] is None  # no family / answer to verify
    (row,) = dpo_rows(tmp_path / "w", list(st.values()))
    assert row["steps"] == 8 and row["rewards/accuracies"]["first"] == 1 / 8
    assert row["rewards/accuracies"]["last"] == pytest.approx((7 / 8 + 1) / 2)  # last 2 of 8
    assert row["loss"]["last"] == pytest.approx((0.3 + 0.2) / 2)
    md = dpo_markdown([row], [got])
    assert "| online_r1 | 4 x 2 | 0.400 | 0.800 | 3 | 1 | 0.667 | 0.833 | 0.167 | - |" in md
