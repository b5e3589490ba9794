"""Evaluation: held-out loss, task accuracy per family and per language, reports and plots.

- `heldout_loss`: mean negative log-likelihood per assistant token of the held-out conversations
  (computed with `r7b_fast.losses.token_logps`, the training loss's own code path), overall and
  per task family.
- `task_accuracy`: greedy generation (`r7b_fast.generate.generate`, temperature 0) on each
  held-out prompt, scored by the task's verifier (`r7b_fast.data.synthetic.verify`, in [0, 1]);
  means per family, per language (the Arabic families vs the English twin) and overall.
- `evaluate_model` / `evaluate_checkpoint`: both of the above on one model -> a flat metrics dict
  (`acc/<family>`, `acc_lang/<lang>`, `acc/mean`, `loss`, `loss/<family>`).
- Reports: `accuracy_table` (markdown, stages x families), `write_report` (report.json,
  report.md, accuracy.png, loss_curves.png; matplotlib with the Agg backend, no display needed).

`python -m r7b_fast.eval MODEL_DIR EVAL.jsonl [--n-per-family N]` prints one model's metrics;
`--lm-eval TASKS [--limit N]` adds lm-evaluation-harness scores (`r7b_fast.lm_eval_run`; then
EVAL.jsonl is optional).
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

IGNORE = -100


def language_of(row: Mapping) -> str:
    """A row's language: its `lang` field, else the data package's family table, else the family
    name's suffix (`*_en` -> "en", otherwise "ar")."""
    if row.get("lang"):
        return str(row["lang"])
    family = str(row.get("family", ""))
    try:
        from r7b_fast.data.synthetic import LANGUAGE

        if family in LANGUAGE:
            return LANGUAGE[family]
    except ImportError:  # pragma: no cover - the data package is part of the project
        pass
    return "en" if family.endswith("_en") else "ar"


