"""The dataset quality gate's runner, and the gate as the pipeline's first training phase.

The runner (`GatePlan`, `run_plan`) serves both `python -m r7b_fast.gate` and the pipeline's
`gate` stage: per seed one short proxy SFT on the mixture, and per candidate and seed one on
mixture + candidate (in process by default: the trainer's own `run`), each evaluated on the same
held-out rows; `gate.decide_seeds` decides, `gate.refine` drives iterative arbitrage
(`arbitrage`: sample from a pool of teacher checkpoints, score, keep each prompt's best answer
if it reaches `min_score`, default 1.0). Every proxy run is cached in its directory by a key over
config, overrides, seed, base and data content, so an interrupted gate resumes where it stopped.

The pipeline's `gate:` section (validated by `check_gate`, keys `GATE_KEYS`) lists candidate
SFT sets; it compiles into one `gate` stage (`gate_stage`) after data / init / pretrain and
before the SFT experts. Decisions:

- the baseline is the SFT mixture as a whole, every expert's data (the experts are merged into
  one generalist, so a set is judged by what it does to the whole mixture's held-out metrics);
- a candidate names the `expert` whose training data its kept (or regenerated) rows join;
- candidate families are drawn by the gate with `data_seed` (default seed + 1, never `seed`,
  which draws the experts' rows), `n_train` rows each; `files` are user datasets.

The stage writes gate.json / gate.md and `gated/<expert>.jsonl` (the rows each expert gains);
an expert that some candidate joins depends on the gate and reads its gated file, whose content
identity enters the expert's stage hash (`gate_inputs`), so resume follows the gate's result.
"""

from __future__ import annotations

import math
from pathlib import Path

from r7b_fast.gate import Z_DEFAULT
from r7b_fast.gate_runner import ARB_DEFAULTS

GATE_KEYS = {"candidates", "model", "tiny_overrides", "config", "overrides", "seeds", "n_seeds",
             "z", "threshold", "tolerance", "tracked", "eval", "n_train", "data_seed",
             "arbitrage"}  # fmt: skip
CANDIDATE_KEYS = {"name", "families", "files", "target", "expert", "arbitrage"}
ARBITRAGE_KEYS = {"teachers", "reward", "num_samples", "temperature", "max_new_tokens",
                  "min_score", "max_iterations"}  # fmt: skip


# ----------------------------------------------------------------------------- validation


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def resolve_seeds(seeds, n_seeds, seed: int, err=ValueError, where: str = "") -> list[int]:
    """The training seeds: `seeds` (>= 2 distinct ints) or `n_seeds` (int >= 2, default 2):
    seed, seed + 1, ...; not both."""
    if seeds is not None and n_seeds is not None:
        raise err(f"{where}seeds / n_seeds: give one of them, not both")
    if seeds is not None:
        ok = isinstance(seeds, list) and all(_is_int(s) for s in seeds)
        if not ok or len(seeds) < 2 or len(set(seeds)) != len(seeds):
            raise err(f"{where}seeds: expected a list of >= 2 distinct ints, got {seeds!r}")
        return list(seeds)
    n = 2 if n_seeds is None else n_seeds
    if not _is_int(n) or n < 2:
        raise err(f"{where}n_seeds: expected an int >= 2 (a spread needs two seeds), got {n!r}")
    return [seed + i for i in range(n)]


def check_arbitrage(where: str, arb, err=ValueError) -> None:
    """An arbitrage mapping: `teachers` (non-empty list) and optional ARBITRAGE_KEYS."""
    if not isinstance(arb, dict):
        raise err(f"{where}: expected a mapping, got {arb!r}")
    unknown = set(arb) - ARBITRAGE_KEYS
    if unknown:
        raise err(f"{where}: unknown keys {sorted(unknown)} (known: {sorted(ARBITRAGE_KEYS)})")
    t = arb.get("teachers")
    if not isinstance(t, list) or not t or not all(isinstance(x, str) and x for x in t):
        raise err(f"{where}.teachers: expected a non-empty list of model dirs / stages, got {t!r}")
    for k in ("num_samples", "max_new_tokens", "max_iterations"):
        if k in arb and not (_is_int(arb[k]) and arb[k] >= 1):
            raise err(f"{where}.{k}: expected an int >= 1, got {arb[k]!r}")
    if "temperature" in arb and not (_is_num(arb["temperature"]) and arb["temperature"] >= 0):
        raise err(f"{where}.temperature: expected a number >= 0, got {arb['temperature']!r}")
    if arb.get("min_score") is not None and not _is_num(arb["min_score"]):
        raise err(f"{where}.min_score: expected a number or null, got {arb['min_score']!r}")


