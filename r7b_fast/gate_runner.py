"""The dataset quality gate's runner: proxy SFTs over several seeds, decisions, arbitrage.

Shared by `python -m r7b_fast.gate` (`gate.run_gate`) and the pipeline's `gate` stage
(`r7b_fast.pipeline_gate`): both build a `GatePlan` and call `run_plan`. Per seed one short SFT
on the mixture and, per candidate (and arbitrage iteration) and seed, one on mixture +
candidate, each with the trainer's own code (in process by default, or a subprocess) and
evaluated on the same held-out rows; `gate.decide_seeds` decides and `gate.refine` drives the
iterative arbitrage (`arbitrage`). Each proxy run lives in its own directory with a cache key
(config text, overrides, seed, base, data content): a finished run with the same key is reused,
an interrupted one resumed, anything else wiped and retrained.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from r7b_fast.gate import (
    Z_DEFAULT,
    Decision,
    decide_seeds,
    decision_table,
    pick_best_answers,
    refine,
)

ARB_DEFAULTS = {"reward": "verifier", "num_samples": 4, "temperature": 0.7, "max_new_tokens": 16,
                "min_score": 1.0, "max_iterations": 2}  # fmt: skip
"""Arbitrage defaults. `min_score` 1.0 is the verifier's full score: a prompt whose best answer
the verifier rejects (reward 0) is dropped, never kept with a wrong answer; set it for a reward
model's scale, or null to keep every prompt's best answer whatever its reward."""


@dataclass
class GatePlan:
    """Everything one gate run needs, resolved to files and directories.

    model: {"path": "tiny" (a fresh seeded model per seed) or an HF checkpoint dir,
    "tiny_overrides": {...}}; overrides: trainer overrides for every proxy run; candidates:
    [{"name", "files": [Path], "target", "arbitrage": dict (teachers = checkpoint dirs) or None}];
    eval: {"accuracy": bool, "max_new_tokens": int} (loss only by default)."""

    work: Path
    config: str
    model: dict
    overrides: dict
    seeds: list[int]
    mixture: list[Path]
    candidates: list[dict]
    eval_rows: list[dict]
    eval: dict = field(default_factory=dict)
    threshold: float = 0.0
    tolerance: float = 0.0
    z: float = Z_DEFAULT
    tracked: list[str] | None = None
    launcher: str = "inprocess"


def run_plan(plan: GatePlan, log=print) -> dict:
    """Gates every candidate of `plan` (see the module doc). Writes work/gate.json (seeds, the
    mixture's metrics per seed, per candidate its decisions and final files) and work/gate.md;
    returns {"decisions": every Decision in order, "final": {name: last Decision}, "files":
    {name: files kept (as given or regenerated; [] if rejected)}, "table", "mixture": mean
    metrics, "seconds"}."""
    t0 = time.time()
    work = Path(plan.work)
    work.mkdir(parents=True, exist_ok=True)
    base = {s: evaluate_proxy(plan, train_proxy(plan, work / "mixture" / f"seed{s}",
                                                plan.mixture, s)) for s in plan.seeds}  # fmt: skip
    mean = {k: sum(m[k] for m in base.values()) / len(base) for k in base[plan.seeds[0]]}
    log(
        f"gate: mixture, {len(plan.seeds)} seeds: "
        + ", ".join(f"{k}={v:.4f}" for k, v in mean.items())
    )
    decisions, final, files, memo = [], {}, {}, {}
    for c in plan.candidates:
        name, out = c["name"], work / c["name"]

        def gate_files(fs, k, c=c, out=out):
            runs = [proxy_metrics(plan, out / f"r{k}" / f"seed{s}", [*plan.mixture, *fs], s, memo)
                    for s in plan.seeds]  # fmt: skip
            return decide_seeds(c["name"], [base[s] for s in plan.seeds], runs, target=c["target"],
                                threshold=plan.threshold, tolerance=plan.tolerance, z=plan.z,
                                tracked=plan.tracked or [k for k in mean if k.startswith("loss")])  # fmt: skip

        arb = {**ARB_DEFAULTS, **c["arbitrage"]} if c.get("arbitrage") else None
        regen = lambda k, c=c, out=out, arb=arb: arbitrage(  # noqa: E731
            arb, c["files"], out / f"r{k}" / "data.jsonl", seed=plan.seeds[0] + k - 1, log=log
        )
        steps = refine(gate_files(c["files"], 0), regen, lambda data, k: gate_files([data], k),
                       int(arb["max_iterations"]) if arb else 0)  # fmt: skip
        for d in steps:
            log(f"gate: {name} iteration {d.round}: {'keep' if d.keep else 'reject'} ({d.reason})")
        last = steps[-1]
        decisions += steps
        final[name] = last
        files[name] = ([] if not last.keep else list(c["files"]) if last.round == 0
                       else [out / f"r{last.round}" / "data.jsonl"])  # fmt: skip
    table = decision_table(decisions)
    secs = time.time() - t0
    record = {"seeds": plan.seeds, "z": plan.z, "threshold": plan.threshold,
              "tolerance": plan.tolerance, "mixture": {str(s): m for s, m in base.items()},
              "candidates": {n: {"keep": d.keep, "round": d.round, "reason": d.reason,
                                 "files": [str(f) for f in files[n]]} for n, d in final.items()},
              "decisions": [d.to_dict() for d in decisions], "seconds": round(secs, 2)}  # fmt: skip
    (work / "gate.json").write_text(json.dumps(record, indent=1, ensure_ascii=False, default=str))
    (work / "gate.md").write_text(gate_summary(plan, final, secs) + "\n\n" + table + "\n")
    log(table)
    return {"decisions": decisions, "final": final, "files": files, "table": table,
            "mixture": mean, "seconds": secs}  # fmt: skip


def gate_summary(plan: GatePlan, final: dict[str, Decision], secs: float) -> str:
    """gate.md's first lines: the rule with this run's parameters and the outcome per candidate."""
    out = ", ".join(f"{n}: {'kept' if d.keep else 'rejected'}"
                    + (f" after {d.round} regeneration(s)" if d.round else "")
                    for n, d in final.items())  # fmt: skip
    return (f"# Dataset quality gate\n\nSeeds {plan.seeds}; a candidate is kept iff its target's mean "
            f"gain > max(threshold {plan.threshold:g}, z {plan.z:g} x SE of the mean paired "
            f"difference) and no other tracked loss worsens by more than {plan.tolerance:g} on "
            f"average. Outcome: {out}. ({secs:.0f} s)")  # fmt: skip


def proxy_metrics(plan: GatePlan, out: Path, files: list[Path], seed: int, memo: dict) -> dict:
    """`evaluate_proxy(train_proxy(...))`, once per (seed, data content): two candidates with
    the same rows (e.g. one data set gated with two teacher pools) share their proxy runs."""
    import hashlib

    key = (seed, tuple(hashlib.sha256(Path(f).read_bytes()).hexdigest() for f in files))
    if key not in memo:
        memo[key] = evaluate_proxy(plan, train_proxy(plan, out, files, seed))
    return memo[key]


def train_proxy(plan: GatePlan, out: Path, files: list[Path], seed: int) -> Path:
    """One short SFT (the trainer's own code) on `files` with `seed`; returns its HF export dir.

    Cached: a run in `out` is reused (finished) or resumed (interrupted) only if its
    `gate_key.json` matches `cache_key`; otherwise `out` is wiped and retrained."""
    import shutil
    import subprocess
    import sys

    from r7b_fast.rundir import die_with_parent

    ov = {**plan.overrides, "run.output_dir": str(out), "run.seed": int(seed),
          "model.path": str(plan.model.get("path", "tiny")),
          "model.tiny_overrides": plan.model.get("tiny_overrides") or {},
          "data.train": [str(f) for f in files], "data.synthetic_families": []}  # fmt: skip
    args = [f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in ov.items()]
    key = cache_key(plan.config, ov, files)
    key_file = out / "gate_key.json"
    if _read_key(key_file) == key:
        if (out / "done.json").is_file():
            return out / "hf"  # an interrupted run with this key resumes below
    else:
        if out.exists():  # another config, seed or data trained here: retrain from scratch
            shutil.rmtree(out)
        out.mkdir(parents=True)
        key_file.write_text(json.dumps({"key": key}))
    if plan.launcher == "subprocess":
        cmd = [sys.executable, "-m", "r7b_fast.train", plan.config, *args]
        subprocess.run(die_with_parent(cmd), check=True, stdout=subprocess.DEVNULL)
    elif plan.launcher == "inprocess":
        from r7b_fast.config import load_config
        from r7b_fast.train import run

        run(load_config(plan.config, args + ["logging.progress_bar=false",
                                             "logging.tensorboard=false"]))  # fmt: skip
    else:
        raise ValueError(
            f"gate: launcher must be 'inprocess' or 'subprocess', got {plan.launcher!r}"
        )
    return out / "hf"


def cache_key(config: str, overrides: dict, files: list[Path]) -> str:
    """What determines a proxy run's model: the trainer config's text, the overrides (seed,
    base, file paths included), the data files' content (rundir.data_identity) and, for a base
    checkpoint directory, its identity (rundir.model_identity)."""
    import hashlib

    from r7b_fast.config import resolve_path
    from r7b_fast.rundir import data_identity, model_identity

    base = overrides.get("model.path", "tiny")
    payload = {"config": resolve_path(config).read_text(), "overrides": overrides,
               "data": data_identity([str(f) for f in files]),
               "base": model_identity(base) if (Path(base) / "config.json").is_file() else base}  # fmt: skip
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _read_key(path: Path) -> str | None:
    try:
        return json.loads(path.read_text())["key"]
    except (OSError, ValueError, KeyError):
        return None


def evaluate_proxy(plan: GatePlan, hf: Path, rows: list[dict] | None = None) -> dict[str, float]:
    """Held-out loss per family (and greedy accuracy with eval.accuracy) of a proxy run."""
    from r7b_fast.eval import evaluate_checkpoint

    ev = plan.eval or {}
    m = evaluate_checkpoint(hf, plan.eval_rows if rows is None else rows,
                            accuracy=bool(ev.get("accuracy", False)),
                            max_new_tokens=int(ev.get("max_new_tokens", 16)))  # fmt: skip
    return {k: float(v) for k, v in m.items() if isinstance(v, (int, float))}


def arbitrage(
    arb: dict, files: list[Path], out: Path, *, seed: int, log=None
) -> tuple[Path, int, int]:
    """Regenerate a dataset: for every row's prompt, sample `num_samples` answers from each
    teacher checkpoint (`seed`: the sampling seed), score them with the reward (`get_reward`
    spec or a callable), keep each prompt's best answer if its reward >= `min_score` (default
    1.0, ARB_DEFAULTS; null keeps every best answer). Writes `out` (JSONL, SFT `messages`
    schema, the task metadata kept, `arbitrage: {teacher, reward}` added); returns (out, rows
    kept, rows in)."""
    from r7b_fast.data.chat import render_prompt
    from r7b_fast.data.synthetic import write_jsonl
    from r7b_fast.eval import load_for_eval, read_jsonl
    from r7b_fast.generate import decode_completion, generate
    from r7b_fast.rewards import get_reward

    arb = {**ARB_DEFAULTS, **arb}
    rows = [r for f in files for r in read_jsonl(f)]
    reward = arb["reward"] if callable(arb["reward"]) else get_reward(arb["reward"])
    scored: list[list[tuple[str, float, str]]] = [[] for _ in rows]
    for teacher in arb["teachers"]:
        model, tok = load_for_eval(teacher)
        prompts = [render_prompt(tok, r["messages"][:-1]) for r in rows]
        outs = generate(model, tok, prompts, max_new_tokens=int(arb["max_new_tokens"]),
                        num_samples=int(arb["num_samples"]), temperature=float(arb["temperature"]),
                        seed=int(seed))  # fmt: skip
        for i, (r, comps) in enumerate(zip(rows, outs)):
            texts = [decode_completion(tok, c) for c in comps]
            for t, s in zip(texts, reward([r] * len(texts), texts)):
                scored[i].append((t, float(s), str(teacher)))
    best = pick_best_answers(scored, min_score=arb["min_score"])
    new = [{**r, "messages": r["messages"][:-1] + [{"role": "assistant", "content": b[0]}],
            "arbitrage": {"teacher": b[2], "reward": b[1]}}
           for r, b in zip(rows, best) if b is not None]  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    if log is not None:
        log(f"gate: arbitrage (seed {seed}) kept {len(new)}/{len(rows)} rows (min_score "
            f"{arb['min_score']}) -> {out}")  # fmt: skip
    return write_jsonl(new, out), len(new), len(rows)
