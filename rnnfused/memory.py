"""The CPU block cache: rnnfused.empty_cache() and rnnfused.cpu_cache_stats().

On the CPU, rnnfused's kernels take their large buffers (256 KiB and more: gate
activations, saved states, gradients) from a cache of blocks instead of mapping fresh
memory for every call, which would touch every page again (about a quarter of the time of
an LSTM layer's forward + backward at T100 B16 H256). Freed blocks are kept for reuse up
to a bound, 256 MiB per process by default; set ``RNNFUSED_CPU_CACHE_MB`` before the first
call to change it (``0`` keeps none). Blocks beyond the bound, and every block on
``empty_cache()``, go back to the operating system at once. CUDA tensors use torch's own
caching allocator (``torch.cuda.empty_cache()``).
"""

from . import _C


def empty_cache():
    """Returns every CPU block rnnfused keeps for reuse to the operating system (blocks in
    use by live tensors stay). Returns the number of bytes released."""
    return _C.empty_cpu_cache()


def cpu_cache_stats():
    """The CPU block cache now, as a dict of bytes: ``cached_bytes`` (freed blocks kept for
    reuse), ``in_use_bytes`` (blocks held by live tensors), ``limit_bytes`` (the bound on
    ``cached_bytes``, from ``RNNFUSED_CPU_CACHE_MB``)."""
    return dict(_C.cpu_cache_stats())
