"""r7b-fast: kernel-first post-training for Command R7B-class (Cohere2) models.

The package stays light: nothing here imports torch or triton until an attribute that needs it
is used, so `python -m r7b_fast.merge` starts fast.
"""

from __future__ import annotations

import importlib
import pkgutil

# A checkout run from its root (`python -m r7b_fast.train` with cwd = repo) shadows an installed
# copy. Extending __path__ with every `r7b_fast/` on sys.path lets the compiled `_merge` module
# of a non-editable install be found from the checkout too.
__path__ = pkgutil.extend_path(__path__, __name__)

__version__ = "0.1.0"

_LAZY = {
    "apply_kernels": "r7b_fast.model",
    "build_model": "r7b_fast.model",
    "tiny_config": "r7b_fast.model",
    "linear_logprobs": "r7b_fast.kernels",
    "varlen_attention": "r7b_fast.kernels",
    "merge_checkpoints": "r7b_fast.merge",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'r7b_fast' has no attribute {name!r}")
