"""Builds rnnfused._C against the installed torch (install with --no-build-isolation).

CPU kernels are always built. CUDA kernels are built when torch is a CUDA build and a CUDA
toolkit (nvcc) is found; otherwise the extension is CPU-only and says so at build time.

Environment:
  RNNFUSED_SKIP_CUDA_BUILD=1    build the CPU extension only
  RNNFUSED_REQUIRE_CUDA_BUILD=1 fail instead of falling back to a CPU-only build (CI)
  RNNFUSED_CUDA_ARCHS="80;90+PTX"  compute capabilities to compile for; "+PTX" also embeds PTX,
                                which newer GPUs run through the driver's JIT
  TORCH_CUDA_ARCH_LIST          the same, as every PyTorch extension reads it ("8.0 9.0+PTX"),
                                used when RNNFUSED_CUDA_ARCHS is not set; neither set: "80;90+PTX"
  RNNFUSED_PHASE_TIMING=1       time the phases of the persistent kernel on the GPU (a -D define;
                                python -m bench.phases reads the times). Off: no timing code at all
  MAX_JOBS                      parallel compile jobs (default: from cores and free memory)
  RNNFUSED_CXX_OPT=0            the C++ sources' optimisation level (0 to 3; default 3). 0 builds in
                                a fraction of the time and runs slowly: for checking packaging
  RNNFUSED_CPU_BASELINE_ONLY=1  the CPU vector code for the baseline instruction set only, not also
                                for AVX2 and AVX-512 (picked at run time): builds in about half the
                                time, runs the baseline code on any CPU
"""

import glob
import hashlib
import os
import shutil

from setuptools import find_packages, setup


def find_cuda_home():
    """The CUDA toolkit folder: $CUDA_HOME or $CUDA_PATH, else the folder of the nvcc on PATH,
    else /usr/local/cuda; the first that holds include/cuda_runtime.h. torch guesses from
    nvcc's location only, which is wrong when nvcc is a wrapper script (/usr/local/bin/nvcc)."""
    nvcc = shutil.which("nvcc")
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if home and os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            return home
    return None


if os.environ.get("CUDA_HOME") is None and find_cuda_home() is not None:
    os.environ["CUDA_HOME"] = find_cuda_home()  # read by torch.utils.cpp_extension on import

try:
    import torch
    from torch.utils import cpp_extension
except ModuleNotFoundError as error:  # pip's isolated build environment has no torch
    raise SystemExit(
        "rnnfused compiles against the torch you already have; install it first and build "
        "with: pip install --no-build-isolation ."
    ) from error

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")
DEFAULT_CUDA_ARCHS = "80;90+PTX"


def env_flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def cxx_opt_level():
    """-O<n> for the C++ sources: RNNFUSED_CXX_OPT (0 to 3), else -O3."""
    text = os.environ.get("RNNFUSED_CXX_OPT", "").strip() or "3"
    if text not in ("0", "1", "2", "3"):
        raise SystemExit(f"rnnfused: RNNFUSED_CXX_OPT={text!r}: write 0, 1, 2 or 3")
    return f"-O{text}"


def why_no_cuda():
    """None when the CUDA kernels can be built, else the reason they are skipped."""
    if env_flag("RNNFUSED_SKIP_CUDA_BUILD"):
        return "RNNFUSED_SKIP_CUDA_BUILD is set"
    if torch.version.cuda is None:
        return "torch is a CPU-only build"
    home = cpp_extension.CUDA_HOME
    if home is None or not os.path.exists(os.path.join(home, "bin", "nvcc")):
        return "no CUDA toolkit (nvcc) was found; set CUDA_HOME"
    if not os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
        return f"the CUDA toolkit at {home} has no headers; set CUDA_HOME"
    return None