def read_jsonl(path: str | Path) -> list[dict]:
    """Rows of a JSONL file (blank lines skipped)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def subsample(rows: Sequence[dict], n_per_family: int | None) -> list[dict]:
    """The first `n_per_family` rows of each family, in file order (None: all rows)."""
    if n_per_family is None:
        return list(rows)
    if n_per_family < 1:
        raise ValueError(f"n_per_family must be >= 1 or None, got {n_per_family}")
    seen: dict[str, int] = defaultdict(int)
    out = []
    for r in rows:
        fam = r.get("family", "?")
        if seen[fam] < n_per_family:
            seen[fam] += 1
            out.append(r)
    return out


def _prompt_messages(row: Mapping) -> list[dict]:
    msgs = list(row["messages"])
    if not msgs or msgs[-1]["role"] != "assistant":
        raise ValueError("eval rows need `messages` ending with the reference assistant turn")
    return msgs[:-1]


def _shifted_targets(ids: list[int], mask: list[int]) -> list[int]:
    """targets[t] = ids[t+1] where token t+1 is an assistant token, else IGNORE."""
    return [ids[t + 1] if mask[t + 1] else IGNORE for t in range(len(ids) - 1)] + [IGNORE]


def heldout_loss(
    model, tokenizer, rows: Sequence[dict], *, max_len: int = 512, batch_size: int = 16
) -> dict[str, float]:
    """Mean NLL (nats) per assistant target token over `rows` -> {"loss", "loss/<family>"}.

    Each row's `messages` is rendered with `r7b_fast.data.chat.render_sft`; rows are right-padded
    into batches (padding gets target IGNORE, and causal attention keeps it from affecting real
    tokens). The model is put in eval mode and restored."""
    import torch

    from r7b_fast.data.chat import render_sft
    from r7b_fast.losses import token_logps

    if not rows:
        raise ValueError("heldout_loss: rows is empty")
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    rendered = []
    for r in rows:
        ids, mask = render_sft(tokenizer, r["messages"], max_len)
        rendered.append((r.get("family", "?"), list(ids), _shifted_targets(list(ids), list(mask))))
    was_training = model.training
    model.eval()
    try:
        for b in range(0, len(rendered), batch_size):
            chunk = rendered[b : b + batch_size]
            T = max(len(ids) for _, ids, _ in chunk)
            inp = torch.zeros(len(chunk), T, dtype=torch.long)
            tgt = torch.full((len(chunk), T), IGNORE, dtype=torch.long)
            for i, (_, ids, t) in enumerate(chunk):
                inp[i, : len(ids)] = torch.tensor(ids)
                tgt[i, : len(t)] = torch.tensor(t)
            pos = torch.arange(T).expand(len(chunk), T).contiguous()
            dev = next(model.parameters()).device
            # CPU: the torch twin (the Triton interpreter would be needlessly slow here)
            backend = "auto" if dev.type == "cuda" else "torch"
            with torch.no_grad():
                lp = token_logps(model, inp.to(dev), pos.to(dev), tgt.to(dev), backend=backend)
            lp = lp.float().cpu()
            for i, (fam, _, _) in enumerate(chunk):
                valid = tgt[i] != IGNORE
                sums[fam] -= float(lp[i][valid].sum())
                counts[fam] += int(valid.sum())
    finally:
        model.train(was_training)
    total = sum(counts.values())
    if total == 0:
        raise ValueError("heldout_loss: no assistant target tokens in rows")
    out = {"loss": sum(sums.values()) / total}
    out.update({f"loss/{f}": sums[f] / counts[f] for f in sorted(counts) if counts[f]})
    return out


def task_accuracy(
    model,
    tokenizer,
    rows: Sequence[dict],
    *,
    max_new_tokens: int = 24,
    batch_size: int = 64,
    return_samples: bool = False,
) -> dict:
    """Greedy-decode every row's prompt and score it with the verifier.

    Returns {"acc/<family>", "acc_lang/<lang>", "acc/mean" (unweighted mean over families)}; with
    `return_samples`, also "samples": [{"family", "prompt", "answer", "output", "score"}]."""
    from r7b_fast.data.chat import render_prompt
    from r7b_fast.data.synthetic import verify
    from r7b_fast.generate import decode_completion, generate

    if not rows:
        raise ValueError("task_accuracy: rows is empty")
    prompts = [list(render_prompt(tokenizer, _prompt_messages(r))) for r in rows]
    outs = generate(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        num_samples=1,
        temperature=0.0,
        seed=0,
        batch_size=batch_size,
    )
    by_fam: dict[str, list[float]] = defaultdict(list)
    by_lang: dict[str, list[float]] = defaultdict(list)
    samples = []
    for r, comp in zip(rows, outs):
        text = decode_completion(tokenizer, comp[0])
        score = float(verify(r, text))
        by_fam[r.get("family", "?")].append(score)
        by_lang[language_of(r)].append(score)
        if return_samples:
            samples.append(
                {
                    "family": r.get("family"),
                    "prompt": r.get("prompt"),
                    "answer": r.get("answer"),
                    "output": text,
                    "score": score,
                }
            )
    out: dict = {f"acc/{f}": sum(v) / len(v) for f, v in sorted(by_fam.items())}
    out.update({f"acc_lang/{lang}": sum(v) / len(v) for lang, v in sorted(by_lang.items())})
    out["acc/mean"] = sum(sum(v) / len(v) for v in by_fam.values()) / len(by_fam)
    if return_samples:
        out["samples"] = samples
    return out


def evaluate_model(
    model,
    tokenizer,
    rows: Sequence[dict],
    *,
    max_new_tokens: int = 24,
    accuracy: bool = True,
    loss: bool = True,
    max_len: int = 512,
    return_samples: bool = False,
) -> dict:
    """`heldout_loss` and/or `task_accuracy` on `rows`, merged into one metrics dict."""
    out: dict = {}
    if loss:
        out.update(heldout_loss(model, tokenizer, rows, max_len=max_len))
    if accuracy:
        out.update(
            task_accuracy(
                model, tokenizer, rows, max_new_tokens=max_new_tokens, return_samples=return_samples
            )
        )
    return out


def load_for_eval(model_dir: str | Path):
    """(model, tokenizer) from an HF checkpoint directory (fp32, CPU or the current CUDA device;
    the tokenizer from the same directory, else the embedded one)."""
    import torch
    from transformers import AutoModelForCausalLM

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(dev)
    if (Path(model_dir) / "tokenizer.json").exists():
        from transformers import PreTrainedTokenizerFast

        tok = PreTrainedTokenizerFast.from_pretrained(str(model_dir))
    else:
        from r7b_fast.data.tokenizer import load_tokenizer

        tok = load_tokenizer()
    return model, tok


def evaluate_checkpoint(model_dir: str | Path, rows: Sequence[dict], **kwargs) -> dict:
    """`evaluate_model` on the HF checkpoint at `model_dir` (see `load_for_eval`)."""
    model, tok = load_for_eval(model_dir)
    return evaluate_model(model, tok, rows, **kwargs)


# ----------------------------------------------------------------------------- reports


def families_in(results: Sequence[tuple[str, Mapping]]) -> list[str]:
    """Families with an `acc/<family>` entry in any stage's metrics (sorted, `mean` last)."""
    fams = {k.split("/", 1)[1] for _, m in results for k in m if k.startswith("acc/")}
    return sorted(fams - {"mean"}) + (["mean"] if "mean" in fams else [])


