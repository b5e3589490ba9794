"""A run directory belongs to one run (r7b_fast.rundir): fingerprint refusals leave the directory
byte-identical, deliberate changes take effect and are recorded, the lock, validation before
anything changes, the tokenizer rule, exports that cache, gate/pipeline caches keyed by what
determines them, children that die with the pipeline, metrics without duplicate steps."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from _train_helpers import COMMON, events, metrics, one_thread  # noqa: F401 (fixture)

from r7b_fast import train
from r7b_fast.checkpoint import latest
from r7b_fast.config import ConfigError, load_config

FAST = [*COMMON, "data.synthetic_families=[digits_ar]", "data.synthetic_train=8",
        "optim.global_batch=1", "optim.micro_batch=1", "checkpoint.every_steps=0",
        "logging.tensorboard=false"]  # fmt: skip


def args(out: Path, *overrides: str) -> list[str]:
    return [*FAST, f"run.output_dir={out}", "optim.max_steps=2", *overrides]


def run(out: Path, *overrides: str, config: str = "sft_tiny") -> dict:
    return train.run(load_config(config, args(out, *overrides)))


def tree(d: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under `d` (bytes, so any rewrite shows)."""
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}  # fmt: skip


def main(out: Path, capsys, *overrides: str, config: str = "sft_tiny") -> tuple[int, str]:
    rc = train.main([config, *args(out, *overrides)])
    return rc, capsys.readouterr().err


def test_changed_config_refused_dir_untouched_same_config_already_done(tmp_path, capsys):
    out = tmp_path / "sft"
    run(out)
    before = tree(out)
    assert "run.json" in before and "done.json" in before
    for change, key in (("optim.lr=5e-5", "optim.lr"),  # 1: a changed lr was silently dropped
                        ("data.synthetic_train=9", "data.synthetic_train"),  # 1: changed data
                        ("run.seed=1", "run.seed")):  # fmt: skip
        rc, err = main(out, capsys, change)
        assert rc == 2 and key in err and "run.allow_changes" in err, err
        assert tree(out) == before, change
    rc, err = main(out, capsys, config="dpo_tiny")  # 1: dpo into a finished SFT dir
    assert rc == 2 and "run.stage" in err and '"sft" -> "dpo"' in err, err
    assert tree(out) == before
    # the same config: nothing retrained, nothing rewritten (result-neutral keys may differ)
    rc, err = main(out, capsys, "logging.every_steps=5", "run.cpu_threads=2")
    assert rc == 0 and "already done" in err and tree(out) == before, err


def test_changed_data_file_refused(tmp_path, capsys):
    from r7b_fast.data.synthetic import generate_split, write_jsonl

    data = write_jsonl(generate_split("digits_ar", 8, 0, "train"), tmp_path / "d.jsonl")
    over = [f"data.train=[{data}]", "data.synthetic_families=[]"]
    out = tmp_path / "run"
    run(out, *over)
    before = tree(out)
    write_jsonl(generate_split("digits_ar", 8, 1, "train"), data)  # same path, other rows
    rc, err = main(out, capsys, *over)
    assert rc == 2 and "data.train:content" in err, err
    assert tree(out) == before


def test_allowed_change_takes_effect_and_is_recorded(tmp_path):
    out = tmp_path / "sft"
    const = ["optim.schedule=constant", "optim.warmup_steps=0"]
    run(out, *const, "optim.lr=1e-3")
    # continue the finished run for 2 more steps at half the lr
    run(out, *const, "optim.lr=5e-4", "optim.max_steps=4",
        "run.allow_changes=[optim.lr, optim.max_steps]")  # fmt: skip
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    # the checkpoint's scheduler (base_lrs) and param groups must not bring the old lr back
    assert [r["lr"] for r in rows] == pytest.approx([1e-3, 1e-3, 5e-4, 5e-4], rel=1e-12)
    change = events(out, "config_change")[0]["changes"]
    assert change["optim.lr"] == {"old": 1e-3, "new": 5e-4}
    assert change["optim.max_steps"] == {"old": 2, "new": 4}
    assert events(out, "resume")[0]["step"] == 2
    assert yaml.safe_load((out / "config.yaml").read_text())["optim"]["lr"] == 5e-4
    history = json.loads((out / "run.json").read_text())["changes"]
    assert history[0]["changes"]["optim.lr"] == [1e-3, 5e-4]
    assert json.loads((out / "done.json").read_text())["steps"] == 4