def check_gate(spec: dict) -> None:
    """Validates the pipeline's `gate:` section (absent or empty: no gate); errors name the key."""
    from r7b_fast.pipeline_spec import PipelineError, _check_families, _check_keys

    g = spec.get("gate") or {}
    if not g:
        return
    cands = g.get("candidates")
    if not isinstance(cands, list) or not cands:
        raise PipelineError("gate.candidates: need a list of at least one candidate")
    experts = {e["name"] for e in spec["sft"]["experts"]}
    names = set()
    for i, c in enumerate(cands):
        w = f"gate.candidates[{i}]"
        _check_keys(w, c, CANDIDATE_KEYS)
        name = c.get("name")
        if not isinstance(name, str) or not name.replace("_", "").replace("-", "").isalnum():
            raise PipelineError(f"{w}.name: a name of letters, digits, _ or -, got {name!r}")
        if name in names:
            raise PipelineError(f"{w}.name: {name!r} is listed twice")
        names.add(name)
        if not (c.get("families") or c.get("files")) or not isinstance(c.get("target"), str):
            raise PipelineError(f"{w}: needs `families` and/or `files`, and a `target` metric")
        _check_families(f"{w}.families", c.get("families"))
        if c.get("expert") not in experts:
            raise PipelineError(f"{w}.expert: one of the sft experts {sorted(experts)}, "
                                f"got {c.get('expert')!r}")  # fmt: skip
        if c.get("arbitrage") not in (None, False):
            check_arbitrage(f"{w}.arbitrage", {**(g.get("arbitrage") or {}), **c["arbitrage"]},
                            PipelineError)  # fmt: skip
    if g.get("arbitrage") is not None:
        check_arbitrage("gate.arbitrage", g["arbitrage"], PipelineError)
    resolve_seeds(g.get("seeds"), g.get("n_seeds"), 0, PipelineError, "gate.")
    for k in ("z", "threshold", "tolerance"):
        if k in g and not (_is_num(g[k]) and g[k] >= 0):
            raise PipelineError(f"gate.{k}: expected a finite number >= 0, got {g[k]!r}")
    for k in ("tiny_overrides", "overrides", "eval"):
        if g.get(k) is not None and not isinstance(g[k], dict):
            raise PipelineError(f"gate.{k}: expected a mapping, got {g[k]!r}")
    _check_keys("gate.eval", g.get("eval") or {}, {"families", "n_per_family"})
    _check_families("gate.eval.families", (g.get("eval") or {}).get("families"))
    tracked = g.get("tracked")
    if tracked is not None and not (
        isinstance(tracked, list) and all(isinstance(t, str) for t in tracked)
    ):
        raise PipelineError(f"gate.tracked: expected a list of metric names, got {tracked!r}")
    if "n_train" in g and not (_is_int(g["n_train"]) and g["n_train"] >= 1):
        raise PipelineError(f"gate.n_train: expected an int >= 1, got {g['n_train']!r}")
    ds = g.get("data_seed")
    if ds is not None and (not _is_int(ds) or ds == spec.get("seed", 0)):
        raise PipelineError(f"gate.data_seed: an int other than the pipeline's `seed` (which "
                            f"draws the experts' rows), got {ds!r}")  # fmt: skip


# ----------------------------------------------------------------------------- the stage graph

MODEL_KINDS = ("init", "external", "train", "merge")


