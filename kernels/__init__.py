"""r7b_fast.kernels: fused Triton kernels, each with a plain-torch twin of the same signature.

Imported lazily: `import r7b_fast.kernels` costs nothing until a kernel is used. Public names:

- `linear_logprobs(hidden, weight, targets, *, scale, ignore_index, backend)`: log p(target)
  under softmax(scale * hidden @ weight.T) without materialising the logits; fp32 [N], also
  under autocast. `linear_logprobs_torch` is its torch twin.
- `varlen_attention(q, k, v, cu_seqlens, max_seqlen, *, causal, window, softmax_scale, backend)`:
  packed-sequence flash attention with GQA and sliding window. `max_seqlen` is a python int
  bound on the longest sequence: with it no path reads cu_seqlens on the host, so the Triton
  path and the torch path under torch.compile(fullgraph=True) run without a device sync or a
  graph break. Its torch twin (`varlen_attention_torch`) is fast on CPUs;
  `varlen_attention_reference` is the slow per-sequence loop the tests take as their truth.
- `kernel_calls()`: a context manager counting our kernels' calls per kernel and backend (the
  proof that a patched model or trainer ran our path).

`backend`: "auto" (Triton when every tensor is on CUDA or TRITON_INTERPRET=1, else torch),
"triton", "torch". Triton is optional: the kernel modules import it only when a Triton path
runs, so everything here imports and the torch twins run without it ("auto" then warns once and
uses torch; "triton" raises ImportError quoting triton's).

Debug mode: R7B_FAST_DEBUG=1 (or `r7b_fast.kernels._backend.DEBUG = True`) also checks input
values that need a host read (cu_seqlens from 0 to T and non-decreasing, max_seqlen >= the
longest sequence, targets in range) for CUDA tensors, at one sync per call; CPU tensors are
always checked; nothing is value-checked inside torch.compile.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "kernel_calls": "r7b_fast.kernels._backend",
    "linear_logprobs": "r7b_fast.kernels.fused_logprobs",
    "linear_logprobs_torch": "r7b_fast.kernels.fused_logprobs",
    "varlen_attention": "r7b_fast.kernels.attention",
    "varlen_attention_torch": "r7b_fast.kernels.attention",
    "varlen_attention_reference": "r7b_fast.kernels.attention",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'r7b_fast.kernels' has no attribute {name!r}")
