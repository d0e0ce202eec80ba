"""The AVX2, AVX-VNNI and AVX-512 VNNI kernel paths on any x86 CPU, through SIMDe emulation.

test_kernels_cpu.py and test_fused_linear_cpu.py run the paths this CPU has natively (every
one on an AVX-512 VNNI machine with AVX-VNNI, only scalar and avx2 on an AVX2-only one). This
builds tests/emulated/harness.cc against the kernel headers (bitnet_jax/kernels/cpu/
ternary_paths.h, ternary_gemm.h, int8_cpu.h, int8_gemm.h, quantize_cpu.h, isa.h) with SIMDe's
portable intrinsics (Debian's libsimde-dev; tests/emulated/immintrin.h maps the Intel names)
and no target attributes, so every path runs on any x86 CPU, and checks the ternary and int8
kernels (GEMV at M = 1, GEMM at M >= 2) against the portable path bit for bit on shapes with
column tails, token remainders and row counts that are not whole GEMM blocks, each over all
rows and split in two at an odd row, and the fused linear's activation quantisation (codes and
absmax) on rows with ties and column tails. tests/emulated/attention_harness.cc does the same
for the attention units (attention_cpu.h, attention_avx2.h, attention_prefill.h: the AVX2 and
AVX-512 paths against the portable one, decode and prefill, float32 / float16 / bfloat16 /
int8-row caches), to a float tolerance.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent / "emulated"
SIMDE = Path("/usr/include/simde/x86/avx512.h")


def _run_harness(tmp_path, source: str, defines: list[str]) -> str:
    """Build tests/emulated/`source` with SIMDe and no target attributes; run it; its stdout."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler on PATH")
    if not SIMDE.is_file():
        pytest.skip(f"SIMDe headers not found ({SIMDE}); apt install libsimde-dev")
    exe = tmp_path / "harness"
    build = [cxx, "-std=c++17", "-O1", *defines,
             "-I", str(HERE), "-I", str(ROOT / "bitnet_jax" / "kernels" / "cpu"),
             str(HERE / source), "-o", str(exe)]
    built = subprocess.run(build, capture_output=True, text=True, timeout=300, check=False)
    assert built.returncode == 0, f"{' '.join(build)}\n{built.stderr[-4000:]}"
    out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


@pytest.mark.slow
def test_every_isa_path_matches_the_portable_one(tmp_path):
    out = _run_harness(tmp_path, "harness.cc",
                       ["-DBITNET_AVX2=", "-DBITNET_AVXVNNI=", "-DBITNET_AVX512="])
    # 12 shapes x 3 SIMD paths x 2 kernels x (all rows, rows split in two).
    assert "152/152 emulated cases agree" in out, out


@pytest.mark.slow
def test_every_attention_path_matches_the_portable_one(tmp_path):
    out = _run_harness(tmp_path, "attention_harness.cc",
                       ["-DBITNET_ATTN_TARGET=", "-DBITNET_ATTN_TARGET512="])
    # 6 shapes x 4 cache types x (AVX2, AVX-512).
    assert "48/48 emulated attention cases agree" in out, out
