"""r7b_fast.lm_eval_run: lm-evaluation-harness on a tiny Cohere2 export with the shipped local
tasks, offline. The scores are checked against our own computations on the same rows: the MC
task against a direct log-likelihood comparison with the model, the generative task against
`r7b_fast.eval.task_accuracy` (same prompt tokens, same greedy outputs, same verifier). Also: the
shipped data equals a fresh build, nothing touches the network, the CLI, the pipeline section."""

from __future__ import annotations

import json
import math
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import yaml

from r7b_fast import lm_eval_run as le
from r7b_fast.data.chat import render_prompt
from r7b_fast.data.synthetic import _is_eval, generate_split, read_jsonl, verify
from r7b_fast.data.tokenizer import load_tokenizer
from r7b_fast.model import build_model, tiny_config

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 1}  # fmt: skip
LIMIT = 32


@pytest.fixture(scope="module")
def net_guard():
    """Every socket connection / DNS lookup in the module is recorded and refused."""
    attempts: list = []

    def refuse(*args, **kwargs):
        attempts.append(args[1:] if args else kwargs)
        raise OSError("network access in a test of the offline lm-eval path")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket.socket, "connect_ex", refuse)
        mp.setattr(socket, "getaddrinfo", refuse)
        mp.setattr(socket, "create_connection", refuse)
        yield attempts


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Cohere2 (initializer_range 0.1: its greedy outputs differ from prompt to prompt,
    where the default 0.02 repeats one special token), saved with the embedded tokenizer."""
    model = build_model(tiny_config(**TINY, initializer_range=0.1), seed=0)
    d = tmp_path_factory.mktemp("lm_eval_model") / "hf"
    model.save_pretrained(d)
    load_tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def both(model_dir, net_guard):
    """lm-eval on both shipped tasks (LIMIT docs each), samples kept, under the network guard."""
    out = le.run_lm_eval(model_dir, list(le.SHIPPED_TASKS), limit=LIMIT, return_samples=True)
    assert net_guard == [], f"lm-eval tried the network: {net_guard}"
    return out


def _loaded(model_dir):
    from r7b_fast.eval import load_for_eval

    model, tok = load_for_eval(model_dir)
    return model.float().eval(), tok


# ----------------------------------------------------------------------------- shipped data


@pytest.mark.parametrize("task", le.SHIPPED_TASKS)
def test_shipped_files_equal_a_fresh_build(task, tmp_path):
    """The committed JSONL is what `--build-tasks` writes now (so it cannot go stale), its test
    rows are held-out prompts, and the MC choices hold the answer once and 3 wrong answers."""
    shipped = le.task_file(task).read_bytes()
    le.write_task_files(tmp_path)
    assert le.task_file(task, tmp_path).read_bytes() == shipped
    rows = read_jsonl(le.task_file(task))
    test = [r for r in rows if r["split"] == "test"]
    assert len(test) == le.N_TEST and len(rows) == le.N_TEST + le.N_FEWSHOT
    assert all(_is_eval(r["prompt"]) for r in test)
    assert not any(_is_eval(r["prompt"]) for r in rows if r["split"] == "train")
    if task.endswith("_mc"):
        for r in rows:
            assert len(set(r["choices"])) == 4 and r["choices"][r["label"]] == r["answer"]
            assert [verify(r, c) for c in r["choices"]].count(1.0) == 1


def test_process_verify_normalises_digits_like_the_verifier():
    from r7b_fast.lm_eval_tasks.utils import process_verify

    doc = {"family": "arith_ar", "answer": "١٤", "prompt": "?"}
    assert process_verify(doc, ["١٤"]) == {"acc": 1.0}
    assert process_verify(doc, [" الجواب 14."]) == {"acc": 1.0}  # Western digits, words around
    assert process_verify(doc, ["١٣"]) == {"acc": 0.0}
    assert process_verify(doc, ["١٤ أو ١٥"]) == {"acc": 0.0}


# ----------------------------------------------------------------------------- scores


def test_mc_score_equals_our_own_loglikelihood_comparison(both, model_dir):
    """Per choice: sum of log p(choice tokens | chat-templated prompt) from the model directly
    (fp32; tolerance 1e-4 absolute on values ~10: lm-eval batches and pads, so only the fp32
    summation order differs); acc / acc_norm (by UTF-8 byte length) recomputed from ours."""
    model, tok = _loaded(model_dir)
    samples = both["samples"]["r7b_arith_ar_mc"]
    assert len(samples) == LIMIT
    hits = norm_hits = 0
    for s in samples:
        doc = s["doc"]
        ctx = render_prompt(tok, [{"role": "user", "content": doc["prompt"]}])
        text = tok.apply_chat_template([{"role": "user", "content": doc["prompt"]}],
                                       tokenize=False, add_generation_prompt=True)  # fmt: skip
        fulls = [tok(text + c, add_special_tokens=False)["input_ids"] for c in doc["choices"]]
        assert all(f[: len(ctx)] == ctx for f in fulls)
        batch = torch.zeros(4, max(map(len, fulls)), dtype=torch.long)  # right padding: causal
        for i, f in enumerate(fulls):  # attention keeps it out of the real positions
            batch[i, : len(f)] = torch.tensor(f)
        with torch.no_grad():
            logp = model(batch).logits.float().log_softmax(-1)
        ours = [sum(float(logp[i, t - 1, f[t]]) for t in range(len(ctx), len(f)))
                for i, f in enumerate(fulls)]  # fmt: skip
        theirs = [r[0] for r in s["filtered_resps"]]
        assert theirs == pytest.approx(ours, abs=1e-4)
        hits += max(range(4), key=ours.__getitem__) == doc["label"]
        per_byte = [ll / len(c.encode()) for ll, c in zip(ours, doc["choices"])]
        norm_hits += max(range(4), key=per_byte.__getitem__) == doc["label"]
    assert both["lm_eval/r7b_arith_ar_mc/acc"] == pytest.approx(hits / LIMIT, abs=1e-12)
    assert both["lm_eval/r7b_arith_ar_mc/acc_norm"] == pytest.approx(norm_hits / LIMIT, abs=1e-12)
    assert both["lm_eval/r7b_arith_ar_mc/n"] == LIMIT


def test_generative_score_equals_task_accuracy(both, model_dir):
    """Same prompt tokens as r7b_fast.eval (the chat template's generation prompt), same greedy
    outputs, same verifier score per row, same mean."""
    from r7b_fast.eval import task_accuracy

    model, tok = _loaded(model_dir)
    rows = generate_split("arith_ar", le.N_TEST, le.SEED, "eval")[:LIMIT]
    ours = task_accuracy(model, tok, rows, max_new_tokens=24, return_samples=True)
    samples = sorted(both["samples"]["r7b_arith_ar"], key=lambda s: s["doc_id"])
    assert [s["doc"]["prompt"] for s in samples] == [r["prompt"] for r in rows]
    for s, r, o in zip(samples, rows, ours["samples"]):
        context = s["arguments"][0][0]
        assert tok(context, add_special_tokens=False)["input_ids"] == render_prompt(
            tok, r["messages"][:-1]
        )
        assert s["filtered_resps"][0].strip() == o["output"]
        assert s["acc"] == o["score"]
    assert len({o["output"] for o in ours["samples"]}) > LIMIT // 2  # outputs differ per prompt
    assert both["lm_eval/r7b_arith_ar/acc"] == pytest.approx(ours["acc/arith_ar"], abs=1e-12)


def test_flatten_results_names_and_filters():
    res = {
        "results": {"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": 0.1,
                          "exact_match,strict": 1.0, "exact_match_stderr,strict": "N/A"}},
        "n-samples": {"t": {"original": 10, "effective": 4}},
    }  # fmt: skip
    assert le.flatten_results(res) == {
        "lm_eval/t/acc": 0.5,
        "lm_eval/t/acc_stderr": 0.1,
        "lm_eval/t/exact_match:strict": 1.0,
        "lm_eval/t/n": 4.0,
    }
    table = le.scores_table(le.flatten_results(res), title="m")
    assert "| t | acc | 0.500 | 0.100 | 4 |" in table
    assert "| t | exact_match:strict | 1.000 | - | 4 |" in table


# ----------------------------------------------------------------------------- offline, errors


def test_offline_sets_and_restores_the_flags(monkeypatch):
    import huggingface_hub.constants as hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    with le.offline():
        assert all(os.environ[k] == "1" for k in le.OFFLINE_ENV)
        assert hub.HF_HUB_OFFLINE is True
    assert "HF_HUB_OFFLINE" not in os.environ and os.environ["HF_DATASETS_OFFLINE"] == "0"
    assert hub.HF_HUB_OFFLINE is False


def test_a_hub_dataset_fails_instead_of_downloading(model_dir, tmp_path, net_guard):
    """A task whose data would come from the Hub raises (offline), and nothing connected."""
    (tmp_path / "hub_task.yaml").write_text(yaml.safe_dump({
        "task": "r7b_test_hub_task", "dataset_path": "r7b-fast-test/not-cached",
        "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{q}}",
        "doc_to_choice": "choices", "doc_to_target": "label", "metric_list": [{"metric": "acc"}],
    }))  # fmt: skip
    with pytest.raises(ConnectionError, match="OfflineModeIsEnabled"):  # datasets' own error
        le.run_lm_eval(model_dir, ["r7b_test_hub_task"], include_path=tmp_path, limit=2)
    assert net_guard == [], f"tried the network: {net_guard}"


def test_errors_name_the_extra_and_the_shipped_tasks(model_dir, monkeypatch):
    with pytest.raises(ValueError, match="r7b_arith_ar_mc"):
        le.run_lm_eval(model_dir, ["r7b_no_such_task"], include_path=le.TASKS_DIR)
    with pytest.raises(FileNotFoundError, match="config.json"):
        le.run_lm_eval(model_dir.parent, ["r7b_arith_ar"])
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
    with pytest.raises(ImportError, match=r"r7b-fast\[eval\]"):
        le.run_lm_eval(model_dir, ["r7b_arith_ar"])


# ----------------------------------------------------------------------------- CLI, pipeline


def test_cli_prints_the_scores(model_dir, both, capsys, net_guard):
    from r7b_fast.eval import main

    main([str(model_dir), "--lm-eval", "r7b_arith_ar_mc", "--limit", str(LIMIT)])
    out = capsys.readouterr().out
    acc = both["lm_eval/r7b_arith_ar_mc/acc"]
    assert f"| r7b_arith_ar_mc | acc | {acc:.3f} |" in out
    with pytest.raises(SystemExit):
        main([str(model_dir)])  # neither EVAL.jsonl nor --lm-eval
    assert net_guard == []


def _micro_spec(tmp_path, lm_eval) -> Path:
    spec = {
        "work_dir": str(tmp_path / "work"),
        "base": {"path": "tiny", "tiny_overrides": TINY},
        "data": {"n_train": 4, "n_eval": 2},
        "sft": {"config": "demo_sft", "experts": [{"name": "math", "families": ["arith_ar"]}]},
        "eval": {"families": ["arith_ar"], "max_new_tokens": 2, "lm_eval": lm_eval},
    }
    path = tmp_path / "micro.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.parametrize(
    "lm_eval, match",
    [
        ({"tasks": []}, "eval.lm_eval.tasks"),
        ({"tasks": ["r7b_arith_ar"], "limit": 0}, "eval.lm_eval.limit"),
        ({"tasks": ["r7b_arith_ar"], "stages": "final"}, "eval.lm_eval.stages"),
        ({"tasks": ["r7b_arith_ar"], "shots": 1}, "unknown keys"),
        ({"tasks": ["r7b_not_a_task"]}, "unknown tasks"),
    ],
)
def test_pipeline_section_is_validated(tmp_path, lm_eval, match):
    from r7b_fast.pipeline_spec import PipelineError, load_pipeline

    with pytest.raises(PipelineError, match=match):
        load_pipeline(str(_micro_spec(tmp_path, lm_eval)))


def test_pipeline_stage_names_are_checked_and_select_the_evals(tmp_path):
    from r7b_fast.pipeline_spec import PipelineError, build_stages, load_pipeline

    sel = {"tasks": ["r7b_arith_ar_mc"], "limit": 3, "stages": ["sft_merge"]}
    evals = {s.spec["model"]: s.spec for s in build_stages(load_pipeline(
        str(_micro_spec(tmp_path, sel)))) if s.kind == "eval"}  # fmt: skip
    assert evals["sft_merge"]["lm_eval"] == {"tasks": ["r7b_arith_ar_mc"], "limit": 3}
    assert "lm_eval" not in evals["sft_math"]  # unselected: spec (and hash) unchanged
    spec = load_pipeline(str(_micro_spec(tmp_path, {**sel, "stages": ["dpo_merge"]})))
    with pytest.raises(PipelineError, match="not evaluated stages"):
        build_stages(spec)


@pytest.mark.slow
def test_pipeline_run_eval_joins_eval_json_and_the_report(tmp_path, model_dir, both, net_guard):
    """The selected eval stage of a micro spec runs lm-eval on its model's export: the scores
    join eval.json and report.md (the data stage runs; the merge's export is our test model)."""
    from r7b_fast import pipeline as pl
    from r7b_fast.pipeline_spec import build_stages, load_pipeline

    sel = {"tasks": ["r7b_arith_ar_mc"], "limit": LIMIT, "stages": ["sft_merge"]}
    spec = load_pipeline(str(_micro_spec(tmp_path, sel)))
    stages = build_stages(spec)
    byname = {s.name: s for s in stages}
    work = Path(spec["work_dir"])
    ctx = pl.Context(spec, work, byname, log=lambda *a: None)
    (work / "data").mkdir(parents=True)
    pl.run_data(byname["data"], work / "data", ctx)
    (work / "sft_merge").mkdir()
    os.symlink(model_dir, work / "sft_merge" / "hf")
    d = work / "eval_sft_merge"
    d.mkdir()
    pl.run_eval(byname["eval_sft_merge"], d, ctx)
    got = json.loads((d / "eval.json").read_text())
    assert got["lm_eval/r7b_arith_ar_mc/acc"] == both["lm_eval/r7b_arith_ar_mc/acc"]
    assert "acc/arith_ar" in got  # our harness still ran
    report = pl.write_pipeline_report(ctx, stages)
    md = Path(report["report"]["md"]).read_text()
    acc = got["lm_eval/r7b_arith_ar_mc/acc"]
    assert "## lm-evaluation-harness" in md and f"| {acc:.3f} ± " in md
    assert not math.isnan(acc) and net_guard == []