def _fmt(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def accuracy_table(results: Sequence[tuple[str, Mapping]], *, loss: bool = True) -> str:
    """Markdown table: one row per (stage, metrics), one column per family accuracy (+ mean and
    per-language means, and the held-out loss when `loss`)."""
    fams = families_in(results)
    langs = sorted({k.split("/", 1)[1] for _, m in results for k in m if k.startswith("acc_lang/")})
    cols = [f"acc/{f}" for f in fams] + [f"acc_lang/{lang}" for lang in langs]
    heads = fams + [f"lang:{lang}" for lang in langs]
    if loss:
        cols.append("loss")
        heads.append("heldout loss")
    lines = ["| stage | " + " | ".join(heads) + " |", "| --- " * (len(heads) + 1) + "|"]
    for stage, m in results:
        lines.append(f"| {stage} | " + " | ".join(_fmt(m.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def _matplotlib():
    """matplotlib with the Agg backend; it is the `train` extra, not a core dependency."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("plots need matplotlib: pip install 'r7b-fast[train]'") from e
    matplotlib.use("Agg")
    return matplotlib


def plot_accuracy(results: Sequence[tuple[str, Mapping]], path: str | Path) -> Path:
    """Line plot of accuracy (y) by stage (x), one line per family (mean dashed) -> PNG."""
    _matplotlib()
    import matplotlib.pyplot as plt

    fams = families_in(results)
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(results)), 4))
    x = list(range(len(results)))
    for f in fams:
        y = [m.get(f"acc/{f}", float("nan")) for _, m in results]
        ax.plot(x, y, marker="o", label=f, linestyle="--" if f == "mean" else "-")
    ax.set_xticks(x, [s for s, _ in results], rotation=30, ha="right")
    ax.set_ylabel("greedy accuracy (verifier)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("Task accuracy by stage and family")
    return _save_figure(fig, ax, path)


def _save_figure(fig, ax, path: str | Path) -> Path:
    """Grid, legend, tight layout, PNG at `path`; closes the figure."""
    import matplotlib.pyplot as plt

    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def read_metrics(path: str | Path, key: str = "loss") -> tuple[list[float], list[float]]:
    """(steps, values) of `key` from a trainer metrics.jsonl (rows without it are skipped; the
    x value is the row's `step`, else its index)."""
    xs, ys = [], []
    for i, row in enumerate(read_jsonl(path)):
        if key in row and row[key] is not None:
            xs.append(float(row.get("step", i)))
            ys.append(float(row[key]))
    return xs, ys


def plot_loss_curves(metrics_files: Mapping[str, str | Path], path: str | Path) -> Path | None:
    """Training loss against step for each stage's metrics.jsonl -> PNG (None if none has any)."""
    _matplotlib()
    import matplotlib.pyplot as plt

    curves = {}
    for stage, f in metrics_files.items():
        if Path(f).exists():
            xs, ys = read_metrics(f)
            if xs:
                curves[stage] = (xs, ys)
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for stage, (xs, ys) in curves.items():
        ax.plot(xs, ys, label=stage)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("Loss curves (SFT: NLL per token; DPO: preference loss)")
    return _save_figure(fig, ax, path)


def write_report(
    results: Sequence[tuple[str, Mapping]],
    out_dir: str | Path,
    *,
    metrics_files: Mapping[str, str | Path] | None = None,
    extra: Mapping | None = None,
    extra_md: str = "",
) -> dict[str, str]:
    """Writes report.json ({"stages": [{"stage", "metrics"}], **extra}), report.md (the accuracy
    table, then `extra_md`), accuracy.png and loss_curves.png under `out_dir`; returns their
    paths by name ("json", "md", "accuracy_png", "loss_png" when curves exist)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clean = [(s, {k: v for k, v in m.items() if k != "samples"}) for s, m in results]
    payload = {"stages": [{"stage": s, "metrics": m} for s, m in clean], **dict(extra or {})}
    (out / "report.json").write_text(json.dumps(payload, indent=2, ensure_ascii=False))
    paths = {"json": str(out / "report.json")}
    paths["accuracy_png"] = str(plot_accuracy(clean, out / "accuracy.png"))
    if metrics_files:
        lp = plot_loss_curves(metrics_files, out / "loss_curves.png")
        if lp is not None:
            paths["loss_png"] = str(lp)
    md = "# Evaluation report\n\n" + accuracy_table(clean) + "\n"
    if extra_md:
        md += "\n" + extra_md.strip() + "\n"
    (out / "report.md").write_text(md, encoding="utf-8")
    paths["md"] = str(out / "report.md")
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m r7b_fast.eval", description=__doc__.split("\n")[0])
    p.add_argument("model_dir")
    p.add_argument("eval_jsonl", nargs="?", help="held-out rows (optional with --lm-eval)")
    p.add_argument("--n-per-family", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--lm-eval", metavar="TASKS", default=None,
                   help="also run lm-evaluation-harness tasks (comma-separated; shipped: "
                   "r7b_arith_ar, r7b_arith_ar_mc; offline; needs r7b-fast[eval])")  # fmt: skip
    p.add_argument("--limit", type=int, default=None, help="lm-eval: documents per task")
    p.add_argument("--include-path", action="append", default=None,
                   help="lm-eval: more task directories (the shipped one is always included)")  # fmt: skip
    a = p.parse_args(argv)
    if a.eval_jsonl is None and a.lm_eval is None:
        p.error("give EVAL_JSONL, --lm-eval TASKS, or both")
    name = Path(a.model_dir).name
    if a.eval_jsonl is not None:
        rows = subsample(read_jsonl(a.eval_jsonl), a.n_per_family)
        m = evaluate_checkpoint(a.model_dir, rows, max_new_tokens=a.max_new_tokens)
        print(accuracy_table([(name, m)]))
    if a.lm_eval is not None:
        import torch

        from r7b_fast.lm_eval_run import TASKS_DIR, run_lm_eval, scores_table

        scores = run_lm_eval(a.model_dir, a.lm_eval, limit=a.limit,
                             include_path=[TASKS_DIR, *(a.include_path or [])],
                             device="cuda" if torch.cuda.is_available() else "cpu")  # fmt: skip
        print(("\n" if a.eval_jsonl else "") + scores_table(scores, title=name))


if __name__ == "__main__":
    main()
