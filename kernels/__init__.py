"""r7b_fast.kernels: fused Triton kernels, each with a plain-torch twin of the same signature.

Imported lazily: `import r7b_fast.kernels` costs nothing until a kernel is used.

- `linear_logprobs(hidden, weight, targets, *, scale, ignore_index, backend)`: log p(target)
  under softmax(scale * hidden @ weight.T) without materialising the logits.
- `kernel_calls()`: a context manager counting our kernels' calls per kernel and backend (the
  proof that a patched model or trainer ran our path).
- `varlen_attention(q, k, v, cu_seqlens, max_seqlen, *, causal, window, softmax_scale, backend)`:
  packed-sequence flash attention with GQA and sliding window. Its torch twin
  (`varlen_attention_torch`) is a fast tiled path for CPUs; `varlen_attention_reference` is the
  slow per-sequence loop the tests take as their truth.
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
