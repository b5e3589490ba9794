"""The demo over several seeds: mean and spread per stage and family, and each seed's lifts.

    python -m benchmarks.demo_seeds --seeds 0 1 2            # runs the demo once per seed
    python -m benchmarks.demo_seeds --seeds 0 1 2 --collect  # only aggregates finished work dirs

Each seed runs `python -m r7b_fast.pipeline PIPELINE --seed N --work-dir ROOT/seed_N`
sequentially (its own work dir, so seeds never share a stage; a rerun resumes / skips as the
pipeline does). Then, from every seed's report/report.json and stage records:

- per stage label and metric (acc/<family>, acc/mean, loss): mean, std (n - 1), min and max
  over the seeds;
- per stage and seed: the pooled paired lift on the stage's targeted families vs its start
  (delta, SE, z; `r7b_fast.pipeline_lift`) and every family's z;
- per seed: the pipeline's wall time, its CPU seconds (the pipeline's and its trainers': every
  process is single-threaded, so about the wall time of an idle machine), the seconds of each
  stage kind (from the records), the load average before and after, and the machine
  (`benchmarks._common.env_info`). The pipeline runs with OMP_NUM_THREADS=1 (unless set).

Writes `<out>.json` and `<out>.md` (default `benchmarks/results/cpu_demo_seeds`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def spread(xs: list[float]) -> dict:
    """mean, std (sample, n - 1; 0 for one value), min, max and n of a list of numbers."""
    from r7b_fast.gate import mean_spread

    n = len(xs)
    mean, std, _ = mean_spread(xs) if n > 1 else (xs[0], 0.0, 0.0)
    return {"mean": mean, "std": std, "min": min(xs), "max": max(xs), "n": n}


def _children_cpu() -> float:
    """User + system CPU seconds of this process's waited-for descendants so far."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_seed(pipeline: str, seed: int, work: Path, log: Path) -> dict:
    """Runs the pipeline for one seed (stdout/stderr to `log`); returns wall seconds, exit code
    and the 1-minute load average before and after."""
    cmd = [sys.executable, "-m", "r7b_fast.pipeline", pipeline, "--seed", str(seed),
           "--work-dir", str(work)]  # fmt: skip
    # one thread for the pipeline's own evals too (the trainers already run one: the demo's
    # train_overrides): on a shared 2-core machine torch's default 2 threads fight the other jobs
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    load0, t0, cpu0 = os.getloadavg()[0], time.time(), _children_cpu()
    with open(log, "ab") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env).returncode
    # CPU seconds of the pipeline and every trainer it ran (all single-threaded): about the wall
    # time on an idle machine, whatever the load while measuring
    cpu = round(_children_cpu() - cpu0, 1)
    return {"seconds": round(time.time() - t0, 1), "rc": rc, "load_before": load0,
            "load_after": os.getloadavg()[0], "omp_num_threads": env["OMP_NUM_THREADS"],
            "cpu_seconds": cpu}  # fmt: skip


def stage_seconds(work: Path) -> dict:
    """Seconds per stage (the stage records) and summed per kind."""
    per, kinds = {}, {}
    for rec_path in sorted(work.glob("*/record.json")):
        rec = json.loads(rec_path.read_text())
        per[rec["name"]] = rec["seconds"]
        kinds[rec["kind"]] = round(kinds.get(rec["kind"], 0.0) + rec["seconds"], 2)
    return {"stages": per, "kinds": kinds, "total": round(sum(per.values()), 1)}


def aggregate(seeds: dict[int, dict]) -> dict:
    """{stage label: {metric: spread}} over the seeds' reports, and the per-seed lifts."""
    metrics: dict[str, dict[str, list]] = {}
    for rep in seeds.values():
        for st in rep["stages"]:
            m = metrics.setdefault(st["stage"], {})
            for k, v in st["metrics"].items():
                if k.startswith(("acc/", "acc_lang/")) or k == "loss":
                    m.setdefault(k, []).append(v)
    table = {label: {k: spread(v) for k, v in m.items()} for label, m in metrics.items()}
    lifts: dict[str, dict] = {}
    for seed, rep in seeds.items():
        for r in rep.get("lift", []):
            row = lifts.setdefault(r["stage"], {"start": r["start"], "targeted_families":
                                                r["targeted_families"], "seeds": {}})  # fmt: skip
            row["seeds"][seed] = {"targeted": r["targeted"],
                                  "z": {f: x["z"] for f, x in r["families"].items()},
                                  "delta": {f: x["delta"] for f, x in r["families"].items()}}  # fmt: skip
    for row in lifts.values():
        deltas = [s["targeted"]["delta"] for s in row["seeds"].values() if s["targeted"]]
        row["targeted_delta"] = spread(deltas) if deltas else None
    return {"metrics": table, "lifts": lifts}


def _pm(s: dict) -> str:
    return f"{s['mean']:.3f} ± {s['std']:.3f} ({s['min']:.3f}-{s['max']:.3f})"


