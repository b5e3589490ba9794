"""The Command R7B Arabic post-training recipe as one resumable command.

    python -m r7b_fast.pipeline PIPELINE.yaml|builtin-name [--from STAGE] [--work-dir DIR]

One YAML (see `r7b_fast/configs/pipeline_demo.yaml`) describes the recipe; it compiles into a
linear list of stages, each with its own directory `work_dir/<stage>/`:

    data                       generated task data (sft / pref / eval JSONL per family)
    init                       the base checkpoint (a seeded tiny Cohere2), unless base.path is a dir
    pretrain                   optional warm-up SFT standing in for a pretrained base (with
                               base.pretrain.data_seed: on its own rows, data/<fam>/pretrain.jsonl)
    sft_<expert>...            1. one SFT run per expert dataset, all from the same base
    sft_merge                  -> linear merge, equal weights by default (sft.merge_weights)
    sft_merge_perf             ablation: performance-weighted merge (not used downstream)
    sft_merge_alt              ablation: the experts merged by sft.ablation_merge's method (e.g.
                               ties), evaluated beside the linear merge (not used downstream)
    dpo, dpo_merge             2. offline DPO from the generalist -> merge with the generalist
    online_r1..online_rR       3. on-policy DPO rounds, each from the previous round
    online_merge               -> merge the last round with the DPO generalist
    eval_<stage>               4. held-out loss + greedy accuracy after every model stage
    report                     JSON + markdown table + PNG plots (always rewritten)

Training stages run `python -m r7b_fast.train CONFIG key=value...` as subprocesses (under
`torchrun --nproc_per_node N` when nproc > 1), so they run exactly the trainer's code, and die
with the pipeline (Linux: PR_SET_PDEATHSIG, so even a kill -9 of the pipeline stops them); merges
call `r7b_fast.merge.merge_checkpoints`. Each stage writes `started.json` (its hash) when it
starts and `record.json` (hash, kind, metrics, seconds, output) when complete. The hash covers
the stage's spec (for training: the trainer config file's text and the overrides; for data and
the tiny init: TOKENIZER_VERSION, the generator/tokenizer cache key; for user data files and an
external base: their identity, r7b_fast.rundir's content hash or size + mtime) and the hashes of
the stages it depends on. On a rerun, a stage whose record matches its hash and whose output
exists is skipped; an interrupted one (started, no record) is redone in place (the trainer
resumes from its own checkpoints); a stage whose spec changed is wiped and redone. `--from
STAGE` wipes and redoes that stage and every later one.

The spec, the stage graph and the records live in `r7b_fast/pipeline_spec.py` (re-exported
here); this module runs the stages and writes the report.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from r7b_fast.pipeline_spec import (
    EXPERT_KEYS,
    SECTION_KEYS,
    TOP_KEYS,
    PipelineError,
    Stage,
    build_stages,
    is_complete,
    load_pipeline,
    model_dir,
    output_complete,
    prepare_stage_dir,
    read_json,
    resolve_pipeline,
    stage_hash,
    write_json,
)
from r7b_fast.rundir import die_with_parent

__all__ = [  # the public names, including those defined in pipeline_spec
    "EXECUTORS", "EXPERT_KEYS", "SECTION_KEYS", "TOP_KEYS", "Context", "PipelineError", "Stage",
    "ablation_markdown", "build_stages", "eval_rows", "is_complete", "load_pipeline", "main",
    "metric_score", "model_dir", "output_complete", "performance_weights", "prepare_stage_dir",
    "read_json", "resolve_pipeline", "run_data", "run_eval", "run_init", "run_merge",
    "run_pipeline", "run_train", "stage_hash", "train_command", "write_json",
    "write_pipeline_report",
]  # fmt: skip


# ----------------------------------------------------------------------------- executors


@dataclass
class Context:
    spec: dict
    work: Path
    stages: dict[str, Stage]
    log: callable = print

    def model(self, stage: str) -> Path:
        return model_dir(self.work, stage, self.stages)

    def data_file(self, family: str, kind: str) -> Path:
        """A generated family's file, or (kind "file") a user dataset path as given."""
        if kind == "file":
            return Path(family)
        return self.work / "data" / family / f"{kind}.jsonl"


