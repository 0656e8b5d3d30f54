"""setup.py's choice of GPU architectures: RNNFUSED_CUDA_ARCHS, else TORCH_CUDA_ARCH_LIST
(as every PyTorch extension reads it), else the default; unreadable entries are refused.
setup.py is loaded in a subprocess with setuptools.setup stubbed out (nothing is built)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_PROBE = """
import json, os, sys
import setuptools
setuptools.setup = lambda **kwargs: None
sys.argv = ["setup.py"]
namespace = {"__file__": os.path.join(ROOT, "setup.py"), "__name__": "setup_probe"}
exec(compile(open(namespace["__file__"]).read(), "setup.py", "exec"), namespace)
out = []
for case in json.loads(sys.argv_cases):
    for name in ("RNNFUSED_CUDA_ARCHS", "TORCH_CUDA_ARCH_LIST"):
        os.environ.pop(name, None)
    os.environ.update(case)
    try:
        archs, source = namespace["cuda_archs"]()
        out.append([archs, source, namespace["arch_flags"]()])
    except SystemExit as error:
        out.append(str(error))
print(json.dumps(out))
"""


def _probe(cases):
    code = f"ROOT = {ROOT!r}\nimport sys\nsys.argv_cases = {json.dumps(json.dumps(cases))}\n" + _PROBE
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env=dict(os.environ, RNNFUSED_SKIP_CUDA_BUILD="1", RNNFUSED_REQUIRE_CUDA_BUILD="0"))
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_which_variable_decides():
    default, torch_list, ours, both, spaces, suffix = _probe([
        {}, {"TORCH_CUDA_ARCH_LIST": "8.6;9.0+PTX"}, {"RNNFUSED_CUDA_ARCHS": "75"},
        {"RNNFUSED_CUDA_ARCHS": "90", "TORCH_CUDA_ARCH_LIST": "8.0"}, {"TORCH_CUDA_ARCH_LIST": "7.5 8.0  8.9"},
        {"TORCH_CUDA_ARCH_LIST": "9.0a"}])
    assert default[:2] == [["80", "90+PTX"], "default"]
    assert default[2] == ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
                          "-gencode", "arch=compute_90,code=compute_90"]
    assert torch_list[:2] == [["86", "90+PTX"], "TORCH_CUDA_ARCH_LIST"]
    assert ours[:2] == [["75"], "RNNFUSED_CUDA_ARCHS"]
    assert both[:2] == [["90"], "RNNFUSED_CUDA_ARCHS"]  # ours overrides torch's
    assert spaces[0] == ["75", "80", "89"]
    assert suffix[2] == ["-gencode", "arch=compute_90a,code=sm_90a"]


def test_unreadable_entries_are_refused():
    named, empty = _probe([{"TORCH_CUDA_ARCH_LIST": "Ampere;9.0"}, {"RNNFUSED_CUDA_ARCHS": ";;"}])
    assert named == ("rnnfused: TORCH_CUDA_ARCH_LIST='Ampere;9.0': cannot read 'Ampere' as a compute capability; "
                     'write e.g. "8.0;9.0+PTX" or "80;90"')
    assert empty == "rnnfused: RNNFUSED_CUDA_ARCHS=';;' names no compute capability"
