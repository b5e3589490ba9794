"""The trainer's stages end to end on a tiny model (in process, CPU): run-dir contract, loss falls
on a learnable task, DPO metrics, the online stage, NaN handling, config errors before the model."""

import json

import pytest
import torch
import yaml
from _train_helpers import COMMON, events, metrics, one_thread  # noqa: F401 (fixture)

from r7b_fast import checkpoint, train
from r7b_fast.config import ConfigError, load_config
from r7b_fast.distributed import Dist
from r7b_fast.optim import build_optimizer, lr_factor


def run(tmp_path, name, *overrides):
    out = tmp_path / name
    cfg = load_config(name, [*COMMON, f"run.output_dir={out}", *overrides])
    train.run(cfg)
    return out


def test_sft_loss_falls_and_run_dir_contract(tmp_path):
    out = run(tmp_path, "sft_tiny", "data.synthetic_families=[digits_ar]",
              "data.synthetic_train=48", "optim.max_steps=24", "optim.global_batch=2",
              "optim.micro_batch=1", "optim.lr=3e-2", "optim.warmup_steps=2",
              "checkpoint.every_steps=10")  # fmt: skip
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 25))
    first, last = rows[0]["loss"], sum(r["loss"] for r in rows[-3:]) / 3
    assert first > 6.0  # ~ln(1024) at init
    assert last < first - 2.5, (first, last)  # the task format is learnable
    for key in ("lr", "grad_norm", "tokens_per_s", "tokens"):
        assert all(r[key] > 0 for r in rows), key
    assert "mfu" not in rows[0]  # no peak FLOP/s on CPU
    start = events(out, "start")[0]
    assert start["config"]["optim"]["max_steps"] == 24 and "torch" in start["versions"]
    assert yaml.safe_load((out / "config.yaml").read_text())["optim"]["lr"] == 3e-2
    done = json.loads((out / "done.json").read_text())
    assert done["steps"] == 24 and done["final"]["loss"] == rows[-1]["loss"]
    # keep_last=2 while training; checkpoint.keep_after_done=1 once done.json is written
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000024"]
    assert (out / "hf" / "config.json").is_file() and (out / "hf" / "tokenizer.json").is_file()
    assert list((out / "tb").iterdir())  # TensorBoard events


