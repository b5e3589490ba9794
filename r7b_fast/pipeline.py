"""The Command R7B Arabic post-training recipe as one resumable command.

    python -m r7b_fast.pipeline PIPELINE.yaml|builtin-name [--from STAGE] [--work-dir DIR]

One YAML (see `r7b_fast/configs/pipeline_demo.yaml`) describes the recipe; it compiles into a
linear list of stages, each with its own directory `work_dir/<stage>/`:

    data                       generated task data (sft / pref / eval JSONL per family)
    init                       the base checkpoint (a seeded tiny Cohere2), unless base.path is a dir
    pretrain                   optional warm-up SFT standing in for a pretrained base
    sft_<expert>...            1. one SFT run per expert dataset, all from the same base
    sft_merge                  -> linear merge, equal weights by default (sft.merge_weights)
    sft_merge_perf             ablation: performance-weighted merge (not used downstream)
    dpo, dpo_merge             2. offline DPO from the generalist -> merge with the generalist
    online_r1..online_rR       3. on-policy DPO rounds, each from the previous round
    online_merge               -> merge the last round with the DPO generalist
    eval_<stage>               4. held-out loss + greedy accuracy after every model stage
    report                     JSON + markdown table + PNG plots (always rewritten)

Training stages run `python -m r7b_fast.train CONFIG key=value...` as subprocesses (under
`torchrun --nproc_per_node N` when nproc > 1), so they run exactly the trainer's code; merges
call `r7b_fast.merge.merge_checkpoints`. Each stage writes `started.json` (its hash) when it
starts and `record.json` (hash, kind, metrics, seconds, output) when complete. The hash covers
the stage's spec (for training: the trainer config file's text and the overrides) and the hashes
of the stages it depends on. On a rerun, a stage whose record matches its hash and whose output
exists is skipped; an interrupted one (started, no record) is redone in place (the trainer
resumes from its own checkpoints); a stage whose spec changed is wiped and redone. `--from
STAGE` wipes and redoes that stage and every later one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

EXPERT_KEYS = {"name", "families", "files", "overrides"}
TOP_KEYS = {"name", "work_dir", "nproc", "seed", "base", "data", "train_overrides", "sft", "dpo",
            "online_dpo", "eval"}  # fmt: skip
SECTION_KEYS = {
    "base": {"path", "tiny_overrides", "pretrain"},
    "data": {"n_train", "n_eval", "difficulty", "system"},
    "sft": {"config", "experts", "merge_weights", "ablation", "ablation_metric"},
    "dpo": {"config", "families", "files", "overrides", "merge_weights"},
    "online_dpo": {"config", "families", "files", "rounds", "overrides", "merge_weights"},
    "eval": {"families", "n_per_family", "max_new_tokens", "max_len"},
}


class PipelineError(ValueError):
    """A bad pipeline spec; the message names the offending key."""


@dataclass
class Stage:
    """One step of the pipeline. `spec` (JSON-able) fully determines the output, given `deps`."""

    name: str
    kind: str  # data | init | train | merge | eval
    deps: list[str]
    spec: dict
    label: str = ""
    meta: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- the spec


def resolve_pipeline(path_or_name: str) -> Path:
    """A pipeline YAML path, or a built-in name (`pipeline_demo`) from r7b_fast/configs/."""
    p = Path(path_or_name)
    if p.is_file():
        return p
    builtin = resources.files("r7b_fast") / "configs" / f"{path_or_name}.yaml"
    if builtin.is_file():
        return Path(str(builtin))
    raise PipelineError(f"pipeline: {path_or_name!r} is neither a file nor a built-in config")


def _check_keys(where: str, got: dict, allowed: set) -> None:
    if not isinstance(got, dict):
        raise PipelineError(f"{where}: expected a mapping, got {type(got).__name__}")
    unknown = set(got) - allowed
    if unknown:
        raise PipelineError(f"{where}: unknown keys {sorted(unknown)} (known: {sorted(allowed)})")


def load_pipeline(path_or_name: str, work_dir: str | None = None) -> dict:
    """The validated spec (a dict) of a pipeline YAML; `_dir` is the YAML's directory (relative
    trainer-config paths resolve against it) and `work_dir` is overridable."""
    path = resolve_pipeline(path_or_name)
    spec = yaml.safe_load(path.read_text()) or {}
    _check_keys("<root>", spec, TOP_KEYS)
    for sec, keys in SECTION_KEYS.items():
        _check_keys(sec, spec.setdefault(sec, {}) or {}, keys)
    spec["_dir"] = str(path.parent.resolve())
    if work_dir is not None:
        spec["work_dir"] = work_dir
    if not spec.get("work_dir"):
        raise PipelineError("work_dir: required")
    nproc = spec.setdefault("nproc", 1)
    if not isinstance(nproc, int) or nproc < 1:
        raise PipelineError(f"nproc: must be an int >= 1, got {nproc!r}")
    experts = spec["sft"].get("experts") or []
    if not experts:
        raise PipelineError("sft.experts: need at least one expert")
    for i, e in enumerate(experts):
        _check_keys(f"sft.experts[{i}]", e, EXPERT_KEYS)
        if not e.get("name") or not (e.get("families") or e.get("files")):
            raise PipelineError(f"sft.experts[{i}]: needs `name` and `families` and/or `files`")
    _check_weights("sft.merge_weights", spec["sft"].get("merge_weights"), len(experts))
    for sec in ("dpo", "online_dpo"):
        if spec[sec]:
            _check_weights(f"{sec}.merge_weights", spec[sec].get("merge_weights"), 2)
    rounds = spec["online_dpo"].get("rounds", 1)
    if spec["online_dpo"] and (not isinstance(rounds, int) or rounds < 1):
        raise PipelineError(f"online_dpo.rounds: must be an int >= 1, got {rounds!r}")
    abl = spec["sft"].get("ablation")
    if abl not in (None, "performance"):
        raise PipelineError(f"sft.ablation: must be null or 'performance', got {abl!r}")
    return spec


def _check_weights(key: str, w, n: int) -> None:
    if w is None:
        return
    if not isinstance(w, list) or len(w) != n or not all(isinstance(x, (int, float)) for x in w):
        raise PipelineError(f"{key}: expected a list of {n} numbers or null (equal), got {w!r}")
    if any(x < 0 for x in w) or sum(w) <= 0:
        raise PipelineError(f"{key}: weights must be >= 0 with a positive sum, got {w!r}")


def _config_file(spec: dict, name: str) -> Path:
    """A trainer config: a path (as given, or next to the pipeline YAML) or a built-in name."""
    from r7b_fast.config import resolve_path

    for cand in (Path(name), Path(spec["_dir"]) / name):
        if cand.is_file():
            return cand.resolve()
    return resolve_path(name).resolve()


# ----------------------------------------------------------------------------- the stage graph


def build_stages(spec: dict) -> list[Stage]:
    """The recipe as a list of stages in execution order (each depends only on earlier ones)."""
    sft, dpo, onl, ev = spec["sft"], spec["dpo"], spec["online_dpo"], spec["eval"]
    seed = int(spec.get("seed", 0))
    used = [f for e in sft["experts"] for f in e.get("families") or []]
    used += list(dpo.get("families") or []) + list(onl.get("families") or [])
    eval_fams = list(ev.get("families") or dict.fromkeys(used))
    d = spec["data"]
    data_spec = {
        "families": sorted(set(used) | set(eval_fams)),
        "n_train": int(d.get("n_train", 256)),
        "n_eval": int(d.get("n_eval", 32)),
        "seed": seed,
        "difficulty": int(d.get("difficulty", 1)),
        "system": d.get("system"),
    }
    stages = [Stage("data", "data", [], data_spec)]
    eval_spec = {
        "families": eval_fams,
        "n_per_family": ev.get("n_per_family"),
        "max_new_tokens": int(ev.get("max_new_tokens", 24)),
        "max_len": int(ev.get("max_len", 512)),
    }

    def add_eval(model: str, label: str) -> None:
        stages.append(Stage(f"eval_{model}", "eval", ["data", model], {"model": model,
                            **eval_spec}, label=label))  # fmt: skip

    def add_train(name, cfg, model, files, overrides, label, seed=seed):
        ov = {**(spec.get("train_overrides") or {}), **(overrides or {}), "run.seed": seed}
        path = _config_file(spec, cfg)
        stages.append(Stage(name, "train", ["data", model], {
            "config": str(path), "config_text": path.read_text(), "model": model,
            "data": files, "overrides": ov, "nproc": spec["nproc"]}, label=label))  # fmt: skip
        add_eval(name, label)

    base = spec["base"]
    if base.get("path", "tiny") == "tiny":
        init = {"tiny_overrides": base.get("tiny_overrides") or {}, "seed": seed}
        stages.append(Stage("init", "init", [], init, label="base"))
    else:
        init = {"path": str(Path(base["path"]).resolve())}
        stages.append(Stage("init", "external", [], init, label="base"))
    model = "init"
    pre = base.get("pretrain")
    if pre and base.get("path", "tiny") == "tiny":
        add_eval("init", "random init")
    if pre:
        files = _files(spec, pre, "sft")
        add_train("pretrain", pre["config"], model, files, pre.get("overrides"), "base")
        model = "pretrain"
    else:
        add_eval(model, "base")
    experts = []
    for e in sft["experts"]:
        name = f"sft_{e['name']}"
        files = _files(spec, e, "sft")
        add_train(name, sft["config"], model, files, e.get("overrides"), f"SFT expert {e['name']}")
        experts.append(name)
    stages.append(Stage("sft_merge", "merge", experts, {"models": experts,
                        "weights": sft.get("merge_weights")}, label="SFT merged"))  # fmt: skip
    add_eval("sft_merge", "SFT merged")
    if sft.get("ablation") == "performance":
        metric = sft.get("ablation_metric", "acc/mean")
        deps = experts + [f"eval_{x}" for x in experts]
        stages.append(Stage("sft_merge_perf", "merge", deps, {"models": experts,
                            "weights": "performance", "metric": metric},
                            label="SFT merged (perf-weighted)"))  # fmt: skip
        add_eval("sft_merge_perf", "SFT merged (perf-weighted, ablation)")
    model = "sft_merge"
    if dpo:
        files = _files(spec, dpo, "pref")
        add_train("dpo", dpo["config"], model, files, dpo.get("overrides"), "offline DPO expert")
        stages.append(Stage("dpo_merge", "merge", ["dpo", model], {"models": ["dpo", model],
                            "weights": dpo.get("merge_weights")}, label="DPO merged"))  # fmt: skip
        add_eval("dpo_merge", "offline DPO merged")
        model = "dpo_merge"
    if onl:
        prev = model
        for r in range(1, int(onl.get("rounds", 1)) + 1):
            files = _files(spec, onl, "sft")
            # one trainer run per round (each from the previous round, its own sampling seed)
            ov = {**(onl.get("overrides") or {}), "online.rounds": 1}
            add_train(f"online_r{r}", onl["config"], prev, files, ov,
                      f"on-policy DPO round {r}", seed=seed + r - 1)  # fmt: skip
            prev = f"online_r{r}"
        stages.append(Stage("online_merge", "merge", [prev, model], {"models": [prev, model],
                            "weights": onl.get("merge_weights")}, label="on-policy merged"))  # fmt: skip
        add_eval("online_merge", "on-policy DPO merged (final)")
    return stages


def _files(spec: dict, sec: dict, kind: str) -> list[list[str]]:
    """[name, kind] pairs for a train stage: generated families (`kind` = sft or pref) and user
    dataset `files` (absolute paths; relative ones resolve against the pipeline YAML's dir)."""
    out = [[f, kind] for f in sec.get("families") or []]
    for f in sec.get("files") or []:
        p = Path(f) if Path(f).is_absolute() else Path(spec["_dir"]) / f
        out.append([str(p), "file"])
    return out


def stage_hash(stage: Stage, upstream: dict[str, str]) -> str:
    """sha256 over the stage's kind, spec and its dependencies' hashes (16 hex digits)."""
    payload = {"kind": stage.kind, "spec": stage.spec, "deps": {d: upstream[d] for d in stage.deps}}
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False, default=str))
    os.replace(tmp, path)


