"""The CPU kernels for every vector code path `simd.h` has (AVX-512, AVX2 + FMA, portable loops),
not only the one this CPU's `-march=native` picks: each is built (`LENGTHWISE_CPU_MARCH`) into its
own cache and runs test_cpu_decode's GEMM, 4-bit, fused-step and LoRA comparisons and
test_ops_attention's kernel ones (every KV cache dtype) against torch in a subprocess. A path
this CPU cannot execute is skipped, saying so; the native one is what the rest of the suite runs."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from lengthwise.ops import cpu as cpu_kernels

ROOT = Path(__file__).resolve().parents[1]
# isa -> (gcc -march, the /proc/cpuinfo flags a CPU needs to run it)
TARGETS = {"portable": ("x86-64", ()), "avx2": ("x86-64-v3", ("avx2", "fma")),
           "avx512": ("x86-64-v4", ("avx512f", "avx512bw", "avx512vl"))}
SUBSET = ("test_panel_packed_linear_matches_f_linear or test_int4_groups_that_straddle_k_blocks "
          "or test_fused_step_matches_op_by_op or test_fused_step_over_a_narrow_kv_cache "
          "or test_fused_step_with_lora_adapters "
          "or test_cpu_kernel or test_prompt_and_response_segments_one_softmax")


def _cpu_flags() -> set[str]:
    try:
        line = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags"))
    except (OSError, StopIteration):
        return set()
    return set(line.split(":", 1)[1].split())


@pytest.mark.parametrize("isa", list(TARGETS))
def test_kernels_of_each_instruction_set_match_torch(isa, tmp_path):
    march, needs = TARGETS[isa]
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip(f"the -march targets here are x86-64's; this machine is {platform.machine()}")
    missing = [f for f in needs if f not in _cpu_flags()]
    if missing:
        pytest.skip(f"this CPU lacks {', '.join(missing)}: the {isa} build cannot run here")
    if cpu_kernels.segment_attention_kernel() is None:
        pytest.skip("no C++ compiler here: the kernels cannot be built at all (the torch reference runs)")
    if cpu_kernels.simd_isa() == isa:
        pytest.skip(f"{isa} is this CPU's native build, which the rest of the suite runs")
    env = {**os.environ, "LENGTHWISE_CPU_MARCH": march, "LENGTHWISE_CACHE": str(tmp_path)}
    built = subprocess.run([sys.executable, "-c", "from lengthwise.ops.cpu import simd_isa; print(simd_isa())"],
                           env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert built.stdout.strip() == isa, built.stderr[-2000:]
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                          str(ROOT / "tests" / "test_cpu_decode.py"), str(ROOT / "tests" / "test_ops_attention.py"),
                          "-k", SUBSET],
                         env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-3000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout, run.stdout[-500:]
