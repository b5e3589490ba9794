"""Compile a Triton kernel ahead of time for Hopper (sm_90) on a machine without a GPU and report
what the GPU would run: registers, spills (local memory), shared memory, and whether the PTX
uses `wgmma` (the Hopper tensor-core path). CI runs this on every kernel with the configs the GPU
uses, so compile errors, spills, shared-memory overflow and a lost tensor-core path show up before
any GPU time is spent.

    report = compile_for_hopper(kernel, signature={"x": "*bf16", "n": "i32", "BLOCK": "constexpr"},
                                constexprs={"BLOCK": 128}, num_warps=8, num_stages=3)
    assert report.spills == 0 and report.shared_bytes <= HOPPER_SMEM_LIMIT and report.wgmma

Under the Triton interpreter (TRITON_INTERPRET=1, how tests run kernels on the CPU) `@triton.jit`
builds interpreter objects that cannot be compiled, so `compile_in_subprocess` compiles a list of
`AotSpec`s in a fresh Python with the interpreter off; it is what tests and CI call:

    python -m r7b_fast.kernels.aot            # every kernel, local Triton + the GPU image's
    python -m r7b_fast.kernels.aot --triton 3.6.0   # only the GPU image's Triton

What the GPU builds depends on the Triton version (3.6 in the GPU image; the venv may hold a newer
one): `compile_in_subprocess(..., triton_version="3.6.0")` installs that version once into
`~/.cache/r7b-fast/triton-<version>` (`pip install --no-deps --target`, network to PyPI) and puts
it first on the subprocess's sys.path; every report names the Triton that produced it. A spec
lists the JIT's specialisation at the real shape (`divisible`) and one spec per autotune candidate
(each module's AOT_SPECS), and `pipelined=True` for kernels whose main loop must be software
pipelined: `problems()` then flags PTX without `cp.async` (the async copies the pipeliner emits;
`cp.async.bulk` is TMA), as it flags spills, stack frames and shared memory over 227 KB.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field

HOPPER_SMEM_LIMIT = 227 * 1024  # bytes of shared memory one block may use on sm_90
GPU_TRITON_VERSION = "3.6.0"  # the GPU image's Triton (see benchmarks/make_wheels.sh)
SIDE_TRITON_ROOT = os.path.join(os.path.expanduser("~"), ".cache", "r7b-fast")


@dataclass
class KernelReport:
    name: str
    registers: int
    spills: int  # bytes of local memory per thread (register spills); 0 is what we want
    stack: int
    shared_bytes: int
    wgmma: bool
    ptx: str
    cp_async: bool = False  # async global->shared copies (cp.async, or cp.async.bulk = TMA)
    tma: bool = False  # cp.async.bulk (Hopper's tensor memory accelerator)
    pipelined: bool = False  # the spec expects a software-pipelined main loop
    triton_version: str = ""

    def problems(self) -> list[str]:
        out = []
        if self.spills:
            out.append(f"{self.name}: {self.spills} bytes of local memory (register spills)")
        if self.stack:  # a stack frame lives in local memory: as slow as a spill
            out.append(f"{self.name}: {self.stack} bytes of stack frame")
        if self.shared_bytes > HOPPER_SMEM_LIMIT:
            out.append(f"{self.name}: {self.shared_bytes} B shared memory > {HOPPER_SMEM_LIMIT}")
        if self.pipelined and not self.cp_async:
            out.append(
                f"{self.name}: no cp.async in the PTX: the main loop is not pipelined (pointers "
                "and strides not known divisible by 16? see AotSpec.divisible)"
            )
        return out


def _cuobjdump() -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(path):
        raise FileNotFoundError(f"Triton's bundled cuobjdump not found at {path}")
    return path


def compile_for_hopper(
    fn,
    signature: dict[str, str],
    constexprs: dict[str, object] | None = None,
    *,
    num_warps: int = 4,
    num_stages: int = 3,
    divisible: tuple[str, ...] | list[str] = (),
    pipelined: bool = False,
) -> KernelReport:
    """Compile `fn` (a `@triton.jit` function) for sm_90 and read its resource usage.

    `signature` maps every argument name to a Triton type ('*bf16', '*fp32', 'i32', 'fp32',
    'constexpr'); `constexprs` gives the constexpr values. `divisible` names the arguments the
    JIT would specialise as multiples of 16 at the real shape (16-byte-aligned pointers, sizes
    and strides divisible by 16): without it loads cannot vectorise and Triton does not pipeline
    them (num_stages has no effect), so the report would not be what the GPU runs. `pipelined`
    says the main loop must be pipelined (`problems()` flags PTX without cp.async)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    constexprs = dict(constexprs or {})
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in divisible}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(
        src,
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": num_warps, "num_stages": num_stages},
    )
    ptx = compiled.asm["ptx"]
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run(
            [_cuobjdump(), "--dump-resource-usage", f.name],
            capture_output=True,
            text=True,
            check=True,
        ).stdout

    def read(key: str) -> int:
        m = re.search(rf"\b{key}:(\d+)", usage)
        if m is None:
            raise RuntimeError(f"cuobjdump output has no {key}: {usage!r}")
        return int(m.group(1))

    return KernelReport(
        name=getattr(fn, "__name__", str(fn)),
        registers=read("REG"),
        spills=read("LOCAL"),
        stack=read("STACK"),
        shared_bytes=int(compiled.metadata.shared),
        wgmma="wgmma" in ptx,
        ptx=ptx,
        cp_async="cp.async" in ptx,
        tma="cp.async.bulk" in ptx,
        pipelined=pipelined,
        triton_version=triton.__version__,
    )


