"""Checking and timing one case (cell x dtype x config x mode) across implementations.

Method: every implementation is first checked against the fp64 reference on the same
input and weights (output, input gradient and every weight gradient); a wrong one is
refused, not timed. Then warm-up runs, then `repeats` timed runs with the implementations
interleaved (so drift hits all alike), each on a fresh random input (never zeros). On a
GPU, CUDA events time each run and a buffer twice the size of the L2 cache is overwritten
before it (outside the timed span), so that no run finds the previous one's weights and
activations in L2; on a CPU, the wall clock. Reported: the median with the 20th and 80th
percentiles, and the median's ratio to torch.nn's in the same case. Peak memory is read
per implementation on a GPU.
"""

import statistics
import time
from dataclasses import dataclass, field

import torch
from torch.nn.utils.rnn import pack_padded_sequence

from . import impls

# Largest accepted error against the fp64 reference, relative to max(1, max |reference|).
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-3, torch.float16: 3e-2, torch.bfloat16: 1e-1}
TOLERANCE_TF32 = 3e-2  # fp32 when TF32 matmuls are allowed


@dataclass
class Result:
    config: str
    shape: str
    cell: str
    dtype: str
    mode: str
    impl: str
    status: str = "ok"  # ok | refused: ... | skipped: ... | failed: ...
    kernel: str = None  # rnnfused's kernel for this case (stepwise / persistent)
    ms: float = None  # median of the timed runs
    p20_ms: float = None  # 20th percentile
    p80_ms: float = None  # 80th percentile
    us_per_step: float = None  # ms / T
    ratio: float = None  # ms / ms of torch.nn in the same case
    max_error: float = None  # largest relative error of output, input gradient, weight gradients
    worst: str = None  # which of them it is
    peak_mb: float = None
    times_ms: list = field(default_factory=list, repr=False)


