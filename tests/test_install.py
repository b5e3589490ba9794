"""`import r7b_fast.kernels` and `r7b_fast._merge` work after `pip install .`, after
`pip install -e .`, and from the repo root (where the checkout's `r7b_fast/` shadows an installed
copy: the trap of DESIGN.md §2). The package metadata (license, URLs, the core dependencies and
the extras) is read back from a built dist-info and from the installed copy; the core works with
the extras' packages unimportable, and each extra-only feature names its extra."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from email.parser import Parser
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # the `dev` extra brings tomli there
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
CHECK = (
    "import importlib.util, sys, r7b_fast, r7b_fast.kernels, r7b_fast._merge as m;"
    "assert importlib.util.find_spec('r7b_fast.kernels.aot') is not None;"
    "assert 'torch' not in sys.modules, 'importing the package must not import torch';"
    "print(r7b_fast.kernels.__file__); print(m.__file__); print(m.build_info())"
)


def _copy_source(dst: Path) -> Path:
    ignore = shutil.ignore_patterns(
        ".venv", "build", ".git", "*.so", "__pycache__", "*.egg-info", "runs"
    )
    shutil.copytree(REPO, dst, ignore=ignore, symlinks=True)
    return dst


def _venv(path: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    py = path / "bin" / "python"
    # the declared build requirements only (the import check needs neither torch nor triton)
    build = tomllib.loads((REPO / "pyproject.toml").read_text())["build-system"]["requires"]
    subprocess.run([py, "-m", "pip", "install", "-q", *build], check=True)
    return py


def _run(py: Path, cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    r = subprocess.run([py, "-c", CHECK], cwd=cwd, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.slow
@pytest.mark.parametrize("editable", [False, True], ids=["pip-install", "pip-install-e"])
def test_import_after_install(tmp_path, editable):
    src = _copy_source(tmp_path / "src")
    py = _venv(tmp_path / "venv")
    cmd = [py, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation"]
    t0 = time.perf_counter()
    subprocess.run([*cmd, *(["-e"] if editable else []), str(src)], check=True, cwd=tmp_path)
    print(
        f"build+install ({'editable' if editable else 'plain'}): {time.perf_counter() - t0:.1f} s"
    )
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    for cwd in (outside, src):  # installed copy; then the repo root shadowing it
        out = _run(py, cwd)
        assert "simd_paths" in out
        kernels_file = Path(out.splitlines()[0])
        if editable or cwd == src:
            assert kernels_file.resolve().parent == (src / "kernels").resolve()
    installed = subprocess.run(
        [py, "-c", "import importlib.metadata as m; print(m.metadata('r7b-fast').as_string())"],
        cwd=outside, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    _check_metadata(Parser().parsestr(installed))


def test_import_from_repo_root():
    """The development checkout (editable install made by `make`) from cwd = repo."""
    r = subprocess.run([sys.executable, "-c", CHECK], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


# What each extra must bring, and what the core must not: the core is what the kernels,
# `apply_kernels` and the merge CLI import (test_core_works_without_the_extras proves it).
CORE = {"torch", "triton", "transformers", "safetensors", "pyyaml", "tqdm"}
EXTRAS = {
    "train": {"datasets", "tokenizers", "numpy", "tensorboard", "matplotlib"},
    "trl": {"trl", "peft", "accelerate"},
    "dev": {"pytest", "hypothesis", "ruff", "tomli"},
    "peers": {"liger-kernel", "trl", "mergekit"},
    "eval": {"lm-eval"},
    "all": {"r7b-fast"},
}
URLS = {"Homepage", "Repository", "Issues"}


def _name(req: str) -> str:
    return re.split(r"[\s<>=!~;\[(]", req, maxsplit=1)[0].lower().replace("_", "-")


def _check_metadata(meta) -> None:
    """Core-metadata checks shared by the built dist-info and the installed copy."""
    assert meta["Name"] == "r7b-fast"
    assert meta["License-Expression"] == "Apache-2.0"
    assert meta.get_all("License-File") == ["LICENSE"]
    urls = dict(u.split(", ", 1) for u in meta.get_all("Project-URL"))
    assert set(urls) == URLS and all(u.startswith("https://github.com/") for u in urls.values())
    assert "Programming Language :: Python :: 3" in meta.get_all("Classifier")
    assert meta["Keywords"] and "triton" in meta["Keywords"]
    assert set(meta.get_all("Provides-Extra")) == set(EXTRAS)
    core, extras = set(), {e: set() for e in EXTRAS}
    for req in meta.get_all("Requires-Dist"):
        m = re.search(r"extra\s*==\s*['\"](\w+)['\"]", req)
        (extras[m.group(1)] if m else core).add(_name(req))
    assert core == CORE, core
    assert extras == EXTRAS, extras
    (everything,) = [r for r in meta.get_all("Requires-Dist") if _name(r) == "r7b-fast"]
    brings = re.search(r"\[([^\]]*)\]", everything).group(1)  # `all` = the other user extras
    assert set(brings.replace(" ", "").split(",")) == {"train", "trl", "peers", "eval"}


def test_metadata_of_a_built_dist_info(tmp_path):
    """The wheel's metadata as setuptools builds it from this checkout (PEP 517 hook, offline:
    no extension is compiled), plus the LICENSE file it ships."""
    src = _copy_source(tmp_path / "src")
    hook = (
        "import sys; from setuptools import build_meta as b;"
        "print(b.prepare_metadata_for_build_wheel(sys.argv[1]))"
    )
    r = subprocess.run([sys.executable, "-c", hook, str(tmp_path)], cwd=src, capture_output=True,
                       text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    dist_info = tmp_path / r.stdout.strip().splitlines()[-1]
    _check_metadata(Parser().parsestr((dist_info / "METADATA").read_text()))
    shipped = (dist_info / "licenses" / "LICENSE").read_text()
    assert shipped.startswith("Copyright 2026 The r7b-fast authors")
    assert "Apache License" in shipped and "END OF TERMS AND CONDITIONS" in shipped
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert meta["license"] == "Apache-2.0" and meta["license-files"] == ["LICENSE"]


CORE_ONLY = """
import sys, tempfile
from pathlib import Path
BLOCKED = ("datasets", "tensorboard", "matplotlib", "trl", "peft", "accelerate", "liger_kernel",
           "mergekit")
