"""Fused linear log-probs: log p(target) under softmax(scale * hidden @ weight.T), never [N, V].

    logp = linear_logprobs(hidden, weight, targets, scale=0.25)      # fp32[N], differentiable

The Triton kernels and their schedule live in `_fused_logprobs_triton.py`, imported only when the
Triton path runs: without triton installed this module imports and `backend="auto"` runs the torch
twin (`backend="triton"` raises, giving triton's ImportError). The Triton path is exposed as the
torch custom ops `r7b_fast::linear_logprobs_fwd` / `_bwd` (fake implementations + registered
autograd), registered when this module is imported, so `torch.compile` can trace a model around
them without a graph break. `AOT_SPECS` (the sm_90 configs) is re-exported lazily from there.

`linear_logprobs_torch` is the plain-torch twin (token chunks, fp32 logits, recomputed in backward
through activation checkpointing).
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils.checkpoint import checkpoint

from r7b_fast.kernels._backend import (
    host_value_checks,
    record_call,
    resolve_backend,
    triton_module,
)

TORCH_CHUNK_ELEMENTS = 1 << 26  # the torch twin's logits chunk: 64M fp32 = 256 MiB
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _triton():
    """The Triton half (kernels + launchers), imported on first use."""
    return triton_module("r7b_fast.kernels._fused_logprobs_triton")


def __getattr__(name: str):
    if name == "AOT_SPECS":  # the sm_90 configs live (and import triton) with the kernels
        return _triton().AOT_SPECS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ----------------------------------------------------------------------------- custom op


@torch.library.custom_op("r7b_fast::linear_logprobs_fwd", mutates_args=())
def _llp_fwd_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    scale: float,
    ignore_index: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _triton()._forward(hidden, weight, targets, scale, ignore_index)


@_llp_fwd_op.register_fake
def _(hidden, weight, targets, scale, ignore_index):
    n = hidden.shape[0]
    return hidden.new_empty(n, dtype=torch.float32), hidden.new_empty(n, dtype=torch.float32)


@torch.library.custom_op("r7b_fast::linear_logprobs_bwd", mutates_args=())
def _llp_bwd_op(
    grad: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
    lse: torch.Tensor, scale: float, ignore_index: int, need_h: bool, need_w: bool,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(dH, dW); a gradient that is not needed comes back as an empty tensor."""
    dh, dw = _triton()._backward(
        grad, hidden, weight, targets, lse, scale, ignore_index, need_h, need_w
    )
    return (dh if need_h else hidden.new_empty(0)), (dw if need_w else weight.new_empty(0))


@_llp_bwd_op.register_fake
def _(grad, hidden, weight, targets, lse, scale, ignore_index, need_h, need_w):
    dh = torch.empty_like(hidden) if need_h else hidden.new_empty(0)
    return dh, (torch.empty_like(weight) if need_w else weight.new_empty(0))


def _setup_context(ctx, inputs, output):
    hidden, weight, targets, scale, ignore_index = inputs
    ctx.save_for_backward(hidden, weight, targets, output[1])
    ctx.scale, ctx.ignore_index = scale, ignore_index


def _autograd_backward(ctx, grad_logp, _grad_lse):
    hidden, weight, targets, lse = ctx.saved_tensors
    need_h, need_w = ctx.needs_input_grad[:2]
    dh, dw = _llp_bwd_op(grad_logp.contiguous(), hidden, weight, targets, lse, ctx.scale,
                         ctx.ignore_index, need_h, need_w)  # fmt: skip
    return (dh if need_h else None), (dw if need_w else None), None, None, None


_llp_fwd_op.register_autograd(_autograd_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public API


def _check_inputs(hidden, weight, targets, ignore_index: int, float_dtypes=_FLOAT_DTYPES) -> None:
    """ValueError naming the argument for anything the kernels do not accept."""
    for name, t, dim in (("hidden", hidden, 2), ("weight", weight, 2), ("targets", targets, 1)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != dim:
            raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"width mismatch: hidden {tuple(hidden.shape)} vs weight {tuple(weight.shape)} "
            "(hidden[N, H] and weight[V, H] must share H)"
        )
    if targets.shape[0] != hidden.shape[0]:
        raise ValueError(
            f"targets {tuple(targets.shape)} must have one entry per row of hidden "
            f"{tuple(hidden.shape)}"
        )
    if weight.shape[0] == 0:
        raise ValueError(f"weight {tuple(weight.shape)} has an empty vocabulary")
    for name, t in (("hidden", hidden), ("weight", weight)):
        if t.dtype not in float_dtypes:
            raise ValueError(f"{name} dtype must be one of {float_dtypes}, got {t.dtype}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) dtypes differ")
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets dtype must be torch.int64 (or int32), got {targets.dtype}")
    if not (hidden.device == weight.device == targets.device):
        raise ValueError(
            f"hidden ({hidden.device}), weight ({weight.device}) and targets ({targets.device}) "
            "must be on one device"
        )
    if not host_value_checks(targets):  # a host read: a device sync, or a graph break
        return
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= weight.shape[0]))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"targets[{i}] = {int(targets[i])} is outside [0, V={weight.shape[0]}) and is not "
            f"ignore_index={ignore_index}"
        )


