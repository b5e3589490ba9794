"""A run directory belongs to one run: its fingerprint, its lock, and the checks made before
anything in it changes.

Fingerprint (`fingerprint`, stored in `out/run.json`): a flat mapping of dotted keys to the
values that determine the trained result: every config key except the result-neutral ones
(`NEUTRAL`: output dir, threads, device, kernel/attention implementation, activation
checkpointing, torch.compile, checkpointing,
FSDP resharding and gradient accumulation scheme, the AdamW implementation, logging and
held-out eval cadence, debug aids, this module's own switches), with `model.path` resolved to an
absolute directory, plus identities of the inputs: `model.path:weights` (config.json and the
weight files' names, sizes and mtimes), `data.train:content` (each file's sha256 if small,
else size + mtime), `data.synthetic:version` (the generator's cache key) and
`data.tokenizer:files` (the tokenizer files' sha256, or the embedded tokenizer's version).

`check(cfg, fp)` decides, before anything in the directory is touched, what a run does there:

    fresh      no previous run (or nothing trained yet): start from step 0
    resume     same fingerprint (or only `run.allow_changes` keys differ): latest checkpoint
    done       done.json and the same fingerprint: nothing to do (exit 0, dir untouched)
    overwrite  run.overwrite=true: the previous run's files are removed, then fresh

and raises ConfigError naming every differing key (old -> new) otherwise, including
`checkpoint.resume=false` into a directory holding a previous run. `commit(...)` then applies
the decision (removals, config.yaml, run.json) once the data and model are validated.

The trainer's order (r7b_fast.train.run): resolve `model.path` (`resolve_model_path`), load the
tokenizer (`tokenizer_source`), `check_model`, `lock_and_check`, build the data rows (events
held by `Deferred`), then `commit`; a finished run with the same fingerprint stops at
`already_done`. A deliberate change is listed in `run.allow_changes` (`allowed`).

Lock (`RunLock`): `out/.lock`, an fcntl.flock held by the live trainer (rank 0 only) for its
whole run; it records pid, host and start time for the refusal message. The kernel drops a
flock when its process dies, so a lock left by a killed trainer is taken over silently.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

from r7b_fast.config import Config, ConfigError, save_config, to_dict

RUN_JSON = "run.json"
LOCK = ".lock"
# Config keys (or whole sections, "section.") that do not change the trained weights.
NEUTRAL = (
    "run.output_dir", "run.cpu_threads", "run.device", "run.allow_changes", "run.overwrite",
    "model.kernel_backend", "model.attention", "model.activation_checkpointing",
    "model.activation_checkpointing_every", "model.compile",
    "checkpoint.", "logging.", "debug.", "eval.", "data.eval",  # held-out measurement only
    # Same update to fp32 rounding (reduce-scatter per micro-batch or once, resharding, the
    # AdamW kernel): a memory/speed choice, free to change on resume.
    "fsdp.", "optim.implementation",
    # Where the sampling parameters live (gathered once per round or per forward): the same
    # samples (tested bit-identical over 2 ranks); online.cache/batch_size stay (bf16 rounding).
    "online.gather_for_sampling",
)  # fmt: skip
# What a fresh start (run.overwrite, or a run that never checkpointed) removes: the run's own
# files only, never anything else a user keeps in the directory.
RUN_FILES = ("config.yaml", RUN_JSON, "metrics.jsonl", "tb", "checkpoints", "hf", "hf.tmp",
             "data", "reference", "online", "done.json", "done.json.tmp")  # fmt: skip
# Derived state that depends on the model and data (reference log-probs, on-policy pairs):
# recomputed when a deliberate change touches model.* or data.*.
DERIVED = ("reference", "online")
SMALL_FILE = 8 << 20  # hash the content of files up to 8 MiB; larger: size + mtime
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja")  # fmt: skip


# ----------------------------------------------------------------------------- model path


def resolve_model_path(path: str) -> str:
    """`model.path` as a checkpoint directory: `tiny` as is; a finished run directory (done.json
    and hf/) becomes its `hf/`; a directory without config.json is a ConfigError."""
    if path == "tiny":
        return path
    p = Path(path)
    if (p / "done.json").is_file() and (p / "hf" / "config.json").is_file():
        p = p / "hf"
    if not (p / "config.json").is_file():
        hint = " (a run directory without hf/: did the run finish with checkpoint.export_hf?)"
        raise ConfigError(
            f"model.path: {path} has no config.json: give an HF checkpoint directory or a "
            "finished run directory" + (hint if (p / "checkpoints").is_dir() else "")
        )
    return str(p.resolve())


def tokenizer_source(cfg: Config) -> str:
    """`embedded` or a tokenizer directory, for `data.tokenizer` (`auto` = the checkpoint's
    own; the embedded tokenizer only for model.path=tiny)."""
    choice = cfg.data.tokenizer
    if choice != "auto":
        return choice
    if cfg.model.path == "tiny":
        return "embedded"
    path = resolve_model_path(cfg.model.path)
    if any((Path(path) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return path
    raise ConfigError(
        f"data.tokenizer: auto, but model.path {cfg.model.path} has no tokenizer files "
        "(tokenizer.json / tokenizer_config.json): pass data.tokenizer=<tokenizer dir> (the "
        "base model's), or data.tokenizer=embedded for the embedded 1024-token demo tokenizer"
    )


# ----------------------------------------------------------------------------- fingerprint


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _file_identity(p: Path) -> str:
    st = p.stat()
    if st.st_size <= SMALL_FILE:
        return f"{p.name}:sha256:{_sha(p.read_bytes())}"
    return f"{p.name}:size:{st.st_size}:mtime:{st.st_mtime_ns}"


def data_identity(paths: list[str]) -> list[str]:
    """One identity per `data.train` entry (a directory: every file under it, sorted)."""
    out = []
    for raw in paths:
        p = Path(raw)
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        out.append(_sha("\n".join(_file_identity(f) for f in files).encode()))
    return out


def model_identity(path: str) -> str:
    """config.json's content and each weight file's name, size and mtime (cheap: no weights
    are read; a rewritten export gets a new mtime)."""
    p = Path(path)
    parts = [(p / "config.json").read_text()]
    for f in sorted(p.iterdir()):
        if f.suffix in (".safetensors", ".bin", ".pt") or f.name.endswith(".index.json"):
            st = f.stat()
            parts.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
    return _sha("\n".join(parts).encode())


def tokenizer_identity(source: str) -> str:
    from r7b_fast.data.tokenizer import TOKENIZER_VERSION

    if source == "embedded":
        return f"embedded-v{TOKENIZER_VERSION}"
    p = Path(source)
    parts = [f"{n}:{_sha((p / n).read_bytes())}" for n in TOKENIZER_FILES if (p / n).is_file()]
    return _sha("\n".join(parts).encode())


def neutral(key: str) -> bool:
    return any(key == n or (n.endswith(".") and key.startswith(n)) for n in NEUTRAL)


def fingerprint(cfg: Config) -> dict:
    """What determines this run's result (see the module doc). `cfg.model.path` must already be
    resolved (resolve_model_path)."""
    from r7b_fast.data.tokenizer import TOKENIZER_VERSION

    fp = {}
    for section, values in to_dict(cfg).items():
        for k, v in values.items():
            key = f"{section}.{k}"
            if not neutral(key):
                fp[key] = v
    if cfg.model.path != "tiny":
        fp["model.path:weights"] = model_identity(cfg.model.path)
    if cfg.data.train:
        fp["data.train"] = [str(Path(p).resolve()) for p in cfg.data.train]
        fp["data.train:content"] = data_identity(cfg.data.train)
    else:
        fp["data.synthetic:version"] = TOKENIZER_VERSION
    fp["data.tokenizer:files"] = tokenizer_identity(tokenizer_source(cfg))
    return json.loads(json.dumps(fp, default=str))  # as stored: comparable with run.json's


def allowed(key: str, allow: list[str]) -> bool:
    """`key` may differ: listed, `*`, or its base key listed (`data.train` allows
    `data.train:content`)."""
    return "*" in allow or key in allow or key.split(":")[0] in allow


def diff(old: dict, new: dict) -> dict[str, tuple]:
    """key -> (old, new) for every key whose value differs (None = absent)."""
    return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k)}  # fmt: skip


# ----------------------------------------------------------------------------- the decision


def _short(v) -> str:
    s = json.dumps(v, ensure_ascii=False, default=str)
    return s if len(s) <= 80 else s[:77] + "..."


def previous_run(out: Path) -> dict:
    """What the directory holds of an earlier run."""
    from r7b_fast.checkpoint import latest

    run_json = out / RUN_JSON
    return {
        "record": json.loads(run_json.read_text()) if run_json.is_file() else None,
        "checkpoint": latest(out / "checkpoints"),
        "done": (out / "done.json").is_file(),
        "any": any((out / n).exists() for n in RUN_FILES),
    }


def check(cfg: Config, fp: dict) -> dict:
    """The decision for this run in `run.output_dir` (module doc); reads only. Returns
    {"mode": fresh|resume|done|overwrite, "changes": {key: (old, new)}}."""
    out, r = Path(cfg.run.output_dir), cfg.run
    prev = previous_run(out) if out.is_dir() else {"any": False}
    if r.overwrite or not prev["any"]:
        return {"mode": "overwrite" if prev["any"] else "fresh", "changes": {}}
    trained = prev["checkpoint"] is not None or prev["done"]
    if not cfg.checkpoint.resume and trained:
        raise ConfigError(
            f"checkpoint.resume: false, but {out} holds a previous run "
            f"({'done.json' if prev['done'] else prev['checkpoint'].name}): pass "
            "run.overwrite=true to delete it and start fresh, or another run.output_dir"
        )
    if prev["record"] is None:
        if not trained:  # an attempt that never checkpointed: nothing to keep
            return {"mode": "overwrite", "changes": {}}
        if "*" not in r.allow_changes:
            raise ConfigError(
                f"run.output_dir: {out} holds a run without {RUN_JSON} (an older r7b_fast): its "
                "config cannot be compared. Pass run.overwrite=true to start fresh, or "
                "run.allow_changes=['*'] to continue it with this config"
            )
    changes = diff(prev["record"]["fingerprint"], fp) if prev["record"] else {}
    refused = {k: v for k, v in changes.items() if not allowed(k, r.allow_changes)}
    if refused and trained:
        lines = "; ".join(f"{k}: {_short(a)} -> {_short(b)}" for k, (a, b) in refused.items())
        raise ConfigError(
            f"run.output_dir: {out} belongs to a run with another config ({lines}). Use another "
            f"run.output_dir, pass run.allow_changes=[{','.join(refused)}] to continue this run "
            "with the change, or run.overwrite=true to start fresh"
        )
    if not trained:
        return {"mode": "overwrite", "changes": {}}
    if prev["done"] and not changes:
        return {"mode": "done", "changes": {}}
    if prev["done"] and prev["checkpoint"] is None:
        raise ConfigError(
            f"run.allow_changes: {out} is finished and kept no checkpoint to continue from "
            "(checkpoint.keep_after_done=0): pass run.overwrite=true to retrain from scratch"
        )
    return {"mode": "resume", "changes": changes}


def commit(cfg: Config, fp: dict, decision: dict) -> None:
    """Apply `decision` to the directory (rank 0, after the data and model were validated):
    remove a previous run for overwrite, derived state for model/data changes, done.json when
    continuing; write config.yaml and run.json (with the history of deliberate changes)."""
    out = Path(cfg.run.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    changes = decision["changes"]
    if decision["mode"] == "overwrite":  # data/: already (re)generated for this run
        for name in RUN_FILES:
            if name != "data":
                _remove(out / name)
    if any(k.startswith(("model.", "data.")) for k in changes):
        for name in DERIVED:
            _remove(out / name)
    (out / "done.json").unlink(missing_ok=True)
    save_config(cfg, out / "config.yaml")
    old = json.loads((out / RUN_JSON).read_text()) if (out / RUN_JSON).is_file() else {}
    history = old.get("changes", [])
    if changes:
        history.append({"time": time.time(), "changes": {k: list(v) for k, v in changes.items()}})
    record = {"stage": cfg.run.stage, "fingerprint": fp, "changes": history}
    tmp = out / f"{RUN_JSON}.tmp"
    tmp.write_text(json.dumps(record, indent=1, ensure_ascii=False, default=str))
    os.replace(tmp, out / RUN_JSON)


def _remove(p: Path) -> None:
    if p.is_dir():
        shutil.rmtree(p)
    else:
        p.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- the trainer's steps


def check_model(cfg: Config, tokenizer) -> None:
    """The model's config (not its weights) against the tokenizer, before the run dir changes."""
    from transformers import AutoConfig

    from r7b_fast.model import SUPPORTED_MODEL_TYPES, tiny_config

    if cfg.model.path == "tiny":
        config = tiny_config(**cfg.model.tiny_overrides)
    else:
        config = AutoConfig.from_pretrained(cfg.model.path)
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(f"model.path: {cfg.model.path} is a {config.model_type!r} model; "
                              f"supported: {sorted(SUPPORTED_MODEL_TYPES)}")  # fmt: skip
    if len(tokenizer) > config.vocab_size:
        raise ConfigError(f"data.tokenizer: {len(tokenizer)} tokens > model vocab "
                          f"{config.vocab_size}")  # fmt: skip


