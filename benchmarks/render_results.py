"""Results files -> tables. Never type a benchmark number by hand.

    python -m benchmarks.render_results                 # README perf table from benchmarks/results/
    python -m benchmarks.render_results --check         # exit 1 if the README table is stale
    python -m benchmarks.render_results --consolidate PARTS --dest DIR --tag TAG
        # (gpu_suite.sh) every part's JSON/markdown in PARTS + PARTS/steps.jsonl ->
        # DIR/TAG.json and DIR/TAG.md; prints the summary table

A consolidated suite file (`<date>-<card>.json`, written by gpu_suite.sh) holds {"suite": 1,
"tag", "env", "steps": [...], "parts": {name: part JSON}, "summary": [rows]}. Summary rows are
the parts' own `summary` lists (see benchmarks/_common.goal_row) plus the rows derived here from
train_step's comparison. The README table lists, for the newest suite file of each card, every
summary row; the tiny-model CPU measurement (train_step_cpu_tiny.json) gets its own line.
Uses only the standard library (no torch), so it runs anywhere.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
START, END = "<!-- perf-table:start -->", "<!-- perf-table:end -->"


def fmt(x, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        if x == 0 or 1e-3 <= abs(x) < 1e6:
            return f"{x:.{digits}g}" if abs(x) < 10**digits else f"{x:.0f}"
        return f"{x:.{digits}e}"
    return str(x)


def table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    lines += [
        "| " + " | ".join(fmt(r.get(c)).replace("|", "/") for c in columns) + " |" for r in rows
    ]
    return "\n".join(lines)


def _goal(metric, value, goal, higher=True, applies=True) -> dict:
    """A goal row; `applies=False` (a CPU run: the goals are the H100's) shows no verdict."""
    ok = None if value is None or not applies else (value >= goal if higher else value <= goal)
    goal_s = f"{'>=' if higher else '<='} {goal}" + ("" if applies else " (GPU)")
    return {"metric": metric, "value": value, "goal": goal_s, "ok": ok}


def _tol(part: dict, stage: str):
    tol = part.get("loss_tolerance")
    return tol.get(stage) if isinstance(tol, dict) else tol


def train_step_summary(part: dict) -> list[dict]:
    """Goal rows of issue 9 from train_step's JSON (tokens/s ratios, MFU, memory ratio)."""
    rows, cmp_ = part.get("rows", []), part.get("compare", {})
    by = {(r["stage"], r["variant"]): r for r in rows if "error" not in r}
    layers = part.get("config", {}).get("num_hidden_layers")
    pre = f"e2e ({layers} layers) "
    on_gpu = bool(part.get("env", {}).get("gpu"))
    out = []
    ours_sft = by.get(("sft", "ours"))
    if ours_sft:
        out.append(
            {
                "metric": pre + "SFT ours tokens/s",
                "value": ours_sft["tokens_per_s"],
                "goal": None,
                "ok": None,
            }
        )
        if ours_sft.get("mfu") is not None:
            out.append(_goal(pre + "SFT ours MFU", ours_sft["mfu"], 0.45))
    for key, metric, goal, higher in (
        ("sft_speedup_vs_hf", "SFT ours / HF tokens/s", 1.5, True),
        ("sft_speedup_vs_hf_liger", "SFT ours / HF+Liger tokens/s", 1.2, True),
        ("dpo_speedup_vs_hf", "DPO ours / TRL-style tokens/s", 2.0, True),
        ("dpo_memory_vs_hf", "DPO ours / TRL-style peak memory", 0.5, False),
        ("dpo_speedup_vs_hf_liger", "DPO ours / HF+Liger DPO tokens/s", None, True),
        ("dpo_extra_memory_vs_hf", "DPO ours / TRL-style memory beyond weights+AdamW", None, False),
    ):
        if key in cmp_:
            if goal is None:
                out.append({"metric": pre + metric, "value": cmp_[key], "goal": None, "ok": None})
            else:
                out.append(_goal(pre + metric, cmp_[key], goal, higher, applies=on_gpu))
    big = by.get(("sft", "ours_max"))
    if big:
        pre_big = f"e2e ({big.get('layers')} layers, ours alone) SFT "
        out.append(
            {"metric": pre_big + "tokens/s", "value": big["tokens_per_s"], "goal": None, "ok": None}
        )
        if big.get("mfu") is not None:
            out.append(_goal(pre_big + "MFU", big["mfu"], 0.45))
        if big.get("peak_mem_gib") is not None:
            out.append(
                {
                    "metric": pre_big + "peak GiB",
                    "value": big["peak_mem_gib"],
                    "goal": None,
                    "ok": None,
                }
            )
    for stage in ("sft", "dpo"):
        if f"{stage}_loss_ok" in cmp_:
            out.append({"metric": f"{pre}{stage.upper()} loss ours vs HF (rel. diff)",
                        "value": cmp_[f"{stage}_loss_rel_diff"],
                        "goal": f"<= {_tol(part, stage)}", "ok": cmp_[f"{stage}_loss_ok"]})  # fmt: skip
    return out


def consolidate(parts_dir: Path, dest: Path, tag: str) -> dict:
    """Merge PARTS/*.json (+ .md) and PARTS/steps.jsonl into DEST/TAG.json and DEST/TAG.md."""
    steps = []
    steps_file = parts_dir / "steps.jsonl"
    if steps_file.exists():
        steps = [json.loads(line) for line in steps_file.read_text().splitlines() if line.strip()]
    env = (
        json.loads((parts_dir / "env.json").read_text())
        if (parts_dir / "env.json").exists()
        else {}
    )
    parts, mds, summary = {}, {}, []
    for p in sorted(parts_dir.glob("*.json")):
        if p.name == "env.json":
            continue
        try:
            parts[p.stem] = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            parts[p.stem] = {"error": f"unreadable JSON: {e}"}
        md = p.with_suffix(".md")
        if md.exists():
            mds[p.stem] = md.read_text().strip()
        part = parts[p.stem]
        summary += [dict(r, part=p.stem) for r in part.get("summary", []) if isinstance(r, dict)]
        if p.stem.startswith("train_step"):
            summary += [dict(r, part=p.stem) for r in train_step_summary(part)]
    doc = {"suite": 1, "tag": tag, "env": env, "steps": steps, "parts": parts, "summary": summary}
    dest.mkdir(parents=True, exist_ok=True)
    (dest / f"{tag}.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
    lines = [
        f"# GPU suite {tag}",
        "",
        "## Environment",
        "",
        table([env], list(env)) if env else "-",
        "",
    ]
    lines += ["## Steps", "", steps_table(steps), "", "## Summary", "", summary_table(summary), ""]
    for name, md in mds.items():
        lines += [f"## {name}", "", md, ""]
    (dest / f"{tag}.md").write_text("\n".join(lines))
    return doc


def steps_table(steps: list[dict]) -> str:
    """Steps with their commands cut to 90 characters (the JSON keeps them whole)."""
    if not steps:
        return "(no steps)"
    short = [dict(s, command=(s.get("command") or "")[:90]) for s in steps]
    return table(short, ["step", "status", "seconds", "budget_s", "command"])


def summary_table(rows: list[dict]) -> str:
    return table(rows, ["metric", "value", "goal", "ok"]) if rows else "(no summary rows)"


def readme_table(results: Path) -> str:
    """The README's performance section, from the newest suite file per card."""
    newest: dict[str, dict] = {}
    for p in sorted(results.glob("*.json")):
        try:
            doc = json.loads(p.read_text())
        except json.JSONDecodeError:
            continue
        if doc.get("suite") != 1 or "dryrun" in doc.get("tag", ""):
            continue
        card = doc.get("env", {}).get("gpu") or "cpu"
        if card not in newest or doc["tag"] > newest[card]["tag"]:
            newest[card] = dict(doc, file=p.name)
    out = []
    for card, doc in sorted(newest.items()):
        env = doc.get("env", {})
        out += [f"**{card}** ({doc['tag']}: torch {env.get('torch')}, triton {env.get('triton')}, "
                f"transformers {env.get('transformers')}; [`{doc['file']}`](benchmarks/results/{doc['file']}))", "",
                summary_table(doc.get("summary", [])), ""]  # fmt: skip
    if not newest:
        out += ["GPU numbers pending: `benchmarks/gpu_suite.sh` has not run on a GPU yet.", ""]
    cpu = results / "train_step_cpu_tiny.json"
    if cpu.exists():
        out += [cpu_line(json.loads(cpu.read_text())), ""]
    return "\n".join(out).rstrip() + "\n"


CPU_HF = {"sft": "padded, `model(labels=...)`", "dpo": "TRL-style padded [2B, L] pairs"}


def cpu_line(part: dict) -> str:
    """The tiny-model CPU train-step measurement (issue 7): SFT and DPO, in one sentence."""
    by = {(r["stage"], r["variant"]): r for r in part.get("rows", []) if "error" not in r}
    parts = []
    for stage, hf_desc in CPU_HF.items():
        ours, hf = by.get((stage, "ours")), by.get((stage, "hf"))
        if not (ours and hf):
            continue
        cpu = ""
        if ours.get("tokens_per_cpu_s") and hf.get("tokens_per_cpu_s"):
            cpu = f", {ours['tokens_per_cpu_s'] / hf['tokens_per_cpu_s']:.2f}x in process CPU time"
        parts.append(
            f"{stage.upper()}: ours (packed) {ours['tokens_per_s']:.0f} tokens/s vs HF ({hf_desc}) "
            f"{hf['tokens_per_s']:.0f} tokens/s on the same {ours['real_tokens']} real tokens: "
            f"{ours['tokens_per_s'] / hf['tokens_per_s']:.2f}x{cpu}"
        )
    if not parts:
        return "CPU tiny-model train-step measurement: incomplete (see train_step_cpu_tiny.json)."
    env = part.get("env", {})
    return (
        f"CPU, tiny model ({env.get('cpu_count')}-core CPU shared with other jobs, steps "
        f"interleaved, {env.get('utc')}). " + "; ".join(parts) + " "
        "([`train_step_cpu_tiny.json`](benchmarks/results/train_step_cpu_tiny.json))."
    )


def update_readme(readme: Path, body: str) -> str:
    text = readme.read_text()
    if START not in text or END not in text:
        raise ValueError(f"{readme}: markers {START} / {END} not found")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{body}{END}{tail}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--consolidate", type=Path, help="a suite's parts folder")
    ap.add_argument("--dest", type=Path, help="with --consolidate: where TAG.json/.md go")
    ap.add_argument("--tag", help="with --consolidate: the file stem, e.g. 2026-11-26-h100")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--readme", type=Path, default=REPO / "README.md")
    ap.add_argument("--check", action="store_true", help="exit 1 if the README table is stale")
    a = ap.parse_args(argv)
    if a.consolidate:
        if not (a.dest and a.tag):
            ap.error("--consolidate needs --dest and --tag")
        doc = consolidate(a.consolidate, a.dest, a.tag)
        print("\n" + steps_table(doc["steps"]) + "\n\n" + summary_table(doc["summary"]))
        return 0
    new = update_readme(a.readme, readme_table(a.results))
    if a.check:
        stale = new != a.readme.read_text()
        print(
            "README perf table is stale: run python -m benchmarks.render_results"
            if stale
            else "up to date"
        )
        return int(stale)
    a.readme.write_text(new)
    print(f"updated {a.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
