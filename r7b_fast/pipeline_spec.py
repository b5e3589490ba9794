"""The pipeline's spec, stage graph and on-disk records (the run loop is `r7b_fast.pipeline`).

- `load_pipeline` reads and validates a pipeline YAML (unknown keys are errors naming the key);
- `build_stages` compiles it into the linear list of `Stage`s (see `r7b_fast.pipeline`);
- `stage_hash` fingerprints a stage (its kind, spec and its dependencies' hashes);
- `prepare_stage_dir` / `is_complete` keep `started.json` and `record.json` per stage directory,
  which decide on a rerun whether a stage is skipped, resumed in place or wiped and redone.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from r7b_fast.data import tokenizer
from r7b_fast.data.synthetic import FAMILIES
from r7b_fast.pipeline_gate import GATE_KEYS, check_gate, gate_inputs, gate_stage, join_gate

EXPERT_KEYS = {"name", "families", "files", "overrides"}
PREF_KEYS = ("experts", "merge_with_start")  # preference experts: r7b_fast.pipeline_pref
PRETRAIN_KEYS = {"config", "families", "files", "overrides", "data_seed"}
TOP_KEYS = {"name", "work_dir", "nproc", "seed", "base", "data", "train_overrides", "sft", "dpo",
            "online_dpo", "eval", "gate"}  # fmt: skip
SECTION_KEYS = {
    "base": {"path", "tiny_overrides", "pretrain"},
    "data": {"n_train", "n_eval", "difficulty", "system"},
    "sft": {
        "config",
        "experts",
        "merge_weights",
        "merge",
        "ablation",
        "ablation_metric",
        "ablation_merge",
    },
    "dpo": {"config", "families", "files", "overrides", "merge_weights", "merge", *PREF_KEYS},
    "online_dpo": {"config", "families", "files", "rounds", "overrides", "merge_weights", "merge"}
    | set(PREF_KEYS),
    "eval": {"families", "n_per_family", "max_new_tokens", "max_len", "lm_eval"},
    "gate": GATE_KEYS,  # the dataset quality gate (r7b_fast.pipeline_gate)
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


def load_pipeline(path_or_name: str, work_dir: str | None = None, seed: int | None = None) -> dict:
    """The validated spec (a dict) of a pipeline YAML; `_dir` is the YAML's directory (relative
    trainer-config paths resolve against it); `work_dir` and `seed` (the tiny base's init, the
    generated data and every trainer's run.seed; not base.pretrain.data_seed) are overridable."""
    path = resolve_pipeline(path_or_name)
    spec = yaml.safe_load(path.read_text()) or {}
    _check_keys("<root>", spec, TOP_KEYS)
    if seed is not None:
        spec["seed"] = seed
    s = spec.get("seed", 0)
    if not isinstance(s, int) or isinstance(s, bool) or s < 0:
        raise PipelineError(f"seed: expected an int >= 0, got {s!r}")
    for sec, keys in SECTION_KEYS.items():
        spec[sec] = spec.get(sec) or {}  # absent or null: an empty section (no such stage)
        _check_keys(sec, spec[sec], keys)
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
        _check_families(f"sft.experts[{i}].families", e.get("families"))
    for sec in ("dpo", "online_dpo", "eval"):
        _check_families(f"{sec}.families", spec[sec].get("families"))
    _check_data(spec["data"])
    check_gate(spec)  # the `gate:` section (r7b_fast.pipeline_gate)
    _check_lm_eval(spec["eval"].get("lm_eval"))
    _check_pretrain(spec["base"].get("pretrain"), spec.get("seed", 0))
    _check_weights("sft.merge_weights", spec["sft"].get("merge_weights"), len(experts))
    _check_merge("sft.merge", spec["sft"].get("merge"), len(experts), base_listed=False)
    alt = spec["sft"].get("ablation_merge")
    if alt is not None and not (isinstance(alt, dict) and alt.get("method")):
        raise PipelineError(f"sft.ablation_merge: a merge section with a `method`, got {alt!r}")
    _check_merge("sft.ablation_merge", alt, len(experts), base_listed=False)
    from r7b_fast.pipeline_pref import check_pref

    for sec in ("dpo", "online_dpo"):
        check_pref(sec, spec[sec])  # experts, merge_with_start, merge_weights, merge
    rounds = spec["online_dpo"].get("rounds", 1)
    if spec["online_dpo"] and (not isinstance(rounds, int) or rounds < 1):
        raise PipelineError(f"online_dpo.rounds: must be an int >= 1, got {rounds!r}")
    abl = spec["sft"].get("ablation")
    if abl not in (None, "performance"):
        raise PipelineError(f"sft.ablation: must be null or 'performance', got {abl!r}")
    return spec


MERGE_PARAMS = {"density", "t", "seed", "normalize", "rescale"}


def _check_merge(key: str, m, n_models: int, base_listed: bool) -> None:
    """`<section>.merge`: null (linear) or {method: one of r7b_fast.merge_plan.METHODS, and the
    method's parameters among MERGE_PARAMS}. ties / dare_* / slerp use the model the section's
    models were trained from as the base (sft: the base model, not among the experts; dpo /
    online_dpo: the second merged model). Checked with the merge's own validation."""
    if m is None:
        return
    _check_keys(key, m, {"method", *MERGE_PARAMS})
    from r7b_fast.merge_plan import METHODS, WEIGHTED_SUMS, MergeError, method_plan

    method = m.get("method")
    if method not in METHODS:
        raise PipelineError(f"{key}.method: must be one of {list(METHODS)}, got {method!r}")
    params = {k: v for k, v in m.items() if k != "method"}
    if method in WEIGHTED_SUMS:
        if set(params) - {"normalize"}:
            raise PipelineError(f"{key}: {method} takes only `normalize`, got {sorted(params)}")
        return
    n = n_models if base_listed else n_models + 1  # participants, base included
    if isinstance(params.get("density"), list) and not base_listed:
        params["density"] = [*params["density"], 1.0]  # the base's (unused), as merge.py pads
    if method == "slerp" and n != 2:
        raise PipelineError(f"{key}: slerp merges the base with exactly one model, got {n - 1}")
    try:
        method_plan(method, n, None, n - 1, **params)
    except (MergeError, TypeError) as e:
        raise PipelineError(f"{key}: {e}") from e


def _merge_spec(models: list[str], weights, merge: dict | None, base: str) -> dict:
    """A merge stage's spec: models + weights, plus method / params / base for anything but
    linear (absent for linear, so the stage hashes of linear merges are unchanged)."""
    spec = {"models": models, "weights": weights}
    if merge and merge.get("method", "linear") != "linear":
        params = {k: v for k, v in merge.items() if k != "method"}
        spec.update(method=merge["method"], params=params, base=base)
    return spec


def _check_pretrain(pre, seed) -> None:
    """base.pretrain: config + families/files; data_seed null or an int other than `seed` (the
    pipeline's data seed, which would make the pretrain rows the experts' SFT rows)."""
    if not pre:
        return
    if not isinstance(pre, dict):
        raise PipelineError(f"base.pretrain: expected a mapping, got {type(pre).__name__}")
    _check_keys("base.pretrain", pre, PRETRAIN_KEYS)
    if not pre.get("config") or not (pre.get("families") or pre.get("files")):
        raise PipelineError("base.pretrain: needs `config` and `families` and/or `files`")
    _check_families("base.pretrain.families", pre.get("families"))
    ds = pre.get("data_seed")
    if ds is not None and (not isinstance(ds, int) or isinstance(ds, bool)):
        raise PipelineError(f"base.pretrain.data_seed: expected an int or null, got {ds!r}")
    if ds is not None and ds == seed:
        raise PipelineError(f"base.pretrain.data_seed: {ds} is the pipeline's `seed`, which "
                            "draws the SFT rows: pick another seed (or null)")  # fmt: skip


def _check_families(key: str, fams) -> None:
    """`fams` is null or a list of generated family names (`r7b_fast.data.synthetic.FAMILIES`)."""
    if fams is None:
        return
    if not isinstance(fams, list):
        raise PipelineError(f"{key}: expected a list of family names, got {fams!r}")
    bad = [f for f in fams if not isinstance(f, str) or f not in FAMILIES]
    if bad:
        raise PipelineError(f"{key}: unknown families {bad!r} (known: {', '.join(FAMILIES)})")


def _check_lm_eval(lm) -> None:
    """eval.lm_eval: null, or {tasks: non-empty list of lm-eval task names, limit: null or an int
    >= 1 (documents per task), stages: "all" (default) or a list of model stage names}. Needs
    lm_eval installed; non-shipped task names are looked up in lm-eval's index now (~20 s), so a
    typo fails before any training. Stage names are checked by `build_stages`."""
    if lm is None:
        return
    _check_keys("eval.lm_eval", lm, {"tasks", "limit", "stages"})
    tasks, limit, stages = lm.get("tasks"), lm.get("limit"), lm.get("stages", "all")
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks):
        raise PipelineError(
            f"eval.lm_eval.tasks: expected a non-empty list of names, got {tasks!r}"
        )
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise PipelineError(f"eval.lm_eval.limit: expected an int >= 1 or null, got {limit!r}")
    if stages != "all" and not (isinstance(stages, list) and stages
                                and all(isinstance(x, str) for x in stages)):  # fmt: skip
        raise PipelineError(f"eval.lm_eval.stages: expected 'all' or a list of stage names, "
                            f"got {stages!r}")  # fmt: skip
    from r7b_fast.lm_eval_run import check_tasks

    try:
        check_tasks(tasks)
    except (ImportError, ValueError) as e:
        raise PipelineError(f"eval.lm_eval: {e}") from e


