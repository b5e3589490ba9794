"""lm-evaluation-harness on an HF export, offline, with r7b-fast's shipped Arabic tasks.

`run_lm_eval(model_dir, tasks)` evaluates an HF checkpoint directory (a pipeline stage's `hf/`,
tokenizer included) with lm-eval's HF wrapper and returns flat metrics
`{"lm_eval/<task>/<metric>": value}` (`<metric>` is lm-eval's metric name, `:<filter>` appended
when the filter is not "none"; `<metric>_stderr` and `n`, the number of documents scored, too).
The call never touches the network: `HF_HUB_OFFLINE`, `HF_DATASETS_OFFLINE` and
`TRANSFORMERS_OFFLINE` are set (and the flags of huggingface_hub / datasets already imported
are switched) for its duration, so a task whose data is not on disk fails instead of
downloading.

Shipped tasks (`r7b_fast/lm_eval_tasks/`, lm-eval's YAML format, found by `include_path`):

| task              | kind                          | rows | score                              |
| ----------------- | ----------------------------- | ---- | ---------------------------------- |
| `r7b_arith_ar`    | generate_until (greedy, 24)   | 100  | `acc`: `r7b_fast.data.synthetic.verify` |
| `r7b_arith_ar_mc` | multiple_choice (loglikelihood) | 100 | `acc`, `acc_norm`: true answer vs 3 wrong ones |

Both come from the eval split of the generated `arith_ar` family (seed 0, difficulty 1, no system
turn: the demo's held-out prompts, never in training), plus 8 train-split rows for few-shot.
`python -m r7b_fast.lm_eval_run --build-tasks` rewrites their JSONL files (a test checks that the
committed files equal a fresh build). With `apply_chat_template=True` (the default: our models are
chat models) the prompt is the tokenizer's chat template around the user turn, the same tokens
`r7b_fast.eval.task_accuracy` generates from, so the two scores of `r7b_arith_ar` agree.

Only the shipped tasks requested: lm-eval's own ~15k task configs are not indexed (~20 s saved);
any other task name (e.g. `arabicmmlu`) indexes them, and its dataset must already be in the HF
datasets cache (offline). Needs the `eval` extra: `pip install 'r7b-fast[eval]'`.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import random
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
"""The shipped task directory (lm-eval `include_path`)."""
SHIPPED_TASKS = ("r7b_arith_ar", "r7b_arith_ar_mc")
N_TEST, N_FEWSHOT, SEED = 100, 8, 0
OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def require_lm_eval():
    """The `lm_eval` package, or an ImportError naming the extra that installs it."""
    try:
        import lm_eval
    except ImportError as e:
        raise ImportError(
            "lm-evaluation-harness is not installed: pip install 'r7b-fast[eval]'"
        ) from e
    return lm_eval


# ----------------------------------------------------------------------------- shipped data


def _mc_choices(row: dict, rng: random.Random) -> tuple[list[str], int]:
    """(4 choices: the true answer and 3 distinct wrong ones, shuffled; the true one's index)."""
    from r7b_fast.data.synthetic import wrong_answer

    wrong: list[str] = []
    while len(wrong) < 3:
        w = wrong_answer(row, rng)
        if w not in wrong:
            wrong.append(w)
    choices = [row["answer"], *wrong]
    rng.shuffle(choices)
    return choices, choices.index(row["answer"])


def build_task_rows(task: str) -> list[dict]:
    """The rows of a shipped task's JSONL, deterministic: `N_FEWSHOT` train-split rows then
    `N_TEST` eval-split rows of `arith_ar` (fields family, kind, prompt, answer, split; the MC task
    adds `choices` and `label`)."""
    from r7b_fast.data.synthetic import generate_split

    if task not in SHIPPED_TASKS:
        raise ValueError(f"task: {task!r} is not shipped; shipped: {', '.join(SHIPPED_TASKS)}")
    rows = []
    for split, n, name in (("train", N_FEWSHOT, "train"), ("eval", N_TEST, "test")):
        for r in generate_split("arith_ar", n, SEED, split):
            rows.append({k: r[k] for k in ("family", "kind", "prompt", "answer")} | {"split": name})
    if task.endswith("_mc"):
        rng = random.Random(f"r7b-fast/lm_eval/{task}/{SEED}")
        for r in rows:
            r["choices"], r["label"] = _mc_choices(r, rng)
    return rows


def task_file(task: str, tasks_dir: str | Path = TASKS_DIR) -> Path:
    return Path(tasks_dir) / f"{task}.jsonl"


def write_task_files(tasks_dir: str | Path = TASKS_DIR) -> list[Path]:
    """(Re)write every shipped task's JSONL under `tasks_dir`; returns the paths."""
    from r7b_fast.data.synthetic import write_jsonl

    return [write_jsonl(build_task_rows(t), task_file(t, tasks_dir)) for t in SHIPPED_TASKS]


# ----------------------------------------------------------------------------- offline


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """HF hub / datasets / transformers offline for the block: the environment variables, and
    the import-time flags of huggingface_hub and datasets if they are already imported (they
    read the variables once, at import); everything restored afterwards."""
    saved_env = {k: os.environ.get(k) for k in OFFLINE_ENV}
    os.environ.update({k: "1" for k in OFFLINE_ENV})
    flags = [("huggingface_hub.constants", "HF_HUB_OFFLINE"), ("datasets.config", "HF_HUB_OFFLINE"),
             ("datasets.config", "HF_DATASETS_OFFLINE")]  # fmt: skip
    saved_flags = []
    for mod, attr in flags:
        m = sys.modules.get(mod)
        if m is not None and hasattr(m, attr):
            saved_flags.append((m, attr, getattr(m, attr)))
            setattr(m, attr, True)
    try:
        yield
    finally:
        for m, attr, v in saved_flags:
            setattr(m, attr, v)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ----------------------------------------------------------------------------- running


def flatten_results(results: dict) -> dict[str, float]:
    """lm-eval's `results` -> {"lm_eval/<task>/<metric>[:<filter>]": float, ".../n": docs}."""
    out: dict[str, float] = {}
    for task, metrics in results.get("results", {}).items():
        for key, v in metrics.items():
            if "," not in key or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue  # "alias" and "N/A" stderrs
            metric, filt = key.split(",", 1)
            out[f"lm_eval/{task}/{metric}" + ("" if filt == "none" else f":{filt}")] = float(v)
        n = (results.get("n-samples") or {}).get(task, {}).get("effective")
        if n is not None:
            out[f"lm_eval/{task}/n"] = float(n)
    return out


def check_tasks(tasks: Sequence[str], include_path=TASKS_DIR) -> None:
    """Raise ImportError (naming the extra) without lm_eval, ValueError naming unknown tasks.
    Only shipped names: our directory is indexed alone (fast); others index lm-eval's own."""
    require_lm_eval()
    _task_manager(list(tasks), include_path)


def _task_manager(tasks: Sequence[str], include_path):
    """A TaskManager that knows `tasks` (else ValueError); lm-eval's own ~15k configs are indexed
    only if a task is in none of `include_path` and is not named `r7b_*`."""
    from lm_eval.tasks import TaskManager

    paths = [str(p) for p in ([include_path] if isinstance(include_path, (str, Path)) else
                              include_path or [])]  # fmt: skip
    tm = TaskManager(include_path=paths or None, include_defaults=False) if paths else None
    # lm-eval ships no `r7b_*` task: a missing one is unknown without indexing lm-eval's own
    missing = set(tasks) - set(tm.all_tasks if tm else ())
    if tm is None or (missing and not all(t.startswith("r7b_") for t in missing)):
        tm = TaskManager(include_path=paths or None)
    unknown = sorted(set(tasks) - set(tm.all_tasks))
    if unknown:
        raise ValueError(f"lm-eval: unknown tasks {unknown} (shipped: {', '.join(SHIPPED_TASKS)}; "
                         f"include_path: {paths or 'none'})")  # fmt: skip
    return tm


def run_lm_eval(
    model_dir: str | Path,
    tasks: Sequence[str] | str,
    *,
    limit: int | float | None = None,
    batch_size: int = 16,
    device: str = "cpu",
    include_path: str | Path | Sequence[str | Path] | None = TASKS_DIR,
    num_fewshot: int | None = None,
    apply_chat_template: bool = True,
    dtype: str | None = None,
    return_samples: bool = False,
) -> dict:
    """lm-eval's `simple_evaluate` on the HF checkpoint at `model_dir`, offline (see `offline`).

    `tasks`: names (a comma-separated string works too); `limit`: documents per task (lm-eval's
    meaning: < 1 is a fraction); `dtype`: default float32 on CPU, bfloat16 on CUDA. Returns the
    flat metrics (`flatten_results`); with `return_samples`, also "samples": {task: lm-eval's
    per-document records}. Raises ImportError without lm_eval, ValueError for an unknown task,
    and whatever lm-eval raises when a task's data is not available offline."""
    require_lm_eval()
    tasks = [t for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t]
    if not tasks:
        raise ValueError("lm-eval: no tasks given")
    if not (Path(model_dir) / "config.json").is_file():
        raise FileNotFoundError(f"lm-eval: {model_dir} is not an HF checkpoint (no config.json)")
    dtype = dtype or ("bfloat16" if str(device).startswith("cuda") else "float32")
    task_log = logging.getLogger("lm_eval.api.task")
    hint = _DropHint()  # lm-eval's "custom kwargs" hint, printed for every custom dataset
    task_log.addFilter(hint)
    try:
        res = _evaluate(model_dir, tasks, include_path, dtype=dtype, num_fewshot=num_fewshot,
                        batch_size=batch_size, device=device, limit=limit,
                        apply_chat_template=apply_chat_template, log_samples=return_samples)  # fmt: skip
    finally:
        task_log.removeFilter(hint)
    out: dict = flatten_results(res)
    if return_samples:
        out["samples"] = res.get("samples", {})
    return out


class _DropHint(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed" not in record.getMessage()


def _evaluate(model_dir, tasks, include_path, *, dtype, **kwargs) -> dict:
    """`simple_evaluate` offline with the shipped-or-full task index (see `run_lm_eval`)."""
    from lm_eval import simple_evaluate

    with offline():
        tm = _task_manager(tasks, include_path)
        res = simple_evaluate(
            model="hf",
            model_args={"pretrained": str(Path(model_dir).resolve()), "dtype": dtype},
            tasks=list(tasks),
            task_manager=tm,
            # means (acc) get a closed-form stderr; 1000 resamples for the others (lm-eval's
            # default of 100000 costs seconds per metric for a few-document task)
            bootstrap_iters=1000,
            **kwargs,
        )
    if res is None:  # lm-eval returns None on non-zero ranks of a distributed run
        raise RuntimeError("lm-eval returned no results (run it in a single process)")
    return res


def scores_table(metrics: dict, title: str = "model") -> str:
    """Markdown: one row per (lm-eval task, metric): value, stderr ("-" if none) and n."""
    rows = _by_task(metrics)
    lines = [f"| {title}: task | metric | value | stderr | n |", "| --- | --- | --- | --- | --- |"]
    for task, m in sorted(rows.items()):
        for metric, v in sorted(m.items()):
            if metric == "n" or "_stderr" in metric:
                continue
            err = m.get(_stderr_key(metric))
            err_s = "-" if err is None or math.isnan(err) else f"{err:.3f}"
            n = m.get("n")
            lines.append(f"| {task} | {metric} | {v:.3f} | {err_s} | "
                         f"{'-' if n is None else int(n)} |")  # fmt: skip
    return "\n".join(lines)


def _by_task(metrics: dict) -> dict[str, dict[str, float]]:
    rows: dict[str, dict[str, float]] = {}
    for k, v in metrics.items():
        if k.startswith("lm_eval/"):
            _, task, metric = k.split("/", 2)
            rows.setdefault(task, {})[metric] = v
    return rows


def lm_eval_markdown(results: Sequence[tuple[str, dict]]) -> str:
    """The pipeline report's lm-eval section: one row per stage with lm-eval scores, one column
    per (task, metric), "value ± stderr"; "" when no stage has any."""
    stages = [(s, _by_task(m)) for s, m in results]
    stages = [(s, t) for s, t in stages if t]
    if not stages:
        return ""
    cols = sorted({(task, metric) for _, t in stages for task, m in t.items() for metric in m
                   if metric != "n" and "_stderr" not in metric})  # fmt: skip
    lines = ["## lm-evaluation-harness (offline, `eval.lm_eval`)", "",
             "| stage | " + " | ".join(f"{t} {m}" for t, m in cols) + " | n |",
             "| --- " * (len(cols) + 2) + "|"]  # fmt: skip
    for stage, t in stages:
        cells = []
        for task, metric in cols:
            m = t.get(task, {})
            v, err = m.get(metric), m.get(_stderr_key(metric))
            cells.append("-" if v is None else f"{v:.3f}" + ("" if err is None or math.isnan(err)
                                                              else f" ± {err:.3f}"))  # fmt: skip
        n = sorted({int(m["n"]) for m in t.values() if "n" in m})
        lines.append(f"| {stage} | " + " | ".join(cells) + f" | {'/'.join(map(str, n))} |")
    return "\n".join(lines)


def _stderr_key(metric: str) -> str:
    """`acc` -> `acc_stderr`; `acc:strict` -> `acc_stderr:strict` (see `flatten_results`)."""
    name, _, filt = metric.partition(":")
    return f"{name}_stderr" + (f":{filt}" if filt else "")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m r7b_fast.lm_eval_run",
                                description=__doc__.split("\n")[0])  # fmt: skip
    p.add_argument("--build-tasks", action="store_true",
                   help=f"rewrite the shipped tasks' JSONL files under {TASKS_DIR}")  # fmt: skip
    a = p.parse_args(argv)
    if not a.build_tasks:
        p.error(
            "nothing to do: --build-tasks (to evaluate: python -m r7b_fast.eval MODEL --lm-eval)"
        )
    for path in write_task_files():
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
