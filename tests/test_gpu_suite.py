"""The GPU suite, proven on the CPU: `gpu_suite.sh --dry-run` end to end, and the pieces its
numbers rest on (FLOP and attended-pair counts, padded batches, the memory plan, AdamW with fp32
state, the README table renderer) against formulas and references written here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import _e2e, render_results
from benchmarks._common import goal_row, markdown_table, summarize_ms

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_suite_dry_run_writes_results_and_prints_summary_last(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    r = subprocess.run(
        ["bash", "benchmarks/gpu_suite.sh", "--dry-run", "--no-install"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    tags = sorted(p.stem for p in tmp_path.glob("*-cpu-dryrun.json"))
    assert len(tags) == 1, sorted(os.listdir(tmp_path))
    tag = tags[0]
    # at most 8 files come back from the device machine: the suite writes exactly three
    assert sorted(os.listdir(tmp_path)) == sorted(f"{tag}.{x}" for x in ("json", "md", "log"))
    doc = json.loads((tmp_path / f"{tag}.json").read_text())
    status = {s["step"]: s["status"] for s in doc["steps"]}
    for step in ("env", "check_linear_logprobs", "check_attention", "train"):
        assert status.get(step) == "ok", status
    ts = doc["parts"]["train_step_dryrun"]
    got = {(row["stage"], row["variant"]) for row in ts["rows"] if "error" not in row}
    want = {("sft", "ours"), ("dpo", "ours"), ("sft", "hf"), ("dpo", "hf"), ("sft", "ours_max")}
    assert want <= got, ts["rows"]
    # ours and HF compute the same losses on the same tokens (fp32 on the CPU)
    assert ts["compare"]["sft_loss_ok"] and ts["compare"]["dpo_loss_ok"], ts["compare"]
    assert doc["env"]["torch"] == torch.__version__
    md = (tmp_path / f"{tag}.md").read_text()
    assert "## Summary" in md and "## train_step_dryrun" in md
    # the summary table is the last thing printed, before the final verdict line
    tail = r.stdout.strip().splitlines()
    assert tail[-1] == "gpu_suite: ok"
    header = max(
        i for i, line in enumerate(tail) if line.startswith("| metric | value | goal | ok |")
    )
    assert all(line.startswith("|") for line in tail[header:-1])
    assert any("SFT loss ours vs HF" in line for line in tail[header:-1])


def test_attended_pairs_matches_explicit_mask():
    for n in (1, 5, 7, 16, 33):
        for w in (None, 1, 4, 7, 40):
            i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
            mask = (j <= i) & ((i - j < w) if w is not None else True)
            assert _e2e.attended_pairs(n, w) == int(mask.sum()), (n, w)


def test_step_flops_counts_layers_attention_and_head():
    cfg = _e2e.model_config(None, tiny=True)  # 4 layers: 3 sliding (window 32) + 1 global
    h, i_, hq, hk = cfg.hidden_size, cfg.intermediate_size, 4, 2
    d = h // hq
    per_layer = h * hq * d * 2 + 2 * h * hk * d + 3 * h * i_
    assert _e2e.layer_matmul_params(cfg) == per_layer
    lens, n_targets = [10, 50], 37
    pairs_global = 10 * 11 // 2 + 50 * 51 // 2
    pairs_window = 10 * 11 // 2 + (32 * 33 // 2 + 18 * 32)
    expect = (
        6 * 60 * per_layer * 4
        + 12 * hq * d * (3 * pairs_window + pairs_global)
        + 6 * n_targets * h * cfg.vocab_size
    )
    assert _e2e.step_flops(cfg, lens, n_targets) == expect


def test_pad_batches_respects_budget_order_and_labels():
    rng = np.random.default_rng(0)
    seqs = _e2e.sample_sft(rng, 40, 100, 20, 64)
    batches = _e2e.pad_batches(seqs, budget=96)
    flat = []
    for b in batches:
        B, L = b["input_ids"].shape
        assert B * L <= 96 or B == 1
        for row, att, lab in zip(b["input_ids"], b["attention_mask"], b["labels"]):
            n = int(att.sum())
            assert att[:n].all() and not att[n:].any()  # right padding
            flat.append((row[:n].tolist(), (lab[:n] != -100).long().tolist()))
            assert (lab[n:] == -100).all()
            keep = lab[:n] != -100
            assert torch.equal(lab[:n][keep], row[:n][keep])
    assert flat == [(ids, mask) for ids, mask in seqs]  # same sequences, same order


def test_pad_pair_batches_chosen_first():
    rng = np.random.default_rng(1)
    pairs = _e2e.sample_pref(rng, 12, 100, 16, 128)
    batches = _e2e.pad_pair_batches(pairs, budget=256)
    seen = []
    for b in batches:
        B = len(b["pair_index"])
        assert b["input_ids"].shape[0] == 2 * B and (b["input_ids"].numel() <= 256 or B == 1)
        for k, pid in enumerate(b["pair_index"].tolist()):
            p, c, r = pairs[pid]
            n_c, n_r = int(b["attention_mask"][k].sum()), int(b["attention_mask"][B + k].sum())
            assert b["input_ids"][k, :n_c].tolist() == p + c
            assert b["input_ids"][B + k, :n_r].tolist() == p + r
            assert int((b["labels"][k] != -100).sum()) == len(c)  # only the completion trains
        seen += b["pair_index"].tolist()
    assert seen == list(range(len(pairs)))


def test_plan_layers_is_the_largest_count_that_fits():
    plan = _e2e.plan_layers(78, 8192)
    fixed = plan["embedding_state_gib"] + plan["reserve_gib"]
    for key, loss in (("layers", plan["hf_loss_gib"]), ("layers_ours", plan["ours_loss_gib"])):
        n = plan[key]
        assert (
            fixed + loss + n * plan["per_layer_gib"]
            <= 78
            < fixed + loss + (n + 1) * plan["per_layer_gib"]
        )
    assert plan["layers_ours"] > plan["layers"] >= 1


@pytest.mark.parametrize("chunk", [1 << 26, 7])
def test_adamw_fp32_state_matches_torch_adamw(chunk):
    torch.manual_seed(0)
    ps = [torch.randn(5, 3, dtype=torch.float64), torch.randn(11, dtype=torch.float64)]
    ref = [p.clone().requires_grad_() for p in ps]
    ours = [p.clone().requires_grad_() for p in ps]
    opt_ref = torch.optim.AdamW(ref, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    opt = _e2e.AdamWFp32State(
        ours, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, chunk=chunk
    )
    for _ in range(4):
        grads = [torch.randn_like(p) for p in ps]
        for p, g in zip(ref, grads):
            p.grad = g.clone()
        for p, g in zip(ours, grads):
            p.grad = g.clone()
        opt_ref.step()
        opt.step()
    # state in fp32 (the point of the class), parameters in float64: agreement to fp32 rounding
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert all(m.dtype == torch.float32 for m in opt.exp_avg + opt.exp_avg_sq)


def test_adamw_lr_zero_leaves_bf16_weights_bit_identical():
    p = torch.randn(100, dtype=torch.bfloat16, requires_grad=True)
    before = p.detach().clone()
    opt = _e2e.AdamWFp32State([p], lr=0.0)
    p.grad = torch.randn_like(p)
    opt.step()
    assert torch.equal(p.detach(), before)


def test_readme_table_from_results_files(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    summary = [goal_row("e2e SFT ours MFU", 0.5, 0.45)]
    suite = {"suite": 1, "tag": "2026-11-27-h100", "env": {"gpu": "NVIDIA H100 80GB HBM3", "torch": "2.11"},
             "steps": [], "parts": {}, "summary": summary}  # fmt: skip
    (results / "2026-11-27-h100.json").write_text(json.dumps(suite))
    dry = dict(suite, tag="2026-11-28-cpu-dryrun", summary=[goal_row("dry", 9.0, 1)])
    (results / "2026-11-28-cpu-dryrun.json").write_text(json.dumps(dry))
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{render_results.START}\nold 123\n{render_results.END}\nrest\n")
    args = ["--results", str(results), "--readme", str(readme)]
    assert render_results.main([*args, "--check"]) == 1  # stale
    assert render_results.main(args) == 0
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith(f"{render_results.END}\nrest\n")
    assert "old 123" not in text and "| e2e SFT ours MFU | 0.5 | >= 0.45 | yes |" in text
    assert "dry" not in text.split(render_results.START)[1]  # dry runs never reach the README
    assert render_results.main([*args, "--check"]) == 0


def test_readme_without_gpu_results_says_pending(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"{render_results.START}\n{render_results.END}\n")
    render_results.main(["--results", str(tmp_path), "--readme", str(readme)])
    assert "GPU numbers pending" in readme.read_text()
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="markers"):
        render_results.main(["--results", str(tmp_path), "--readme", str(readme)])


def test_common_helpers():
    assert summarize_ms([3.0, 1.0, 2.0])["median_ms"] == 2.0
    assert goal_row("m", 0.6, 0.5, higher_is_better=False)["ok"] is False
    assert goal_row("m", None, 0.5)["ok"] is None
    md = markdown_table([{"a": 1.23456, "b": None}], ["a", "b"])
    assert md.splitlines() == ["| a | b |", "| --- | --- |", "| 1.23 | - |"]


def test_failed_kernel_check_is_loud_and_gates_timing_and_e2e(tmp_path):
    """A copy of the tracked files whose attention check fails: its timing and the end-to-end
    steps must not run, the log must shout, and the suite must exit 1."""
    tree = tmp_path / "repo"
    tree.mkdir()
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True)
    pack = subprocess.run(  # the working tree's tracked files (symlinks kept)
        ["tar", "--null", "-T", "-", "-c"], cwd=REPO, input=files.stdout, capture_output=True
    )
    subprocess.run(["tar", "-x", "-C", str(tree)], input=pack.stdout, check=True)
    (tree / "benchmarks" / "attention.py").write_text(
        "import sys\nsys.exit(1 if '--check' in sys.argv else 0)\n"
    )
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    only = "env,check_attention,time_attention,train"
    r = subprocess.run(
        ["bash", "benchmarks/gpu_suite.sh", "--dry-run", "--no-install", "--only", only],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    assert "attention is WRONG" in r.stdout and r.stdout.strip().endswith(
        "gpu_suite: FAILED (see the steps above)"
    )
    (doc_path,) = out.glob("*-cpu-dryrun.json")
    status = {s["step"]: s["status"] for s in json.loads(doc_path.read_text())["steps"]}
    assert status == {"env": "ok", "check_attention": "fail(1)", "train": "skipped(check)"}, status


def test_models_built_from_one_config_switch_attention_independently():
    from r7b_fast.model import apply_kernels

    cfg = _e2e.model_config(None, tiny=True)
    ours, hf = (
        _e2e.build(cfg, torch.device("cpu"), torch.float32),
        _e2e.build(cfg, "cpu", torch.float32),
    )
    apply_kernels(ours, backend="torch")
    assert ours.config._attn_implementation == "r7b_varlen"
    assert hf.config._attn_implementation == "sdpa"  # untouched: the HF baseline stays HF
    for a, b in zip(ours.parameters(), hf.parameters()):
        assert torch.equal(a, b)  # same seeded weights


def test_cpu_line_reports_each_stage_ratio():
    row = lambda stage, variant, tps, cpu: {  # noqa: E731
        "stage": stage, "variant": variant, "tokens_per_s": tps, "tokens_per_cpu_s": cpu,
        "real_tokens": 1000}  # fmt: skip
    part = {"env": {"cpu_count": 2, "utc": "T"},
            "rows": [row("sft", "hf", 400.0, 200.0), row("sft", "ours", 600.0, 250.0),
                     row("dpo", "hf", 500.0, 100.0), row("dpo", "ours", 450.0, 90.0)]}  # fmt: skip
    line = render_results.cpu_line(part)
    assert (
        "SFT: ours (packed) 600 tokens/s" in line and ": 1.50x, 1.25x in process CPU time" in line
    )
    assert (
        "DPO: ours (packed) 450 tokens/s" in line and ": 0.90x, 0.90x in process CPU time" in line
    )
    part["rows"] = part["rows"][2:]  # DPO only
    assert "SFT" not in render_results.cpu_line(part)
    part["rows"] = [{"stage": "sft", "variant": "ours", "error": "oom"}]
    assert "incomplete" in render_results.cpu_line(part)


@pytest.mark.parametrize(
    "name, tflops",
    [("NVIDIA H100 PCIe", 756), ("NVIDIA H100 NVL", 835), ("NVIDIA H100 80GB HBM3", 989),
     ("NVIDIA H200", 989), ("NVIDIA A100-SXM4-80GB", 312), ("Some GPU", None)],
)  # fmt: skip
def test_one_peak_table_for_trainer_and_benchmarks(monkeypatch, name, tflops):
    from benchmarks import _common
    from r7b_fast import logging as r7b_logging

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert _common.peak_flops is r7b_logging.peak_flops  # the trainer's MFU and the benchmarks'
    got = r7b_logging.peak_flops(torch.device("cuda", 0))
    assert got == (None if tflops is None else tflops * 1e12)
    assert r7b_logging.peak_flops(torch.device("cuda", 0), 123.0) == 123e12  # --peak override
    assert r7b_logging.peak_flops(torch.device("cpu")) is None