def _check_lm_eval_stages(spec: dict, stages: list[Stage]) -> None:
    """Every stage named in eval.lm_eval.stages is a model stage that gets an eval stage."""
    wanted = (spec["eval"].get("lm_eval") or {}).get("stages", "all")
    evaluated = [st.spec["model"] for st in stages if st.kind == "eval"]
    unknown = [] if wanted == "all" else [x for x in wanted if x not in evaluated]
    if unknown:
        raise PipelineError(f"eval.lm_eval.stages: {unknown} are not evaluated stages "
                            f"(evaluated: {', '.join(evaluated)})")  # fmt: skip


def _check_data(data: dict) -> None:
    """data.n_train / n_eval: ints >= 1; data.difficulty: 1, 2 or 3 (bools are not ints)."""
    for k, ok, want in (("n_train", lambda v: v >= 1, "an int >= 1"),
                        ("n_eval", lambda v: v >= 1, "an int >= 1"),
                        ("difficulty", lambda v: v in (1, 2, 3), "1, 2 or 3")):  # fmt: skip
        if k not in data:
            continue
        v = data[k]
        if not isinstance(v, int) or isinstance(v, bool) or not ok(v):
            raise PipelineError(f"data.{k}: expected {want}, got {v!r}")


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


@dataclass
class _StageList:
    """The stages built so far, with the helpers that append train / eval stages."""

    spec: dict
    seed: int
    eval_spec: dict
    stages: list[Stage] = field(default_factory=list)

    def add_eval(self, model: str, label: str) -> None:
        spec = {"model": model, **self.eval_spec}
        lm = spec.pop("lm_eval", None)  # only the selected stages carry (and hash) eval.lm_eval
        if lm and (lm["stages"] == "all" or model in lm["stages"]):
            spec["lm_eval"] = {"tasks": lm["tasks"], "limit": lm["limit"]}
        self.stages.append(Stage(f"eval_{model}", "eval", ["data", model], spec, label=label))

    def add_train(self, name, cfg, model, files, overrides, label, seed=None) -> None:
        seed = self.seed if seed is None else seed
        ov = {**(self.spec.get("train_overrides") or {}), **(overrides or {}), "run.seed": seed}
        path = _config_file(self.spec, cfg)
        self.stages.append(Stage(name, "train", ["data", model], {
            "config": str(path), "config_text": path.read_text(), "model": model,
            "data": files, "overrides": ov, "nproc": self.spec["nproc"]}, label=label))  # fmt: skip
        self.add_eval(name, label)


