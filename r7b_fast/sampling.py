"""On-policy sampling plumbing: FSDP2 parameters gathered once per sampling phase, and pluggable
generation backends (docs/sampling.md).

Gathering. Under FSDP2 every forward all-gathers each sharded module's parameters and frees them
after (reshard after forward), so decoding token by token all-gathers the whole model once per
token. `gathered(model)` all-gathers every FSDP module once at entry, keeps the parameters
resident for the phase (no collective inside any forward, so ranks need not stay in step) and
reshards them at exit, restoring each module's reshard-after-forward setting. Memory cost: while
inside, every rank holds the whole model unsharded in FSDP's compute dtype (the
`MixedPrecisionPolicy` param_dtype: bf16 on GPU, 2 bytes x parameters, ~16 GB for Command R7B;
fp32 on CPU) on top of its shard, the optimizer state and the KV cache. Turn it off with
`online.gather_for_sampling=false` when that does not fit; sampling then all-gathers per forward
and keeps the ranks in step as before.

Backends. A backend turns prompts into completions with the current policy weights:

    backend.sample(prompt_ids, k, max_new_tokens, temperature, top_p, seed, stop_ids,
                   prompt_keys=None) -> out[i][j] = completion ids of sample j of prompt i

(ids without the prompt, ending with the stop token that ended them; `prompt_keys[i]` keys the
randomness of prompt i, its global index when prompts are sharded over ranks, default i).
`get_backend(spec, model, tokenizer)` builds one: `hf` (r7b_fast.generate on the training
model), `vllm` (a colocated vLLM engine fed the current weights; needs `pip install vllm`) or
`module:function` (a factory called as `function(model, tokenizer, **options)`).
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable

from torch import nn

from r7b_fast.generate import generate


def fsdp_modules(model: nn.Module) -> list:
    """The FSDP2-sharded modules of `model` in `modules()` order (the same on every rank)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch built without distributed
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def _param_groups(state) -> list:
    """FSDP's parameter groups of one module state (a list in newer torch, one group before)."""
    if hasattr(state, "_fsdp_param_groups"):
        return list(state._fsdp_param_groups)
    if hasattr(state, "_fsdp_param_group"):
        return [state._fsdp_param_group] if state._fsdp_param_group is not None else []
    raise RuntimeError(
        "sampling.gathered: this torch's FSDP2 state has neither _fsdp_param_groups nor "
        "_fsdp_param_group; set online.gather_for_sampling=false"
    )


def _save_reshard(module) -> tuple:
    """(state, auto flag, [post_forward_mesh_info per group]): what set_reshard_after_forward
    overwrites. FSDP2 has a public setter but no getter, so the state is read directly."""
    state = module._get_fsdp_state()
    auto = getattr(state, "_auto_reshard_after_forward", None)
    return state, auto, [g.post_forward_mesh_info for g in _param_groups(state)]


def _restore_reshard(saved: tuple) -> None:
    state, auto, infos = saved
    if auto is not None:
        state._auto_reshard_after_forward = auto
    for group, info in zip(_param_groups(state), infos):
        group.post_forward_mesh_info = info


@contextlib.contextmanager
def gathered(model: nn.Module, enabled: bool = True):
    """Keeps an FSDP2 model's parameters all-gathered for the duration; yields True if it did.

    At entry (a collective: every rank must enter together): FSDP's lazy init runs on the roots
    (what the first forward would do: the root then keeps the setting FSDP gives it), each
    module's reshard-after-forward is saved and set to False, and each module is unsharded in
    `modules()` order: one all-gather per FSDP module for the whole phase instead of one per
    forward. Inside, forwards run no collective. At exit (also on an exception; local, no
    collective): every module is resharded (the full parameters freed) and its saved setting
    restored. Yields False and does nothing when `enabled` is False or the model has no FSDP
    module (one process). Memory: see the module docstring."""
    mods = fsdp_modules(model)
    if not enabled or not mods:
        yield False
        return
    nested = {id(s) for m in mods for s in list(m.modules())[1:]}
    for m in mods:  # the roots (FSDP modules inside no other), as their first forward would
        if id(m) not in nested:
            m._get_fsdp_state()._lazy_init()
    saved = [_save_reshard(m) for m in mods]
    try:
        for m in mods:
            m.set_reshard_after_forward(False, recurse=False)
        for m in mods:
            m.unshard()
        yield True
    finally:
        for m in mods:
            m.reshard()
        for s in saved:
            _restore_reshard(s)