def run_data(st: Stage, d: Path, ctx: Context) -> dict:
    """Each family's sft/pref/eval files; with `base.pretrain.data_seed`, also the base's own
    `pretrain.jsonl` per pretrain family: `n_train` train-split rows drawn with that seed (never
    an eval prompt), its own independent draw of rows (small prompt spaces such as digit
    conversion still overlap the experts' SFT rows)."""
    from r7b_fast.data.synthetic import generate_split, make_dataset_dir, write_jsonl

    s = st.spec
    make_dataset_dir(d, s["families"], s["n_train"], s["n_eval"], s["seed"],
                     difficulty=s["difficulty"], system=s["system"])  # fmt: skip
    pre = s.get("pretrain") or {"families": []}
    for fam in pre["families"]:
        rows = generate_split(fam, s["n_train"], pre["seed"], "train",
                              difficulty=s["difficulty"], system=s["system"])  # fmt: skip
        write_jsonl(rows, d / fam / "pretrain.jsonl")
    return {"families": s["families"], "n_train": s["n_train"], "n_eval": s["n_eval"]}


def run_init(st: Stage, d: Path, ctx: Context) -> dict:
    """The base checkpoint: a seeded tiny Cohere2 and the embedded tokenizer, saved HF-style."""
    from r7b_fast.data.tokenizer import load_tokenizer
    from r7b_fast.model import build_model, tiny_config

    model = build_model(tiny_config(**st.spec["tiny_overrides"]), seed=st.spec["seed"])
    tmp = d / "hf.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    load_tokenizer().save_pretrained(tmp)
    shutil.rmtree(d / "hf", ignore_errors=True)
    os.replace(tmp, d / "hf")
    return {"parameters": sum(p.numel() for p in model.parameters())}


def train_command(st: Stage, d: Path, ctx: Context) -> list[str]:
    """The trainer command line for a train stage (torchrun when nproc > 1)."""
    s = st.spec
    files = [str(ctx.data_file(f, k)) for f, k in s["data"]]
    args = [
        s["config"],
        f"run.output_dir={d}",
        f"model.path={ctx.model(s['model'])}",
        "model.tiny_overrides={}",
        f"data.train={json.dumps(files, ensure_ascii=False)}",
        "data.synthetic_families=[]",
    ]
    args += [f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in s["overrides"].items()]
    if s["nproc"] > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc_per_node={s['nproc']}"]  # fmt: skip
    else:
        launcher = [sys.executable]
    return launcher + ["-m", "r7b_fast.train"] + args


def run_train(st: Stage, d: Path, ctx: Context) -> dict:
    cmd = train_command(st, d, ctx)
    log_path = d / "train.log"
    with open(log_path, "ab") as logf:
        logf.write(("$ " + " ".join(cmd) + "\n").encode())
        logf.flush()
        # the trainer dies with the pipeline, even a kill -9 of it (no orphan keeps training)
        proc = subprocess.run(die_with_parent(cmd), stdout=logf, stderr=subprocess.STDOUT,
                              check=False)  # fmt: skip
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-25:]
        raise RuntimeError(f"stage {st.name}: trainer exited with {proc.returncode}; "
                           f"log {log_path}:\n" + "\n".join(tail))  # fmt: skip
    done = read_json(d / "done.json") or {}
    if not (d / "hf" / "config.json").is_file():
        raise RuntimeError(f"stage {st.name}: trainer finished without an HF export in {d / 'hf'}")
    return {"trainer": done, "metrics_file": str(d / "metrics.jsonl")}


def performance_weights(scores: list[float]) -> list[float]:
    """Merge weights proportional to the experts' scores (>= 0); equal if they are all 0."""
    if any(not (s >= 0) for s in scores):
        raise ValueError(f"performance weights need scores >= 0, got {scores}")
    total = sum(scores)
    return [1 / len(scores)] * len(scores) if total == 0 else [s / total for s in scores]


def metric_score(metrics: dict, metric: str) -> float:
    """A higher-is-better score from an eval record: the metric itself, or exp(-loss) for a
    loss metric (the per-token likelihood)."""
    import math

    if metric not in metrics:
        raise PipelineError(f"sft.ablation_metric: {metric!r} not in the experts' eval metrics")
    v = float(metrics[metric])
    return math.exp(-v) if metric.startswith("loss") else v