def build_stages(spec: dict) -> list[Stage]:
    """The recipe as a list of stages in execution order (each depends only on earlier ones)."""
    seed = int(spec.get("seed", 0))
    data, eval_spec = _data_stage(spec, seed)
    g = _StageList(spec, seed, eval_spec, [data])
    model = _base_stages(g, spec["base"])
    _gate_stages(g)
    model = _sft_stages(g, spec["sft"], model)
    if spec["dpo"]:
        model = _dpo_stages(g, spec["dpo"], model)
    if spec["online_dpo"]:
        _online_stages(g, spec["online_dpo"], model)
    _check_lm_eval_stages(spec, g.stages)
    return g.stages


def _data_stage(spec: dict, seed: int) -> tuple[Stage, dict]:
    """The data stage (every family any stage trains or evaluates on) and the eval stages' spec."""
    sft, dpo, onl, ev = spec["sft"], spec["dpo"], spec["online_dpo"], spec["eval"]
    used = [f for e in sft["experts"] for f in e.get("families") or []]
    from r7b_fast.pipeline_pref import pref_families

    used += pref_families(dpo) + pref_families(onl)  # with the preference experts' families
    eval_fams = list(ev.get("families") or dict.fromkeys(used))
    pre = spec["base"].get("pretrain") or {}
    # without data_seed the pretrain stage reads the families' sft.jsonl: generate them too
    pre_sft = set(pre.get("families") or []) if pre.get("data_seed") is None else set()
    d = spec["data"]
    data_spec = {
        "families": sorted(set(used) | set(eval_fams) | pre_sft),
        "n_train": int(d.get("n_train", 256)),
        "n_eval": int(d.get("n_eval", 32)),
        "seed": seed,
        "difficulty": int(d.get("difficulty", 1)),
        "system": d.get("system"),
        "version": tokenizer.TOKENIZER_VERSION,  # bumped when the generator/corpus changes
    }
    if pre.get("data_seed") is not None:  # the base's own sample (the key is absent otherwise,
        # so specs without it hash as before)
        data_spec["pretrain"] = {"families": sorted(set(pre.get("families") or [])),
                                 "seed": int(pre["data_seed"])}  # fmt: skip
    eval_spec = {
        "families": eval_fams,
        "n_per_family": ev.get("n_per_family"),
        "max_new_tokens": int(ev.get("max_new_tokens", 24)),
        "max_len": int(ev.get("max_len", 512)),
    }
    if ev.get("lm_eval"):  # absent otherwise, so specs without it hash as before
        lm = ev["lm_eval"]
        eval_spec["lm_eval"] = {"tasks": list(lm["tasks"]), "limit": lm.get("limit"),
                                "stages": lm.get("stages", "all")}  # fmt: skip
    return Stage("data", "data", [], data_spec), eval_spec