def gate_stage(spec: dict, seed: int, data_families: list[str], model_stages: list[str]):
    """The `gate` Stage for `spec["gate"]` (None without one). `model_stages`: the model stages
    built so far (the proxy base and teachers may name them); `data_families`: what the data
    stage generates (the mixture's and the eval's rows come from it)."""
    from r7b_fast.data import tokenizer
    from r7b_fast.pipeline_spec import PipelineError, Stage, _config_file, _files

    g = spec.get("gate") or {}
    if not g:
        return None
    ev = g.get("eval") or {}
    eval_fams = list(ev.get("families") or [f for f in (spec["eval"].get("families") or
                                                        data_families)])  # fmt: skip
    missing = [f for f in eval_fams if f not in data_families]
    if missing:
        raise PipelineError(f"gate.eval.families: {missing} are not generated by the data stage "
                            f"(it has {data_families})")  # fmt: skip
    metrics = {"loss"} | {f"loss/{f}" for f in eval_fams}
    mixture = []
    for e in spec["sft"]["experts"]:
        mixture += [x for x in _files(spec, e, "sft") if x not in mixture]
    model = g.get("model", "tiny")
    if model != "tiny" and model not in model_stages:
        raise PipelineError(f"gate.model: 'tiny' or an earlier model stage {model_stages}, "
                            f"got {model!r}")  # fmt: skip
    deps = ["data"] + ([model] if model != "tiny" else [])
    cands = []
    for i, c in enumerate(g["candidates"]):
        if c["target"] not in metrics:
            raise PipelineError(f"gate.candidates[{i}].target: one of {sorted(metrics)} (the "
                                f"gate's held-out losses), got {c['target']!r}")  # fmt: skip
        arb = None
        if c.get("arbitrage") is not False and (g.get("arbitrage") or c.get("arbitrage")):
            arb = {**ARB_DEFAULTS, **(g.get("arbitrage") or {}), **(c.get("arbitrage") or {})}
            arb["teachers"] = [_teacher(spec, t, model_stages, i) for t in arb["teachers"]]
            deps += [t for kind, t in arb["teachers"] if kind == "stage" and t not in deps]
        cands.append({"name": c["name"], "families": list(c.get("families") or []),
                      "files": [f for f, _ in _files(spec, {"files": c.get("files")}, "sft")],
                      "target": c["target"], "expert": c["expert"], "arbitrage": arb})  # fmt: skip
    cfg = _config_file(spec, g.get("config") or spec["sft"]["config"])
    d = spec["data"]
    body = {
        "config": str(cfg), "config_text": cfg.read_text(), "model": model,
        "tiny_overrides": g.get("tiny_overrides") or {},
        "overrides": {**(spec.get("train_overrides") or {}), **(g.get("overrides") or {})},
        "seeds": resolve_seeds(g.get("seeds"), g.get("n_seeds"), seed, PipelineError, "gate."),
        "mixture": mixture, "candidates": cands,
        "eval": {"families": eval_fams, "n_per_family": ev.get("n_per_family")},
        "threshold": float(g.get("threshold", 0.0)), "tolerance": float(g.get("tolerance", 0.0)),
        "z": float(g.get("z", Z_DEFAULT)), "tracked": g.get("tracked"),
        "data": {"n_train": int(g.get("n_train", d.get("n_train", 256))),
                 "seed": int(g.get("data_seed", seed + 1)), "difficulty": int(d.get("difficulty", 1)),
                 "system": d.get("system"), "version": tokenizer.TOKENIZER_VERSION},
    }  # fmt: skip
    joined = sorted({c["expert"] for c in cands})
    return Stage("gate", "gate", deps, body, label="dataset quality gate",
                 meta={"experts": joined})  # fmt: skip


def _teacher(spec: dict, t: str, model_stages: list[str], i: int) -> list[str]:
    """["stage", name] for an earlier model stage, else ["dir", absolute path] (must hold an HF
    checkpoint now; relative paths resolve against the pipeline YAML's directory)."""
    from r7b_fast.pipeline_spec import PipelineError

    if t in model_stages:
        return ["stage", t]
    p = Path(t) if Path(t).is_absolute() else Path(spec["_dir"]) / t
    if not (p / "config.json").is_file():
        raise PipelineError(f"gate.candidates[{i}].arbitrage.teachers: {t!r} is neither an earlier "
                            f"model stage {model_stages} nor a checkpoint directory")  # fmt: skip
    return ["dir", str(p.resolve())]


def join_gate(stages: list, stage_name: str, expert: str, work_dir: str) -> None:
    """An SFT expert that some gate candidate joins also trains on the gate's kept rows: a
    `[expert, "gated"]` data entry, the gate as a dependency, and where its gated file lies
    (`meta`, not hashed: the file's content identity is, via `gate_inputs`)."""
    gate = next((s for s in stages if s.kind == "gate"), None)
    if gate is None or expert not in gate.meta["experts"]:
        return
    st = next(s for s in stages if s.name == stage_name)
    st.spec["data"].append([expert, "gated"])
    st.deps.append("gate")
    st.meta["gate_dir"] = str(Path(work_dir).resolve() / "gate")


def gated_file(gate_dir: Path, expert: str) -> Path:
    return Path(gate_dir) / "gated" / f"{expert}.jsonl"


def gated_files(work: Path, data: list) -> list[Path]:
    """The gate's kept-rows files for a train stage's `[expert, "gated"]` entries (none where the
    gate kept nothing for that expert)."""
    out = [gated_file(Path(work) / "gate", n) for n, k in data if k == "gated"]
    return [p for p in out if p.is_file()]


def gate_inputs(stage) -> dict[str, str]:
    """input_identity's gate part: a gate stage's user candidate files and teacher directories;
    a joined expert's gated file (content hash; "none" while the gate kept nothing for it)."""
    from r7b_fast.rundir import data_identity, model_identity

    out = {}
    if stage.kind == "gate":
        for c in stage.spec["candidates"]:
            for f in c["files"]:
                out[f] = data_identity([f])[0] if Path(f).exists() else "missing"
            for kind, t in (c["arbitrage"] or {}).get("teachers", []):
                if kind == "dir":
                    out[t] = model_identity(t) if (Path(t) / "config.json").is_file() else "missing"
    elif stage.kind == "train" and "gate_dir" in stage.meta:
        for name, kind in stage.spec["data"]:
            if kind == "gated":
                p = gated_file(stage.meta["gate_dir"], name)
                out[f"gate:{name}"] = data_identity([str(p)])[0] if p.is_file() else "none"
    return out


