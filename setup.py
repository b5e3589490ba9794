"""Build: setuptools drives CMake for the C++ merge engine (csrc/ -> r7b_fast._merge) and maps
the top-level kernels/ folder onto the subpackage r7b_fast.kernels."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _cmake() -> str:
    """The cmake executable: on PATH (an isolated build puts the `cmake` build requirement's
    script there), else the PyPI `cmake` package's own binary (a --no-build-isolation build in
    an environment that has the package but not its script on PATH)."""
    found = shutil.which("cmake")
    if found is None:
        try:
            import cmake  # the PyPI package (pyproject's build requirement)

            found = str(Path(cmake.CMAKE_BIN_DIR) / "cmake")
        except ImportError:
            pass
    if found is None:
        raise RuntimeError(
            "r7b-fast needs CMake >= 3.18 to build its C++ merge engine: `pip install cmake` "
            "or a system cmake on PATH"
        )
    return found


class CMakeExtension(Extension):
    def __init__(self, name: str, sourcedir: Path):
        super().__init__(name, sources=[])
        self.sourcedir = str(sourcedir)


class CMakeBuild(build_ext):
    def build_extension(self, ext: CMakeExtension) -> None:
        import pybind11

        cmake = _cmake()
        out = Path(self.get_ext_fullpath(ext.name)).resolve()
        out.parent.mkdir(parents=True, exist_ok=True)
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        cfg = "Debug" if self.debug else "Release"
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out.parent}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={cfg}",
        ]
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
        subprocess.run([cmake, ext.sourcedir, *args], cwd=build_dir, check=True)
        subprocess.run([cmake, "--build", ".", "-j", jobs], cwd=build_dir, check=True)


setup(
    packages=["r7b_fast", "r7b_fast.data", "r7b_fast.kernels"],
    package_dir={"r7b_fast": "r7b_fast", "r7b_fast.kernels": "kernels"},
    ext_modules=[CMakeExtension("r7b_fast._merge", ROOT)],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