@dataclass
class AotSpec:
    """One kernel configuration to compile: `module:kernel` names the `@triton.jit` function."""

    target: str
    signature: dict[str, str]
    constexprs: dict[str, object] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3
    label: str = ""
    divisible: list[str] = field(default_factory=list)  # see compile_for_hopper
    pipelined: bool = False  # the main loop must be pipelined (cp.async in the PTX)


# Modules whose AOT_SPECS list the configurations the GPU runs.
KERNEL_MODULES = ("r7b_fast.kernels.fused_logprobs", "r7b_fast.kernels.attention")


def _compile_spec(spec: AotSpec) -> dict:
    mod_name, fn_name = spec.target.split(":")
    fn = getattr(importlib.import_module(mod_name), fn_name)
    rep = compile_for_hopper(
        fn,
        spec.signature,
        spec.constexprs,
        num_warps=spec.num_warps,
        num_stages=spec.num_stages,
        divisible=spec.divisible,
        pipelined=spec.pipelined,
    )
    out = asdict(rep)
    out.pop("ptx")
    out["label"] = spec.label or spec.target
    out["problems"] = rep.problems()
    return out


def side_triton(version: str = GPU_TRITON_VERSION) -> str:
    """The directory holding Triton `version` (installed there on first use, then reused):
    `pip install --no-deps --target SIDE_TRITON_ROOT/triton-<version> triton==<version>`.
    The venv's own Triton is untouched. Raises RuntimeError with pip's output if the install
    fails (no network to PyPI, no wheel for this Python): the check must not pass silently."""
    target = os.path.join(SIDE_TRITON_ROOT, f"triton-{version}")
    stamp = os.path.join(target, f".r7b-installed-{version}")
    if os.path.exists(stamp):
        return target
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--upgrade", "--target", target,
           f"triton=={version}"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(
            f"could not install triton=={version} into {target} for the AOT check "
            f"({' '.join(cmd)}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
        )
    open(stamp, "w").close()  # written last: a half-finished install is redone next time
    return target