for name in BLOCKED:  # as if not installed: imports fail, importlib.util.find_spec says None
    sys.modules[name] = None
import torch
from r7b_fast.kernels import kernel_calls
from r7b_fast.merge import main
from r7b_fast.model import apply_kernels, build_model, tiny_config

tmp = Path(tempfile.mkdtemp())
cfg = tiny_config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, sliding_window=4)
ids = torch.randint(5, 64, (2, 7))
dirs = []
for seed in (0, 1):
    model = build_model(cfg, seed=seed)
    dirs.append(tmp / f"m{seed}")
    model.save_pretrained(dirs[-1])
apply_kernels(model)
with kernel_calls() as calls:
    loss = model(input_ids=ids, labels=ids).loss
loss.backward()
assert torch.isfinite(loss) and sum(calls.values()) > 0, calls
assert main(["--out", str(tmp / "merged"), "--model", str(dirs[0]),
             "--model", f"{dirs[1]}:0.3"]) == 0
from r7b_fast import eval as ev
from r7b_fast.data.sources import read_records
from r7b_fast.logging import MetricsLogger
(tmp / "rows.jsonl").write_text('{"messages": []}')
for make in (lambda: MetricsLogger(tmp, enabled=True, tensorboard=True, progress_bar=False),
             lambda: ev.plot_accuracy([("base", {"acc/mean": 0.5})], tmp / "a.png"),
             lambda: read_records(tmp / "rows.jsonl")):
    try:
        make()
        raise SystemExit("an extra-only feature ran without its extra")
    except ImportError as e:
        assert "pip install 'r7b-fast[train]'" in str(e), e
print("core ok", sorted(m for m in BLOCKED if sys.modules.get(m) is not None))
"""


def test_core_works_without_the_extras():
    """The core dependencies are enough for the kernels, `apply_kernels` (a patched forward and
    backward that runs our kernels) and the merge CLI: the extras' packages are made
    unimportable in a fresh interpreter. TensorBoard logging, plots and reading data files (the
    `train` extra) then fail with an ImportError that names the extra."""
    r = subprocess.run([sys.executable, "-c", CORE_ONLY], capture_output=True, text=True,
                       timeout=300, cwd=REPO)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "core ok []" in r.stdout
