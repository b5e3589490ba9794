"""Triton is optional: where it is not importable (macOS, Windows, a minimal venv) the package, the
losses, the HF attention hook and the model import, the torch twins run (backend "auto" and
"torch"), and backend="triton" raises an ImportError quoting triton's own.

A fresh Python (TRITON_INTERPRET unset, as a user's would be) gets a `sys.meta_path` finder that
makes `import triton` raise ModuleNotFoundError before anything is imported: what a venv without
triton does. It runs both twins forward + backward and a tiny Cohere2 forward through
`varlen_attention` on inputs this process saved, and saves the results; this process (triton
installed) computes the same with backend="torch" and compares. Then the child turns
TRITON_INTERPRET on (a CPU stand-in for "CUDA tensors, so auto would pick Triton"): "auto" must
give the torch result, also under torch.compile(fullgraph=True) (no import traced), and warn once
(at the first eager call: dynamo cannot trace a warning); "triton" must raise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from r7b_fast.hf_attention import packed_kwargs, use_varlen_attention
from r7b_fast.kernels import linear_logprobs, varlen_attention
from r7b_fast.model import build_model, tiny_config

CHILD = r"""
import importlib.abc, json, os, sys, warnings

class _NoTriton(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by test_no_triton)",
                                      name=name)
        return None

sys.meta_path.insert(0, _NoTriton())
assert "triton" not in sys.modules and "TRITON_INTERPRET" not in os.environ
import torch
import r7b_fast.kernels
from r7b_fast.kernels import kernel_calls, linear_logprobs, varlen_attention
import r7b_fast.losses, r7b_fast.hf_attention, r7b_fast.model
from r7b_fast.kernels._backend import triton_import_error

report = {"triton_loaded": "triton" in sys.modules, "import_error": str(triton_import_error()),
          "ops": [hasattr(torch.ops.r7b_fast, n) for n in
                  ("linear_logprobs_fwd", "linear_logprobs_bwd", "varlen_attention_fwd")]}
inp = torch.load(sys.argv[1])
sys.path.insert(0, inp["tests_dir"])
from test_no_triton import run_twins, run_model

out = {}
with kernel_calls() as calls:
    for backend in ("auto", "torch"):
        out[backend] = run_twins(inp, backend)
    out["model"] = run_model(inp["ids"], inp["pos"], "auto")
report["calls"] = dict(calls)
os.environ["TRITON_INTERPRET"] = "1"  # tensors that would go to Triton: auto must fall back
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    attend = lambda q, k, v: varlen_attention(q, k, v, inp["cu"], 33, window=5)
    compiled = torch.compile(attend, backend="aot_eager", fullgraph=True)
    out["compiled"] = compiled(inp["q"], inp["k"], inp["v"])  # auto -> torch, traced
    out["interp_auto"] = run_twins(inp, "auto")
    run_twins(inp, "auto")
report["warnings"] = [str(w.message) for w in caught]
errors = []
for call in (lambda: linear_logprobs(inp["h"], inp["w"], inp["t"], backend="triton"),
             lambda: varlen_attention(inp["q"], inp["k"], inp["v"], inp["cu"], 33,
                                      backend="triton")):
    try:
        call()
        errors.append(None)
    except ImportError as e:
        errors.append(str(e))
report["errors"] = errors
torch.save(out, sys.argv[2])
print(json.dumps(report))
"""


def run_twins(inp: dict, backend: str) -> dict:
    """Forward + backward of both kernels on `inp`'s tensors: {name: [out, grads...]}."""
    h, w = inp["h"].clone().requires_grad_(), inp["w"].clone().requires_grad_()
    logp = linear_logprobs(h, w, inp["t"], scale=0.5, backend=backend)
    logp.backward(inp["g"])
    q, k, v = (inp[n].clone().requires_grad_() for n in "qkv")
    o = varlen_attention(q, k, v, inp["cu"], 33, window=5, backend=backend)
    o.backward(inp["do"])
    return {"llp": [logp.detach(), h.grad, w.grad], "attn": [o.detach(), q.grad, k.grad, v.grad]}