def aot_jobs() -> int:
    """Compile subprocesses run at once: $R7B_AOT_JOBS, else half the CPUs (8 on the GPU
    machine's 16 cores, so the suite's aot step fits its budget; 1 on a 2-core CI box)."""
    env = os.environ.get("R7B_AOT_JOBS")
    return int(env) if env else max(1, (os.cpu_count() or 2) // 2)


def compile_in_subprocess(
    specs: list[AotSpec],
    extra_path: list[str] | None = None,
    triton_version: str | None = None,
) -> list[dict]:
    """Compile each spec for sm_90 in a fresh interpreter-free Python; one report dict per spec
    (keys of KernelReport minus the PTX, plus `label` and `problems`), or {'label', 'error'}.
    `triton_version` (e.g. GPU_TRITON_VERSION) compiles with that Triton from `side_triton`
    instead of the venv's; each report's `triton_version` says which one ran. The specs are
    shared among `aot_jobs()` subprocesses; reports come back in the order of `specs`."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    path = list(extra_path or [])
    if triton_version:
        path.insert(0, side_triton(triton_version))  # ahead of site-packages (PYTHONPATH is)
    if path:
        env["PYTHONPATH"] = os.pathsep.join([*path, env.get("PYTHONPATH", "")])
    jobs = max(1, min(len(specs), aot_jobs()))
    procs = []
    for j in range(jobs):  # spec i goes to worker i % jobs; each compiles its share in order
        # stdin from a file, not a pipe fed by communicate(): each worker has its whole share
        # at once, so all compile in parallel (a pipe would hold worker j until j's turn below)
        with tempfile.TemporaryFile("w+") as payload:
            json.dump([asdict(s) for s in specs[j::jobs]], payload)
            payload.seek(0)
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "r7b_fast.kernels.aot", "--specs", "-"],
                stdin=payload, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                text=True, env=env,
            ))  # fmt: skip
    parts = []
    for p in procs:  # communicate() one by one: the others keep compiling meanwhile
        out, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"AOT compile subprocess failed:\n{err[-4000:]}")
        parts.append(json.loads(out.strip().splitlines()[-1]) if specs else [])
    reports = [parts[i % jobs][i // jobs] for i in range(len(specs))]
    if triton_version:  # the side directory must have won over the venv's Triton
        got = {x["triton_version"] for x in reports if "triton_version" in x}
        if got - {triton_version}:
            raise RuntimeError(f"asked for Triton {triton_version}, the compile used {got}")
    return reports


def all_kernel_specs() -> list[AotSpec]:
    specs = []
    for name in KERNEL_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue  # kernel not written yet
            raise
        specs.extend(getattr(mod, "AOT_SPECS", []))
    return specs


def _compile_all(specs: list[AotSpec]) -> list[dict]:
    reports = []
    for spec in specs:
        try:
            reports.append(_compile_spec(spec))
        except Exception as e:  # report, keep going: one bad config must not hide the others
            reports.append(
                {"label": spec.label or spec.target, "error": f"{type(e).__name__}: {e}"}
            )
    return reports


def _print_table(reports: list[dict], version: str) -> None:
    print(f"== Triton {version}", file=sys.stderr)
    for r in reports:
        if "error" in r:
            print(f"{r['label']:<48} ERROR {r['error'][:200]}", file=sys.stderr)
            continue
        print(
            f"{r['label']:<48} regs={r['registers']:<4} spills={r['spills']:<4} "
            f"stack={r['stack']:<4} smem={r['shared_bytes'] // 1024}KB wgmma={r['wgmma']} "
            f"cp.async={r['cp_async']} tma={r['tma']}",
            file=sys.stderr,
        )
        for p in r["problems"]:
            print(f"    PROBLEM {p}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--specs", help="JSON list of AotSpec dicts ('-' = stdin), compiled in this process "
        "with the importable Triton (the worker compile_in_subprocess runs)"
    )  # fmt: skip
    ap.add_argument(
        "--triton",
        help="comma-separated Tritons to compile every kernel with: 'local' (the importable one) "
        f"and/or versions installed by side_triton; default: local, plus {GPU_TRITON_VERSION} "
        "when local is another version (on the GPU image local is it: no install, no network)",
    )  # fmt: skip
    args = ap.parse_args(argv)
    if args.specs:
        raw = sys.stdin.read() if args.specs == "-" else open(args.specs).read()
        print(json.dumps(_compile_all([AotSpec(**d) for d in json.loads(raw)])))
        return 0
    import triton

    versions = args.triton.split(",") if args.triton else ["local"]
    if not args.triton and triton.__version__ != GPU_TRITON_VERSION:
        versions.append(GPU_TRITON_VERSION)
    specs, out, bad = all_kernel_specs(), {}, False
    for version in versions:
        reports = compile_in_subprocess(
            specs, triton_version=None if version == "local" else version
        )
        name = next((r["triton_version"] for r in reports if "triton_version" in r), version)
        _print_table(reports, name)
        out[name] = reports
        bad |= any("error" in r or r.get("problems") for r in reports)
    print(json.dumps(out))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
