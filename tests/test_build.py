"""What was built: CI sets RNNFUSED_REQUIRE_CUDA_BUILD, so a CUDA kernel that does not
compile, or a silent fall-back to a CPU-only build, fails the run."""

import os

import pytest

import rnnfused

pytestmark = pytest.mark.build


def test_backends_reported():
    assert rnnfused.backends()[0] == "cpu"
    assert set(rnnfused.backends()) <= {"cpu", "cuda"}


@pytest.mark.skipif(os.environ.get("RNNFUSED_REQUIRE_CUDA_BUILD") != "1",
                    reason="only when the CUDA build is required (CI)")
def test_cuda_kernels_were_built():
    assert "cuda" in rnnfused.backends()
    assert rnnfused._C.cuda_archs  # e.g. "8.0, 9.0"
