"""On-policy DPO rounds that must train: a round without pairs is loud, a stage whose rounds all
tie fails (exit 5) instead of exporting its input, done.json counts the steps that trained, a
mid-round resume equals an uninterrupted run bit for bit, and (slow) the documented tiny chain
sft_tiny -> dpo_tiny -> online_dpo_tiny makes pairs and changes the model."""

import json

import pytest
import torch
from _train_helpers import COMMON, events, metrics, one_thread  # noqa: F401 (fixture)
from safetensors.torch import load_file

from r7b_fast import train
from r7b_fast.config import load_config

ONLINE = [*COMMON, "logging.tensorboard=false", "data.synthetic_train=4", "online.rounds=2",
          "online.prompts_per_round=2", "online.num_samples=3", "online.max_new_tokens=6",
          "optim.max_steps=2", "optim.global_batch=1", "optim.micro_batch=1",
          "checkpoint.every_steps=0"]  # fmt: skip


def constant_reward(rows, texts):
    """Every sample ties."""
    return [0.5] * len(texts)


def digits_only_reward(rows, texts):
    """Length for digits_ar prompts, a tie for every other family."""
    return [float(len(t)) if r["family"] == "digits_ar" else 0.0 for r, t in zip(rows, texts)]


def run(out, *overrides):
    return train.run(load_config("online_dpo_tiny", [*ONLINE, f"run.output_dir={out}", *overrides]))


def test_all_rounds_without_pairs_exit_5_and_export_nothing(tmp_path, capsys):
    out = tmp_path / "tied"
    rc = train.main(["online_dpo_tiny", *ONLINE, f"run.output_dir={out}",
                     "data.synthetic_families=[digits_ar]",
                     "online.reward=test_trust_online:constant_reward"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 5, err
    assert "all 2 round(s) produced no preference pair" in err
    assert err.count("WARNING: online round") == 2 and "2 of 2 prompts tied over 6 samples" in err
    assert "online round 1: sampling: 6 of 6 samples in " in err  # progress line (no bar)
    assert not (out / "done.json").exists() and not (out / "hf").exists()
    empty = events(out, "no_pairs")
    assert [(e["round"], e["prompts"], e["samples"], e["ties"]) for e in empty] == [
        (0, 2, 6, 2), (1, 2, 6, 2)]  # fmt: skip
    assert all(e["reward_rate"] == 0.5 for e in empty)
    assert events(out, "error")[0]["type"] == "NoPairsError" and not metrics(out)


def test_done_counts_only_the_steps_that_trained(tmp_path):
    """One prompt per round over a digits_ar and a count_ar prompt: the count_ar round ties."""
    out = tmp_path / "half"
    run(out, "data.synthetic_families=[digits_ar,count_ar]", "data.synthetic_train=1",
        "online.prompts_per_round=1",
        "online.reward=test_trust_online:digits_only_reward")  # fmt: skip
    rounds = events(out, "round")
    assert sorted(r["pairs"] for r in rounds) == [0, 1]
    trained = next(r["round"] for r in rounds if r["pairs"])
    assert [r["step"] for r in metrics(out)] == [2 * trained + 1, 2 * trained + 2]
    assert [e["round"] for e in events(out, "no_pairs")] == [1 - trained]
    assert json.loads((out / "done.json").read_text())["steps"] == 2
    assert events(out, "done")[0]["steps"] == 2


def test_mid_round_resume_is_bit_identical(tmp_path):
    """Stopped after step 3 (round 1's first step), resumed: the round's stored pairs and its data
    position are reused, so the weights and every step's metrics equal an uninterrupted run."""
    # 64-token rows: each round's 2 pairs fill 2 packed rows, one per step, so a resume that
    # restarted the round's data would train step 4 on step 3's row again
    common = ["data.synthetic_families=[digits_ar]", "online.reward=_train_helpers:length_reward",
              "data.max_tokens=64"]  # fmt: skip
    full, cut = tmp_path / "full", tmp_path / "cut"
    run(full, *common)
    with pytest.raises(train.DebugStop):
        run(cut, *common, "debug.stop_after_step=3")
    pairs_before = (cut / "online" / "round_001.pt").read_bytes()
    run(cut, *common)
    assert events(cut, "resume")[0]["step"] == 3
    assert (cut / "online" / "round_001.pt").read_bytes() == pairs_before  # not resampled
    assert len(torch.load(cut / "online" / "round_001.pt", weights_only=False)["ref"]) == 2
    a = {r["step"]: r for r in metrics(full)}
    b = {r["step"]: r for r in metrics(cut)}
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        for key in ("loss", "lr", "tokens", "grad_norm", "rewards/margins"):
            assert b[step][key] == a[step][key], (step, key)
    pa = load_file(str(full / "hf" / "model.safetensors"))
    pb = load_file(str(cut / "hf" / "model.safetensors"))
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


@pytest.mark.slow
def test_documented_tiny_chain_makes_pairs_and_trains(tmp_path):
    """The README's chain with the built-in tiny configs as shipped (only the run dirs, the
    input model, one CPU thread and the kernels' torch twins set: conftest's Triton interpreter
    takes minutes per step): the on-policy stage finds pairs and changes the model it was
    given (~2 min on one core)."""
    quiet = ["logging.progress_bar=false", "run.cpu_threads=1", "model.kernel_backend=torch"]
    sft, dpo, online = tmp_path / "sft", tmp_path / "dpo", tmp_path / "online"
    train.run(load_config("sft_tiny", [f"run.output_dir={sft}", *quiet]))
    train.run(load_config("dpo_tiny", [f"run.output_dir={dpo}", f"model.path={dpo.parent}/sft/hf",
                                       *quiet]))  # fmt: skip
    train.run(load_config("online_dpo_tiny", [f"run.output_dir={online}",
                                              f"model.path={dpo}/hf", *quiet]))  # fmt: skip
    rounds = events(online, "round")
    assert len(rounds) == 3 and sum(r["pairs"] for r in rounds) > 0, rounds
    done = json.loads((online / "done.json").read_text())
    assert done["steps"] == 5 * sum(1 for r in rounds if r["pairs"])
    before = load_file(str(dpo / "hf" / "model.safetensors"))
    after = load_file(str(online / "hf" / "model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before)