def model_dir(work: Path, stage: str, spec_stages: dict[str, Stage] | None = None) -> Path:
    """The HF checkpoint directory a model stage produces (an external base: its own path)."""
    st = (spec_stages or {}).get(stage)
    if st is not None and st.kind == "external":
        return Path(st.spec["path"])
    return work / stage / "hf"


def output_complete(stage: Stage, d: Path) -> bool:
    """Whether the stage's output exists (used with its record to decide a skip)."""
    if stage.kind == "external":
        return (Path(stage.spec["path"]) / "config.json").is_file()
    if stage.kind == "data":
        return all((d / f / "eval.jsonl").is_file() for f in stage.spec["families"])
    if stage.kind == "eval":
        return (d / "eval.json").is_file()
    if stage.kind == "train" and not (d / "done.json").is_file():
        return False
    return (d / "hf" / "config.json").is_file()


def is_complete(stage: Stage, d: Path, h: str) -> bool:
    """Skip rule: a record with this hash and the output present."""
    rec = read_json(d / "record.json")
    return bool(rec) and rec.get("hash") == h and output_complete(stage, d)


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
    from r7b_fast.data.synthetic import make_dataset_dir

    s = st.spec
    make_dataset_dir(d, s["families"], s["n_train"], s["n_eval"], s["seed"],
                     difficulty=s["difficulty"], system=s["system"])  # fmt: skip
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
        proc = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT, check=False)
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
    summary = merge_checkpoints([str(m) for m in models], d / "hf", weights=weights,
                                method="linear", overwrite=True, progress=False)  # fmt: skip
    out = {"models": s["models"], "weights": weights, "seconds": summary.get("seconds")}
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
    _write_json(d / "eval.json", metrics)
    return metrics