class HFBackend:
    """`r7b_fast.generate.generate` on the training model (FSDP-sharded or not).

    batch_size: rows (prompt x sample) per forward; cache: "static" | "dynamic" (generate's);
    progress: a callable given each finished batch's row count; sync: generate's (None = in step
    under torch.distributed; `online_round_rows` passes False inside `gathered`). `stats`
    accumulates generate's counters over every `sample` call (see `generate`)."""

    def __init__(self, model, tokenizer, *, batch_size=32, cache="static", progress=None,
                 sync=None):  # fmt: skip
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.cache, self.progress, self.sync = batch_size, cache, progress, sync
        self.stats: dict = {}

    def sample(self, prompt_ids, k, max_new_tokens, temperature, top_p, seed, stop_ids,
               prompt_keys=None):  # fmt: skip
        return generate(self.model, self.tokenizer, prompt_ids, max_new_tokens=max_new_tokens,
                        num_samples=k, temperature=temperature, top_p=top_p, seed=seed,
                        batch_size=self.batch_size, stop_ids=stop_ids, prompt_keys=prompt_keys,
                        progress=self.progress, cache=self.cache, sync=self.sync,
                        stats=self.stats)  # fmt: skip


# vLLM engines by id(training model), with the folder holding the config they were built from.
_ENGINES: dict[int, tuple] = {}


