"""Hand-written mutation testing of the trainer's core (not collected by pytest).

    .venv/bin/python tests/mutation/run_mutants.py [--tree DIR] [--only ID,ID] [--out FILE]

Copies DIR (default: this checkout) to a temporary directory, then for each mutant below
applies ONE text substitution to one module of the copy, runs that module's fast tests there
(`pytest -x -q -m "not slow"`, a timeout per mutant), restores the file, and counts the mutant
killed when the tests fail (or time out). Prints killed/total per module group and writes a
JSON report. A mutant whose text is absent from DIR (an older or newer tree) is reported n/a
and left out of the score; a test file absent from DIR is left out of that mutant's run.

Groups: losses, packing, train (trainer loop, resume, checkpoint), online (online_dpo, rewards,
verifier), merge (merge planning). The list includes the survivors of the issue-14 review
(mean of means, NaN check ignoring the gradient norm, mid-round online resume, iterator resume
onto other data, resume of optimizer/scheduler/data, task arithmetic normalising a ~0 sum,
+-Inf rewards, Persian digits / mixed numbers in the verifier).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TESTS = {
    "losses": ["tests/test_losses.py"],
    "packing": ["tests/test_data_packing.py", "tests/test_trust_data.py"],
    "train": ["tests/test_trust_loop.py", "tests/test_train.py", "tests/test_checkpoint.py"],
    "online": ["tests/test_rewards.py", "tests/test_online_dpo.py", "tests/test_trust_online.py",
               "tests/test_data_synthetic.py", "tests/test_trust_data.py"],
    "merge": ["tests/test_merge_helpers.py", "tests/test_trust_data.py"],
}  # fmt: skip
L, P, T, OD = (
    "r7b_fast/losses.py",
    "r7b_fast/data/packing.py",
    "r7b_fast/train.py",
    "r7b_fast/online_dpo.py",
)
R, S, C, M = (
    "r7b_fast/rewards.py",
    "r7b_fast/data/synthetic.py",
    "r7b_fast/checkpoint.py",
    "r7b_fast/merge_plan.py",
)
TD = "r7b_fast/train_data.py"

# (id, group, file, [(old, new), ...]): the first (old, new) whose `old` is in the file is used.
MUTANTS = [
    ("L1", "losses", L, [("return -(token_logps * mask).sum() / num_target_tokens",
                          "return -(token_logps * mask).sum() / mask.sum()")]),
    ("L2", "losses", L, [("mask = targets != ignore_index", "mask = targets == targets")]),
    ("L3", "losses", L, [("* (1 - ls) - F.logsigmoid(-beta * m) * ls",
                          "* (1 - ls) + F.logsigmoid(-beta * m) * ls")]),
    ("L4", "losses", L, [("losses = (m - 1 / (2 * beta)) ** 2", "losses = (m - 1 / beta) ** 2")]),
    ("L5", "losses", L, [("losses = torch.relu(1 - beta * m)", "losses = torch.relu(-beta * m)")]),
    ("L6", "losses", L, [("/ (1 - 2 * ls)", "/ (1 - ls)")]),
    ("L7", "losses", L, [("m = (pc - rc) - (pr - rr)", "m = (pc - rc) - (pr + rr)")]),
    ("L8", "losses", L, [("pc / nc, rc / nc, pr / nr, rr / nr", "pc / nc, rc / nc, pr / nc, rr / nc")]),
    ("L9", "losses", L, [("(chosen_r > rejected_r).float().mean()",
                          "(chosen_r >= rejected_r).float().mean()")]),
    ("L10", "losses", L, [("loss = loss - sft_weight * policy_chosen", "loss = loss + sft_weight * policy_chosen")]),
    ("L11", "losses", L, [('"rewards/margins": (chosen_r - rejected_r).mean()',
                           '"rewards/margins": (chosen_r + rejected_r).mean()')]),
    ("L12", "losses", L, [("keep = ids >= 0", "keep = ids >= 1")]),
    ("P1", "packing", P, [('for key in ("seed", "shuffle", "num_rows", "rank", "world_size"):',
                           'for key in ("seed", "shuffle", "rank", "world_size"):')]),
    ("P2", "packing", P, [("default_rng([self.seed, self.epoch])", "default_rng([self.seed, 0])")]),
    ("P3", "packing", P, [('self.epoch, self.index = int(state["epoch"]), int(state["index"])',
                           'self.epoch, self.index = int(state["epoch"]), 0')]),
    ("P4", "packing", P, [("keep = (seq_ids[1:n] == seq_ids[: n - 1]) & self.trained[idx[1:]]",
                           "keep = self.trained[idx[1:]]")]),
    ("P5", "packing", P, [("position_ids[:n] = np.arange(n) - np.repeat(cu[:-1].astype(np.int64), lens)",
                           "position_ids[:n] = np.arange(n)")]),
    ("P6", "packing", P, [("self.rank :: self.world_size", ":: self.world_size")]),
    ("P7", "packing", P, [("if self.index >= self.steps_per_epoch:", "if self.index > self.steps_per_epoch:")]),
    ("T1", "train", T, [("loss, metrics = loss_fn(s.model, batch, denom, s.cfg)",
                         "loss, metrics = loss_fn(s.model, batch, (sft_count(batch).clamp(min=1).float()"
                         " * len(micro)) if s.cfg.run.stage == 'sft' else denom, s.cfg)")]),
    ("T2", "train", T, [("if torch.isfinite(loss) and torch.isfinite(grad_norm):", "if torch.isfinite(loss):")]),
    ("T3", "train", T, [("(loss * s.dist.world_size).backward()", "loss.backward()")]),
    ("T4", "train", T, [('s.scheduler.load_state_dict(state["scheduler"])', "pass")]),
    ("T5", "train", T, [("it.load_state_dict(data_state)", "pass")]),
    ("T6", "train", C, [('set_optimizer_state_dict(model, optimizer, state["optimizer"])', "pass")]),
    # T6 is equivalent (dcp.load fills the optimizer's own state tensors in place); T6b drops them
    ("T6b", "train", C, [('set_optimizer_state_dict(model, optimizer, state["optimizer"])', "optimizer.state.clear()")]),
    ("T7", "online", T, [('data_state = resume_state["data"] if mid_round else None', "data_state = None")]),
    ("T8", "train", T, [("max_norm if max_norm > 0 else float(\"inf\")", "float(\"inf\")")]),
    ("T9", "train", T, [("        s.scheduler.step()\n        s.optimizer.zero_grad(set_to_none=True)",
                         "        s.scheduler.step()")]),
    ("T10", "train", T, [("        seq_logps[rejected],\n", "        seq_logps[chosen],\n")]),
    ("T11", "train", T, [("        ref[rejected],\n", "        ref[chosen],\n")]),
    ("T12", "train", T, [('torch.stack([(b["seq_ids"] >= 0).sum() for b in micro])',
                          'torch.stack([(b["seq_ids"] >= -1).sum() for b in micro])')]),
    ("T13", "train", T, [("(every and step % every == 0) or step == last", "(every and step % every == 0)")]),
    ("T14", "train", C, [("for p in done[: len(done) - keep_last]:", "for p in done[: len(done) - keep_last - 1]:"),
            ("for p in done[:-keep_last]:", "for p in done[: -keep_last - 1]:")]),
    ("T15", "train", T, [('start = resume_state["step"] if resume_state else 0', "start = 0")]),
    ("T16", "train", T, [('return (batch["targets"] != -100).sum()', 'return (batch["seq_ids"] >= 0).sum()')]),
    ("T17", "train", TD, [("    if path.is_file():\n        return WithReference(packed, torch.load(path))",
                           "    if False:\n        return WithReference(packed, torch.load(path))")]),
    ("O1", "online", R, [("if not math.isfinite(s)]", "if math.isnan(s)]")]),
    ("O2", "online", OD, [("skip = ss[hi] - ss[lo] <= min_margin or ts[hi] == ts[lo]",
                          "skip = ss[hi] - ss[lo] <= min_margin")]),
    ("O3", "online", OD, [("lo = min(range(len(ss)), key=lambda j: ss[j])", "lo = 0")]),
    ("O4", "online", OD, [("[x - (missing_eos_penalty or 0.0) * t", "[x + (missing_eos_penalty or 0.0) * t")]),
    ("O5", "online", OD, [("/ len(rewards))", "/ max(1, len(rewards) - 1))")]),
    ("O6", "online", TD, [("return [prompts[order[(r * k + j) % n]] for j in range(k)]",
                           "return [prompts[order[j % n]] for j in range(k)]")]),
    ("O7", "online", TD, [("seed=cfg.run.seed * 1000 + r", "seed=cfg.run.seed * 1000")]),
    ("O8", "online", OD, [('"chosen": [{"role": "assistant", "content": best}]',
                          '"chosen": [{"role": "assistant", "content": worst}]')]),
    ("O9", "online", R, [("if len(scores) != len(completions):", "if False:")]),
    ("O10", "online", S, [('other = "0123456789" + _FA_DIGITS if wanted_arabic',
                           'other = "0123456789" if wanted_arabic')]),
    ("O11", "online", S, [("if _mixed_number(text) or _numbers(text)", "if _numbers(text)")]),
    ("O12", "online", S, [("_numbers(text) != _numbers(answer)", "_numbers(text)[:1] != _numbers(answer)[:1]")]),
    ("M1", "merge", M, [("abs(s) <= 1e-6 * sum(abs(w[i]) for i in experts)", "abs(s) < 0"),
                        ("div = s if (normalize and abs(s) >= 1e-8) else 1.0",
                         "div = s if (normalize and abs(s) >= 1e-12) else 1.0")]),
    ("M2", "merge", M, [("terms = [(i, wi / s if norm else wi) for i, wi in enumerate(w)]",
                         "terms = [(i, wi if norm else wi) for i, wi in enumerate(w)]")]),
    ("M3", "merge", M, [("terms = [(base_index, 1.0 - sum(ws.values()))]", "terms = [(base_index, 1.0)]")]),
    ("M4", "merge", M, [("return [t for t in terms if t[1] != 0.0] or terms[:1]", "return terms")]),
    ("M5", "merge", M, [('"GB": 10**9', '"GB": 2**30')]),
]  # fmt: skip


def run_tests(root: Path, group: str, timeout: float) -> tuple[bool, float, str]:
    files = [f for f in TESTS[group] if (root / f).is_file()]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-m", "not slow", "-p", "no:cacheprovider",
           "--basetemp", str(root / ".mut_tmp"), *files]  # fmt: skip
    t0 = time.time()
    try:
        p = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, time.time() - t0, "timeout"
    tail = (p.stdout + p.stderr).strip().splitlines()[-1:] or [""]
    return p.returncode == 0, time.time() - t0, tail[0][:200]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tree", default=str(Path(__file__).resolve().parents[2]))
    ap.add_argument("--only", default="")
    ap.add_argument("--out", default="")
    ap.add_argument("--timeout", type=float, default=400.0)
    ap.add_argument("--skip-baseline", action="store_true")
    args = ap.parse_args()
    only = list(filter(None, args.only.split(",")))  # run in this order (most important first)
    by_id = {m[0]: m for m in MUTANTS}
    todo = [by_id[i] for i in only] if only else MUTANTS
    work = Path(tempfile.mkdtemp(prefix="r7b_mut.")) / "tree"
    shutil.copytree(args.tree, work, symlinks=True,
                    ignore=shutil.ignore_patterns(".git", ".venv", "runs", "__pycache__", ".mut_tmp"))  # fmt: skip
    results = []
    try:
        for group in [] if args.skip_baseline else TESTS:  # unmutated tests must pass first
            passed, sec, tail = run_tests(work, group, args.timeout)
            print(
                f"baseline {group:8s} {'ok' if passed else 'FAILED'} {sec:6.1f}s  {tail}",
                flush=True,
            )
            if not passed:
                raise SystemExit(f"baseline tests of {group} fail on the unmutated tree: {tail}")
        for mid, group, path, subs in todo:
            f = work / path
            src = f.read_text()
            sub = next(((o, n) for o, n in subs if o in src), None)
            if sub is None:
                results.append({"id": mid, "group": group, "status": "n/a"})
                print(f"{mid:4s} {group:8s} n/a (text not in this tree)", flush=True)
                continue
            f.write_text(src.replace(sub[0], sub[1], 1))
            try:
                passed, sec, tail = run_tests(work, group, args.timeout)
            finally:
                f.write_text(src)
            status = "survived" if passed else "killed"
            results.append({"id": mid, "group": group, "status": status, "seconds": round(sec, 1),
                            "tail": tail})  # fmt: skip
            print(f"{mid:4s} {group:8s} {status:8s} {sec:6.1f}s  {tail}", flush=True)
            report(args, results, quiet=True)  # after every mutant: a cut-short run still counts
    finally:
        shutil.rmtree(work.parent, ignore_errors=True)
    report(args, results)
    return 0


def report(args, results: list[dict], quiet: bool = False) -> dict:
    summary = {}
    for g in list(TESTS) + ["all"]:
        rs = [r for r in results if r["status"] != "n/a" and (g == "all" or r["group"] == g)]
        summary[g] = {"killed": sum(r["status"] == "killed" for r in rs), "total": len(rs)}
        if not quiet:
            print(f"{g:8s} {summary[g]['killed']}/{summary[g]['total']}")
    if args.out:
        Path(args.out).write_text(json.dumps({"tree": args.tree, "summary": summary,
                                              "mutants": results}, indent=1))  # fmt: skip
    return summary


if __name__ == "__main__":
    sys.exit(main())
