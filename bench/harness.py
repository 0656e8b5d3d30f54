"""Checking and timing one case (cell x dtype x config x mode) across implementations.

Method: every implementation is first checked against the fp64 reference on the same
input (output and input gradient); a wrong one is refused, not timed. Then warm-up runs,
then `repeats` timed runs with the implementations interleaved (so drift hits all alike),
each on a fresh random input (never zeros). CUDA events on a GPU, the wall clock on a
CPU; the median is reported. Peak memory is read per implementation on a GPU.
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
    ms: float = None
    us_per_step: float = None  # ms / T
    ratio: float = None  # ms / ms of torch.nn in the same case
    max_error: float = None
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
    """Max relative error of the runner's output and input gradient against `reference`
    (the fp64 output and input gradient for the same input), and whether it passes."""
    expected_out, expected_grad = reference
    low = _with_grad(_cast(x, dtype))
    output = runner(low, "fwdbwd")
    error = 0.0
    for actual, expected in ((output, expected_out), (_input_grad(low), expected_grad)):
        scale = max(1.0, expected.abs().max().item())
        error = max(error, (actual.double() - expected).abs().max().item() / scale)
    tolerance = TOLERANCE_TF32 if (dtype == torch.float32 and tf32) else TOLERANCE[dtype]
    return error, error <= tolerance, tolerance


def _cast(x, dtype):
    if isinstance(x, torch.Tensor):
        return x.to(dtype)
    return type(x)(x.data.to(dtype), x.batch_sizes, x.sorted_indices, x.unsorted_indices)


_REFERENCES = {}


def reference_result(base, cell, config, device, x, key=None):
    """fp64 output and input gradient of the reference loop for input x; remembered under
    `key` (the same for every dtype and mode of a case: same weights, same input)."""
    if key is not None and key in _REFERENCES:
        return _REFERENCES[key]
    runner = impls.make_reference(base, cell, config, device, torch.float64)
    x64 = _with_grad(_cast(x, torch.float64))
    output = runner(x64, "fwdbwd")
    result = output, _input_grad(x64).detach()
    if key is not None:
        _REFERENCES.clear()  # one at a time: the cases of a config come together
        _REFERENCES[key] = result
    return result


class Timer:
    """CUDA events on a GPU (the device's own clock), perf_counter on a CPU."""

    def __init__(self, device):
        self.cuda = device == "cuda"

    def __call__(self, fn):
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


def run_case(cell, config, dtype, mode, names, device, warmup, repeats, tf32=False, seed=0):
    """Results of every implementation in `names` for one case; the first time-able one
    named 'torch' sets the ratio."""
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
            error, ok, tolerance = check(runner, reference, check_input, dtype, tf32)
        except Exception as error:  # noqa: BLE001 - a failing competitor must not stop the run
            result.status = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:120]}"
            continue
        result.max_error = error
        if not ok:
            result.status = f"refused: error {error:.2e} > {tolerance:.0e}"
            continue
        runners[name] = runner

    timer = Timer(device)
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
        result.ms = statistics.median(result.times_ms)
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
