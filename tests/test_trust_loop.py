"""The trainer's step arithmetic and resume, each checked against an independent run of the same
rows (in process, CPU, tiny model): accumulation == one micro-batch (SFT, and DPO with its SFT
term), an Inf gradient with a finite loss stops before the optimizer step, and a run stopped
after step k then resumed equals an uninterrupted one bit for bit (weights, lr, data order)."""

import json

import pytest
import torch
from _train_helpers import COMMON, events, latest_checkpoint_model, metrics, one_thread  # noqa: F401
from safetensors.torch import load_file

from r7b_fast import checkpoint, train
from r7b_fast.config import load_config

FAST = [*COMMON, "logging.tensorboard=false", "checkpoint.every_steps=0"]
SFT = ["data.synthetic_families=[digits_ar,count_ar]", "data.synthetic_train=16",
       "optim.lr=1e-2", "optim.warmup_steps=1"]  # fmt: skip
DPO = ["data.synthetic_families=[count_ar,digits_ar]", "data.synthetic_train=12",
       "optim.lr=1e-2", "optim.warmup_steps=1", "dpo.sft_weight=1.0", "dpo.beta=0.5"]  # fmt: skip


def run(out, name, *overrides):
    train.run(load_config(name, [*FAST, f"run.output_dir={out}", *overrides]))
    return out


def hf(out) -> dict:
    return load_file(str(out / "hf" / "model.safetensors"))


def assert_same_weights(a: dict, b: dict, atol: float):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=atol, msg=k)


@pytest.mark.parametrize("stage,extra", [("sft_tiny", SFT), ("dpo_tiny", DPO)])
def test_accumulated_step_equals_one_micro_batch(tmp_path, stage, extra):
    """global_batch 2 as 2 micro-batches of 1 row vs 1 micro-batch of the same 2 rows: the loss
    is normalised by the step's global count (tokens; pairs and chosen tokens for DPO's SFT
    term), so the updates agree up to fp32 summation order. Adam moves every weight by ~lr per
    step whatever its gradient's scale, so the weights are compared to 1e-3 x lr = 1e-5
    absolute (measured: <= 5.3e-7 SFT, <= 1.6e-6 DPO, from near-zero gradient elements whose
    Adam-normalised update amplifies rounding; element-wise relative error is meaningless for
    weights crossing zero). A per-micro-batch normaliser (a mean of means) weights the rows
    differently: its updates differ by a fraction of lr and fail."""
    common = [*extra, "optim.max_steps=2", "optim.global_batch=2"]
    acc = run(tmp_path / "acc", stage, *common, "optim.micro_batch=1")
    one = run(tmp_path / "one", stage, *common, "optim.micro_batch=2")
    ra, ro = metrics(acc), metrics(one)
    assert [r["tokens"] for r in ra] == [r["tokens"] for r in ro]  # the same rows per step
    for a, b in zip(ra, ro):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)
    assert_same_weights(hf(one), hf(acc), atol=1e-5)


def test_inf_gradient_with_finite_loss_stops_before_step(tmp_path, monkeypatch):
    built, real_build = [], train.build_model

    def keep(*args):  # the live model, to inspect after the error
        built.append(real_build(*args))
        return built[-1]

    monkeypatch.setattr(train, "build_model", keep)
    out = tmp_path / "inf"
    with pytest.raises(train.NonFiniteError, match=r"step 2: .*gradient norm \(inf\)"):
        run(out, "sft_tiny", *SFT, "optim.max_steps=4", "optim.global_batch=1",
            "optim.micro_batch=1",
            "checkpoint.every_steps=1", "debug.inf_grad_at_step=2")  # fmt: skip
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1]
    assert checkpoint.latest(out / "checkpoints").name == "step_00000001"
    assert not (out / "done.json").exists()
    # The live model after the error still holds step 1's weights (no optimizer step ran).
    ref = latest_checkpoint_model(out, real_build)
    for (name, p), q in zip(built[0].named_parameters(), ref.parameters()):
        assert torch.isfinite(p).all(), name
        assert torch.equal(p, q), name


def _steps(out) -> dict[int, dict]:
    return {r["step"]: r for r in metrics(out)}


