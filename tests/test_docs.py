"""Every fenced code block of README.md and docs/*.md runs, as written, on this CPU.

A block is read with the marker comments directly above its fence (no blank line between):

    <!-- test: setup NAME -->         run SETUPS[NAME] first (Python: as a preamble in the same
                                      process; bash: as its own Python process in the same
                                      directory), e.g. to build the tiny objects a snippet names
    <!-- test: append ARGS -->        (bash) append ARGS to every command of the block: the tiny
                                      settings (steps, sizes) of a command that would run for
                                      minutes as written; the command itself is unchanged
    <!-- test: slow REASON -->        ~20 s of CPU or a minute of wall time here (each run prints
                                      its CPU seconds: wall time depends on the load) -> `slow`
    <!-- test: not-runnable REASON -->  the block cannot run on this machine (a GPU cluster, a
                                      multi-minute end-to-end run, the test suite itself); the
                                      reason is required and such blocks must stay few

```python blocks run with this interpreter in a fresh temp directory; ```bash blocks run with
`bash -e -o pipefail` there, with `python` rewritten to this interpreter and the venv's bin first
on PATH. Any other language, an unknown marker, or a block without a runnable path fails.
Subprocesses get one CPU thread and TRITON_INTERPRET unset (so `backend="auto"` picks the kernels'
torch twins on a CPU: the kernels themselves are tested against references elsewhere).
"""

from __future__ import annotations

import os
import re
import resource
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
RUNNABLE = ("python", "bash")
MARKERS = ("setup", "append", "slow", "not-runnable")
MAX_NOT_RUNNABLE = 6  # "few": a growing list means the docs drift away from what is tested
MARK = re.compile(r"^<!--\s*test:\s*([\w-]+)\s*(.*?)\s*-->$")

