"""r7b_fast.pipeline: a micro recipe end to end (real trainer subprocesses, real merges), merge
weights checked against numpy, rerun skips, a stage killed part-way is redone, --from, spec
validation. The micro pipeline runs once per module (tiny model, 2 steps per stage)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from r7b_fast import pipeline as pl

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 1}  # fmt: skip
MICRO = {
    "work_dir": "WORK",
    "seed": 0,
    "base": {"path": "tiny", "tiny_overrides": TINY},
    "data": {"n_train": 16, "n_eval": 4},
    "train_overrides": {
        "optim.max_steps": 2,
        "optim.global_batch": 2,
        "optim.micro_batch": 2,
        "optim.warmup_steps": 1,
        "data.max_tokens": 128,
        "checkpoint.every_steps": 1,
        # conftest sets TRITON_INTERPRET=1, where "auto" means the (slow) Triton interpreter;
        # the trainer's own tests cover that path
        "model.kernel_backend": "torch",
    },  # fmt: skip
    "sft": {
        "config": "demo_sft",
        "experts": [
            {"name": "math", "families": ["arith_ar"]},
            {"name": "skills", "families": ["digits_ar"]},
        ],  # fmt: skip
        "ablation": "performance",
        "ablation_metric": "loss",  # an untrained model's accuracy is 0: loss gives real weights
    },
    "dpo": {"config": "demo_dpo", "families": ["arith_ar"], "merge_weights": [0.7, 0.3]},
    "online_dpo": {
        "config": "demo_online_dpo",
        "families": ["arith_ar"],
        "rounds": 1,
        "overrides": {
            "online.prompts_per_round": 4,
            "online.num_samples": 2,
            "online.max_new_tokens": 4,
            # an untrained policy fails every verifier (all samples tie: the trainer exits 5);
            # a length reward rarely ties (the trainer subprocess finds it via PYTHONPATH)
            "online.reward": "_train_helpers:length_reward",
        },  # fmt: skip
    },
    "eval": {"families": ["arith_ar", "digits_ar"], "n_per_family": 2, "max_new_tokens": 4},
}


def write_spec(path: Path, work: Path, **changes) -> Path:
    spec = json.loads(json.dumps(MICRO))
    spec["work_dir"] = str(work)
    for key, value in changes.items():
        sec, _, sub = key.partition(".")
        if sub:
            spec[sec][sub] = value
        else:
            spec[sec] = value
    path.write_text(yaml.safe_dump(spec, allow_unicode=True))
    return path


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    tests_dir = str(Path(__file__).parent)  # _train_helpers, for the trainer subprocesses
    path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (tests_dir, path) if p)
    root = tmp_path_factory.mktemp("micro")
    yml = write_spec(root / "micro.yaml", root / "work")
    try:
        out = pl.run_pipeline(pl.load_pipeline(str(yml)), log=lambda *a: None)
        yield root, yml, out
    finally:
        if path is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = path


def read_model(hf: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    tensors = {}
    for f in sorted(hf.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


def records(work: Path) -> dict[str, dict]:
    return {d.name: json.loads((d / "record.json").read_text())
            for d in work.iterdir() if (d / "record.json").is_file()}  # fmt: skip


@pytest.mark.slow
def test_micro_pipeline_end_to_end(micro):
    root, _, out = micro
    work = root / "work"
    names = [s.name for s in pl.build_stages(pl.load_pipeline(str(root / "micro.yaml")))]
    assert set(out["stages"]) == set(names) and set(out["stages"].values()) == {"ran"}
    recs = records(work)
    assert set(recs) == set(names)
    for rec in recs.values():
        assert len(rec["hash"]) == 16 and rec["seconds"] >= 0
    for st in ("sft_math", "sft_skills", "dpo", "online_r1"):
        assert (work / st / "done.json").is_file() and (work / st / "hf" / "config.json").is_file()
        assert recs[st]["result"]["trainer"]["steps"] == 2
    ev = json.loads((work / "eval_online_merge" / "eval.json").read_text())
    for key in ("acc/arith_ar", "acc/digits_ar", "acc_lang/ar", "acc/mean", "loss/arith_ar"):
        assert key in ev
    assert 0 < ev["loss"] < math.log(1024) + 1  # near-uniform but finite for a 2-step model
    rep = json.loads(Path(out["report"]["json"]).read_text())
    labels = [s["stage"] for s in rep["stages"]]
    assert labels[0] == "base" and labels[-1] == "on-policy DPO merged (final)"
    assert len(labels) == sum(1 for n in names if n.startswith("eval_"))
    for key in ("accuracy_png", "loss_png", "md"):
        assert Path(out["report"][key]).is_file()
    for label in labels:
        assert f"| {label} |" in out["table"]


@pytest.mark.slow
def test_merge_weights_equal_by_default_configurable_and_ablation(micro):
    root, _, out = micro
    work = root / "work"
    recs = records(work)
    math_, skills = read_model(work / "sft_math" / "hf"), read_model(work / "sft_skills" / "hf")

    def check(stage, models, weights):
        got = read_model(work / stage / "hf")
        assert set(got) == set(models[0])
        for name, x in got.items():
            want = sum(w * m[name].astype(np.float64) for w, m in zip(weights, models))
            # fp32 accumulation of 2 terms, rounded once to fp32: <= 1 ulp-ish
            np.testing.assert_allclose(x, want, rtol=1e-6, atol=1e-7)

    assert recs["sft_merge"]["result"]["weights"] == [0.5, 0.5]  # equal by default
    check("sft_merge", [math_, skills], [0.5, 0.5])
    assert recs["dpo_merge"]["result"]["weights"] == pytest.approx([0.7, 0.3])  # configured
    check("dpo_merge", [read_model(work / "dpo" / "hf"), read_model(work / "sft_merge" / "hf")],
          [0.7, 0.3])  # fmt: skip
    # ablation: weights proportional to exp(-held-out loss) of each expert
    losses = [json.loads((work / f"eval_{e}" / "eval.json").read_text())["loss"]
              for e in ("sft_math", "sft_skills")]  # fmt: skip
    s = [math.exp(-x) for x in losses]
    want = [x / sum(s) for x in s]
    perf = recs["sft_merge_perf"]["result"]
    assert perf["weights"] == pytest.approx(want, rel=1e-12)
    check("sft_merge_perf", [math_, skills], want)
    assert "| sft_merge_perf |" in out["ablation"]
    assert "| sft_merge | linear | 0.500, 0.500 |" in out["ablation"]


@pytest.mark.slow
def test_rerun_skips_and_from_redoes_the_tail(micro):
    root, yml, _ = micro
    work = root / "work"
    before = {n: r["finished"] for n, r in records(work).items()}
    out = pl.run_pipeline(pl.load_pipeline(str(yml)), log=lambda *a: None)
    assert set(out["stages"].values()) == {"skipped"}
    assert {n: r["finished"] for n, r in records(work).items()} == before
    out = pl.run_pipeline(pl.load_pipeline(str(yml)), from_stage="online_merge",
                          log=lambda *a: None)  # fmt: skip
    redone = {n for n, s in out["stages"].items() if s == "ran"}
    assert redone == {"online_merge", "eval_online_merge"}
    assert records(work)["online_merge"]["start"] == "wiped"
    with pytest.raises(pl.PipelineError, match="unknown stage"):
        pl.run_pipeline(pl.load_pipeline(str(yml)), from_stage="nope", log=lambda *a: None)


@pytest.mark.slow
def test_stage_killed_part_way_is_redone(micro):
    """The (slowed) offline DPO stage is killed mid-training; the rerun redoes it, resuming the
    trainer's checkpoint, and everything downstream, skipping everything upstream."""
    from r7b_fast.checkpoint import latest

    root, _, _ = micro
    work = root / "work"
    dpo = dict(MICRO["dpo"], overrides={"debug.step_sleep": 3.0})
    yml = write_spec(root / "kill.yaml", work, dpo=dpo)
    before = records(work)
    proc = subprocess.Popen([sys.executable, "-m", "r7b_fast.pipeline", str(yml)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip
    metrics = work / "dpo" / "metrics.jsonl"
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            started = pl.read_json(work / "dpo" / "started.json") or {}
            mine = started.get("pid") == proc.pid  # the old run's files are gone
            if mine and latest(work / "dpo" / "checkpoints") is not None:  # step 1 saved
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the pipeline finished before it could be killed"
        assert latest(work / "dpo" / "checkpoints") is not None, "dpo saved no checkpoint"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (work / "dpo" / "record.json").exists()
    assert not (work / "dpo" / "done.json").exists()
    assert (work / "dpo" / "started.json").exists()
    out = pl.run_pipeline(pl.load_pipeline(str(yml)), log=lambda *a: None)
    ran = {n for n, s in out["stages"].items() if s == "ran"}
    names = [s.name for s in pl.build_stages(pl.load_pipeline(str(yml)))]
    assert ran == set(names[names.index("dpo") :])
    after = records(work)
    assert after["dpo"]["start"] == "resume"
    for name in names[: names.index("dpo")]:
        assert after[name]["finished"] == before[name]["finished"], name
    assert '"event": "resume"' in metrics.read_text()  # the trainer picked up its checkpoint
    assert after["dpo"]["result"]["trainer"]["steps"] == 2


def test_stage_hash_depends_on_spec_and_upstream():
    a = pl.Stage("a", "train", [], {"x": 1})
    b = pl.Stage("b", "merge", ["a"], {"y": 2})
    h1 = pl.stage_hash(b, {"a": pl.stage_hash(a, {})})
    a2 = pl.Stage("a", "train", [], {"x": 2})
    assert pl.stage_hash(b, {"a": pl.stage_hash(a2, {})}) != h1
    assert pl.stage_hash(b, {"a": pl.stage_hash(a, {})}) == h1


def test_data_and_init_hashes_cover_the_tokenizer_version(tmp_path, monkeypatch):
    """TOKENIZER_VERSION (bumped when the generator, corpus or template change) is in the data
    and tiny-init specs: a bump redoes them and, through the dependency hashes, everything."""
    from r7b_fast.data import tokenizer

    spec = pl.load_pipeline(str(write_spec(tmp_path / "p.yaml", tmp_path / "w")))

    def hashes():
        out = {}
        for st in pl.build_stages(spec):
            out[st.name] = pl.stage_hash(st, out)
        return out

    before = hashes()
    st = {s.name: s for s in pl.build_stages(spec)}
    assert st["data"].spec["version"] == st["init"].spec["version"] == tokenizer.TOKENIZER_VERSION
    monkeypatch.setattr(tokenizer, "TOKENIZER_VERSION", tokenizer.TOKENIZER_VERSION + 1)
    after = hashes()
    assert set(after) == set(before)
    assert all(after[n] != before[n] for n in before)
    monkeypatch.undo()
    assert hashes() == before


def test_performance_weights():
    assert pl.performance_weights([1.0, 3.0]) == [0.25, 0.75]
    assert pl.performance_weights([0.0, 0.0]) == [0.5, 0.5]
    with pytest.raises(ValueError):
        pl.performance_weights([-1.0, 1.0])
    assert pl.metric_score({"loss": 2.0}, "loss") == pytest.approx(math.exp(-2.0))
    assert pl.metric_score({"acc/mean": 0.4}, "acc/mean") == 0.4


@pytest.mark.parametrize(
    "change, match",
    [
        ({"bogus": 1}, "unknown keys"),
        ({"sft.merge_weights": [1.0]}, "sft.merge_weights"),
        ({"sft.merge_weights": [-1.0, 2.0]}, "sft.merge_weights"),
        ({"sft.experts": []}, "sft.experts"),
        ({"online_dpo.rounds": 0}, "online_dpo.rounds"),
        ({"sft.ablation": "best"}, "sft.ablation"),
        ({"sft.ablation_merge": {"density": 0.5}}, "sft.ablation_merge"),
        ({"sft.ablation_merge": {"method": "ties", "density": 2.0}}, "sft.ablation_merge"),
        ({"nproc": 0}, "nproc"),
        (
            {"base.pretrain": {"config": "demo_sft", "families": ["arith_ar"], "bogus": 1}},
            "base.pretrain",
        ),
        (
            {"base.pretrain": {"config": "demo_sft", "families": ["arith_ar"], "data_seed": "1"}},
            "base.pretrain.data_seed",
        ),
        ({"base.pretrain": {"config": "demo_sft"}}, "base.pretrain"),
        (  # the pipeline's own data seed (0): the pretrain rows would be the SFT rows
            {"base.pretrain": {"config": "demo_sft", "families": ["arith_ar"], "data_seed": 0}},
            r"base\.pretrain\.data_seed.*seed",
        ),
        # family lists: a list of known names, the error naming the key
        ({"sft.experts": [{"name": "m", "families": "arith_ar"}]}, r"sft\.experts\[0\]\.families"),
        (
            {
                "sft.experts": [
                    {"name": "m", "families": ["arith_ar"]},
                    {"name": "s", "families": ["nope_ar"]},
                ]
            },
            r"sft\.experts\[1\]\.families.*nope_ar",
        ),  # fmt: skip
        (
            {"base.pretrain": {"config": "demo_sft", "families": ["arith_ar", "nope"]}},
            r"base\.pretrain\.families",
        ),
        (
            {"base.pretrain": {"config": "demo_sft", "families": "arith_ar"}},
            "base.pretrain.families",
        ),
        ({"dpo.families": ["arith_ar", "arith"]}, r"dpo\.families.*'arith'"),
        ({"online_dpo.families": "arith_ar"}, r"online_dpo\.families"),
        ({"eval.families": ["digits"]}, r"eval\.families"),
        ({"eval.families": [["arith_ar"]]}, r"eval\.families"),
        # data sizes: ints (a bool is not one)
        ({"data.n_train": "abc"}, r"data\.n_train"),
        ({"data.n_train": True}, r"data\.n_train"),
        ({"data.n_train": 0}, r"data\.n_train"),
        ({"data.n_eval": 1.5}, r"data\.n_eval"),
        ({"data.n_eval": None}, r"data\.n_eval"),
        ({"data.difficulty": "2"}, r"data\.difficulty"),
        ({"data.difficulty": True}, r"data\.difficulty"),
        ({"data.difficulty": 4}, r"data\.difficulty"),
    ],
)
def test_spec_validation(tmp_path, change, match):
    yml = write_spec(tmp_path / "p.yaml", tmp_path / "w", **change)
    with pytest.raises(pl.PipelineError, match=match):
        pl.load_pipeline(str(yml))


def test_null_sections_are_empty(tmp_path):
    """`dpo: null` / `online_dpo: null` mean "no such stage" (as an absent section does)."""
    spec = pl.load_pipeline(str(write_spec(tmp_path / "p.yaml", tmp_path / "w", dpo=None,
                                           online_dpo=None)))  # fmt: skip
    assert spec["dpo"] == {} and spec["online_dpo"] == {}
    names = [s.name for s in pl.build_stages(spec)]
    assert names[-2:] == ["sft_merge_perf", "eval_sft_merge_perf"]
    assert not any(n.startswith(("dpo", "online")) for n in names)


def test_ablation_merge_stage_merges_the_experts_by_its_method():
    """pipeline_demo's sft.ablation_merge: a TIES merge of the SFT experts (base = the model they
    were trained from), evaluated beside the linear merge, never used downstream."""
    st = {s.name: s for s in pl.build_stages(pl.load_pipeline("pipeline_demo"))}
    alt = st["sft_merge_alt"]
    assert alt.kind == "merge" and alt.spec["method"] == "ties"
    assert alt.spec["models"] == st["sft_merge"].spec["models"] == ["sft_math", "sft_skills"]
    assert alt.spec["base"] == "pretrain" and alt.spec["params"] == {"density": 0.5}
    assert "eval_sft_merge_alt" in st
    assert not any("sft_merge_alt" in s.deps for n, s in st.items() if n != "eval_sft_merge_alt")


def test_ablation_markdown_lists_every_sft_merge_that_ran(tmp_path):
    """The report's ablation table: one row per SFT merge that ran, its method and weights, and
    its eval numbers read back from eval_<merge>/eval.json; nothing without an ablation."""
    import json
    from types import SimpleNamespace

    for name, acc in (("sft_merge", 0.62), ("sft_merge_alt", 0.597)):
        (tmp_path / f"eval_{name}").mkdir()
        (tmp_path / f"eval_{name}" / "eval.json").write_text(
            json.dumps({"acc/mean": acc, "acc/arith_ar": 0.3, "loss": 0.4})
        )
    ctx = SimpleNamespace(work=tmp_path)
    main = {"weights": [0.5, 0.5]}
    alt = {"weights": [0.5, 0.5], "method": "ties", "params": {"density": 0.5}}
    assert pl.ablation_markdown(ctx, {"sft_merge": main}) == ""
    md = pl.ablation_markdown(ctx, {"sft_merge": main, "sft_merge_alt": alt})
    assert "| sft_merge | linear | 0.500, 0.500 | 0.620 | 0.400 | arith_ar 0.300 |" in md
    assert "| sft_merge_alt | ties | 0.500, 0.500 | 0.597 |" in md
    assert "ties {'density': 0.5}" in md.splitlines()[0]


def test_builtin_pipelines_compile():
    for name in ("pipeline_demo", "pipeline_r7b"):
        stages = pl.build_stages(pl.load_pipeline(name))
        names = [s.name for s in stages]
        dpo = [n for n in names if n.startswith("dpo") and n != "dpo_merge"]  # dpo or experts
        assert dpo and names.index("sft_merge") < min(map(names.index, dpo))
        assert max(map(names.index, dpo)) < names.index("dpo_merge") < names.index("online_merge")
        for i, st in enumerate(stages):  # dependencies always come first
            assert all(names.index(d) < i for d in st.deps)


def test_pretrain_data_seed_gives_the_base_its_own_rows(tmp_path):
    """base.pretrain.data_seed: the pretrain stage trains on data/<fam>/pretrain.jsonl, exactly
    the train-split rows drawn with that seed (never an eval prompt), not the experts' sft.jsonl;
    a family listed twice is upsampled (its file twice). Without the key, specs hash as before."""
    from r7b_fast.data.synthetic import generate_split

    pre = {"config": "demo_sft", "families": ["arith_ar", "digits_ar", "digits_ar"]}
    plain = pl.load_pipeline(str(write_spec(tmp_path / "a.yaml", tmp_path / "w",
                                            **{"base.pretrain": pre})))  # fmt: skip
    seeded = pl.load_pipeline(str(write_spec(tmp_path / "b.yaml", tmp_path / "w",
                                             **{"base.pretrain": {**pre, "data_seed": 7}})))  # fmt: skip
    st_plain = {s.name: s for s in pl.build_stages(plain)}
    st = {s.name: s for s in pl.build_stages(seeded)}
    assert "pretrain" not in st_plain["data"].spec
    assert [k for _, k in st_plain["pretrain"].spec["data"]] == ["sft"] * 3
    assert st["pretrain"].spec["data"] == [["arith_ar", "pretrain"], ["digits_ar", "pretrain"],
                                           ["digits_ar", "pretrain"]]  # fmt: skip
    assert st["sft_math"].spec["data"] == st_plain["sft_math"].spec["data"]
    assert pl.stage_hash(st["data"], {}) != pl.stage_hash(st_plain["data"], {})

    d = tmp_path / "w" / "data"
    d.mkdir(parents=True)
    assert not pl.output_complete(st["data"], d)
    pl.run_data(st["data"], d, pl.Context(seeded, tmp_path / "w", {}))
    assert pl.output_complete(st["data"], d)
    for fam in ("arith_ar", "digits_ar"):
        pretrain, sft, ev = (
            [json.loads(x) for x in (d / fam / name).read_text().splitlines()]
            for name in ("pretrain.jsonl", "sft.jsonl", "eval.jsonl")
        )
        s = st["data"].spec
        want = generate_split(fam, MICRO["data"]["n_train"], 7, "train",
                              difficulty=s["difficulty"], system=s["system"])  # fmt: skip
        assert pretrain == json.loads(json.dumps(want, ensure_ascii=False))
        assert all(r["split"] == "train" for r in pretrain)
        assert not {r["prompt"] for r in pretrain} & {r["prompt"] for r in ev}
        assert pretrain != sft
    assert not (d / "count_ar").exists()


def test_pretrain_only_family_is_generated(tmp_path):
    """Without data_seed the pretrain stage reads data/<fam>/sft.jsonl: the data stage generates
    every pretrain family, also one no expert / DPO / eval uses (count_ar here); a pretrain
    family already covered leaves the data stage (and its hash) as without pretrain."""
    pre = {"config": "demo_sft", "families": ["arith_ar", "count_ar"]}
    spec = pl.load_pipeline(str(write_spec(tmp_path / "a.yaml", tmp_path / "w",
                                           **{"base.pretrain": pre})))  # fmt: skip
    st = {s.name: s for s in pl.build_stages(spec)}
    assert st["data"].spec["families"] == ["arith_ar", "count_ar", "digits_ar"]
    assert st["eval_sft_merge"].spec["families"] == MICRO["eval"]["families"]  # eval unchanged
    ctx = pl.Context(spec, tmp_path / "w", st)
    pl.run_data(st["data"], tmp_path / "w" / "data", ctx)
    assert st["pretrain"].spec["data"] == [["arith_ar", "sft"], ["count_ar", "sft"]]
    for fam, kind in st["pretrain"].spec["data"]:
        assert len(ctx.data_file(fam, kind).read_text().splitlines()) == MICRO["data"]["n_train"]

    covered = {"config": "demo_sft", "families": ["digits_ar"]}
    plain = pl.load_pipeline(str(write_spec(tmp_path / "b.yaml", tmp_path / "w")))
    spec = pl.load_pipeline(str(write_spec(tmp_path / "c.yaml", tmp_path / "w",
                                           **{"base.pretrain": covered})))  # fmt: skip
    data, data_plain = pl.build_stages(spec)[0], pl.build_stages(plain)[0]
    assert data.spec == data_plain.spec
    assert pl.stage_hash(data, {}) == pl.stage_hash(data_plain, {})


def test_train_command_uses_torchrun_when_nproc_gt_1(tmp_path):
    spec = pl.load_pipeline(str(write_spec(tmp_path / "p.yaml", tmp_path / "w", nproc=2)))
    st = next(s for s in pl.build_stages(spec) if s.kind == "train")
    ctx = pl.Context(spec, tmp_path / "w", {})
    cmd = pl.train_command(st, tmp_path / "w" / st.name, ctx)
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert cmd[5:7] == ["-m", "r7b_fast.train"]
    assert f"run.output_dir={tmp_path / 'w' / st.name}" in cmd