class VLLMBackend:
    """A colocated vLLM engine on this rank, fed the training model's current weights before
    each `sample` call (not run in this project's tests: vLLM is not installed there).

    The engine is built on first use from the model's config alone (`load_format="dummy"`,
    `skip_tokenizer_init`: token ids in and out), with `external_launcher` under torchrun so each
    rank runs its own engine on its own prompts. Weights are streamed by name
    (`named_parameters`, full tensors: call it inside `gathered`, else each DTensor is gathered
    one by one) into vLLM's model `load_weights`, then the prefix cache is reset. Per-request
    seeds derive from (seed, prompt key), so a prompt's samples do not depend on its rank; vLLM's
    kernels and sampler differ from `generate`, so the tokens differ from the `hf` backend's.
    Options: dtype (default "bfloat16"), gpu_memory_utilization (0.3: the trainer holds the
    rest), max_model_len (default: longest prompt + max_new_tokens of the first call, rounded up
    to 256); other keywords (the `hf` ones) are ignored."""

    def __init__(self, model, tokenizer, *, dtype="bfloat16", gpu_memory_utilization=0.3,
                 max_model_len=None, **_hf_options):  # fmt: skip
        try:
            import vllm
        except ImportError as e:
            raise ImportError(
                "online.backend=vllm needs vLLM, which is not installed: pip install vllm "
                "(or set online.backend=hf)"
            ) from e
        self.vllm, self.model = vllm, model
        self.options = dict(dtype=dtype, gpu_memory_utilization=gpu_memory_utilization)
        self.max_model_len = max_model_len

    def _engine(self, longest: int):
        """This model's engine: built once per process and model (rounds reuse it)."""
        if id(self.model) not in _ENGINES:
            import tempfile

            import torch.distributed as dist

            folder = tempfile.TemporaryDirectory(prefix="r7b_vllm_")
            self.model.config.save_pretrained(folder.name)
            launcher = "external_launcher" if dist.is_initialized() else None
            llm = self.vllm.LLM(
                model=folder.name, load_format="dummy", skip_tokenizer_init=True,
                max_model_len=self.max_model_len or -(-longest // 256) * 256,
                distributed_executor_backend=launcher, enable_prefix_caching=False,
                **self.options,
            )  # fmt: skip
            _ENGINES[id(self.model)] = (llm, folder)
        return _ENGINES[id(self.model)][0]

    def load_weights(self, llm) -> None:
        """Streams the policy's current parameters into the engine (names as HF's)."""
        runner = llm.llm_engine.model_executor.driver_worker.model_runner
        for name, param in self.model.named_parameters():
            full = param.full_tensor() if hasattr(param, "full_tensor") else param
            runner.model.load_weights([(hf_name(name), full.detach())])
        llm.reset_prefix_cache()

    def sample(self, prompt_ids, k, max_new_tokens, temperature, top_p, seed, stop_ids,
               prompt_keys=None):  # fmt: skip
        keys = list(range(len(prompt_ids))) if prompt_keys is None else list(prompt_keys)
        llm = self._engine(max(map(len, prompt_ids), default=1) + max_new_tokens)
        self.load_weights(llm)
        if not prompt_ids:
            return []
        params = [
            self.vllm.SamplingParams(
                n=k,
                temperature=temperature,
                top_p=top_p,
                max_tokens=max_new_tokens,
                seed=(seed * 1_000_003 + key) % (1 << 31),
                stop_token_ids=list(stop_ids),
                detokenize=False,
            )  # fmt: skip
            for key in keys
        ]
        prompts = [{"prompt_token_ids": list(p)} for p in prompt_ids]
        outs = llm.generate(prompts, params, use_tqdm=False)
        return [[_ends_with_stop(list(c.token_ids), c, stop_ids) for c in o.outputs] for o in outs]


def hf_name(name: str) -> str:
    """A parameter name as the HF checkpoint spells it: the wrappers the trainer may add
    (activation checkpointing, torch.compile) dropped from the path."""
    for wrapper in ("_checkpoint_wrapped_module.", "_orig_mod."):
        name = name.replace(wrapper, "")
    return name


def _ends_with_stop(ids: list[int], completion, stop_ids) -> list[int]:
    """vLLM may leave the matched stop id out of token_ids (it reports it as stop_reason); our
    completions end with the stop token that ended them (`generate`'s convention)."""
    reason = getattr(completion, "stop_reason", None)
    if isinstance(reason, int) and reason in stop_ids and (not ids or ids[-1] != reason):
        ids.append(reason)
    return ids


BACKENDS: dict[str, Callable] = {"hf": HFBackend, "vllm": VLLMBackend}


def get_backend(spec: str, model, tokenizer, **options):
    """A backend from `spec`: a name in BACKENDS (`hf`, `vllm`) or `module:function`, called as
    factory(model, tokenizer, **options) (options: HFBackend's keywords for `hf`, VLLMBackend's
    for `vllm`; a `module:function` factory receives the same keywords as `hf`, so it should
    accept **kwargs). The result must have a callable `sample` (module docstring)."""
    if spec in BACKENDS:
        factory = BACKENDS[spec]
    elif isinstance(spec, str) and spec.count(":") == 1 and all(spec.split(":")):
        mod_name, fn_name = spec.split(":")
        factory = getattr(importlib.import_module(mod_name), fn_name, None)
        if not callable(factory):
            raise ValueError(f"online.backend: {mod_name} has no callable {fn_name!r}")
    else:
        raise ValueError(
            f"online.backend must be one of {sorted(BACKENDS)} or 'module:function', got {spec!r}"
        )
    backend = factory(model, tokenizer, **options)
    if not callable(getattr(backend, "sample", None)):
        raise TypeError(f"online.backend {spec!r}: the factory's result has no sample() method")
    return backend
