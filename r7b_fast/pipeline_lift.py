"""The pipeline report's evidence for what each stage does: paired lifts, DPO metrics and the
on-policy rounds' pair statistics (used by `r7b_fast.pipeline.write_pipeline_report`).

- `lift_rows`: for every evaluated model stage, the change of held-out accuracy against the
  model it started from, per family and pooled over the stage's targeted families (the families
  it trains on). The same held-out prompts are scored before and after, so the standard error
  is the PAIRED one: SE = sd(after_i - before_i) / sqrt(n) (sample sd, n - 1), z = delta / SE.
- `dpo_rows`: per DPO / on-policy stage, the trainer's metrics.jsonl (loss, rewards/accuracies,
  rewards/margins: first logged step and the mean of the last quarter of the logged steps).
- `round_rows`: per on-policy stage, the sampled round (metrics.jsonl `round` event: reward
  rate, pairs, ties, reward margin) and, from the stored `online/round_000.pt`, the verifier
  score of the chosen vs the rejected answers.
- `*_markdown`: those as report tables.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from r7b_fast.gate import mean_spread
from r7b_fast.pipeline_spec import Stage


def paired_lift(before: list[float], after: list[float]) -> dict:
    """n, before/after means, delta = mean(after - before), the paired SE and z = delta / SE
    (z is 0 when every difference is 0, +-inf when they are all equal and non-zero)."""
    n = len(before)
    if n != len(after) or n < 2:
        raise ValueError(f"paired_lift: need two equal-length lists of >= 2 scores, got "
                         f"{n} and {len(after)}")  # fmt: skip
    delta, _, se = mean_spread([a - b for a, b in zip(after, before)])
    z = delta / se if se > 0 else (0.0 if delta == 0 else math.copysign(math.inf, delta))
    return {"n": n, "before": sum(before) / n, "after": sum(after) / n, "delta": delta,
            "se": se, "z": z}  # fmt: skip


def read_samples(eval_dir: Path) -> list[dict]:
    """An eval stage's per-prompt results (samples.jsonl: family, prompt, answer, score)."""
    path = Path(eval_dir) / "samples.jsonl"
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _pair_scores(before: list[dict], after: list[dict], families) -> tuple[list, list]:
    """The scores of `families`' prompts, checked to be the same prompts in the same order."""
    b = [x for x in before if x["family"] in families]
    a = [x for x in after if x["family"] in families]
    if [(x["family"], x["prompt"]) for x in b] != [(x["family"], x["prompt"]) for x in a]:
        raise ValueError("paired lift: the two evals scored different prompts")
    return [float(x["score"]) for x in b], [float(x["score"]) for x in a]


def stage_start(st: Stage, by_name: dict[str, Stage]) -> tuple[str | None, list[str]]:
    """(the model a model stage started from, the generated families it trains on): a train
    stage's input model and data; a merge of trained models: their common start (or the merged
    model that is not trained from it, e.g. dpo_merge's SFT generalist) and their families."""
    if st.kind == "train":
        # a family listed twice (upsampled) is one targeted family
        return st.spec["model"], list(dict.fromkeys(f for f, k in st.spec["data"] if k != "file"))
    if st.kind != "merge":
        return None, []
    trained = [by_name[m] for m in st.spec["models"] if by_name[m].kind == "train"]
    fams = list(dict.fromkeys(f for t in trained for f, k in t.spec["data"] if k != "file"))
    others = [m for m in st.spec["models"] if by_name[m].kind != "train"]
    starts = {t.spec["model"] for t in trained}
    if others:
        return others[-1], fams
    return (starts.pop() if len(starts) == 1 else None), fams


def lift_rows(work: Path, stages: list[Stage]) -> list[dict]:
    """One row per evaluated model stage with an evaluated start: stage, start, targeted
    families, `targeted` (the pooled paired lift over them, None without any) and `families`
    {family: paired lift}."""
    by_name = {s.name: s for s in stages}
    rows = []
    for st in stages:
        start, fams = stage_start(st, by_name)
        after_dir, before_dir = work / f"eval_{st.name}", work / f"eval_{start}"
        if start is None or not (after_dir / "samples.jsonl").is_file():
            continue
        if not (before_dir / "samples.jsonl").is_file():
            continue
        before, after = read_samples(before_dir), read_samples(after_dir)
        evald = list(dict.fromkeys(x["family"] for x in after))
        per = {f: paired_lift(*_pair_scores(before, after, {f})) for f in evald}
        target = [f for f in fams if f in per]
        pooled = paired_lift(*_pair_scores(before, after, set(target))) if target else None
        rows.append({"stage": st.name, "start": start, "targeted_families": target,
                     "targeted": pooled, "families": per})  # fmt: skip
    return rows


