"""csrc/cpu/convert.h: the CPU element loops' float16 / bfloat16 conversions, branch-free so
that they vectorise, must be c10's bit for bit. tests/cpp/convert_bits.cpp checks every
input; this compiles and runs it."""

import pathlib
import shutil
import subprocess

import pytest
from torch.utils.cpp_extension import include_paths

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("c++") is None, reason="needs a C++ compiler")
def test_every_conversion_matches_c10(tmp_path):
    program = tmp_path / "convert_bits"
    # The extension's floating-point flags (setup.py), which the conversions must survive.
    flags = ["-std=c++17", "-O3", "-fno-trapping-math", "-fno-math-errno"]
    includes = [f"-I{ROOT / 'csrc'}"] + [f"-I{path}" for path in include_paths()]
    subprocess.run(["c++", *flags, *includes, str(ROOT / "tests/cpp/convert_bits.cpp"), "-o", str(program)],
                   check=True, capture_output=True, text=True)
    result = subprocess.run([str(program)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
    assert result.stdout.strip().endswith("0 mismatches")
