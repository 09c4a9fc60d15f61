"""Build the native modules (kernels/_zero_conv_cpu, kernels/_attention_cpu, and kernels/_zero_conv_cuda with
nvcc) via CMake.

    python -m kernels.build_native            # in place, into kernels/
    python -m kernels.build_native --no-cuda  # CPU module only

setup.py loads this file by path (it imports only the standard library) and calls `build()` with
its build_lib folder; any failure there is reported and the install goes on with the torch path.
Needs cmake >= 3.18, a C++17 compiler and pybind11 (`pip install pybind11`).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _pybind11_cmake_dir() -> str:
    try:
        import pybind11
    except ImportError as exc:
        raise RuntimeError("pybind11 is not installed; `pip install pybind11` to build the native kernels") from exc
    return pybind11.get_cmake_dir()


def build(output_dir: str | Path | None = None, build_dir: str | Path | None = None, cuda: bool = True,
          verbose: bool = False, jobs: int | None = None) -> list[Path]:
    """Configure and build with CMake; return the module files written to output_dir (default kernels/).
    jobs: parallel compile jobs (default: every core)."""
    cmake = shutil.which("cmake")
    if cmake is None:
        raise RuntimeError("cmake was not found on PATH; it is needed to build the native kernels")
    output_dir = Path(output_dir or REPO / "kernels").resolve()
    build_dir = Path(build_dir or REPO / "build" / "native").resolve()
    build_dir.mkdir(parents=True, exist_ok=True)
    configure = [
        cmake, "-S", str(REPO), "-B", str(build_dir),
        f"-Dpybind11_DIR={_pybind11_cmake_dir()}",
        f"-DPython_EXECUTABLE={sys.executable}",
        f"-DENGINE_KERNELS_OUTPUT_DIR={output_dir}",
        f"-DENGINE_NATIVE_CUDA={'ON' if cuda else 'OFF'}",
        "-DCMAKE_BUILD_TYPE=Release",
    ]
    if shutil.which("ninja") and not (build_dir / "CMakeCache.txt").exists():
        configure += ["-G", "Ninja"]
    out = None if verbose else subprocess.PIPE
    for cmd in (configure, [cmake, "--build", str(build_dir), "--parallel", str(jobs or os.cpu_count() or 1)]):
        done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[:2])} failed (exit {done.returncode}):\n{done.stdout or ''}")
    return sorted([*output_dir.glob("_zero_conv_*"), *output_dir.glob("_attention_*")])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-cuda", action="store_true", help="build the CPU module only")
    parser.add_argument("--build-dir", default=None, help="CMake build folder (default build/native)")
    parser.add_argument("--verbose", action="store_true", help="show CMake's output")
    args = parser.parse_args()
    for path in build(build_dir=args.build_dir, cuda=not args.no_cuda, verbose=args.verbose):
        print(path)


if __name__ == "__main__":
    main()