EXECUTORS = {"data": run_data, "init": run_init, "external": lambda st, d, ctx: {},
             "train": run_train, "merge": run_merge, "eval": run_eval}  # fmt: skip


# ----------------------------------------------------------------------------- the run loop


def prepare_stage_dir(d: Path, h: str, fresh: bool) -> str:
    """Gets `d` ready for a (re)run; returns "fresh", "resume" (interrupted with the same hash:
    kept, so the trainer resumes from its checkpoints) or "wiped" (other hash, or forced)."""
    started = read_json(d / "started.json")
    how = "fresh"
    if d.exists():
        if not fresh and started and started.get("hash") == h:
            how = "resume"
        else:
            shutil.rmtree(d)
            how = "wiped"
    d.mkdir(parents=True, exist_ok=True)
    (d / "record.json").unlink(missing_ok=True)
    _write_json(d / "started.json", {"hash": h, "time": time.time(), "pid": os.getpid()})
    return how


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
        _write_json(d / "record.json", rec)
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
    """Equal-weight vs performance-weighted SFT merge, side by side (empty if not run)."""
    if "sft_merge_perf" not in merges or "sft_merge" not in merges:
        return ""
    rows = []
    for name in ("sft_merge", "sft_merge_perf"):
        m = read_json(ctx.work / f"eval_{name}" / "eval.json") or {}
        w = ", ".join(f"{x:.3f}" for x in merges[name]["weights"])
        accs = {k[4:]: v for k, v in m.items() if k.startswith("acc/") and k != "acc/mean"}
        fam = ", ".join(f"{k} {v:.3f}" for k, v in sorted(accs.items()))
        rows.append(f"| {name} | {w} | {m.get('acc/mean', float('nan')):.3f} | "
                    f"{m.get('loss', float('nan')):.3f} | {fam} |")  # fmt: skip
    metric = merges["sft_merge_perf"].get("metric", "acc/mean")
    return ("## Merge ablation: equal vs performance-weighted (weights from experts' "
            f"`{metric}`)\n\n| merge | weights | acc/mean | heldout loss | per family |\n"
            "| --- | --- | --- | --- | --- |\n" + "\n".join(rows))  # fmt: skip


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