def find_cublas():
    """(include dir, library dir, linker flag) of cuBLAS: the toolkit's own, else the copy in
    the nvidia-* wheels that CUDA builds of torch install."""
    bases = [cpp_extension.CUDA_HOME]
    try:
        import nvidia

        bases += [d for p in nvidia.__path__ for d in sorted(glob.glob(os.path.join(p, "*")))]
    except ImportError:
        pass
    for base in bases:
        include = os.path.join(base, "include")
        if not os.path.exists(os.path.join(include, "cublas_v2.h")):
            continue
        for lib in ("lib64", "lib"):
            libdir = os.path.join(base, lib)
            if os.path.exists(os.path.join(libdir, "libcublas.so")):
                return include, libdir, "-lcublas"
            versioned = sorted(glob.glob(os.path.join(libdir, "libcublas.so.*")))
            if versioned:
                return include, libdir, "-l:" + os.path.basename(versioned[0])
    raise SystemExit(
        "rnnfused: cuBLAS headers (cublas_v2.h) were not found in the CUDA toolkit or the "
        "nvidia wheels; install them or set RNNFUSED_SKIP_CUDA_BUILD=1 for a CPU-only build"
    )


def cuda_archs():
    """The compute capabilities to compile for, as ["80", "90+PTX", ...], and where they
    came from: RNNFUSED_CUDA_ARCHS, else TORCH_CUDA_ARCH_LIST, else the default. Entries are
    separated by ';', ',' or spaces, with or without the dot ("9.0" = "90"), optionally
    with a suffix letter ("90a") and "+PTX"."""
    for name in ("RNNFUSED_CUDA_ARCHS", "TORCH_CUDA_ARCH_LIST"):
        text = os.environ.get(name, "").strip()
        if text:
            break
    else:
        name, text = "default", DEFAULT_CUDA_ARCHS
    archs = []
    for entry in text.replace(",", ";").replace(" ", ";").split(";"):
        entry = entry.strip()
        if not entry:
            continue
        number, ptx = (entry[:-4], "+PTX") if entry.upper().endswith("+PTX") else (entry, "")
        number = number.replace(".", "")
        if not (number[:-1].isdigit() and (number[-1].isdigit() or number[-1] in "af")) or len(number) < 2:
            raise SystemExit(f"rnnfused: {name}={text!r}: cannot read {entry!r} as a compute capability; "
                             'write e.g. "8.0;9.0+PTX" or "80;90"')
        archs.append(number + ptx)
    if not archs:
        raise SystemExit(f"rnnfused: {name}={text!r} names no compute capability")
    return archs, name


def arch_flags():
    flags = []
    for arch in cuda_archs()[0]:
        ptx = arch.endswith("+PTX")
        arch = arch.removesuffix("+PTX")
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
        if ptx:
            flags += ["-gencode", f"arch=compute_{arch},code=compute_{arch}"]
    return flags