def run_model(ids: torch.Tensor, pos: torch.Tensor, backend: str) -> torch.Tensor:
    """Logits of a tiny Cohere2 (seeded init) with its attention through varlen_attention."""
    model = build_model(tiny_config(num_hidden_layers=2), seed=3)
    use_varlen_attention(model, backend=backend)
    with torch.no_grad():
        return model(ids, position_ids=pos, use_cache=False, **packed_kwargs(pos)).logits


def _inputs() -> dict:
    g = torch.Generator().manual_seed(0)
    lens = [1, 7, 33, 2]
    T = sum(lens)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    return {
        "h": torch.randn(9, 16, generator=g), "w": torch.randn(37, 16, generator=g),
        "t": torch.randint(0, 37, (9,), generator=g), "g": torch.randn(9, generator=g),
        "q": torch.randn(T, 4, 16, generator=g), "k": torch.randn(T, 2, 16, generator=g),
        "v": torch.randn(T, 2, 16, generator=g), "do": torch.randn(T, 4, 16, generator=g),
        "cu": cu, "ids": torch.randint(0, 1024, (1, T), generator=g), "pos": pos,
        "tests_dir": os.path.dirname(__file__),
    }  # fmt: skip


def test_without_triton_everything_imports_and_the_twins_run(tmp_path):
    inp = _inputs()
    torch.save(inp, tmp_path / "in.pt")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-4000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report["triton_loaded"] is False
    assert "hidden by test_no_triton" in report["import_error"]
    assert report["ops"] == [True, True, True]  # custom ops registered without triton
    # every call resolved to torch: 2 backends x 1 call each, + the model's 2 layers
    assert report["calls"]["linear_logprobs:torch"] == report["calls"]["linear_logprobs"] == 2
    assert report["calls"]["varlen_attention:torch"] == report["calls"]["varlen_attention"] == 4
    assert len(report["warnings"]) == 1, report["warnings"]  # auto falls back, warning once
    assert "triton is not importable" in report["warnings"][0]
    assert "hidden by test_no_triton" in report["warnings"][0]
    for msg in report["errors"]:  # backend="triton": ImportError quoting triton's
        assert msg is not None and "triton is not importable" in msg, msg
        assert "hidden by test_no_triton" in msg, msg
    got = torch.load(tmp_path / "out.pt")
    want = run_twins(inp, "torch")  # here triton is importable; torch twins as the reference
    for key in ("auto", "torch", "interp_auto"):
        for name in ("llp", "attn"):
            for a, b in zip(got[key][name], want[name]):
                # same code and inputs in two processes: equal up to thread-count reductions
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    # compiled (banded path, auto resolved to torch while tracing) vs eager here (planner)
    torch.testing.assert_close(got["compiled"], want["attn"][0], rtol=1e-5, atol=1e-5)
    model_logits = run_model(inp["ids"], inp["pos"], "torch")
    torch.testing.assert_close(got["model"], model_logits, rtol=1e-5, atol=1e-5)


CUDA_CHILD = r"""
import importlib.abc, json, sys, warnings

class _NoTriton(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden)", name=name)
        return None

sys.meta_path.insert(0, _NoTriton())
import torch
torch.cuda.is_available = lambda: True  # a CUDA machine without triton
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import r7b_fast.kernels._backend
print(json.dumps([str(w.message) for w in caught]))
"""


def test_cuda_machine_without_triton_warns_at_import():
    """A model that only ever runs compiled cannot warn from resolve_backend (dynamo cannot trace
    a warning), so a CUDA machine without triton is told once when the kernels are imported."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", CUDA_CHILD], capture_output=True, text=True,
                       env=env, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr[-4000:]
    messages = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(messages) == 1 and "triton is not importable" in messages[0], messages
