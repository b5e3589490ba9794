"""`import r7b_fast.kernels` and `r7b_fast._merge` work after `pip install .`, after
`pip install -e .`, and from the repo root (where the checkout's `r7b_fast/` shadows an installed
copy: the trap of DESIGN.md §2)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

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
    # build requirements only (the import check needs neither torch nor triton)
    subprocess.run(
        [py, "-m", "pip", "install", "-q", "setuptools>=64", "wheel", "pybind11>=2.12"], check=True
    )
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


def test_import_from_repo_root():
    """The development checkout (editable install made by `make`) from cwd = repo."""
    r = subprocess.run([sys.executable, "-c", CHECK], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