# The tiny Cohere2 every model-level snippet may use (hidden 32, 2 layers, vocab 64).
_TINY = """
import torch
from r7b_fast.model import build_model, tiny_config

torch.manual_seed(0)
model = build_model(tiny_config(vocab_size=64, hidden_size=32, intermediate_size=64,
                                num_hidden_layers=2, num_attention_heads=2,
                                num_key_value_heads=1, sliding_window=4))
"""
SETUPS = {
    # README "In your own trainer": `hidden` (final hidden states), `model`, shifted `targets`
    "tiny_hidden": _TINY
    + """
hidden = torch.randn(10, model.config.hidden_size)
targets = torch.randint(0, model.config.vocab_size, (10,))
targets[3] = -100
""",
    # two tiny checkpoints `a` and `b` in the working directory, for the merge CLI
    "merge_models": _TINY
    + """
model.save_pretrained("a")
build_model(model.config, seed=1).save_pretrained("b")
""",
}


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    marks: dict = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def read_blocks(path: Path) -> list[Block]:
    """The fenced blocks of one Markdown file with their marker comments."""
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = re.match(r"^```\s*([\w+-]*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        start, j = i, i + 1
        while j < len(lines) and not lines[j].startswith("```"):
            j += 1
        if j == len(lines):
            raise AssertionError(f"{path.name}:{start + 1}: unclosed code fence")
        marks, k = {}, start - 1
        while k >= 0 and (mk := MARK.match(lines[k].strip())):
            assert mk.group(1) not in marks, f"{path.name}:{k + 1}: repeated marker"
            marks[mk.group(1)] = mk.group(2)
            k -= 1
        blocks.append(Block(path, start + 1, m.group(1), "\n".join(lines[start + 1 : j]), marks))
        i = j + 1
    return blocks


ALL = [b for p in DOCS for b in read_blocks(p)]
RUN = [b for b in ALL if "not-runnable" not in b.marks]


def _param(b: Block):
    return pytest.param(b, id=b.id, marks=[pytest.mark.slow] if "slow" in b.marks else [])


def test_every_block_is_runnable_or_says_why_not():
    assert len(ALL) >= 10 and {b.path.name for b in ALL} >= {"README.md", "integrations.md"}
    problems = []
    for b in ALL:
        unknown = set(b.marks) - set(MARKERS)
        if unknown:
            problems.append(f"{b.id}: unknown marker(s) {sorted(unknown)} (known: {MARKERS})")
        reason = b.marks.get("not-runnable")
        if reason is not None:
            if len(reason.split()) < 3:
                problems.append(f"{b.id}: not-runnable needs a reason (a few words)")
            continue
        if b.lang not in RUNNABLE:
            problems.append(f"{b.id}: ```{b.lang} has no runnable path; mark it not-runnable")
        if "setup" in b.marks and b.marks["setup"] not in SETUPS:
            problems.append(f"{b.id}: unknown setup {b.marks['setup']!r}")
        if "append" in b.marks and b.lang != "bash":
            problems.append(f"{b.id}: append is for bash blocks")
        if "slow" in b.marks and not b.marks["slow"]:
            problems.append(f"{b.id}: slow needs a reason (how long, why)")
        if not b.code.strip():
            problems.append(f"{b.id}: empty block")
    assert not problems, "\n".join(problems)
    skipped = [f"{b.id}: {b.marks['not-runnable']}" for b in ALL if "not-runnable" in b.marks]
    print("not runnable here:\n" + "\n".join(skipped))
    assert len(skipped) <= MAX_NOT_RUNNABLE, skipped


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_DISABLED="true",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")  # fmt: skip
    return env


def shell_commands(code: str, append: str = "") -> list[str]:
    """The logical commands of a bash block: continuation lines joined, comment lines and
    trailing ` # comments` dropped, `python` replaced by this interpreter, `append` added."""
    joined = re.sub(r"\s*\\\n\s*", " ", code)
    cmds = []
    for line in joined.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", line).strip()
        if not line:
            continue
        line = re.sub(r"(^|[;&|]\s*)python(?=\s)", lambda m: m.group(1) + sys.executable, line)
        cmds.append(f"{line} {append}".strip())
    return cmds


def _run(argv: list[str], cwd: Path, what: str) -> str:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    r = subprocess.run(argv, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    print(f"{what}: {cpu:.1f} s CPU")  # what `slow` is judged by (wall time depends on load)
    out = (r.stdout + r.stderr)[-4000:]
    assert r.returncode == 0, f"{what} failed (exit {r.returncode}):\n{out}"
    return out


@pytest.mark.parametrize("block", [_param(b) for b in RUN])
def test_block_runs(block: Block, tmp_path):
    setup = SETUPS.get(block.marks.get("setup", ""), "")
    if block.lang == "python":
        script = tmp_path / "block.py"
        script.write_text(f"{setup}\n# --- {block.id}\n{block.code}\n")
        _run([sys.executable, str(script)], tmp_path, block.id)
        return
    if setup:
        (tmp_path / "setup.py").write_text(setup)
        _run([sys.executable, "setup.py"], tmp_path, f"{block.id} setup")
    cmds = shell_commands(block.code, block.marks.get("append", ""))
    assert cmds, f"{block.id}: no command"
    _run(["bash", "-e", "-o", "pipefail", "-c", "\n".join(cmds)], tmp_path, block.id)


def test_shell_commands_rewrites_python_and_appends():
    code = "python -m x a \\\n    b   # note\n# only a comment\ncd d && python -m y\n"
    py = sys.executable
    assert shell_commands(code, "k=1") == [f"{py} -m x a b k=1", f"cd d && {py} -m y k=1"]
    assert shell_commands("torchrun -m python_thing") == ["torchrun -m python_thing"]


def test_read_blocks_takes_the_markers_directly_above(tmp_path):
    md = tmp_path / "x.md"
    md.write_text("<!-- test: slow not this one -->\n\n<!-- test: slow why -->\n"
                  "<!-- test: setup tiny_hidden -->\n```python\nx = 1\n```\n\n```\nplain\n```\n")  # fmt: skip
    got = [(b.lang, b.line, b.code, b.marks) for b in read_blocks(md)]
    assert got == [("python", 5, "x = 1", {"slow": "why", "setup": "tiny_hidden"}),
                   ("", 9, "plain", {})]  # fmt: skip


def test_a_failing_command_fails_the_test(tmp_path):
    with pytest.raises(AssertionError, match=r"(?s)exit 3\).*boom"):
        _run([sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], tmp_path, "x")