def _base_stages(g: _StageList, base: dict) -> str:
    """init (a seeded tiny model, or an external checkpoint), the optional warm-up `pretrain`,
    and their evals; returns the name of the stage the experts start from."""
    if base.get("path", "tiny") == "tiny":
        init = {"tiny_overrides": base.get("tiny_overrides") or {}, "seed": g.seed,
                "version": tokenizer.TOKENIZER_VERSION}  # the embedded tokenizer  # fmt: skip
        g.stages.append(Stage("init", "init", [], init, label="base"))
    else:
        init = {"path": str(Path(base["path"]).resolve())}
        g.stages.append(Stage("init", "external", [], init, label="base"))
    model = "init"
    pre = base.get("pretrain")
    if pre and base.get("path", "tiny") == "tiny":
        g.add_eval("init", "random init")
    if pre:
        files = _files(g.spec, pre, "pretrain" if pre.get("data_seed") is not None else "sft")
        g.add_train("pretrain", pre["config"], model, files, pre.get("overrides"), "base")
        model = "pretrain"
    else:
        g.add_eval(model, "base")
    return model


def _gate_stages(g: _StageList) -> None:
    """The dataset quality gate (`gate:`; r7b_fast.pipeline_gate) after the base stages, before
    the SFT experts; its proxy base and arbitrage teachers may be earlier model stages."""
    models = [s.name for s in g.stages if s.kind in ("init", "external", "train", "merge")]
    st = gate_stage(g.spec, g.seed, g.stages[0].spec["families"], models)
    if st is not None:
        g.stages.append(st)


