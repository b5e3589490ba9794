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

    python -m r7b_fast.kernels.aot            # every kernel's GPU configs (each module's AOT_SPECS)
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


@dataclass
class KernelReport:
    name: str
    registers: int
    spills: int  # bytes of local memory per thread (register spills); 0 is what we want
    stack: int
    shared_bytes: int
    wgmma: bool
    ptx: str

    def problems(self) -> list[str]:
        out = []
        if self.spills:
            out.append(f"{self.name}: {self.spills} bytes of local memory (register spills)")
        if self.shared_bytes > HOPPER_SMEM_LIMIT:
            out.append(f"{self.name}: {self.shared_bytes} B shared memory > {HOPPER_SMEM_LIMIT}")
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
) -> KernelReport:
    """Compile `fn` (a `@triton.jit` function) for sm_90 and read its resource usage.

    `signature` maps every argument name to a Triton type ('*bf16', '*fp32', 'i32', 'fp32',
    'constexpr'); `constexprs` gives the constexpr values. `divisible` names the arguments the
    JIT would specialise as multiples of 16 at the real shape (16-byte-aligned pointers, sizes
    and strides divisible by 16): without it loads cannot vectorise and Triton does not pipeline
    them (num_stages has no effect), so the report would not be what the GPU runs."""
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
    )
    out = asdict(rep)
    out.pop("ptx")
    out["label"] = spec.label or spec.target
    out["problems"] = rep.problems()
    return out


def compile_in_subprocess(specs: list[AotSpec], extra_path: list[str] | None = None) -> list[dict]:
    """Compile each spec for sm_90 in a fresh interpreter-free Python; one report dict per spec
    (keys of KernelReport minus the PTX, plus `label` and `problems`), or {'label', 'error'}."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join([*extra_path, env.get("PYTHONPATH", "")])
    payload = json.dumps([asdict(s) for s in specs])
    r = subprocess.run(
        [sys.executable, "-m", "r7b_fast.kernels.aot", "--specs", "-"],
        input=payload,
        capture_output=True,
        text=True,
        env=env,
    )
    if r.returncode != 0:
        raise RuntimeError(f"AOT compile subprocess failed:\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


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


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--specs", help="JSON list of AotSpec dicts ('-' = stdin); default: all kernels"
    )
    args = ap.parse_args(argv)
    if args.specs:
        raw = sys.stdin.read() if args.specs == "-" else open(args.specs).read()
        specs = [AotSpec(**d) for d in json.loads(raw)]
    else:
        specs = all_kernel_specs()
    reports = []
    for spec in specs:
        try:
            reports.append(_compile_spec(spec))
        except Exception as e:  # report, keep going: one bad config must not hide the others
            reports.append(
                {"label": spec.label or spec.target, "error": f"{type(e).__name__}: {e}"}
            )
    if not args.specs:
        for r in reports:
            if "error" in r:
                print(f"{r['label']:<48} ERROR {r['error'][:200]}", file=sys.stderr)
            else:
                print(
                    f"{r['label']:<48} regs={r['registers']:<4} spills={r['spills']:<4} "
                    f"smem={r['shared_bytes'] // 1024}KB wgmma={r['wgmma']}",
                    file=sys.stderr,
                )
    print(json.dumps(reports))
    bad = [r for r in reports if "error" in r or r.get("problems")]
    return 1 if bad and not args.specs else 0


if __name__ == "__main__":
    sys.exit(main())