def _no_autocast(device: torch.device):
    """A context with autocast off on `device`: an enclosing autocast would run the logits matmul
    in bf16/fp16 (rounding every logit, ~0.04 absolute error in logp) although the API promises
    fp32. The casts inside stay differentiable, so gradients reach the inputs in their dtypes."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _empty_logps(hidden, weight, dtype) -> torch.Tensor:
    """The [0] result for N = 0 tokens, connected to both inputs so backward still works."""
    with _no_autocast(hidden.device):
        return (hidden.to(dtype) @ weight[:1].to(dtype).T).squeeze(1)


def _chunk_logps(h, w, t, scale: float, ignore_index: int):
    with _no_autocast(h.device):  # also on checkpoint's recompute, which restores autocast
        logits = (h.to(w.dtype) @ w.T) * scale  # (c, V) in fp32 (fp64 for fp64 inputs)
        lse = torch.logsumexp(logits, dim=-1)
        valid = t != ignore_index
        picked = logits.gather(1, torch.where(valid, t, 0).unsqueeze(1)).squeeze(1)
        return torch.where(valid, picked - lse, 0.0)


def linear_logprobs_torch(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    scale: float = 1.0,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Plain-torch twin of `linear_logprobs` (same arguments and result).

    Logits are computed in fp32 (float64 for float64 inputs, which only this path accepts, for
    gradcheck) one token chunk at a time (`TORCH_CHUNK_ELEMENTS` logits per chunk); under autograd
    each chunk is recomputed in backward (activation checkpointing), so memory stays bounded.
    An enclosing autocast (CPU bf16, CUDA) is switched off inside: the logits stay fp32."""
    _check_inputs(hidden, weight, targets, ignore_index, (*_FLOAT_DTYPES, torch.float64))
    targets = targets.long()
    N, V = hidden.shape[0], weight.shape[0]
    dtype = torch.promote_types(weight.dtype, torch.float32)
    if N == 0:
        return _empty_logps(hidden, weight, dtype)
    w = weight.to(dtype)
    chunk = max(1, TORCH_CHUNK_ELEMENTS // V)
    grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    outs = []
    for i in range(0, N, chunk):
        args = (hidden[i : i + chunk], w, targets[i : i + chunk], float(scale), int(ignore_index))
        outs.append(
            checkpoint(_chunk_logps, *args, use_reentrant=False) if grad else _chunk_logps(*args)
        )
    return torch.cat(outs)


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    scale: float = 1.0,
    ignore_index: int = -100,
    backend: str = "auto",
) -> torch.Tensor:
    """log p(targets[n]) under softmax(scale * hidden[n] @ weight.T), without the [N, V] logits.

    Args:
        hidden: [N, H] float32 / bfloat16 / float16 (the final hidden states, one row per token).
        weight: [V, H], same dtype and device (the lm_head weight; may be the tied embedding).
        targets: [N] int64 (int32 accepted): a vocab id in [0, V), or `ignore_index`.
        scale: multiplies the logits (Command R7B's `config.logit_scale`).
        ignore_index: targets equal to it give 0 and no gradient. Drop such rows before the call
            when there are many: they still cost their share of the work.
        backend: "auto" (Triton on CUDA or under TRITON_INTERPRET=1, else torch), "triton", "torch".
    Returns:
        fp32 [N], also under autocast (which is switched off inside: logits and log-sum-exp
        accumulate in fp32); differentiable w.r.t. hidden and weight (gradients in their
        dtypes; run backward outside autocast, as torch recommends: a CPU backward inside it
        runs the torch twin's gradient matmuls in bf16). N = 0 gives an empty tensor.
        Raises ValueError for non-2-D inputs, a hidden/weight width mismatch, targets outside
        [0, V) other than ignore_index, unsupported dtypes or mixed devices; ImportError for
        backend="triton" where triton is not importable (quoting triton's ImportError).
    """
    name = resolve_backend(backend, hidden, weight, targets)
    record_call("linear_logprobs", name)
    if name == "torch":
        return linear_logprobs_torch(
            hidden, weight, targets, scale=scale, ignore_index=ignore_index
        )
    _check_inputs(hidden, weight, targets, ignore_index)
    if hidden.shape[0] == 0:
        return _empty_logps(hidden, weight, torch.float32)
    with _no_autocast(hidden.device):  # the kernels are fp32 inside; the small torch ops too
        logp, _ = _llp_fwd_op(
            hidden.contiguous(), weight.contiguous(), targets.long().contiguous(), float(scale),
            int(ignore_index),
        )  # fmt: skip
    return logp
