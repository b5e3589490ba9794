"""The pipeline's preference stages: offline DPO and the on-policy DPO rounds, each either one
DPO model (the single form) or several preference experts merged (the `experts` form).

    dpo:                              # the single form (as before): one DPO run, merged with
      config: demo_dpo                # its start (the SFT generalist), weights [dpo, start]
      families: [arith_ar, ...]
      merge_weights: [0.5, 0.5]
    dpo:                              # the experts form: one DPO run per expert, all from the
      config: demo_dpo                # same start, merged equal-weight (or merge_weights, one
      experts:                        # per expert, then the start's if merge_with_start)
        - {name: math, families: [arith_ar, arith_en], overrides: {dpo.beta: 0.2}}
        - {name: skills, families: [digits_ar, count_ar, order_ar]}
      merge_with_start: false         # default: true in the single form, false with experts
      merge: {method: ties, density: 0.5}   # optional, as sft.merge (base: the start)

Stage names: the single form keeps `dpo` / `online_r<r>` and `dpo_merge` / `online_merge`, with
the same specs as before (so the same stage hashes). The experts form trains `dpo_<name>` and
merges them into `dpo_merge`; for `online_dpo` every round trains `online_r<r>_<name>` from the
previous round's merge (round 1: from the DPO generalist) and merges them into
`online_r<r>_merge` (the last round's merge is `online_merge`). `merge_with_start` adds the
experts' start to the merge (online experts: each round's start); in the single form of
`online_dpo` the start is the DPO generalist the rounds began from, as before. Experts'
`overrides` apply over the section's.
"""

from __future__ import annotations

import re

from r7b_fast.pipeline_spec import (
    EXPERT_KEYS,
    PipelineError,
    Stage,
    _check_families,
    _check_keys,
    _check_merge,
    _check_weights,
    _files,
    _merge_spec,
)

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


def merge_with_start(sec: dict) -> bool:
    """Whether the section's merge includes its start: the key, else true in the single form
    (the DPO model merged with its start, as before) and false with `experts`."""
    return bool(sec.get("merge_with_start", not sec.get("experts")))


def pref_families(sec: dict) -> list[str]:
    """Every generated family the section trains on (the section's own and its experts')."""
    fams = list(sec.get("families") or [])
    return fams + [f for e in sec.get("experts") or [] for f in e.get("families") or []]


def check_pref(key: str, sec: dict) -> None:
    """Validates a dpo / online_dpo section's experts, merge_with_start, merge_weights (one per
    merged model) and merge; errors name the key."""
    if not sec:
        return
    experts = sec.get("experts")
    if experts is not None:
        if not isinstance(experts, list) or not experts:
            raise PipelineError(f"{key}.experts: expected a non-empty list of experts, got "
                                f"{experts!r}")  # fmt: skip
        both = [k for k in ("families", "files") if sec.get(k)]
        if both:
            raise PipelineError(f"{key}.{both[0]}: with {key}.experts give each expert its own "
                                "families/files, not the section")  # fmt: skip
        seen = set()
        for i, e in enumerate(experts):
            where = f"{key}.experts[{i}]"
            _check_keys(where, e, EXPERT_KEYS)
            name = e.get("name")
            if not isinstance(name, str) or not _NAME.fullmatch(name):
                raise PipelineError(f"{where}.name: letters, digits, _ or -, got {name!r}")
            if name in seen:
                raise PipelineError(f"{where}.name: {name!r} is used twice")
            seen.add(name)
            if not (e.get("families") or e.get("files")):
                raise PipelineError(f"{where}: needs `families` and/or `files`")
            _check_families(f"{where}.families", e.get("families"))
            if not isinstance(e.get("overrides") or {}, dict):
                raise PipelineError(f"{where}.overrides: expected a mapping")
    mws = sec.get("merge_with_start", True)
    if not isinstance(mws, bool):
        raise PipelineError(f"{key}.merge_with_start: expected true or false, got {mws!r}")
    with_start = merge_with_start(sec)
    n = len(experts or [None]) + with_start
    _check_weights(f"{key}.merge_weights", sec.get("merge_weights"), n)
    _check_merge(f"{key}.merge", sec.get("merge"), n, base_listed=with_start)


def _train_experts(g, sec: dict, start: str, prefix: str, label: str, kind: str, **kw) -> list:
    """One train stage per expert from `start` (the single form: one named `prefix`); returns
    their names. kw: `extra` overrides applied last, `seed` (default: the pipeline's)."""
    extra, seed = kw.get("extra") or {}, kw.get("seed")
    experts = sec.get("experts")
    if not experts:
        ov = {**(sec.get("overrides") or {}), **extra}
        g.add_train(prefix, sec["config"], start, _files(g.spec, sec, kind), ov, label, seed=seed)
        return [prefix]
    names = []
    for e in experts:
        name = f"{prefix}_{e['name']}"
        ov = {**(sec.get("overrides") or {}), **(e.get("overrides") or {}), **extra}
        g.add_train(name, sec["config"], start, _files(g.spec, e, kind), ov,
                    f"{label} {e['name']}", seed=seed)  # fmt: skip
        names.append(name)
    return names


def _merge(g, sec: dict, models: list[str], start: str, name: str, labels: tuple) -> str:
    """The merge stage `name` of `models` (+ `start` when it is to be included) and its eval."""
    if merge_with_start(sec) and start not in models:
        models = [*models, start]
    spec = _merge_spec(models, sec.get("merge_weights"), sec.get("merge"), start)
    deps = models + ([start] if "base" in spec and start not in models else [])
    g.stages.append(Stage(name, "merge", deps, spec, label=labels[0]))
    g.add_eval(name, labels[1])
    return name


def dpo_stages(g, dpo: dict, model: str) -> str:
    """Offline DPO from `model` (one run, or one per expert), merged; returns "dpo_merge"."""
    names = _train_experts(g, dpo, model, "dpo", "offline DPO expert", "pref")
    return _merge(g, dpo, names, model, "dpo_merge", ("DPO merged", "offline DPO merged"))


def online_stages(g, onl: dict, model: str) -> str:
    """`rounds` on-policy DPO rounds from `model` (each its own sampling seed); the single form
    chains the rounds and merges the last with `model`, the experts form merges each round's
    experts and starts the next round from that merge. Returns "online_merge"."""
    rounds = int(onl.get("rounds", 1))
    prev = model
    for r in range(1, rounds + 1):
        # one trainer run per round and expert (online.rounds 1: the pipeline chains rounds)
        names = _train_experts(g, onl, prev, f"online_r{r}", f"on-policy DPO round {r}", "sft",
                               extra={"online.rounds": 1}, seed=g.seed + r - 1)  # fmt: skip
        if not onl.get("experts"):
            prev = names[0]
            continue
        last = r == rounds
        prev = _merge(g, onl, names, prev, "online_merge" if last else f"online_r{r}_merge",
                      ("on-policy merged" if last else f"on-policy round {r} merged",
                       "on-policy DPO merged (final)" if last else f"on-policy round {r} merged"))  # fmt: skip
    if onl.get("experts"):
        return prev
    return _merge(g, onl, [prev], model, "online_merge",
                  ("on-policy merged", "on-policy DPO merged (final)"))  # fmt: skip
