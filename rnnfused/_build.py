"""What this build of rnnfused was made with (rnnfused/_build_info.py, written by setup.py),
rnnfused.show_config(), and the explanation of an extension that fails to load."""

import platform

import torch

FIX = "pip install --no-build-isolation --force-reinstall --no-deps ."


def _recorded():
    try:
        from . import _build_info
    except ImportError:
        return None
    return _build_info


def load_failure_message(error):
    """Why rnnfused._C did not load, and the command that fixes it."""
    info = _recorded()
    if info is None:
        return (f"rnnfused's compiled extension could not be loaded ({error}); it looks unbuilt. From the "
                f"source folder: {FIX}")
    if info.TORCH_VERSION != torch.__version__:
        return (f"rnnfused was built for torch {info.TORCH_VERSION} but torch {torch.__version__} is installed, "
                f"and its compiled extension no longer loads ({error}). Rebuild it against the installed torch, "
                f"from the source folder or the source archive: {FIX}")
    return (f"rnnfused's compiled extension could not be loaded ({error}); it was built for the installed torch "
            f"{torch.__version__}. Rebuilding may help: {FIX}")


def version_mismatch():
    """A warning text when the extension loaded but was built for another torch, else None."""
    info = _recorded()
    if info is not None and info.TORCH_VERSION != torch.__version__:
        return (f"rnnfused was built for torch {info.TORCH_VERSION} but torch {torch.__version__} is installed; "
                f"if it misbehaves, rebuild it: {FIX}")
    return None


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def config():
    """The build and the machine, as a dict (the benchmark header and bug reports use it)."""
    from . import __version__, _C
    info = _recorded()
    gpu = None
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        gpu = f"{torch.cuda.get_device_name()} (compute capability {major}.{minor})"
    return {
        "rnnfused": __version__,
        "built with torch": info.TORCH_VERSION if info else "unknown (no _build_info.py)",
        "torch": torch.__version__,
        "built with CUDA": (info.CUDA_VERSION if info else None) or "no (CPU kernels only)",
        "CUDA archs configured": (info.CUDA_ARCHS if info else "") or "-",
        "CUDA device code for": _C.cuda_archs or "-",
        "CPU element loops": _C.cpu_element_loops,
        "CPU": cpu_name(),
        "GPU": gpu or "none",
    }


def show_config():
    """Prints how rnnfused was built and what it runs on: its version, the torch and CUDA
    versions it was built with, the GPU architectures compiled and the CPU instruction set
    its element loops use. Paste it into bug reports."""
    items = config()
    width = max(map(len, items))
    print("\n".join(f"{key:<{width}}  {value}" for key, value in items.items()))
