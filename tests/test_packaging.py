"""The source archive round trip, with the README's commands: `python -m build --sdist
--no-isolation` holds every file of the git checkout that the build, tests, benchmarks,
examples and docs read (and nothing built); `pip ... --no-build-isolation <archive>` builds
a wheel from it (CPU kernels only, to keep CI short), which installs and runs from outside
the source tree; a broken install explains itself. About two minutes (the wheel compiles
the CPU kernels)."""

import glob
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Under pytest-xdist one worker runs them all (tests/conftest.py), so the wheel builds once.
pytestmark = pytest.mark.skipif(shutil.which("git") is None or not os.path.exists(os.path.join(ROOT, ".git")),
                                reason="needs the git checkout (the sdist is built from it)")


SDIST_COMMAND = "python -m build --sdist --no-isolation"  # as the README gives it
NOT_SHIPPED = {".ci/run", ".gitignore"}  # the repository's CI and git settings


def _run(args, **kwargs):
    if args[0] == "python":
        args = [sys.executable] + args[1:]
    done = subprocess.run(args, capture_output=True, text=True, **kwargs)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(sdist path, folder the wheel built from the sdist was installed into)."""
    pytest.importorskip("build", reason="python -m build (pip install build)")
    tmp = tmp_path_factory.mktemp("packaging")
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    assert SDIST_COMMAND in readme and "pip install --no-build-isolation dist/rnnfused-0.1.0.tar.gz" in readme
    _run(SDIST_COMMAND.split() + ["--outdir", str(tmp / "dist"), ROOT], cwd=tmp)
    sdist, = glob.glob(str(tmp / "dist" / "rnnfused-*.tar.gz"))
    assert os.path.basename(sdist) == "rnnfused-0.1.0.tar.gz"
    # Unoptimised, and the CPU vector code for one instruction set: this checks what the archive
    # and the wheel hold, and that the extension imports and runs; -O3 would take four of CI's minutes.
    env = dict(os.environ, RNNFUSED_SKIP_CUDA_BUILD="1", RNNFUSED_REQUIRE_CUDA_BUILD="0", RNNFUSED_CXX_OPT="0",
               RNNFUSED_CPU_BASELINE_ONLY="1")
    _run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-w", str(tmp / "wheel"),
          sdist], env=env, cwd=tmp)
    wheel, = glob.glob(str(tmp / "wheel" / "rnnfused-*.whl"))
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(tmp / "site"), wheel])
    return sdist, wheel, tmp / "site"


def test_sdist_holds_every_source_and_nothing_built(installed):
    sdist, _, _ = installed
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    tracked = set(_run(["git", "ls-files"], cwd=ROOT).stdout.split()) - NOT_SHIPPED
    assert tracked <= names, sorted(tracked - names)
    assert {"bench/cli.py", "examples/convert_compile.py", "docs/measurements.md", "Makefile"} <= names
    built = [n for n in names if n.endswith((".so", ".o", ".pyc")) or n.endswith("_build_info.py")]
    assert not built, built


def test_wheel_metadata_names_the_license(installed):
    _, wheel, _ = installed
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(archive.read(n).decode() for n in archive.namelist() if n.endswith("METADATA"))
        names = archive.namelist()
    assert "BSD-3-Clause" in metadata
    assert any(n.endswith("LICENSE") for n in names)


# An editable install of the checkout (make test) would otherwise supply modules missing
# from the installed copy.
_NO_EDITABLE = """
import sys
sys.meta_path = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
"""

_USE = _NO_EDITABLE + """
import torch, rnnfused
assert rnnfused.__file__.startswith(SITE), rnnfused.__file__
assert rnnfused._C.__file__.startswith(SITE), rnnfused._C.__file__
assert rnnfused._C.cpu_element_loops == "baseline", rnnfused._C.cpu_element_loops  # RNNFUSED_CPU_BASELINE_ONLY
m = rnnfused.LSTM(3, 4, num_layers=2, bidirectional=True)
x = torch.randn(5, 2, 3, requires_grad=True)
m(x)[0].sum().backward()
assert x.grad.shape == x.shape
rnnfused.show_config()
"""


def test_installed_wheel_runs_outside_the_source_tree(installed, tmp_path):
    _, _, site = installed
    done = _run([sys.executable, "-c", f"SITE = {str(site)!r}\n" + _USE], cwd=tmp_path,
                env=dict(os.environ, PYTHONPATH=str(site)))
    assert "built with torch" in done.stdout and "CPU element loops" in done.stdout


def test_a_broken_install_names_both_torches_and_the_fix(installed, tmp_path):
    """Simulates the commonest failure: torch changed since the build (recorded version
    differs) and the extension no longer loads (here: removed)."""
    _, _, site = installed
    broken = tmp_path / "site"
    shutil.copytree(site, broken)
    info = broken / "rnnfused" / "_build_info.py"
    info.write_text(info.read_text().replace("TORCH_VERSION = ", "TORCH_VERSION = '1.0.0'  # was "))
    env = dict(os.environ, PYTHONPATH=str(broken))
    warned = _run([sys.executable, "-W", "always", "-c", _NO_EDITABLE + "import rnnfused"], cwd=tmp_path, env=env)
    assert "built for torch 1.0.0" in warned.stderr
    for extension in glob.glob(str(broken / "rnnfused" / "_C*")):
        os.remove(extension)
    failed = subprocess.run([sys.executable, "-c", _NO_EDITABLE + "import rnnfused"], capture_output=True, text=True,
                            cwd=tmp_path, env=env)
    assert failed.returncode != 0
    message = failed.stderr.strip().splitlines()[-1]
    assert message.startswith("ImportError: rnnfused was built for torch 1.0.0 but torch ")
    assert "pip install --no-build-isolation --force-reinstall --no-deps ." in message
