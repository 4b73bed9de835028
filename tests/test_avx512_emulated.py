"""The AVX-512 kernels, checked on any x86-64 through SIMDe's portable intrinsics.

The development and CI machines may lack AVX-512, so tests/native/avx512_emulated.cpp
compiles csrc/cpu/kernels_avx512.cpp against SIMDe and compares both of its backends with
the scalar kernels bit for bit over odd shapes and activation widths.
"""

import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SIMDE_HEADER = pathlib.Path("/usr/include/simde/x86/avx512.h")


@pytest.mark.skipif(not SIMDE_HEADER.exists(), reason="SIMDe headers missing: apt-get install libsimde-dev")
@pytest.mark.skipif(shutil.which("g++") is None, reason="no g++ to build the emulated kernels")
def test_avx512_kernels_match_scalar_under_emulation(tmp_path):
    exe = tmp_path / "avx512_emulated"
    sources = [
        ROOT / "tests/native/avx512_emulated.cpp",
        ROOT / "csrc/cpu/kernels_avx512.cpp",
        ROOT / "csrc/cpu/kernels_scalar.cpp",
    ]
    subprocess.run(
        [
            "g++",
            "-O1",
            "-std=c++17",
            "-Wno-psabi",
            "-DAF_SIMDE",
            f"-I{ROOT / 'csrc'}",
            *map(str, sources),
            "-o",
            str(exe),
        ],
        check=True,
    )
    result = subprocess.run([str(exe)], capture_output=True, text=True)
    assert result.returncode == 0 and " 0 failed" in result.stdout, result.stdout + result.stderr