# ----------------------------------------------------------------------------- the executor


def run_gate_stage(st, d: Path, ctx) -> dict:
    """The pipeline's `gate` stage: draws each candidate's families (`data`: n_train rows per
    family with the gate's data seed, never an eval prompt), takes the first n_train rows of each
    expert dataset as the proxy's mixture (so a candidate weighs in the proxy as one family does),
    runs `gate_runner.run_plan` with the data stage's eval rows, and writes
    `gated/<expert>.jsonl`: the rows of every kept candidate (as given, or regenerated) that
    joins that expert. Restores torch's thread count (the in-process trainer sets
    run.cpu_threads)."""
    import torch

    from r7b_fast.data.synthetic import generate_split, write_jsonl
    from r7b_fast.eval import read_jsonl, subsample
    from r7b_fast.gate_runner import GatePlan, run_plan

    s, dd = st.spec, st.spec["data"]
    cands = []
    for c in s["candidates"]:
        files = [Path(f) for f in c["files"]]
        if c["families"]:
            rows = [r for f in c["families"] for r in generate_split(
                f, dd["n_train"], dd["seed"], "train", difficulty=dd["difficulty"], system=dd["system"])]  # fmt: skip
            files.insert(0, write_jsonl(rows, d / "candidates" / f"{c['name']}.jsonl"))
        arb = c["arbitrage"]
        if arb:
            arb = {
                **arb,
                "teachers": [str(ctx.model(t) if k == "stage" else t) for k, t in arb["teachers"]],
            }
        cands.append({**c, "files": files, "arbitrage": arb})
    mixture = []  # the proxy's sample of the mixture: n_train rows of each expert dataset
    for i, (f, k) in enumerate(s["mixture"]):
        sample = read_jsonl(ctx.data_file(f, k))[: dd["n_train"]]
        mixture.append(write_jsonl(sample, d / "mixture_rows" / f"{i:02d}_{Path(f).stem}.jsonl"))
    ev = s["eval"]
    rows = [r for f in ev["families"] for r in subsample(read_jsonl(ctx.data_file(f, "eval")),
                                                          ev["n_per_family"])]  # fmt: skip
    model = {"path": "tiny" if s["model"] == "tiny" else str(ctx.model(s["model"])),
             "tiny_overrides": s["tiny_overrides"] if s["model"] == "tiny" else {}}  # fmt: skip
    plan = GatePlan(work=d, config=s["config"], model=model, overrides=s["overrides"],
                    seeds=s["seeds"], mixture=mixture,
                    candidates=cands, eval_rows=rows, threshold=s["threshold"],
                    tolerance=s["tolerance"], z=s["z"], tracked=s["tracked"])  # fmt: skip
    threads = torch.get_num_threads()
    try:
        out = run_plan(plan, log=ctx.log)
    finally:
        torch.set_num_threads(threads)
    joins = _write_gated(d, cands, out["files"])
    with open(d / "gate.md", "a", encoding="utf-8") as f:
        f.write("\n" + (("Joined: " + "; ".join(f"`{e}` <- {', '.join(j['candidates'])} "
                f"({j['rows']} rows)" for e, j in joins.items())) if joins else
                "Joined: nothing (no candidate kept).") + "\n")  # fmt: skip
    return {"kept": [n for n, x in out["final"].items() if x.keep],
            "rejected": [n for n, x in out["final"].items() if not x.keep],
            "gated": joins, "seconds": round(out["seconds"], 2)}  # fmt: skip


def _write_gated(d: Path, cands: list[dict], kept: dict[str, list[Path]]) -> dict:
    """gated/<expert>.jsonl per expert that gained rows; returns {expert: {rows, candidates}}."""
    from r7b_fast.data.synthetic import write_jsonl
    from r7b_fast.eval import read_jsonl

    joins: dict[str, dict] = {}
    for c in cands:
        if kept[c["name"]]:
            j = joins.setdefault(c["expert"], {"rows": [], "candidates": []})
            j["rows"] += [r for f in kept[c["name"]] for r in read_jsonl(f)]
            j["candidates"].append(c["name"])
    for expert, j in joins.items():
        write_jsonl(j["rows"], gated_file(d, expert))
        j["rows"] = len(j["rows"])
    return joins


def gate_markdown(ctx) -> str:
    """The pipeline report's gate section (gate.md, one heading level down; empty without a
    gate stage)."""
    if "gate" not in ctx.stages:
        return ""
    p = ctx.work / "gate" / "gate.md"
    return "#" + p.read_text(encoding="utf-8") if p.is_file() else ""