def test_stop_then_resume_is_bit_identical(tmp_path):
    """Optimizer moments, scheduler and data position all restored: a run stopped after step 2
    (debug.stop_after_step) and resumed ends with the uninterrupted run's weights bit for bit,
    with the same lr, loss and tokens on every resumed step (the loss pins the data order)."""
    common = [*SFT, "optim.max_steps=5", "optim.global_batch=2", "optim.micro_batch=1",
              "optim.schedule=linear"]  # fmt: skip
    full = run(tmp_path / "full", "sft_tiny", *common)
    cut = tmp_path / "cut"
    with pytest.raises(train.DebugStop):
        run(cut, "sft_tiny", *common, "debug.stop_after_step=2")
    assert checkpoint.latest(cut / "checkpoints").name == "step_00000002"
    run(cut, "sft_tiny", *common)
    assert events(cut, "resume")[0]["step"] == 2
    a, b = _steps(full), _steps(cut)
    assert sorted(b) == [1, 2, 3, 4, 5]
    for step in range(1, 6):
        for key in ("lr", "loss", "tokens", "grad_norm"):
            assert b[step][key] == a[step][key], (step, key)
    assert_same_weights(hf(full), hf(cut), atol=0)
    assert json.loads((cut / "done.json").read_text())["steps"] == 5


@pytest.mark.slow
def test_dpo_sft_term_two_ranks_match_one_process(tmp_path):
    """dpo.sft_weight > 0 under `torchrun --nproc_per_node 2` (gloo, FSDP2) vs one process with
    the same global batch: the SFT term is normalised by the step's global chosen-token count,
    so 3 steps end with the same weights (1e-5 absolute = 1e-3 x lr; a per-rank chosen-token
    count differed by 1.4e-3 here)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # 2-row micro-batches: one process groups rows (0, 1), (2, 3); two ranks (0, 2), (1, 3), so
    # a per-micro-batch chosen-token count weights the rows differently in the two runs
    args = [*FAST, *DPO, "optim.max_steps=3", "optim.global_batch=4", "optim.micro_batch=2"]

    def launch(out, ranks):
        pre = [sys.executable]
        if ranks > 1:
            pre += ["-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
                    "--master_port", str(29700 + os.getpid() % 1000)]  # fmt: skip
        cmd = [*pre, "-m", "r7b_fast.train", "dpo_tiny", f"run.output_dir={out}", *args]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return out

    one, two = launch(tmp_path / "one", 1), launch(tmp_path / "two", 2)
    for a, b in zip(metrics(one), metrics(two)):
        assert b["tokens"] == a["tokens"] and b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    assert_same_weights(hf(one), hf(two), atol=1e-5)


def test_eval_loss_is_the_held_out_token_mean_nll(tmp_path):
    """eval.every_steps=2 over 4 steps: `eval` events at steps 2 and 4; the last one equals the
    token-mean NLL of the exported model on the generated eval split, recomputed row by row
    with HF's own forward (1e-4 relative: packed kernels vs unpacked HF, fp32)."""
    from transformers import AutoModelForCausalLM

    from r7b_fast.data.chat import render_sft
    from r7b_fast.data.sources import load_rows
    from r7b_fast.data.tokenizer import load_tokenizer

    out = run(tmp_path / "ev", "sft_tiny", *SFT, "optim.max_steps=4", "optim.global_batch=2",
              "optim.micro_batch=1",
              "eval.every_steps=2", "data.synthetic_eval=6")  # fmt: skip
    got = events(out, "eval")
    assert [e["step"] for e in got] == [2, 4] and got[0]["eval/loss"] != got[1]["eval/loss"]
    tok = load_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(out / "hf", attn_implementation="eager").eval()
    nll, count = 0.0, 0
    for fam in ("digits_ar", "count_ar"):
        rows, _ = load_rows(out / "data" / fam / "eval.jsonl", "sft")
        assert len(rows) == 6
        for r in rows:
            ids, mask = render_sft(tok, r["messages"])
            with torch.no_grad():
                logp = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
            for t in range(len(ids) - 1):
                if mask[t + 1]:
                    nll -= logp[t, ids[t + 1]].item()
                    count += 1
    assert got[1]["eval/loss"] == pytest.approx(nll / count, rel=1e-4)


def test_dpo_eval_reports_loss_and_accuracy(tmp_path):
    out = run(tmp_path / "dev", "dpo_tiny", *DPO, "optim.max_steps=2", "optim.global_batch=2",
              "optim.micro_batch=1",
              "eval.every_steps=1", "data.synthetic_eval=4")  # fmt: skip
    got = events(out, "eval")
    assert [e["step"] for e in got] == [1, 2]
    assert all(e["eval/loss"] > 0 and 0 <= e["eval/accuracy"] <= 1 for e in got)
    assert len(torch.load(out / "reference" / "eval.pt")) >= 1
