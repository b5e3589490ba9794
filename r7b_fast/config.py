"""Training configuration: flat dataclasses, one per section, a docstring per field.

A config is a YAML mapping of sections (`run`, `model`, `data`, `optim`, `fsdp`, `dpo`,
`online`, `checkpoint`, `logging`, `debug`) to `field: value` mappings, plus dotted `section.field=value`
overrides from the command line (values parsed as YAML: `optim.lr=3e-4`,
`data.synthetic_families=[arith_ar,count_ar]`, `model.tiny_overrides={hidden_size: 64}`).
A few str keys also take YAML `true`/`false` for one of their values (`BOOL_ALIASES`:
`model.compile` on/off, `model.activation_checkpointing` full/none).

`load_config(path_or_name, overrides)` resolves, type-checks and validates everything, raising
`ConfigError` (a ValueError) that names the offending key, before any model or data is touched.
Values that depend on the number of processes (`optim.global_batch` divisible by
`micro_batch * world_size`) are checked by `check_world(cfg, world_size)` right after the
process group starts. `python -m r7b_fast.train --help` prints every key with its docstring.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import os
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

STAGES = ("sft", "dpo", "online_dpo")
OPTIM_IMPLEMENTATIONS = ("auto", "fused", "foreach", "for_loop")
DPO_LOSS_KINDS = ("sigmoid", "ipo", "hinge", "robust", "sigmoid_norm")
AC_MODES = ("none", "full", "selective")
COMPILE_MODES = ("auto", "on", "off")
# str fields that also accept a YAML bool, read as the named value (kept from when they were
# bools, and natural to write: `compile: true`). from_dict maps the bool before type-checking.
BOOL_ALIASES = {
    "model.activation_checkpointing": {True: "full", False: "none"},
    "model.compile": {True: "on", False: "off"},
}


class ConfigError(ValueError):
    """A bad configuration value; the message starts with the dotted key."""


@dataclass
class RunConfig:
    stage: str = "sft"
    """Training stage: `sft`, `dpo` or `online_dpo`."""
    output_dir: str = ""
    """Run directory (config.yaml, metrics.jsonl, checkpoints/, hf/, done.json). Required."""
    seed: int = 0
    """Seed for model init, data order, dropout and sampling."""
    device: str = "auto"
    """`auto` (CUDA if available, else CPU), `cpu` or `cuda`."""
    cpu_threads: int = 0
    """torch intra-op threads on CPU; 0 = torch's default divided by the processes on this
    machine (oversubscribed CPUs get much slower with too many threads)."""
    allow_changes: list = field(default_factory=list)
    """Keys allowed to differ from the run already in output_dir when continuing it, e.g.
    `[optim.lr]` to resume with a lower learning rate (the new value is used from the resumed
    step on and recorded in metrics.jsonl and run.json); `['*']` allows any change. Without it
    a changed result-determining key (r7b_fast.rundir.fingerprint) is refused (exit 2)."""
    overwrite: bool = False
    """Delete the previous run in output_dir (checkpoints/, hf/, done.json, metrics...) and
    start fresh; required with checkpoint.resume=false into a directory holding a run."""


@dataclass
class ModelConfig:
    path: str = "tiny"
    """An HF Cohere2/Llama checkpoint directory, or `tiny` for r7b_fast.model.tiny_config()."""
    tiny_overrides: dict = field(default_factory=dict)
    """Cohere2Config fields overriding the tiny defaults (only with path=tiny)."""
    dtype: str = "auto"
    """Parameter dtype: `auto` (bfloat16 compute on CUDA with fp32 master weights, fp32 on
    CPU), `float32` or `bfloat16` (pure bf16 weights, no fp32 master copy)."""
    attention: str = "varlen"
    """`varlen` (our packed varlen attention kernel via r7b_fast.hf_attention) or an HF
    attention implementation (`sdpa`, `eager`) that sees packing through position_ids."""
    kernel_backend: str = "auto"
    """Backend of our kernels (linear_logprobs, varlen attention): `auto` (Triton on CUDA or
    under TRITON_INTERPRET=1, else the torch twin), `triton` or `torch`."""
    activation_checkpointing: str = "none"
    """`none`; `full`: recompute each checkpointed decoder layer in the backward pass (least
    memory, ~one more forward of compute); `selective`: op-level selective checkpointing, the
    layer's matmul (and attention kernel) outputs are saved and only the cheap ops (norms,
    activations, elementwise) are recomputed (r7b_fast.distributed). YAML `true`/`false` mean
    `full`/`none`. Same gradients in every mode."""
    activation_checkpointing_every: int = 1
    """Checkpoint every k-th decoder layer only (layers 0, k, 2k, ...; 1 = all), for `full` and
    `selective`: trades memory for less recomputation."""
    compile: str = "auto"
    """Regional `torch.compile` of each decoder layer and of the fused loss head
    (r7b_fast.compile, dynamic shapes): `auto` (on for CUDA, off on CPU), `on` or `off`; YAML
    `true`/`false` mean `on`/`off`. The first steps pay the compilation (see docs/performance.md)."""


@dataclass
class DataConfig:
    train: list = field(default_factory=list)
    """Training data files/dirs (JSONL, Parquet or a `datasets` dir): `messages` rows for sft,
    `prompt`/`chosen`/`rejected` for dpo, prompts (+ task metadata) for online_dpo."""
    synthetic_families: list = field(default_factory=list)
    """Instead of files: embedded synthetic task families generated into output_dir/data."""
    synthetic_train: int = 256
    """Rows per synthetic family in the generated training split."""
    synthetic_eval: int = 32
    """Rows per synthetic family in the generated eval split."""
    tokenizer: str = "auto"
    """`auto` (the checkpoint's tokenizer; the embedded one for model.path=tiny; a checkpoint
    without tokenizer files is an error), `embedded`, or a tokenizer directory."""
    max_tokens: int = 512
    """Length of a packed row, in tokens; also the longest sequence (longer ones are skipped)."""
    shuffle: bool = True
    """Shuffle packed rows each epoch (seeded by run.seed and the epoch)."""
    eval: list = field(default_factory=list)
    """Held-out files (data.train's schema) for eval.every_steps; empty = the generated eval
    split of data.synthetic_families (required with data.train when eval is on)."""
    max_dropped_fraction: float = 0.1
    """Stop before training when a data file has more than this fraction of unusable rows
    (bad schema, too long...); the error names the file, the count per reason and the schema."""


@dataclass
class OptimConfig:
    lr: float = 1e-4
    """Peak learning rate (after warmup)."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of `lr` (cosine/linear decay)."""
    schedule: str = "cosine"
    """Decay after warmup: `cosine`, `linear` or `constant`."""
    warmup_steps: int = 10
    """Linear warmup from 0 over this many optimizer steps."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay (not applied to norms and biases)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping (the norm is still logged)."""
    global_batch: int = 8
    """Packed rows per optimizer step, over all processes and accumulation steps."""
    micro_batch: int = 1
    """Packed rows per forward pass per process; accumulation = global / (micro * world)."""
    max_steps: int = 0
    """Optimizer steps to run (per online round for online_dpo); 0 = `epochs` over the data."""
    epochs: float = 1.0
    """Passes over the data when max_steps is 0."""
    implementation: str = "auto"
    """AdamW implementation: `auto` (fused on CUDA, foreach elsewhere), `fused` (one kernel per
    parameter group; CUDA and CPU), `foreach` (multi-tensor ops) or `for_loop` (one parameter at a
    time: least temporary memory). All compute the same update (to fp32 rounding); under FSDP2
    the parameters are sharded DTensors, so the Adam states are sharded the same way."""


@dataclass
class FSDPConfig:
    reshard_after_forward: bool | int | str = "auto"
    """After a decoder layer's forward, free its gathered parameters? `auto`: every layer but the
    last (its backward runs at once); `true`: every layer (least memory, one more all-gather);
    `false`: none (no all-gather in backward; the whole gathered model is held); an int N (a
    divisor of the world size, 1 < N < world): reshard to groups of N ranks (e.g. the GPUs of a
    node) so backward's all-gather stays within the group. Multi-process runs only."""
    grad_accumulation: str = "reduce_scatter"
    """Gradient accumulation under FSDP2: `reduce_scatter` (reduce-scatter after every
    micro-batch and add into the sharded fp32 gradients: only shards are ever held) or
    `unsharded` (skip the reduce-scatter until the last micro-batch: one reduce-scatter per
    step, but every rank holds an unsharded gradient of the whole model, fp32 under bf16 mixed
    precision: 4 bytes/param, ~32 GB for Command R7B). Same update to fp32 rounding."""


@dataclass
class DPOConfig:
    beta: float = 0.1
    """DPO temperature beta."""
    loss_type: str = "sigmoid"
    """losses.dpo_loss kind: sigmoid, ipo, hinge, robust, sigmoid_norm."""
    label_smoothing: float = 0.0
    """Label smoothing for sigmoid/robust (0 <= x < 0.5)."""
    sft_weight: float = 0.0
    """Weight of an SFT (NLL) term on the chosen answers added to the DPO loss."""


@dataclass
class OnlineConfig:
    rounds: int = 2
    """On-policy rounds: sample -> score -> pairs -> reference logps -> train."""
    prompts_per_round: int = 32
    """Prompts sampled (without replacement, cycling) per round."""
    num_samples: int = 4
    """Answers sampled per prompt (k >= 2); best vs worst by reward becomes a pair."""
    max_new_tokens: int = 32
    """Longest sampled answer."""
    temperature: float = 1.0
    """Sampling temperature."""
    reward: str = "verifier"
    """`verifier` (the synthetic task verifier), an HF reward-model dir, or `module:function`."""
    backend: str = "hf"
    """What samples (docs/sampling.md): `hf` (r7b_fast.generate on the training model), `vllm`
    (a colocated vLLM engine fed the current weights each round; needs `pip install vllm`), or
    `module:function` (a factory `function(model, tokenizer, **kwargs)` returning an object with
    `sample(prompt_ids, k, max_new_tokens, temperature, top_p, seed, stop_ids, prompt_keys)`)."""
    gather_for_sampling: bool = True
    """Under FSDP (2+ ranks): all-gather the parameters once per sampling phase and keep them
    (r7b_fast.sampling.gathered) instead of once per decoded token. Costs the whole model
    unsharded on every rank while sampling (bf16 on GPU: 2 bytes x parameters, ~16 GB for
    Command R7B); false when that does not fit. Same samples either way."""
    cache: str = "static"
    """`hf` backend KV cache: `static` (preallocated, reused across batches) or `dynamic`
    (grown per token); same samples either way (benchmarks/results/cpu_sampling.md)."""
    batch_size: int = 32
    """`hf` backend: rows (prompt x sample) per generation forward, prompts sorted by length."""


@dataclass
class CheckpointConfig:
    every_steps: int = 100
    """Write a resume checkpoint every this many optimizer steps (and always at the end); 0 = end only."""
    keep_last: int = 2
    """Complete checkpoints kept (older ones deleted after a new one is complete)."""
    resume: bool = True
    """Resume from the latest complete checkpoint in output_dir/checkpoints if there is one;
    false into a directory holding a previous run is refused unless run.overwrite=true."""
    keep_after_done: int = 1
    """Complete checkpoints kept once the run is finished (hf/ and done.json written): 1 keeps
    the last (to continue training later), 0 deletes them all."""
    export_hf: bool = True
    """Write an HF `save_pretrained` directory (output_dir/hf) at the end of the stage."""
    hf_max_shard_size: str = "5GB"
    """Largest safetensors shard in the HF export."""


@dataclass
class LoggingConfig:
    every_steps: int = 1
    """Write metrics every this many optimizer steps."""
    tensorboard: bool = True
    """Also write TensorBoard event files under output_dir/tb."""
    progress_bar: bool = True
    """Show a tqdm progress bar on rank 0."""
    peak_tflops: float = 0.0
    """Peak dense bf16 TFLOP/s per device for MFU; 0 = look the GPU up (H100/H200), none on CPU."""


@dataclass
class EvalConfig:
    every_steps: int = 0
    """Held-out loss every this many optimizer steps and at the last one (sft: token-mean NLL;
    dpo: DPO loss + reward accuracy) on data.eval or the generated eval split, logged as
    eval/loss (metrics.jsonl `eval` events, TensorBoard); 0 = off. Not for online_dpo."""


@dataclass
class DebugConfig:
    nan_at_step: int = 0
    """Testing aid: make the loss NaN at this optimizer step (1-based); 0 = never."""
    step_sleep: float = 0.0
    """Testing aid: sleep this many seconds after each optimizer step."""
    inf_grad_at_step: int = 0
    """Testing aid: set one gradient element to Inf at this optimizer step (finite loss); 0 = never."""
    stop_after_step: int = 0
    """Testing aid: checkpoint after this optimizer step, then stop with DebugStop (a kill that
    a resume test can reproduce exactly); 0 = never."""


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    online: OnlineConfig = field(default_factory=OnlineConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}


def _section_types() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {name: hints[name] for name in SECTIONS}


def _coerce(key: str, value, annotation):
    """`value` checked against (and lightly converted to) the field type; ConfigError otherwise."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        # `bool | int | str`: the first member that accepts the value (bool before int, so
        # YAML `true` stays a bool and `4` an int).
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(key, value, arg)
            except ConfigError:
                pass
        names = " | ".join(getattr(a, "__name__", str(a)) for a in args)
        raise ConfigError(f"{key}: expected {names}, got {type(value).__name__} {value!r}")
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif annotation is str:
        if isinstance(value, str):
            return value
    elif annotation is list or origin is list:
        if isinstance(value, str):  # a single path or name
            return [value]
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return list(value)
    elif annotation is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
    name = getattr(annotation, "__name__", str(annotation))
    raise ConfigError(f"{key}: expected {name}, got {type(value).__name__} {value!r}")


def from_dict(data: dict) -> Config:
    """A Config from a nested mapping; unknown sections/fields and wrong types raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"<root>: expected a mapping of sections, got {type(data).__name__}")
    cfg = Config()
    types_ = _section_types()
    for section, values in data.items():
        if section not in types_:
            raise ConfigError(f"{section}: unknown section (known: {', '.join(types_)})")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{section}: expected a mapping of fields")
        obj = getattr(cfg, section)
        hints = typing.get_type_hints(type(obj))
        for name, value in values.items():
            key = f"{section}.{name}"
            if name not in hints:
                raise ConfigError(f"{key}: unknown key (known: {', '.join(hints)})")
            if isinstance(value, bool) and key in BOOL_ALIASES:
                value = BOOL_ALIASES[key][value]
            setattr(obj, name, _coerce(key, value, hints[name]))
    return cfg


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """`data` (nested mapping) with `section.field=value` overrides applied (values as YAML)."""
    data = {k: dict(v or {}) for k, v in data.items()}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"{item}: override must look like section.field=value")
        parts = key.strip().split(".")
        if len(parts) != 2 or not all(parts):
            raise ConfigError(f"{key}: override key must be section.field")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"{key}: cannot parse value {raw!r}: {e}") from None
        data.setdefault(parts[0], {})[parts[1]] = value
    return data