def lock_and_check(cfg: Config, dist):
    """(decision, lock): rank 0 locks run.output_dir and compares fingerprints (`check`:
    nothing in the directory changes); every rank gets the decision (with the fingerprint) or
    raises the same ConfigError. The lock (rank 0; None elsewhere) is held until the run ends."""
    from r7b_fast.distributed import broadcast_object

    lock, result = None, None
    if dist.is_main:
        try:
            lock = RunLock(Path(cfg.run.output_dir))
            fp = fingerprint(cfg)
            result = {**check(cfg, fp), "fingerprint": fp}
        except ConfigError as e:
            result = e
    result = broadcast_object(result, dist)
    if isinstance(result, ConfigError):
        if lock is not None:
            lock.release()
        raise result
    return result, lock


class Deferred:
    """Collects the data loader's events until the run directory may be written (replayed into
    the metrics log afterwards); user messages print at once (rank 0)."""

    def __init__(self, dist):
        self.events, self.dist = [], dist

    def event(self, name: str, **fields) -> None:
        self.events.append((name, fields))

    def message(self, text: str) -> None:
        if self.dist.is_main:
            print(text, file=sys.stderr, flush=True)


def already_done(out: Path, dist) -> dict:
    """A finished run with the same fingerprint: nothing is retrained or rewritten."""
    done = json.loads((out / "done.json").read_text())
    if dist.is_main:
        print(f"r7b_fast.train: {out} is already done ({done.get('steps')} steps, same config); "
              "nothing to do", file=sys.stderr)  # fmt: skip
    return {"steps": done.get("steps"), "metrics": done.get("final", {}), "already_done": True}