def markdown(result: dict) -> str:
    seeds, agg = result["seeds"], result["aggregate"]
    fams = sorted(
        {k for m in agg["metrics"].values() for k in m if k.startswith("acc/")} - {"acc/mean"}
    )
    cols = [*fams, "acc/mean", "loss"]
    env = result["env"]
    out = [f"# The demo over {len(seeds)} seeds ({', '.join(map(str, seeds))})", "",
           f"{result['machine']}; {env.get('cpu_count')} CPUs, torch {env.get('torch')}, "
           f"git {env.get('git')}, {env.get('utc')}. Pipeline `{result['pipeline']}`. "
           "Each cell: mean ± std over the seeds (min-max).", "",
           "| stage | " + " | ".join(c.replace("acc/", "") for c in cols) + " |",
           "|" + " --- |" * (len(cols) + 1)]  # fmt: skip
    for label, m in agg["metrics"].items():
        out.append(f"| {label} | " + " | ".join(_pm(m[c]) if c in m else "-" for c in cols) + " |")
    out += ["", "## Lift per stage vs its start, per seed (paired over the same held-out prompts)",
            "", "Targeted: the families the stage trains on, pooled; delta (z = delta / paired "
            "SE). |z| >= 2: beyond noise.", "",
            "| stage | vs | targeted | " + " | ".join(f"seed {s}" for s in seeds)
            + " | mean delta | per family z (seed order) |",
            "|" + " --- |" * (len(seeds) + 5)]  # fmt: skip
    for stage, row in agg["lifts"].items():
        cells = []
        for s in seeds:
            t = row["seeds"].get(s, {}).get("targeted")
            cells.append(f"{t['delta']:+.3f} ({t['z']:+.1f})" if t else "-")
        fam_z = "; ".join(f"{f} " + "/".join(f"{x['z'][f]:+.1f}" for x in row["seeds"].values()
                                             if f in x["z"])
                          for f in next(iter(row["seeds"].values()))["z"])  # fmt: skip
        td = "-" if row["targeted_delta"] is None else f"{row['targeted_delta']['mean']:+.3f}"
        fams = ", ".join(row["targeted_families"]) or "-"
        out.append(f"| {stage} | {row['start']} | {fams} | " + " | ".join(cells)
                   + f" | {td} | {fam_z} |")  # fmt: skip
    out += ["", "## Time per seed", "", "wall: the pipeline run; CPU: its and its trainers' CPU "
            "seconds (all single-threaded: about the wall time on an idle machine); train / eval / "
            "merge / other: the stage records' seconds (wall, under the load); load: 1-minute "
            "load average before -> after.", "",
            "| seed | wall s | CPU s | train s | eval s | merge s | other s | load |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for s, info in seeds.items():
        k = info["times"]["kinds"]
        other = sum(v for kind, v in k.items() if kind not in ("train", "eval", "merge"))
        out.append(f"| {s} | {info['run'].get('seconds', '-')} | "
                   f"{info['run'].get('cpu_seconds', '-')} | {k.get('train', 0):.0f} | "
                   f"{k.get('eval', 0):.0f} | {k.get('merge', 0):.0f} | {other:.0f} | "
                   f"{info['run'].get('load_before', float('nan')):.1f} -> "
                   f"{info['run'].get('load_after', float('nan')):.1f} |")  # fmt: skip
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--pipeline", default="pipeline_demo")
    p.add_argument("--work-root", default="runs/demo_seeds", help="seed N runs in ROOT/seed_N")
    p.add_argument("--out", default="benchmarks/results/cpu_demo_seeds", help="<out>.json/.md")
    p.add_argument("--collect", action="store_true", help="aggregate finished runs only")
    p.add_argument("--machine", default="this 2-core CPU, shared with other jobs",
                   help="how the machine is described in the results")  # fmt: skip
    a = p.parse_args(argv)
    from benchmarks._common import env_info

    root = Path(a.work_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    seeds = {}
    for seed in a.seeds:
        work = root / f"seed_{seed}"
        run_file = work / "seed_run.json"
        if not a.collect:
            work.mkdir(parents=True, exist_ok=True)
            run = run_seed(a.pipeline, seed, work, root / f"seed_{seed}.log")
            run_file.write_text(json.dumps(run))
            print(f"seed {seed}: rc {run['rc']}, {run['seconds']} s", flush=True)
            if run["rc"] != 0:
                print(f"seed {seed} failed: see {root / f'seed_{seed}.log'}", file=sys.stderr)
                return 1
        report = work / "report" / "report.json"
        if not report.is_file():
            print(f"seed {seed}: no {report} (run it first)", file=sys.stderr)
            return 1
        run = json.loads(run_file.read_text()) if run_file.is_file() else {}
        seeds[seed] = {"report": json.loads(report.read_text()), "run": run,
                       "times": stage_seconds(work)}  # fmt: skip
    result = {"pipeline": a.pipeline, "machine": a.machine, "env": env_info("cpu"),
              "seeds": {s: {"run": v["run"], "times": v["times"]} for s, v in seeds.items()},
              "aggregate": aggregate({s: v["report"] for s, v in seeds.items()})}  # fmt: skip
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    md = markdown(result)
    out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
