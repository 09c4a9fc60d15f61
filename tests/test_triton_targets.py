"""Every Triton kernel in kernels/ compiled for real NVIDIA targets (sm_80, sm_89, sm_90, sm_100) without a GPU,
and the native CUDA module built for them where nvcc is present.

The other kernel tests run Triton's interpreter, which accepts what the real compiler rejects (a dot with
K < 16 runs there: test_a_broken_config_fails_naming_it) or compiles badly (spills, shared memory). The
variants are what the launchers really launch (benchmarks/triton_targets.py records them on meta tensors
and specialises them with Triton's own binder), compiled in one process started without TRITON_INTERPRET.
Each run compiles a covering subset, about 20 compilations: every kernel on every target, each dtype, layout,
alignment and autotune config at least once, cheapest first by the committed table's compile times.
ENGINE_KERNEL_TARGETS=all compiles every variant (2448, ~3.5 h of CPU), as `python -m
benchmarks.kernel_resources` does when it writes the table.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("triton")

from benchmarks import triton_targets as tt  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
EVERY = os.environ.get("ENGINE_KERNEL_TARGETS") == "all"
KERNELS = {"_zero_conv_add_kernel", "_combine_kernel", "_gn_stats_kernel", "_gn_silu_apply_kernel"}


@pytest.fixture(scope="module")
def compiler():
    with tt.compiler_process() as pool:
        yield pool


@pytest.mark.parametrize("target", tt.TARGETS, ids=[t.name for t in tt.TARGETS])
def test_kernels_compile_within_limits(target, compiler):
    rows = compiler.submit(tt.compile_selected, target.name, EVERY).result()
    assert rows, f"nothing selected for {target.name}"
    errors = [r["error"] for r in rows if "error" in r]
    assert not errors, "\n\n".join(errors)
    problems = [p for r in rows for p in tt.limit_problems(tt.Compiled(**r)) if tt.known_problem(p, r["config"]) is None]
    assert not problems, "\n".join(problems)


def test_selection_covers_every_kernel_target_dtype_layout_and_autotune_config(compiler):
    coverage = compiler.submit(tt.selection_coverage, EVERY).result()
    assert KERNELS <= set(coverage["all"])
    for kernel, features in coverage["all"].items():
        assert features == coverage["selected"][kernel], (kernel, features - coverage["selected"][kernel])
        assert {("target", t.name) for t in tt.TARGETS} <= features
    assert coverage["pairs"] == {(k, t.name) for k in coverage["all"] for t in tt.TARGETS}


def test_a_broken_config_fails_naming_it(compiler):
    """BLOCK_K=8: the interpreter runs it and gives the right sum; sm_90's tl.dot needs K >= 16."""
    with pytest.raises(tt.KernelCompileError, match=r"_zero_conv_add_kernel \[fp16 .*BLOCK_K=8 .*\] does not "
                                                    r"compile for sm_90"):
        compiler.submit(tt.compile_changed, "sm_90", "_zero_conv_add_kernel", "fp16", {"BLOCK_K": 8}).result()


def test_limits_are_named():
    over = tt.Compiled("_gn_stats_kernel", "fp16 nhwc aligned SPLITS=1", "sm_89", regs=96, spills=8,
                       smem=100 * 1024, seconds=0.1)
    assert tt.limit_problems(over) == [
        "_gn_stats_kernel [fp16 nhwc aligned SPLITS=1] on sm_89: 8 bytes of register spills (96 registers)",
        "_gn_stats_kernel [fp16 nhwc aligned SPLITS=1] on sm_89: 102400 bytes of shared memory, over the 101376 "
        "a block may use",
    ]
    assert all(tt.known_problem(p, over.config) is None for p in tt.limit_problems(over))
    within = tt.Compiled("_gn_stats_kernel", "fp16 nhwc aligned SPLITS=1", "sm_89", 96, 0, 1024, 0.1)
    assert tt.limit_problems(within) == []


def test_known_problems_name_launched_kernels():
    assert {k.kernel for k in tt.KNOWN_PROBLEMS} <= KERNELS
    assert {k.kind for k in tt.KNOWN_PROBLEMS} <= {"spills", "shared memory"}


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc here: the native CUDA module is not built")
def test_native_cuda_module_is_built_for_every_target():
    """Where nvcc is present the install builds kernels/_zero_conv_cuda (setup.py, kernels/build_native.py) and
    only warns when that fails: here that failure fails the suite, as does a module older than its sources or
    one missing a target's code."""
    spec = importlib.util.find_spec("kernels._zero_conv_cuda")
    assert spec is not None, (f"nvcc is at {shutil.which('nvcc')} but the CUDA module was not built: "
                              "`python -m kernels.build_native --verbose` shows why")
    module = Path(spec.origin)
    sources = [p for p in (REPO / "kernels" / "csrc").iterdir() if p.name.startswith("zero_conv_cuda")]
    stale = [p.name for p in sources if p.stat().st_mtime > module.stat().st_mtime]
    assert not stale, f"{module.name} is older than {stale}: rebuild with `python -m kernels.build_native`"
    cuobjdump = Path(importlib.util.find_spec("triton").origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    listing = subprocess.run([str(cuobjdump), "--list-elf", str(module)], capture_output=True, text=True, check=True)
    built = {int(arch) for arch in re.findall(r"\.sm_(\d+)a?\.cubin", listing.stdout)}
    missing = sorted({t.capability for t in tt.TARGETS} - built)
    assert not missing, (f"{module.name} has code for sm_{sorted(built)} but not sm_{missing}: "
                         "CMakeLists.txt's ENGINE_CUDA_ARCHITECTURES must list every target (a build folder "
                         "configured before keeps its cached list: delete build/native and rebuild)")