def resolve_path(path_or_name: str) -> Path:
    """A YAML path as given, or a built-in config name (`sft_tiny`) from r7b_fast/configs/."""
    p = Path(path_or_name)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise ConfigError(f"config: file not found: {p}")
        return p
    builtin = resources.files("r7b_fast") / "configs" / f"{path_or_name}.yaml"
    if not builtin.is_file():
        names = sorted(
            f.name[:-5]
            for f in (resources.files("r7b_fast") / "configs").iterdir()
            if f.name.endswith(".yaml")
        )
        raise ConfigError(f"config: {path_or_name!r} is neither a file nor a built-in ({names})")
    return Path(str(builtin))


def load_config(path_or_name: str | None, overrides: list[str] = ()) -> Config:
    """Load YAML (path or built-in name; None = defaults), apply overrides, type-check, validate."""
    data = {}
    if path_or_name is not None:
        with open(resolve_path(path_or_name)) as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ConfigError("<root>: the YAML file must be a mapping of sections")
    cfg = from_dict(apply_overrides(data, list(overrides)))
    validate(cfg)
    return cfg


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def validate(cfg: Config) -> None:
    """Raise ConfigError naming the key of the first impossible value."""
    r, m, d, o, p = cfg.run, cfg.model, cfg.data, cfg.optim, cfg.dpo
    _check(r.stage in STAGES, "run.stage", f"must be one of {STAGES}, got {r.stage!r}")
    _check(bool(r.output_dir), "run.output_dir", "is required")
    _check(r.device in ("auto", "cpu", "cuda"), "run.device", "must be auto, cpu or cuda")
    _check(r.cpu_threads >= 0, "run.cpu_threads", "must be >= 0")
    _check(m.dtype in ("auto", "float32", "bfloat16"), "model.dtype", "auto|float32|bfloat16")
    _check(m.attention in ("varlen", "sdpa", "eager"), "model.attention", "varlen|sdpa|eager")
    _check(
        m.kernel_backend in ("auto", "torch", "triton"), "model.kernel_backend", "auto|torch|triton"
    )
    _check(m.activation_checkpointing in AC_MODES, "model.activation_checkpointing",
           f"must be one of {AC_MODES} (or true/false), got {m.activation_checkpointing!r}")  # fmt: skip
    _check(m.activation_checkpointing_every >= 1, "model.activation_checkpointing_every",
           "must be >= 1")  # fmt: skip
    _check(m.compile in COMPILE_MODES, "model.compile",
           f"must be one of {COMPILE_MODES} (or true/false), got {m.compile!r}")  # fmt: skip
    if m.path != "tiny":
        _check(os.path.isdir(m.path), "model.path", f"not a directory: {m.path}")
        _check(not m.tiny_overrides, "model.tiny_overrides", "only valid with model.path=tiny")
    _check(
        bool(d.train) != bool(d.synthetic_families),
        "data.train",
        "give exactly one of data.train (files) or data.synthetic_families",
    )
    if d.synthetic_families:
        from r7b_fast.data.synthetic import FAMILIES

        for i, fam in enumerate(d.synthetic_families):
            _check(
                fam in FAMILIES,
                f"data.synthetic_families[{i}]",
                f"unknown family {fam!r}; known: {', '.join(FAMILIES)}",
            )
    for i, path in enumerate(d.train):
        _check(os.path.exists(path), f"data.train[{i}]", f"dataset path not found: {path}")
    _check(d.synthetic_train > 0, "data.synthetic_train", "must be > 0")
    _check(d.synthetic_eval >= 0, "data.synthetic_eval", "must be >= 0")
    if d.tokenizer not in ("auto", "embedded"):
        _check(os.path.isdir(d.tokenizer), "data.tokenizer", f"not a directory: {d.tokenizer}")
    _check(d.max_tokens >= 8, "data.max_tokens", "must be >= 8")
    _check(0 <= d.max_dropped_fraction <= 1, "data.max_dropped_fraction", "must be in [0, 1]")
    _check(o.lr > 0, "optim.lr", "must be > 0")
    _check(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]")
    _check(
        o.schedule in ("cosine", "linear", "constant"), "optim.schedule", "cosine|linear|constant"
    )
    _check(o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
    _check(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    _check(0 <= o.beta1 < 1, "optim.beta1", "must be in [0, 1)")
    _check(0 <= o.beta2 < 1, "optim.beta2", "must be in [0, 1)")
    _check(o.grad_clip >= 0, "optim.grad_clip", "must be >= 0")
    _check(o.micro_batch >= 1, "optim.micro_batch", "must be >= 1")
    _check(
        o.micro_batch <= o.global_batch,
        "optim.micro_batch",
        f"micro batch {o.micro_batch} > global batch {o.global_batch}",
    )
    _check(
        o.global_batch % o.micro_batch == 0,
        "optim.global_batch",
        f"must be a multiple of optim.micro_batch ({o.micro_batch})",
    )
    _check(o.max_steps >= 0, "optim.max_steps", "must be >= 0")
    _check(o.max_steps > 0 or o.epochs > 0, "optim.epochs", "must be > 0 when max_steps is 0")
    _check(
        o.max_steps > 0 or r.stage != "online_dpo",
        "optim.max_steps",
        "online_dpo needs max_steps > 0 (optimizer steps per round)",
    )
    _validate_fsdp(cfg)
    _check(p.beta > 0, "dpo.beta", "must be > 0")
    _check(p.loss_type in DPO_LOSS_KINDS, "dpo.loss_type", f"must be one of {DPO_LOSS_KINDS}")
    _check(0 <= p.label_smoothing < 0.5, "dpo.label_smoothing", "must be in [0, 0.5)")
    _check(p.sft_weight >= 0, "dpo.sft_weight", "must be >= 0")
    _validate_rest(cfg)


def _validate_fsdp(cfg: Config) -> None:
    o, f = cfg.optim, cfg.fsdp
    _check(o.implementation in OPTIM_IMPLEMENTATIONS, "optim.implementation",
           f"must be one of {OPTIM_IMPLEMENTATIONS}, got {o.implementation!r}")  # fmt: skip
    raf = f.reshard_after_forward
    _check(isinstance(raf, bool) or (isinstance(raf, int) and raf > 1) or raf == "auto",
           "fsdp.reshard_after_forward", f"must be auto, true, false or an int > 1, got {raf!r}")  # fmt: skip
    _check(f.grad_accumulation in ("reduce_scatter", "unsharded"), "fsdp.grad_accumulation",
           f"must be reduce_scatter or unsharded, got {f.grad_accumulation!r}")  # fmt: skip


def _validate_rest(cfg: Config) -> None:
    on, c, lg = cfg.online, cfg.checkpoint, cfg.logging
    _check(on.rounds >= 1, "online.rounds", "must be >= 1")
    _check(on.prompts_per_round >= 1, "online.prompts_per_round", "must be >= 1")
    _check(on.num_samples >= 2, "online.num_samples", "must be >= 2 (best vs worst)")
    _check(on.max_new_tokens >= 1, "online.max_new_tokens", "must be >= 1")
    _check(on.temperature > 0, "online.temperature", "must be > 0")
    _check(on.cache in ("static", "dynamic"), "online.cache", "must be static or dynamic")
    _check(on.batch_size >= 1, "online.batch_size", "must be >= 1")
    _check(c.every_steps >= 0, "checkpoint.every_steps", "must be >= 0")
    _check(c.keep_last >= 1, "checkpoint.keep_last", "must be >= 1")
    _check(c.keep_after_done >= 0, "checkpoint.keep_after_done", "must be >= 0")
    _check(lg.every_steps >= 1, "logging.every_steps", "must be >= 1")
    _check(lg.peak_tflops >= 0, "logging.peak_tflops", "must be >= 0")
    _validate_eval(cfg)
    for key in ("nan_at_step", "inf_grad_at_step", "stop_after_step"):
        _check(getattr(cfg.debug, key) >= 0, f"debug.{key}", "must be >= 0")


def _validate_eval(cfg: Config) -> None:
    e, d = cfg.eval, cfg.data
    _check(e.every_steps >= 0, "eval.every_steps", "must be >= 0")
    for i, path in enumerate(d.eval):
        _check(os.path.exists(path), f"data.eval[{i}]", f"dataset path not found: {path}")
    if e.every_steps:
        _check(cfg.run.stage != "online_dpo", "eval.every_steps",
               "not supported for online_dpo (its held-out measure is r7b_fast.eval)")  # fmt: skip
        _check(bool(d.eval) or not d.train, "data.eval",
               "eval.every_steps with data.train needs data.eval files")  # fmt: skip


def check_world(cfg: Config, world_size: int) -> int:
    """Gradient-accumulation steps for `world_size` processes; ConfigError if it does not divide."""
    o = cfg.optim
    per_step = o.micro_batch * world_size
    _check(
        o.global_batch % per_step == 0,
        "optim.global_batch",
        f"{o.global_batch} is not a multiple of micro_batch*world_size = {per_step}",
    )
    return o.global_batch // per_step


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (loadable again with load_config)."""
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False, allow_unicode=True)


def field_docs() -> dict[str, str]:
    """`section.field` -> its docstring, read from this module's source (for --help and tests)."""
    docs = {}
    for section, cls in _section_types().items():
        tree = ast.parse(inspect.getsource(cls))
        body = tree.body[0].body
        for node, nxt in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr):
                if isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                    docs[f"{section}.{node.target.id}"] = " ".join(nxt.value.value.split())
    return docs


def help_text() -> str:
    """Every key with its default and docstring, grouped by section."""
    lines, cfg, docs = [], Config(), field_docs()
    for section in SECTIONS:
        lines.append(f"[{section}]")
        for f in dataclasses.fields(getattr(cfg, section)):
            default = getattr(getattr(cfg, section), f.name)
            lines.append(
                f"  {section}.{f.name} = {default!r}\n      {docs.get(f'{section}.{f.name}', '')}"
            )
    return "\n".join(lines)