def run_merge(st: Stage, d: Path, ctx: Context) -> dict:
    from r7b_fast.merge import merge_checkpoints

    s = st.spec
    models = [ctx.model(m) for m in s["models"]]
    weights, scores = s["weights"], None
    if weights == "performance":
        recs = [read_json(ctx.work / f"eval_{m}" / "eval.json") for m in s["models"]]
        scores = [metric_score(r, s["metric"]) for r in recs]
        weights = performance_weights(scores)
    elif weights is None:
        weights = [1.0 / len(models)] * len(models)
    else:
        weights = [w / sum(weights) for w in weights]
    method, kw = s.get("method", "linear"), {}
    if method != "linear":  # ties / dare_* / slerp: the base and parameters from the spec
        kw = dict(s.get("params") or {}, base=str(ctx.model(s["base"])))
        weights = None if method == "slerp" else weights
    summary = merge_checkpoints([str(m) for m in models], d / "hf", weights=weights,
                                method=method, overwrite=True, progress=False, **kw)  # fmt: skip
    out = {"models": s["models"], "weights": weights, "seconds": summary.get("seconds")}
    if method != "linear":
        out.update(method=method, params=s.get("params"), base=s["base"])
    if scores is not None:
        out.update(scores=scores, metric=s["metric"])
    return out


def eval_rows(ctx: Context, spec: dict) -> list[dict]:
    from r7b_fast.eval import read_jsonl, subsample

    rows = []
    for fam in spec["families"]:
        rows += subsample(read_jsonl(ctx.data_file(fam, "eval")), spec["n_per_family"])
    return rows


def run_eval(st: Stage, d: Path, ctx: Context) -> dict:
    from r7b_fast.eval import evaluate_checkpoint

    s = st.spec
    metrics = evaluate_checkpoint(ctx.model(s["model"]), eval_rows(ctx, s),
                                  max_new_tokens=s["max_new_tokens"], max_len=s["max_len"],
                                  return_samples=True)  # fmt: skip
    samples = metrics.pop("samples", [])
    (d / "samples.jsonl").write_text(
        "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in samples), encoding="utf-8"
    )
    write_json(d / "eval.json", metrics)
    return metrics


EXECUTORS = {"data": run_data, "init": run_init, "external": lambda st, d, ctx: {},
             "train": run_train, "merge": run_merge, "eval": run_eval}  # fmt: skip


# ----------------------------------------------------------------------------- the run loop
def run_pipeline(spec: dict, *, from_stage: str | None = None, log=print) -> dict:
    """Runs (or resumes) every stage, then writes the report; returns
    {"stages": {name: "skipped"|"ran"}, "report": paths, "table": markdown, "seconds"}."""
    t_start = time.time()
    work = Path(spec["work_dir"]).resolve()
    work.mkdir(parents=True, exist_ok=True)
    stages = build_stages(spec)
    names = [s.name for s in stages]
    if from_stage is not None and from_stage not in names:
        raise PipelineError(f"--from: unknown stage {from_stage!r}; stages: {', '.join(names)}")
    forced = set(names[names.index(from_stage) :]) if from_stage else set()
    ctx = Context(spec, work, {s.name: s for s in stages}, log)
    hashes: dict[str, str] = {}
    status: dict[str, str] = {}
    for i, st in enumerate(stages):
        h = hashes[st.name] = stage_hash(st, hashes)
        d = work / st.name
        tag = f"[{i + 1:2d}/{len(stages)}] {st.name:<22}"
        if st.name not in forced and is_complete(st, d, h):
            status[st.name] = "skipped"
            log(f"{tag} done already (record {h}), skipped")
            continue
        how = prepare_stage_dir(d, h, fresh=st.name in forced)
        t0 = time.time()
        result = EXECUTORS[st.kind](st, d, ctx)
        secs = time.time() - t0
        rec = {"name": st.name, "kind": st.kind, "hash": h, "deps": st.deps, "spec": st.spec,
               "result": result, "seconds": round(secs, 2), "finished": time.time(),
               "start": how}  # fmt: skip
        rec["spec"] = {k: v for k, v in st.spec.items() if k != "config_text"}
        write_json(d / "record.json", rec)
        status[st.name] = "ran"
        log(f"{tag} {st.kind:<8} {secs:7.1f}s  {_brief(st, result)}")
    out = write_pipeline_report(ctx, stages)
    out["stages"] = status
    out["seconds"] = time.time() - t_start
    return out


def _brief(st: Stage, result: dict) -> str:
    if st.kind == "eval":
        return (
            f"acc/mean={result.get('acc/mean', float('nan')):.3f} loss={result.get('loss', 0):.3f}"
        )
    if st.kind == "merge":
        return "weights=" + ", ".join(f"{w:.3f}" for w in result["weights"])
    if st.kind == "train":
        t = result.get("trainer") or {}
        loss = (t.get("final") or {}).get("loss")
        return f"steps={t.get('steps', '?')} final loss=" + ("?" if loss is None else f"{loss:.4f}")
    return ""