class Inputs:
    """Fresh random inputs for a config: values from a generator on the device, lengths
    (packed configs: in [T/3, T], the first one T) from one on the CPU."""

    def __init__(self, config, device, seed):
        self.config, self.device = config, device
        self.values = torch.Generator(device=device).manual_seed(seed)
        self.lengths = torch.Generator().manual_seed(seed)

    def next(self, dtype=torch.float32):
        c = self.config
        x = torch.randn(c.T, c.B, c.I, generator=self.values, device=self.device).to(dtype)
        if not c.packed:
            return x
        lengths = torch.randint(max(1, c.T // 3), c.T + 1, (c.B,), generator=self.lengths)
        lengths[0] = c.T
        return pack_padded_sequence(x, lengths, enforce_sorted=False)


def _with_grad(x):
    if isinstance(x, torch.Tensor):
        return x.detach().requires_grad_()
    data = x.data.detach().requires_grad_()
    return type(x)(data, x.batch_sizes, x.sorted_indices, x.unsorted_indices)


def _input_grad(x):
    return x.grad if isinstance(x, torch.Tensor) else x.data.grad


def check(runner, reference, x, dtype, tf32):
    """(max relative error, name of the worst result, passes, tolerance) of the runner's
    output, input gradient and weight gradients against `reference` (the fp64 ones for the
    same input and weights). The error of each result is relative to max(1, its max |value|)."""
    low = _with_grad(_cast(x, dtype))
    runner.zero_grad()
    output = runner(low, "fwdbwd")
    actual = {"output": output, "input grad": _input_grad(low)}
    actual.update(runner.weight_grads())
    error, worst = 0.0, None
    for name, expected in reference.items():
        got = actual.get(name)
        if got is None:
            return float("inf"), f"{name} (missing)", False, 0.0
        scale = max(1.0, expected.abs().max().item())
        this = (got.double() - expected).abs().max().item() / scale
        if this >= error:
            error, worst = this, name
    tolerance = TOLERANCE_TF32 if (dtype == torch.float32 and tf32) else TOLERANCE[dtype]
    return error, worst, error <= tolerance, tolerance


def _cast(x, dtype):
    if isinstance(x, torch.Tensor):
        return x.to(dtype)
    return type(x)(x.data.to(dtype), x.batch_sizes, x.sorted_indices, x.unsorted_indices)


_REFERENCES = {}


def reference_result(base, cell, config, device, x, key=None):
    """{"output", "input grad", weight name: gradient} of the reference loop in fp64 for
    input x; remembered under `key` (the same for every dtype and mode of a case: same
    weights, same input)."""
    if key is not None and key in _REFERENCES:
        return _REFERENCES[key]
    runner = impls.make_reference(base, cell, config, device, torch.float64)
    x64 = _with_grad(_cast(x, torch.float64))
    output = runner(x64, "fwdbwd")
    result = {"output": output, "input grad": _input_grad(x64).detach()}
    result.update({name: grad.detach() for name, grad in runner.weight_grads().items()})
    if key is not None:
        _REFERENCES.clear()  # one at a time: the cases of a config come together
        _REFERENCES[key] = result
    return result


class L2Flush:
    """Overwrites a buffer twice the size of the GPU's L2 cache: called before each timed
    run, so that no run starts with the previous one's data in L2."""

    def __init__(self, device="cuda"):
        l2_bytes = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 64 * 2**20
        self.buffer = torch.empty(2 * l2_bytes // 4, dtype=torch.float32, device=device)

    def __call__(self):
        self.buffer.fill_(1.0)


class Timer:
    """CUDA events on a GPU (the device's own clock), perf_counter on a CPU. `flush()` runs
    before each measurement, outside the timed span (on a GPU: L2Flush)."""

    def __init__(self, device, flush=None):
        self.cuda = device == "cuda"
        self.flush = flush if flush is not None else (L2Flush() if self.cuda else None)

    def __call__(self, fn):
        if self.flush is not None:
            self.flush()
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        begin = time.perf_counter()
        fn()
        return (time.perf_counter() - begin) * 1e3


def synced_clock(device):
    """The wall clock in seconds, after the GPU's queued work when ``device`` is "cuda"."""
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def percentiles(times):
    """(20th percentile, median, 80th percentile) of a non-empty list of times."""
    if len(times) == 1:
        return times[0], times[0], times[0]
    p20, _, _, p80 = statistics.quantiles(times, n=5, method="inclusive")
    return p20, statistics.median(times), p80


def run_case(cell, config, dtype, mode, names, device, warmup, repeats, tf32=False, seed=0, timer=None):
    """Results of every implementation in `names` for one case; the one named 'torch' sets
    the ratio. `timer` defaults to Timer(device)."""
    base = impls.base_module(cell, config, seed)
    inputs = Inputs(config, device, seed + 1)
    check_input = inputs.next()
    reference = None
    results, runners = {}, {}
    for name in names:
        result = Result(config.name, config.describe(), cell, str(dtype).replace("torch.", ""), mode, name)
        results[name] = result
        result.kernel = impls.kernel_of(name, cell, config, device, dtype) if name.startswith("rnnfused") else None
        reason = impls.unavailable(name, cell, config, device, dtype)
        if reason:
            result.status = f"skipped: {reason}"
            continue
        try:
            runner = impls.IMPLEMENTATIONS[name](base, cell, config, device, dtype)
            if reference is None:
                reference = reference_result(base, cell, config, device, check_input, key=(cell, config, device, seed))
            error, worst, ok, tolerance = check(runner, reference, check_input, dtype, tf32)
        except Exception as error:  # noqa: BLE001 - a failing competitor must not stop the run
            result.status = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:120]}"
            continue
        result.max_error, result.worst = error, worst
        if not ok:
            result.status = f"refused: {worst} error {error:.2e} > {tolerance:.0e}"
            continue
        runners[name] = runner

    timer = timer if timer is not None else Timer(device)
    for _ in range(warmup):
        for runner in runners.values():
            runner(_fresh(inputs, dtype, mode), mode)
    for _ in range(repeats):
        for name, runner in runners.items():
            x = _fresh(inputs, dtype, mode)
            results[name].times_ms.append(timer(lambda: runner(x, mode)))
    for name, runner in runners.items():
        result = results[name]
        if not result.times_ms:
            continue
        result.p20_ms, result.ms, result.p80_ms = percentiles(result.times_ms)
        result.us_per_step = result.ms * 1e3 / config.T
        if device == "cuda":
            result.peak_mb = _peak_memory_mb(runner, _fresh(inputs, dtype, mode), mode)
    torch_ms = results.get("torch").ms if "torch" in results else None
    for result in results.values():
        if result.ms is not None and torch_ms:
            result.ratio = result.ms / torch_ms
    return list(results.values())


def _fresh(inputs, dtype, mode):
    x = inputs.next(dtype)
    return _with_grad(x) if mode == "fwdbwd" else x


def _peak_memory_mb(runner, x, mode):
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    runner(x, mode)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20
