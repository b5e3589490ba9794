"""The trainer as the user runs it (subprocesses): `torchrun --nproc_per_node 2` (gloo, FSDP2)
matches one process with the same global batch, and a run killed with SIGKILL at a random step
resumes to bit-identical final parameters."""

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from _train_helpers import COMMON, metrics
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

# 8 packed rows of 128 tokens; 3 steps x 4 rows stay within the first epoch on 1 and 2 ranks.
RUN = [*COMMON, "data.synthetic_families=[digits_ar]", "data.synthetic_train=48",
       "optim.max_steps=6", "optim.global_batch=4", "optim.micro_batch=1", "optim.lr=1e-2",
       "optim.warmup_steps=1", "checkpoint.every_steps=2", "checkpoint.keep_last=1",
       "logging.tensorboard=false"]  # fmt: skip
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def command(out, *extra, torchrun=False):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(29500 + os.getpid() % 1000)] if torchrun else [sys.executable]  # fmt: skip
    return [*launcher, "-m", "r7b_fast.train", "sft_tiny", f"run.output_dir={out}", *RUN, *extra]


def hf_params(out):
    return load_file(str(out / "hf" / "model.safetensors"))


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    subprocess.run(command(out), check=True, env=ENV, capture_output=True, timeout=300)
    return out


@pytest.mark.parametrize(
    "extra",
    [
        # the defaults: reduce-scatter after each of the 2 micro-batches, foreach AdamW
        [],
        # one reduce-scatter of FSDP's unsharded accumulated gradients, fused (CPU) AdamW on
        # DTensor shards, every layer resharded after forward
        ["fsdp.grad_accumulation=unsharded", "optim.implementation=fused",
         "fsdp.reshard_after_forward=true"],
    ],
    ids=["reduce_scatter", "unsharded"],
)  # fmt: skip
def test_torchrun_two_ranks_matches_one_process(single, tmp_path, extra):
    out = tmp_path / "two"
    proc = subprocess.run(command(out, *extra, torchrun=True), env=ENV, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = metrics(single), metrics(out)
    assert [r["step"] for r in two] == list(range(1, 7))
    # Same rows per step; only the fp32 summation order differs (per-rank partial sums,
    # gloo reduce-scatter): losses agree to 1e-5 relative over 6 steps.
    for a, b in zip(one, two):
        assert b["tokens"] == a["tokens"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    p1, p2 = hf_params(single), hf_params(out)
    assert p1.keys() == p2.keys()
    for k in p1:  # Adam-normalised updates of lr=1e-2: parameters agree to 1e-5 absolute
        torch.testing.assert_close(p2[k], p1[k], rtol=0, atol=1e-5)
    shards = sorted(p.name for p in (out / "checkpoints" / "step_00000006").iterdir())
    assert "__0_0.distcp" in shards and "__1_0.distcp" in shards  # sharded DCP, one per rank


def test_sigkill_then_resume_is_bit_identical(single, tmp_path):
    out = tmp_path / "killed"
    kill_at = random.Random(time.time_ns()).randint(3, 5)  # checkpoint 2 is complete by then
    proc = subprocess.Popen(command(out, "debug.step_sleep=0.5"), env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").exists() and any(r["step"] >= kill_at for r in metrics(out)):
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"run ended before step {kill_at}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "done.json").exists()
    resumed = subprocess.run(command(out), env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr, resumed.stderr[-2000:]
    p1, p2 = hf_params(single), hf_params(out)
    for k in p1:
        assert torch.equal(p1[k], p2[k]), f"{k} differs after a kill at step {kill_at}"
    final = {r["step"]: r["loss"] for r in metrics(out)}
    assert final[6] == metrics(single)[-1]["loss"], kill_at


def test_torchrun_sharded_load_of_a_checkpoint_dir(single, tmp_path):
    """Under torchrun an HF checkpoint is built on the meta device, sharded, and filled from
    rank 0's copy (with activation checkpointing): same losses as one process loading it."""
    extra = [f"model.path={single / 'hf'}", "model.tiny_overrides={}", "optim.max_steps=2",
             "model.activation_checkpointing=true", "checkpoint.export_hf=false"]  # fmt: skip
    outs = {}
    for name, torchrun in (("one", False), ("two", True)):
        outs[name] = tmp_path / name
        proc = subprocess.run(command(outs[name], *extra, torchrun=torchrun), env=ENV,
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = metrics(outs["one"]), metrics(outs["two"])
    assert len(one) == len(two) == 2
    assert one[0]["loss"] < metrics(single)[0]["loss"] - 0.01  # started from the trained export
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