def test_resume_false_refused_overwrite_starts_fresh_keep_none(tmp_path, capsys):
    out = tmp_path / "sft"
    run(out)
    before = tree(out)
    rc, err = main(out, capsys, "checkpoint.resume=false")
    assert rc == 2 and "run.overwrite=true" in err and tree(out) == before, err
    rc, _ = main(out, capsys, "checkpoint.resume=false", "run.overwrite=true", "optim.lr=3e-4",
                 "checkpoint.keep_after_done=0")  # fmt: skip
    assert rc == 0
    assert [r["step"] for r in metrics(out)] == [1, 2]  # the old run's records are gone
    assert not events(out, "resume") and len(events(out, "start")) == 1
    assert not (out / "checkpoints").exists()  # keep_after_done=0: none kept once done
    assert (out / "hf" / "config.json").is_file()
    finished = tree(out)
    rc, err = main(out, capsys, "optim.lr=3e-4")  # the same run again: already done
    assert rc == 0 and "already done" in err and tree(out) == finished, err


def test_failing_rerun_leaves_finished_run_intact(tmp_path, capsys):
    from r7b_fast.data.synthetic import generate_split, write_jsonl

    good = write_jsonl(generate_split("digits_ar", 8, 0, "train"), tmp_path / "good.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": "not a list"}\nnot json at all\n')
    out = tmp_path / "run"
    run(out, f"data.train=[{good}]", "data.synthetic_families=[]")
    before = tree(out)
    with pytest.raises(Exception):  # noqa: B017 (whatever the data error, nothing may change)
        run(out, f"data.train=[{bad}]", "data.synthetic_families=[]",
            "run.allow_changes=[data.train]")  # fmt: skip
    assert tree(out) == before  # done.json, config.yaml, run.json, metrics: all as they were
    nomodel = tmp_path / "empty_model"
    nomodel.mkdir()
    rc, err = main(out, capsys, f"data.train=[{good}]", "data.synthetic_families=[]",
                   f"model.path={nomodel}", "model.tiny_overrides={}", "run.allow_changes=['*']")  # fmt: skip
    assert rc == 2 and "model.path" in err and "config.json" in err, err
    assert tree(out) == before


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny SFT run (its hf/ is a model for the next tests)."""
    out = tmp_path_factory.mktemp("finished") / "sft"
    run(out)
    return out


def test_tokenizerless_checkpoint_needs_data_tokenizer(finished, tmp_path):
    from transformers import AutoModelForCausalLM

    bare = tmp_path / "bare"
    AutoModelForCausalLM.from_pretrained(finished / "hf").save_pretrained(bare)  # no tokenizer
    over = [f"model.path={bare}", "model.tiny_overrides={}"]
    with pytest.raises(ConfigError, match=r"^data.tokenizer: .*data.tokenizer=embedded"):
        run(tmp_path / "a", *over)
    assert not (tmp_path / "a").exists()
    run(tmp_path / "b", *over, "data.tokenizer=embedded")  # asked by name: fine
    assert (tmp_path / "b" / "hf" / "tokenizer.json").is_file()


def test_model_path_run_dir_resolves_to_its_hf(finished, tmp_path):
    out = tmp_path / "dpo"
    run(out, f"model.path={finished}", "model.tiny_overrides={}", config="dpo_tiny")
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["model"]["path"] == str((finished / "hf").resolve())
    cp = finished / "checkpoints"  # a run dir without done.json/hf: a clear error
    with pytest.raises(ConfigError, match="^model.path: .*config.json"):
        run(tmp_path / "x", f"model.path={cp}", "model.tiny_overrides={}")


def test_export_uses_cache_and_generates(finished):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = finished / "hf"
    assert json.loads((hf / "config.json").read_text())["use_cache"] is True
    assert json.loads((hf / "generation_config.json").read_text())["use_cache"] is True
    model = AutoModelForCausalLM.from_pretrained(hf)
    assert model.config.use_cache and model.generation_config.use_cache
    ids = AutoTokenizer.from_pretrained(hf)("12 + 3 =", return_tensors="pt").input_ids
    cached = model.generate(ids, max_new_tokens=6, do_sample=False)  # a plain generate()
    uncached = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False)
    assert cached.shape == (1, ids.shape[1] + 6) and torch.equal(cached, uncached)
    # training itself keeps the cache off (packed rows)
    cfg = load_config("sft_tiny", args(finished, f"model.path={hf}", "model.tiny_overrides={}"))
    built = train.build_model(cfg, train.distributed.Dist(), train.load_tokenizer(cfg))
    assert built.config.use_cache is False


def test_one_checkpoint_kept_after_done(finished):
    assert [p.name for p in (finished / "checkpoints").iterdir()] == ["step_00000002"]


def _spawn_trainer(out: Path, *overrides: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "r7b_fast.train", "sft_tiny", *args(out, *overrides)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            cwd=Path(__file__).parent)  # fmt: skip


def _wait(cond, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        assert proc is None or proc.poll() is None, "the process ended early"
        time.sleep(0.1)
    raise AssertionError("timed out")


def _step_records(out: Path) -> list[int]:
    try:
        return [r["step"] for r in metrics(out)]
    except (OSError, ValueError):
        return []


@pytest.mark.slow
def test_lock_refuses_second_trainer_then_kill_resume_has_no_duplicate_steps(tmp_path, capsys):
    out = tmp_path / "sft"
    slow = ["optim.max_steps=12", "checkpoint.every_steps=4", "debug.step_sleep=1.0"]
    proc = _spawn_trainer(out, *slow)
    try:
        _wait(lambda: 2 in _step_records(out), 120, proc)
        rc, err = main(out, capsys, *slow)  # a second trainer in the same dir
        assert rc == 2 and "in use" in err and f"pid {proc.pid}" in err, err
        # kill -9 right after a step past a checkpoint is logged (the next one is >= 1 s away)
        _wait(lambda: max(_step_records(out)) % 4 == 1, 60, proc)
        os.kill(proc.pid, signal.SIGKILL)  # the flock dies with the process
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    ckpt = int(latest(out / "checkpoints").name[5:])
    logged = _step_records(out)
    assert max(logged) > ckpt, (logged, ckpt)  # steps after the checkpoint were logged
    run(out, *slow[:2])  # the stale lock is taken over; resumes from `ckpt`
    assert _step_records(out) == list(range(1, 13))  # each step once
    assert events(out, "resume")[0]["step"] == ckpt


def test_gate_cache_keyed_by_seed_and_data(tmp_path):
    from r7b_fast.data.synthetic import generate_split, write_jsonl
    from r7b_fast.gate_runner import GatePlan, train_proxy

    files = [write_jsonl(generate_split("digits_ar", 8, 0, "train"), tmp_path / "d.jsonl")]
    ov = {
        "optim.max_steps": 1,
        "optim.global_batch": 1,
        "optim.micro_batch": 1,
        "data.max_tokens": 128,
        "model.kernel_backend": "torch",
        "checkpoint.every_steps": 0,
        "run.cpu_threads": 1,
    }
    model = {"path": "tiny", "tiny_overrides": {"hidden_size": 32, "intermediate_size": 64,
             "num_attention_heads": 2, "num_key_value_heads": 1}}  # fmt: skip
    plan = GatePlan(work=tmp_path, config="sft_tiny", model=model, overrides=ov, seeds=[0],
                    mixture=files, candidates=[], eval_rows=[])  # fmt: skip
    out = tmp_path / "g"
    hf = train_proxy(plan, out, files, 0)
    first = tree(hf)
    done = (out / "done.json").read_bytes()
    assert train_proxy(plan, out, files, 0) == hf and (out / "done.json").read_bytes() == done
    (out / "done.json").unlink()  # as if interrupted after its checkpoint: resumed, not wiped
    train_proxy(plan, out, files, 0)
    assert len(events(out, "start")) == 2 and events(out, "resume") and tree(hf) == first
    train_proxy(plan, out, files, 1)  # 4: another seed retrains
    assert tree(hf) != first
    seed1 = tree(hf)
    write_jsonl(generate_split("digits_ar", 8, 3, "train"), files[0])  # 4: new data retrains
    train_proxy(plan, out, files, 1)
    assert tree(hf) != seed1
    assert len(events(out, "start")) == 1  # each retrain started from an empty dir


def test_pipeline_stage_hash_covers_user_files(tmp_path):
    from r7b_fast import pipeline as pl

    f = tmp_path / "u.jsonl"
    f.write_text('{"messages": []}\n')
    st = pl.Stage("t", "train", [], {"data": [[str(f), "file"]], "config": "x"})
    h = pl.stage_hash(st, {})
    assert pl.stage_hash(st, {}) == h
    f.write_text('{"messages": [1]}\n')
    assert pl.stage_hash(st, {}) != h
    plain = pl.Stage("t", "train", [], {"data": [["digits_ar", "sft"]], "config": "x"})
    payload = {"kind": "train", "spec": plain.spec, "deps": {}}  # unchanged without inputs
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()
    assert pl.stage_hash(plain, {}) == hashlib.sha256(blob).hexdigest()[:16]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in state  # a zombie has exited


@pytest.mark.slow
def test_pipeline_kill9_kills_its_trainer(tmp_path):
    tiny = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 1}  # fmt: skip
    spec = {"work_dir": str(tmp_path / "work"), "base": {"path": "tiny", "tiny_overrides": tiny},
            "data": {"n_train": 8, "n_eval": 2},
            "train_overrides": {"optim.max_steps": 50, "optim.global_batch": 1, "optim.micro_batch": 1,
                                "data.max_tokens": 128, "model.kernel_backend": "torch",
                                "debug.step_sleep": 1.0, "run.cpu_threads": 1},
            "sft": {"config": "demo_sft", "experts": [{"name": "x", "families": ["digits_ar"]}]},
            "eval": {"families": ["digits_ar"], "n_per_family": 1, "max_new_tokens": 2}}  # fmt: skip
    yml = tmp_path / "p.yaml"
    yml.write_text(yaml.safe_dump(spec))
    proc = subprocess.Popen([sys.executable, "-m", "r7b_fast.pipeline", str(yml)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    lock = tmp_path / "work" / "sft_x" / ".lock"
    trainer = None
    try:
        _wait(lambda: lock.is_file() and lock.read_text().startswith("pid "), 240, proc)
        trainer = int(lock.read_text().split()[1])
        assert _alive(trainer)
        os.kill(proc.pid, signal.SIGKILL)  # only the pipeline
        proc.wait()
        _wait(lambda: not _alive(trainer), 10)  # 9: the trainer died with it
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if trainer is not None and _alive(trainer):
            os.kill(trainer, signal.SIGKILL)


def test_resumed_at_keeps_each_step_once_in_metrics_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from r7b_fast.logging import MetricsLogger

    first = MetricsLogger(tmp_path, enabled=True, tensorboard=True, progress_bar=False)
    for step in range(1, 6):  # an attempt killed after step 5, its last checkpoint at step 2
        first.log(step, {"loss": float(step)})
    first.close()
    second = MetricsLogger(tmp_path, enabled=True, tensorboard=True, progress_bar=False)
    second.event("resume", step=2)
    second.resumed_at(2)
    for step in range(3, 7):
        second.log(step, {"loss": 10.0 + step})
    second.close()
    assert [(r["step"], r["loss"]) for r in metrics(tmp_path)] == [
        (1, 1.0), (2, 2.0), (3, 13.0), (4, 14.0), (5, 15.0), (6, 16.0)]  # fmt: skip
    assert len(events(tmp_path, "resume")) == 1  # events are kept
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [
        (1, 1.0), (2, 2.0), (3, 13.0), (4, 14.0), (5, 15.0), (6, 16.0)]  # fmt: skip


def test_fingerprint_ignores_result_neutral_keys_only():
    from r7b_fast import rundir

    base = load_config("sft_tiny", ["run.output_dir=x"])
    fp = rundir.fingerprint(base)
    for neutral in ("logging.every_steps=7", "checkpoint.every_steps=3", "run.cpu_threads=2",
                    "run.output_dir=y", "debug.step_sleep=0.5", "model.kernel_backend=torch", "eval.every_steps=5",
                    "online.gather_for_sampling=false", "model.compile=on",
                    "fsdp.grad_accumulation=unsharded"):  # fmt: skip
        cfg = load_config("sft_tiny", ["run.output_dir=x", neutral])
        assert rundir.fingerprint(cfg) == fp, neutral
    for key, value in (("optim.lr", "1e-3"), ("optim.beta2", "0.9"), ("data.max_tokens", "64"),
                       ("model.dtype", "bfloat16"), ("dpo.beta", "0.5"), ("run.seed", "3"),
                       ("online.batch_size", "7")):  # fmt: skip
        cfg = load_config("sft_tiny", ["run.output_dir=x", f"{key}={value}"])
        assert list(rundir.diff(fp, rundir.fingerprint(cfg))) == [key]


def test_nan_advice_resume_with_lower_lr_works(tmp_path):
    """The NonFiniteError message's advice, followed literally, continues the run at the new lr."""
    out = tmp_path / "sft"
    const = ["optim.schedule=constant", "optim.warmup_steps=0", "optim.max_steps=4",
             "checkpoint.every_steps=2"]  # fmt: skip
    with pytest.raises(train.NonFiniteError, match=r"run.allow_changes=\[optim.lr\]") as e:
        run(out, *const, "optim.lr=1e-2", "debug.nan_at_step=3")
    assert "optim.lr=<new>" in str(e.value)
    run(out, *const, "optim.lr=1e-3", "run.allow_changes=[optim.lr]")  # debug.*: neutral
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["lr"] for r in rows] == pytest.approx([1e-2, 1e-2, 1e-3, 1e-3], rel=1e-12)
