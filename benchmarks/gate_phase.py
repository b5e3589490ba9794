"""The pipeline's gate phase, timed: the `gate` stage of a pipeline YAML run alone.

    python -m benchmarks.gate_phase [PIPELINE] [--work-dir DIR]   # default: pipeline_demo

Runs the stages before the gate that are not complete yet (data / init / pretrain; evals are
skipped: the gate does not read them), then the gate stage itself from scratch, and reports
its wall time, this process's CPU time during it (the proxy trainings run in process), the
number of proxy runs and arbitrage regenerations, the load average before and after, and the
decision table. Writes `benchmarks/results/cpu_gate_phase.{json,md}`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import time
from pathlib import Path

from benchmarks._common import env_info, write_results
from r7b_fast import pipeline as pl


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gate_phase")
    p.add_argument("pipeline", nargs="?", default="pipeline_demo")
    p.add_argument("--work-dir", default=None)
    p.add_argument("--name", default="cpu_gate_phase")
    a = p.parse_args(argv)
    spec = pl.load_pipeline(a.pipeline, a.work_dir)
    stages = pl.build_stages(spec)
    work = Path(spec["work_dir"]).resolve()
    ctx = pl.Context(spec, work, {s.name: s for s in stages})
    hashes: dict[str, str] = {}
    for st in stages:
        h = hashes[st.name] = pl.stage_hash(st, hashes)
        d = work / st.name
        if st.kind == "eval" or (st.name != "gate" and pl.is_complete(st, d, h)):
            continue
        if st.name == "gate":
            shutil.rmtree(d, ignore_errors=True)  # from scratch: no cached proxy run
        pl.prepare_stage_dir(d, h, fresh=False)
        load0, t0, c0 = os.getloadavg(), time.time(), _cpu_s()
        result = pl.EXECUTORS[st.kind](st, d, ctx)
        secs, cpu = time.time() - t0, _cpu_s() - c0
        pl.write_json(d / "record.json", {"name": st.name, "kind": st.kind, "hash": h,
                                          "result": result, "seconds": round(secs, 2)})  # fmt: skip
        print(f"{st.name}: {secs:.1f} s wall, {cpu:.1f} s CPU")
        if st.name == "gate":
            return _report(a.name, d, secs, cpu, load0, os.getloadavg(), a.pipeline)
    raise SystemExit(f"{a.pipeline}: no gate stage")


def _report(name, d: Path, secs, cpu, load0, load1, pipeline) -> int:
    g = json.loads((d / "gate.json").read_text())
    decs = g["decisions"]
    runs = len(g["seeds"]) * (1 + sum(1 for x in decs if x["deltas"]))  # mixture + gated sets
    trained = len(list(d.glob("*/r*/seed*/done.json"))) + len(
        list(d.glob("mixture/seed*/done.json"))
    )
    payload = {"pipeline": pipeline, "gate_wall_s": round(secs, 2), "gate_cpu_s": round(cpu, 2),
               "proxy_runs_decided": runs, "proxy_runs_trained": trained,
               "regenerations": sum(1 for x in decs if x["round"] > 0),
               "loadavg_before": load0, "loadavg_after": load1, "seeds": g["seeds"],
               "candidates": g["candidates"], "decisions": decs,
               "machine": "this project's 2-core CPU, shared with other jobs"}  # fmt: skip
    md = (f"Gate phase of `{pipeline}`: {secs:.1f} s wall, {cpu:.1f} s CPU (in-process proxy "
          f"trainings), {trained} proxy runs trained ({runs} used by decisions), "
          f"{payload['regenerations']} arbitrage regenerations; load average {load0[0]:.1f} -> "
          f"{load1[0]:.1f} on a 2-core CPU shared with other jobs.\n\n"
          + (d / "gate.md").read_text())  # fmt: skip
    payload["env"] = env_info("cpu")
    for path in write_results(name, payload, md):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