def _sft_stages(g: _StageList, sft: dict, model: str) -> str:
    """One SFT expert per `sft.experts` entry from `model`, their merge (and the performance-
    weighted ablation merge); returns "sft_merge"."""
    experts = []
    for e in sft["experts"]:
        name = f"sft_{e['name']}"
        files = _files(g.spec, e, "sft")
        g.add_train(
            name, sft["config"], model, files, e.get("overrides"), f"SFT expert {e['name']}"
        )
        join_gate(g.stages, name, e["name"], g.spec["work_dir"])  # + the gate's kept rows
        experts.append(name)
    spec = _merge_spec(experts, sft.get("merge_weights"), sft.get("merge"), model)
    deps = experts + ([model] if "base" in spec else [])
    g.stages.append(Stage("sft_merge", "merge", deps, spec, label="SFT merged"))
    g.add_eval("sft_merge", "SFT merged")
    if sft.get("ablation") == "performance":
        metric = sft.get("ablation_metric", "acc/mean")
        perf = {**_merge_spec(experts, "performance", sft.get("merge"), model), "metric": metric}
        deps = experts + [f"eval_{x}" for x in experts] + ([model] if "base" in perf else [])
        g.stages.append(Stage("sft_merge_perf", "merge", deps, perf,
                              label="SFT merged (perf-weighted)"))  # fmt: skip
        g.add_eval("sft_merge_perf", "SFT merged (perf-weighted, ablation)")
    alt = sft.get("ablation_merge")
    if alt:  # the experts merged by another method (e.g. ties), evaluated beside the main merge
        spec = _merge_spec(experts, sft.get("merge_weights"), alt, model)
        deps = experts + ([model] if "base" in spec else [])
        g.stages.append(Stage("sft_merge_alt", "merge", deps, spec,
                              label=f"SFT merged ({alt['method']})"))  # fmt: skip
        g.add_eval("sft_merge_alt", f"SFT merged ({alt['method']}, ablation)")
    return "sft_merge"


def _dpo_stages(g: _StageList, dpo: dict, model: str) -> str:
    """Offline DPO from `model` (one run or preference experts), merged; returns "dpo_merge"
    (r7b_fast.pipeline_pref)."""
    from r7b_fast.pipeline_pref import dpo_stages

    return dpo_stages(g, dpo, model)


def _online_stages(g: _StageList, onl: dict, model: str) -> None:
    """`rounds` on-policy DPO rounds from `model` (one run or preference experts per round),
    merged into "online_merge" (r7b_fast.pipeline_pref)."""
    from r7b_fast.pipeline_pref import online_stages

    online_stages(g, onl, model)


def _files(spec: dict, sec: dict, kind: str) -> list[list[str]]:
    """[name, kind] pairs for a train stage: generated families (`kind` = sft or pref) and user
    dataset `files` (absolute paths; relative ones resolve against the pipeline YAML's dir)."""
    out = [[f, kind] for f in sec.get("families") or []]
    for f in sec.get("files") or []:
        p = Path(f) if Path(f).is_absolute() else Path(spec["_dir"]) / f
        out.append([str(p), "file"])
    return out


def stage_hash(stage: Stage, upstream: dict[str, str]) -> str:
    """sha256 over the stage's kind, spec, its dependencies' hashes and the identity of its
    outside inputs (user data files, an external base; absent otherwise, so stages without
    them hash as before) (16 hex digits)."""
    payload = {"kind": stage.kind, "spec": stage.spec, "deps": {d: upstream[d] for d in stage.deps}}
    inputs = input_identity(stage)
    if inputs:
        payload["inputs"] = inputs
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def input_identity(stage: Stage) -> dict[str, str]:
    """path -> identity of the files a stage reads from outside the work dir (rundir's: a
    content hash for small files, else size + mtime; a base's config and weight files)."""
    from r7b_fast.rundir import data_identity, model_identity

    out = {}
    if stage.kind == "external":
        path = stage.spec["path"]
        out[path] = model_identity(path) if (Path(path) / "config.json").is_file() else "missing"
    for name, kind in stage.spec.get("data", []) if stage.kind == "train" else []:
        if kind == "file":
            out[name] = data_identity([name])[0] if Path(name).exists() else "missing"
    out.update(gate_inputs(stage))  # the gate's user files and teachers; a joined expert's rows
    return out


# ----------------------------------------------------------------------------- the records


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_json(path: Path, obj: dict) -> None:
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
        pre = stage.spec.get("pretrain") or {"families": []}
        return all((d / f / "eval.jsonl").is_file() for f in stage.spec["families"]) and all(
            (d / f / "pretrain.jsonl").is_file() for f in pre["families"]
        )
    if stage.kind == "eval":
        return (d / "eval.json").is_file()
    if stage.kind == "gate":
        return (d / "gate.json").is_file()
    if stage.kind == "train" and not (d / "done.json").is_file():
        return False
    return (d / "hf" / "config.json").is_file()


def is_complete(stage: Stage, d: Path, h: str) -> bool:
    """Skip rule: a record with this hash and the output present."""
    rec = read_json(d / "record.json")
    return bool(rec) and rec.get("hash") == h and output_complete(stage, d)


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
    write_json(d / "started.json", {"hash": h, "time": time.time(), "pid": os.getpid()})
    return how