def _z(x: dict) -> str:
    return f"{x['delta']:+.3f} ({x['z']:+.1f})"


def lift_markdown(rows: list[dict]) -> str:
    """The lift table: per stage vs its start, the pooled lift on its targeted families
    (delta, paired SE, z) and every family's delta (z)."""
    if not rows:
        return ""
    fams = list(dict.fromkeys(f for r in rows for f in r["families"]))
    head = ("## Lift per stage vs its start (held-out accuracy, paired over the same prompts)\n\n"
            "delta = mean(after - before); SE = sd(after_i - before_i) / sqrt(n); z = delta / "
            "SE (|z| >= 2: beyond noise). Families the stage trains on are in **bold**.\n\n"
            "| stage | vs | targeted n | targeted delta | SE | z | "
            + " | ".join(fams) + " |\n|" + " --- |" * (6 + len(fams)))  # fmt: skip
    lines = [head]
    for r in rows:
        t = r["targeted"]
        cells = [f"{r['stage']}", r["start"]]
        cells += ([str(t["n"]), f"{t['delta']:+.3f}", f"{t['se']:.3f}", f"{t['z']:+.1f}"]
                  if t else ["0", "-", "-", "-"])  # fmt: skip
        for f in fams:
            x = r["families"].get(f)
            cell = "-" if x is None else _z(x)
            cells.append(f"**{cell}**" if f in r["targeted_families"] and x else cell)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _logged_steps(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if "step" in r and "event" not in r]