def write_pipeline_report(ctx: Context, stages: list[Stage]) -> dict:
    """report/: report.json, report.md (accuracy per stage per family + the merge ablation),
    accuracy.png, loss_curves.png. Returns {"report": paths, "table": markdown}."""
    from r7b_fast.eval import accuracy_table, write_report

    results, metrics_files, merges = [], {}, {}
    for st in stages:
        d = ctx.work / st.name
        if st.kind == "eval":
            m = read_json(d / "eval.json")
            if m is not None:
                results.append((st.label or st.spec["model"], m))
        elif st.kind == "train" and (d / "metrics.jsonl").is_file():
            metrics_files[st.name] = d / "metrics.jsonl"
        elif st.kind == "merge":
            rec = read_json(d / "record.json")
            if rec:
                merges[st.name] = rec["result"]
    extra_md = ablation_markdown(ctx, merges)
    paths = write_report(results, ctx.work / "report", metrics_files=metrics_files,
                         extra={"merges": merges, "work_dir": str(ctx.work)},
                         extra_md=extra_md)  # fmt: skip
    return {"report": paths, "table": accuracy_table(results, loss=True), "ablation": extra_md}


def ablation_markdown(ctx: Context, merges: dict) -> str:
    """The SFT merges side by side: equal weights, performance-weighted (sft.ablation) and the
    other method (sft.ablation_merge), whichever ran (empty if only the main merge ran)."""
    names = [n for n in ("sft_merge", "sft_merge_perf", "sft_merge_alt") if n in merges]
    if "sft_merge" not in names or len(names) < 2:
        return ""
    rows = []
    for name in names:
        m = read_json(ctx.work / f"eval_{name}" / "eval.json") or {}
        w = merges[name].get("weights")
        w = "equal" if w is None else ", ".join(f"{x:.3f}" for x in w)
        method = merges[name].get("method", "linear")
        accs = {k[4:]: v for k, v in m.items() if k.startswith("acc/") and k != "acc/mean"}
        fam = ", ".join(f"{k} {v:.3f}" for k, v in sorted(accs.items()))
        rows.append(f"| {name} | {method} | {w} | {m.get('acc/mean', float('nan')):.3f} | "
                    f"{m.get('loss', float('nan')):.3f} | {fam} |")  # fmt: skip
    how = []
    if "sft_merge_perf" in merges:
        how.append(
            f"performance-weighted (weights from experts' `{merges['sft_merge_perf'].get('metric', 'acc/mean')}`)"
        )
    if "sft_merge_alt" in merges:
        how.append(
            f"{merges['sft_merge_alt'].get('method')} {merges['sft_merge_alt'].get('params', {})}"
        )
    return ("## Merge ablation: equal-weight linear vs " + " vs ".join(how) + "\n\n"
            "| merge | method | weights | acc/mean | heldout loss | per family |\n"
            "| --- | --- | --- | --- | --- | --- |\n" + "\n".join(rows))  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m r7b_fast.pipeline", description=__doc__.split(
        "\n")[0])  # fmt: skip
    p.add_argument("pipeline", help="a pipeline YAML or a built-in name (pipeline_demo)")
    p.add_argument("--from", dest="from_stage", default=None, help="redo from this stage on")
    p.add_argument("--work-dir", default=None, help="override the YAML's work_dir")
    p.add_argument("--list", action="store_true", help="print the stages and exit")
    a = p.parse_args(argv)
    try:
        spec = load_pipeline(a.pipeline, a.work_dir)
        if a.list:
            for st in build_stages(spec):
                print(f"{st.name:<24} {st.kind:<8} deps={','.join(st.deps)}")
            return 0
        out = run_pipeline(spec, from_stage=a.from_stage)
    except PipelineError as e:
        print(f"pipeline: {e}", file=sys.stderr)
        return 2
    print("\nAccuracy per stage and family (greedy decoding, task verifier):\n")
    print(out["table"])
    if out["ablation"]:
        print("\n" + out["ablation"])
    print(f"\nplot: {out['report']['accuracy_png']}")
    if "loss_png" in out["report"]:
        print(f"loss curves: {out['report']['loss_png']}")
    print(f"report: {out['report']['md']}  ({out['seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