# ----------------------------------------------------------------------------- the lock


class RunLock:
    """An exclusive flock on `out/.lock` for the life of this object's process (see module doc).

    The file is opened without truncation and written only once the lock is held, so a refused
    second trainer changes nothing in the directory."""

    def __init__(self, out: Path):
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / LOCK
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 4096, 0).decode(errors="replace").strip()
            os.close(self._fd)
            raise ConfigError(
                f"run.output_dir: {out} is in use by another trainer ({holder or 'unknown pid'}); "
                "wait for it to finish or stop it (a killed trainer's lock is released "
                "automatically)"
            ) from None

    def record(self) -> None:
        """Write this process's pid, host and start time into the held lock file."""
        info = f"pid {os.getpid()} on {socket.gethostname()} since {time.ctime()}\n"
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, info.encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


# ----------------------------------------------------------------------------- child processes

# Runs before the real command, then exec()s it (same pid): the death signal survives exec, and
# nothing runs between fork and exec in the parent's image (a preexec_fn is unsafe with threads).
_TIE = ("import ctypes,os,sys;ctypes.CDLL(None).prctl(1,int(sys.argv[1]),0,0,0);"
        "os.getppid()==int(sys.argv[2]) or os._exit(128+int(sys.argv[1]));"
        "os.execvp(sys.argv[3],sys.argv[3:])")  # fmt: skip


def die_with_parent(cmd: list[str], sig: int = signal.SIGTERM) -> list[str]:
    """`cmd` wrapped so that, on Linux, the child receives `sig` when this process dies, even by
    SIGKILL (prctl PR_SET_PDEATHSIG, set by a tiny Python prologue that then execs `cmd`). SIGTERM
    lets torchrun stop its workers; a plain trainer dies of it. Elsewhere: `cmd` unchanged (and a
    one-time warning): children may outlive us."""
    if not sys.platform.startswith("linux"):
        _warn_once("child processes are not tied to this process outside Linux")
        return list(cmd)
    return [sys.executable, "-c", _TIE, str(int(sig)), str(os.getpid()), *cmd]


_WARNED: set[str] = set()


def _warn_once(text: str) -> None:
    if text not in _WARNED:
        _WARNED.add(text)
        print(f"r7b_fast: warning: {text}", file=sys.stderr)