def test_dpo_loss_falls_with_trl_metrics(tmp_path):
    out = run(tmp_path, "dpo_tiny", "data.synthetic_families=[count_ar]",
              "data.synthetic_train=32", "optim.max_steps=16", "optim.global_batch=2",
              "optim.micro_batch=1", "optim.lr=3e-2", "optim.warmup_steps=1", "dpo.beta=0.5",
              "checkpoint.every_steps=0")  # fmt: skip
    rows = metrics(out)
    names = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
             "logps/chosen", "logps/rejected")  # fmt: skip
    assert all(k in r for r in rows for k in names)
    assert rows[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at step 1
    assert rows[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    last = sum(r["loss"] for r in rows[-4:]) / 4
    assert last < 0.45, [r["loss"] for r in rows]  # chosen = the right count: learnable
    assert rows[-1]["rewards/margins"] > 0
    ref = torch.load(out / "reference" / "dpo.pt")
    assert all(torch.isfinite(t).all() and (t < 0).all() for t in ref)


def test_online_dpo_stage_runs_rounds(tmp_path):
    out = run(tmp_path, "online_dpo_tiny", "data.synthetic_families=[digits_ar]",
              "data.synthetic_train=8", "online.rounds=2", "online.prompts_per_round=4",
              "online.num_samples=3", "online.max_new_tokens=8", "optim.max_steps=2",
              "optim.global_batch=1", "optim.micro_batch=1", "checkpoint.every_steps=0",
              "online.reward=_train_helpers:length_reward")  # fmt: skip
    rounds = events(out, "round")
    assert [r["round"] for r in rounds] == [0, 1]
    for r in rounds:
        assert r["prompts"] == 4 and r["pairs"] + r["skipped_ties"] == 4 and r["pairs"] >= 1
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and "rewards/margins" in rows[0]
    assert rows[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)  # reference = round's policy
    saved = torch.load(out / "online" / "round_001.pt", weights_only=False)
    assert len(saved["pairs"]) == rounds[1]["pairs"] and saved["ref"]
    assert (out / "done.json").is_file()


def test_nan_stops_and_keeps_checkpoint(tmp_path):
    with pytest.raises(train.NonFiniteError, match=r"step 3: non-finite.*step_00000002"):
        run(tmp_path, "sft_tiny", "data.synthetic_families=[digits_ar]",
            "data.synthetic_train=8", "optim.max_steps=6", "optim.global_batch=1",
            "optim.micro_batch=1",
            "checkpoint.every_steps=2", "debug.nan_at_step=3")  # fmt: skip
    out = tmp_path / "sft_tiny"
    assert not (out / "done.json").exists()
    assert checkpoint.latest(out / "checkpoints").name == "step_00000002"
    cfg = load_config(str(out / "config.yaml"))
    tok = train.load_tokenizer(cfg)
    model = train.build_model(cfg, Dist(), tok)
    opt, _ = build_optimizer(cfg, model, 6)
    state = checkpoint.load(checkpoint.latest(out / "checkpoints"), model, opt, Dist())
    assert state["step"] == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert events(out, "error")[0]["type"] == "NonFiniteError"


def test_config_error_before_model(tmp_path, monkeypatch, capsys):
    def boom(*a, **k):
        raise AssertionError("model built despite a config error")

    monkeypatch.setattr(train, "build_model", boom)
    rc = train.main(["sft_tiny", f"run.output_dir={tmp_path}", "optim.micro_batch=99"])
    assert rc == 2 and "optim.micro_batch" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="^optim.global_batch"):
        train.run(load_config("sft_tiny", [f"run.output_dir={tmp_path}", "optim.global_batch=3",
                                           "optim.micro_batch=3", "optim.global_batch=4"]))  # fmt: skip


def test_lr_schedule():
    cfg = load_config("sft_tiny", ["optim.warmup_steps=4", "optim.min_lr_ratio=0.1"])
    f = [lr_factor(s, 14, cfg) for s in range(14)]
    assert f[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8]) and f[4] == pytest.approx(1.0)
    assert f[-1] == pytest.approx(0.1) and all(a >= b for a, b in zip(f[4:], f[5:]))
    cfg.optim.schedule = "linear"
    assert lr_factor(9, 14, cfg) == pytest.approx(0.1 + 0.9 * (1 - 5 / 9))


def test_oom_message_names_batch_settings(tmp_path, monkeypatch, capsys):
    def oom(cfg):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(train, "run", oom)
    rc = train.main(["sft_tiny", f"run.output_dir={tmp_path}", "optim.micro_batch=4"])
    err = capsys.readouterr().err
    assert rc == 4
    for key in ("optim.micro_batch=4", "data.max_tokens=256", "model.activation_checkpointing"):
        assert key in err, err


def test_dpo_ipo_with_sft_term_runs(tmp_path):
    out = run(tmp_path, "dpo_tiny", "data.synthetic_families=[count_ar]",
              "data.synthetic_train=8", "optim.max_steps=2", "optim.global_batch=2",
              "optim.micro_batch=1", "dpo.loss_type=ipo", "dpo.sft_weight=0.5",
              "checkpoint.every_steps=0", "checkpoint.export_hf=false")  # fmt: skip
    rows = metrics(out)
    # step 1: policy == reference, so IPO's (margin - 1/(2 beta))^2 = 25 plus 0.5 x the chosen
    # answers' mean NLL (~ln 1024 at init) gives loss ~ 25 + 3.5
    assert 27.5 < rows[0]["loss"] < 29.5
    assert (out / "done.json").is_file() and not (out / "hf").exists()