def default_max_jobs():
    """nvcc takes up to ~2 GB per job on these templates: bound the jobs by free memory."""
    try:
        with open("/proc/meminfo") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        free_gb = int(fields["MemAvailable"].split()[0]) / 2**20
    except (OSError, KeyError, ValueError):
        free_gb = 4
    return max(1, min(os.cpu_count() or 1, int(free_gb // 2)))


def device_sources():
    """The sources of the GPU kernels and of what they compute: the shared cell and step code,
    the CUDA kernels and the persistent kernel's planner (csrc/*.h, csrc/cuda, csrc/persistent)."""
    patterns = ("*.h", os.path.join("cuda", "*"), os.path.join("persistent", "*"))
    return sorted(p for pattern in patterns for p in glob.glob(os.path.join(CSRC, pattern)) if os.path.isfile(p))


def device_source_hash():
    """sha256 of the device sources (names and contents): a GPU run's verification record
    names the hash it verified, and `auto` trusts a kernel only where that record matches the
    build (rnnfused/dispatch.py)."""
    digest = hashlib.sha256()
    for path in device_sources():
        digest.update(os.path.relpath(path, CSRC).encode() + b"\0")
        with open(path, "rb") as f:
            digest.update(f.read() + b"\0")
    return digest.hexdigest()


def relative(paths):
    """setuptools wants source paths relative to setup.py (include dirs may be absolute)."""
    return [os.path.relpath(p, ROOT) for p in paths]


def extension():
    sources = relative([os.path.join(CSRC, "bindings.cpp"), os.path.join(CSRC, "kernel_choice.cpp"),
                        os.path.join(CSRC, "persistent", "plan.cpp")]
                       + sorted(glob.glob(os.path.join(CSRC, "cpu", "*.cpp"))))
    include_dirs = [CSRC]
    # What the CPU element loops need to vectorise: -fno-trapping-math to select between
    # computed values (torch builds with it too), and -fno-wrapv to undo Python's -fwrapv,
    # under which the vectoriser cannot prove that row * width + j steps affinely.
    # -fopenmp: at::parallel_for is inline and runs serially in code built without OpenMP;
    # the library it links (libgomp.so.1) is the one torch has already loaded.
    # -g0 undoes the -g of Python's own flags: debug information for every template instance
    # took 30% of the compile time (float's CPU kernels: 127 s -> 89 s) and most of the library.
    cxx_flags = [cxx_opt_level(), "-g0", "-fvisibility=hidden", "-fopenmp", "-fno-trapping-math", "-fno-math-errno",
                 "-fno-wrapv",
                 f"-DRNNFUSED_DEVICE_SOURCE_HASH=\"{device_source_hash()}\""]
    if env_flag("RNNFUSED_CPU_BASELINE_ONLY"):
        cxx_flags.append("-DRNNFUSED_CPU_BASELINE_ONLY")
    no_cuda = why_no_cuda()
    if no_cuda is not None and env_flag("RNNFUSED_REQUIRE_CUDA_BUILD"):
        raise SystemExit(f"rnnfused: RNNFUSED_REQUIRE_CUDA_BUILD is set but {no_cuda}")
    if no_cuda is not None:
        print(f"rnnfused: building the CPU kernels only ({no_cuda})"
              + ("; RNNFUSED_PHASE_TIMING has no effect without them" if env_flag("RNNFUSED_PHASE_TIMING") else ""))
        return cpp_extension.CppExtension(
            "rnnfused._C", sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )

    define_macros = [("RNNFUSED_WITH_CUDA", None)]
    if env_flag("RNNFUSED_PHASE_TIMING"):
        define_macros.append(("RNNFUSED_PHASE_TIMING", "1"))
    cublas_include, cublas_libdir, cublas_link = find_cublas()
    # The toolkit's headers first; the wheel directory only adds what the toolkit lacks.
    include_dirs += [os.path.join(cpp_extension.CUDA_HOME, "include"), cublas_include]
    sources += relative(sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu"))))
    archs, source = cuda_archs()
    print(f"rnnfused: building the CPU and CUDA kernels for compute capabilities {';'.join(archs)} (from {source})"
          + (", with the persistent kernel's phase timer" if env_flag("RNNFUSED_PHASE_TIMING") else ""))
    return cpp_extension.CUDAExtension(
        "rnnfused._C",
        sources,
        include_dirs=list(dict.fromkeys(include_dirs)),
        define_macros=define_macros,
        extra_compile_args={
            "cxx": cxx_flags,
            "nvcc": ["-O3", "-lineinfo", "--expt-relaxed-constexpr"] + arch_flags(),
        },
        extra_link_args=[f"-L{cublas_libdir}", cublas_link, f"-Wl,-rpath,{cublas_libdir}", "-fopenmp"],
    )


def build_info(with_cuda):
    """rnnfused/_build_info.py: what this build was made with, read by rnnfused.show_config()
    and by the import-time check that the installed torch is the one built against."""
    archs = ";".join(cuda_archs()[0]) if with_cuda else ""
    return (
        '"""Written by setup.py at build time: what this build of rnnfused was made with."""\n\n'
        f"TORCH_VERSION = {torch.__version__!r}\n"
        f"CUDA_VERSION = {(torch.version.cuda if with_cuda else None)!r}\n"
        f"CUDA_ARCHS = {archs!r}\n"
    )


class BuildExtension(cpp_extension.BuildExtension):
    """torch's build_ext, which also writes rnnfused/_build_info.py next to the extension."""

    def run(self):
        super().run()
        package = os.path.join(ROOT if self.inplace else self.build_lib, "rnnfused")
        with open(os.path.join(package, "_build_info.py"), "w") as f:
            f.write(build_info(with_cuda=why_no_cuda() is None))


os.environ.setdefault("MAX_JOBS", str(default_max_jobs()))

setup(
    packages=find_packages(include=["rnnfused", "rnnfused.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
)