def dpo_rows(work: Path, stages: list[Stage]) -> list[dict]:
    """Per train stage that logged DPO metrics (`rewards/accuracies`): steps, and for loss,
    rewards/accuracies, rewards/margins, logps/chosen, logps/rejected the first logged value
    and the mean over the last quarter of the logged steps."""
    keys = ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected")
    out = []
    for st in stages:
        path = work / st.name / "metrics.jsonl"
        if st.kind != "train" or not path.is_file():
            continue
        steps = [r for r in _logged_steps(path) if "rewards/accuracies" in r]
        if not steps:
            continue
        tail = steps[-max(1, len(steps) // 4) :]
        row = {"stage": st.name, "steps": steps[-1]["step"]}
        for k in keys:
            vals = [r[k] for r in tail if k in r]
            row[k] = {"first": steps[0].get(k), "last": sum(vals) / len(vals) if vals else None}
        out.append(row)
    return out


_PAIR_ONLY = ("prompt", "chosen", "rejected", "chosen_reward", "rejected_reward")


def trained_prompt_lift(work: Path, st: Stage, stages: list[Stage], pairs: list) -> dict | None:
    """Greedy accuracy on the prompts a round trained on (its pairs' prompts, the eval stages'
    max_new_tokens), before (the round's start) and after (the round): the paired lift. It
    separates "the round taught its own prompts" from "it generalised to held-out prompts".
    Cached in <stage>/online/trained_prompts.json, keyed by the stage's record hash. None when
    the pairs' rows carry no `family` + `answer` for the task verifier (e.g. user datasets)."""
    from r7b_fast.eval import load_for_eval, task_accuracy
    from r7b_fast.pipeline_spec import model_dir, read_json, write_json

    rec, cache = (
        read_json(work / st.name / "record.json"),
        work / st.name / "online" / "trained_prompts.json",
    )
    old = read_json(cache)
    if not pairs or rec is None or any("answer" not in p or "family" not in p for p in pairs):
        return None  # nothing to score, or prompts without a verifiable answer (user data)
    if old and old.get("hash") == rec["hash"]:
        return old["lift"]
    ev = next((s for s in stages if s.kind == "eval"), None)
    rows = [{**{k: v for k, v in p.items() if k not in _PAIR_ONLY},
             "messages": [*p["prompt"], {"role": "assistant", "content": str(p.get("answer"))}]}
            for p in pairs]  # fmt: skip
    by_name = {s.name: s for s in stages}
    scores = []
    for name in (st.spec["model"], st.name):
        model, tok = load_for_eval(model_dir(work, name, by_name))
        acc = task_accuracy(model, tok, rows, return_samples=True,
                            max_new_tokens=ev.spec["max_new_tokens"] if ev else 24)  # fmt: skip
        scores.append([x["score"] for x in acc["samples"]])
    lift = paired_lift(*scores) if len(rows) > 1 else None
    write_json(cache, {"hash": rec["hash"], "lift": lift})
    return lift


def round_rows(work: Path, stages: list[Stage]) -> list[dict]:
    """Per on-policy train stage: its round event's stats; from online/round_000.pt, the mean
    verifier score of the chosen and of the rejected answers over the pairs; and the greedy
    accuracy lift on the round's own prompts (`trained_prompt_lift`)."""
    import torch

    out = []
    for st in stages:
        d = work / st.name
        if st.kind != "train" or not (d / "online" / "round_000.pt").is_file():
            continue
        with open(d / "metrics.jsonl", encoding="utf-8") as f:
            ev = [json.loads(x) for x in f if '"event": "round"' in x]
        saved = torch.load(d / "online" / "round_000.pt", weights_only=False)
        pairs = saved["pairs"]
        stats = ev[-1] if ev else saved["stats"]  # the event also carries the stats
        n = len(pairs)
        chosen = sum(p["chosen_reward"] for p in pairs) / n if n else float("nan")
        rejected = sum(p["rejected_reward"] for p in pairs) / n if n else float("nan")
        out.append({"stage": st.name, "prompts": int(stats["num_prompts"]),
                    "samples": int(stats["num_samples"]), "reward_rate": stats["reward_mean"],
                    "best_of_k": stats["reward_best_mean"], "pairs": n,
                    "ties": int(stats["num_tied"]), "margin": stats["margin_mean"],
                    "chosen_score": chosen, "rejected_score": rejected,
                    "trained_prompts": trained_prompt_lift(work, st, stages, pairs)})  # fmt: skip
    return out


def _before_after(x: dict | None) -> str:
    return "-" if x is None else f"{x['before']:.3f} -> {x['after']:.3f} ({x['z']:+.1f})"


def _fl(v, fmt=".3f") -> str:
    return "-" if v is None else format(v, fmt)


def dpo_markdown(dpo: list[dict], rounds: list[dict]) -> str:
    """The DPO training metrics table and the on-policy rounds table (empty without both)."""
    parts = []
    if rounds:
        lines = ["## On-policy rounds: what the sampled pairs teach\n\n"
                 "| stage | prompts x k | reward rate | best-of-k | pairs | ties | margin | "
                 "chosen score | rejected score | greedy acc on its trained prompts: before "
                 "-> after (z) |\n|" + " --- |" * 10]  # fmt: skip
        for r in rounds:
            lines.append(f"| {r['stage']} | {r['prompts']} x {r['samples'] // r['prompts']} | "
                         f"{r['reward_rate']:.3f} | {r['best_of_k']:.3f} | {r['pairs']} | "
                         f"{r['ties']} | {r['margin']:.3f} | {r['chosen_score']:.3f} | "
                         f"{r['rejected_score']:.3f} | {_before_after(r['trained_prompts'])} |")  # fmt: skip
        parts.append("\n".join(lines))
    if dpo:
        lines = ["## DPO training (metrics.jsonl: first logged step -> mean of the last quarter)"
                 "\n\n| stage | steps | loss | rewards/accuracies | rewards/margins | "
                 "logps/chosen | logps/rejected |\n|" + " --- |" * 7]  # fmt: skip
        for r in dpo:
            cells = [f"{_fl(r[k]['first'])} -> {_fl(r[k]['last'])}"
                     for k in ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen",
                               "logps/rejected")]  # fmt: skip
            lines.append(f"| {r['stage']} | {r['steps']} | " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def stage_evidence(work: Path, stages: list[Stage]) -> tuple[list, list, list]:
    """(lift_rows, dpo_rows, round_rows) of a work dir."""
    return lift_rows(work, stages), dpo_rows(work, stages), round_rows(work, stages)
