"""Shared helpers: twin modules (torch.nn and rnnfused with the same weights), and a run
that backpropagates a fixed random weighting of every result to all leaves."""

import contextlib
import os

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

import rnnfused

# Largest difference allowed between rnnfused and another implementation of the same
# equations (torch.nn or rnnfused.reference), relative to max(1, max |value|), by dtype.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5}

MODES = {
    "LSTM": (nn.LSTM, rnnfused.LSTM, {}),
    "GRU": (nn.GRU, rnnfused.GRU, {}),
    "RNN_TANH": (nn.RNN, rnnfused.RNN, {"nonlinearity": "tanh"}),
    "RNN_RELU": (nn.RNN, rnnfused.RNN, {"nonlinearity": "relu"}),
}

CUDA_USABLE = torch.cuda.is_available() and "cuda" in rnnfused.backends()


def pytest_addoption(parser):
    group = parser.getgroup("rnnfused")
    group.addoption("--fuzz-count", type=int, default=None,
                    help="random configurations of tests/test_fuzz.py (default 500; RNNFUSED_FUZZ_COUNT)")
    group.addoption("--fuzz-seed", default=None,
                    help="first seed of tests/test_fuzz.py: an integer, or 'random' (default 0; RNNFUSED_FUZZ_SEED)")


def fuzz_settings(config):
    """(first seed, count) of the fuzzer: the command line, else the environment, else seed 0
    and 500 configurations. Case i runs seed first + i, so `--fuzz-seed=S --fuzz-count=1`
    replays the case of seed S alone."""
    seed = config.getoption("--fuzz-seed") or os.environ.get("RNNFUSED_FUZZ_SEED") or "0"
    if seed == "random":
        # Drawn once per run (pytest-xdist workers would each draw their own: pass a number there).
        if not hasattr(config, "_rnnfused_fuzz_seed"):
            config._rnnfused_fuzz_seed = int.from_bytes(os.urandom(4), "little")
        seed = config._rnnfused_fuzz_seed
    count = config.getoption("--fuzz-count") or int(os.environ.get("RNNFUSED_FUZZ_COUNT", "500"))
    return int(seed), count


# The tests that share a module fixture building a wheel: first in the suite, on one worker.
PACKAGING_TESTS = "test_packaging.py"


def pytest_collection_modifyitems(config, items):
    """The packaging tests first: their fixture builds a wheel (minutes), which under
    pytest-xdist (make test runs two workers) then overlaps the other tests instead of running
    alone at the end."""
    items.sort(key=lambda item: item.path.name != PACKAGING_TESTS)


@pytest.hookimpl(optionalhook=True)  # plain pytest, without xdist, has no such hook
def pytest_xdist_make_scheduler(config, log):
    """make test's scheduler (--dist loadscope with these scopes): each test goes alone to the
    next free worker, except the packaging tests, which share their module's wheel build and so
    go to one worker together. (xdist's --dist loadgroup would say this with a mark, but under
    pytest 9 its marks do not take: the tests spread and built the wheel twice at once.)"""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class Scheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid):
            path = nodeid.split("::", 1)[0]
            return path if path.rsplit("/", 1)[-1] == PACKAGING_TESTS else nodeid

    return Scheduling(config, log)


def pytest_report_header(config):
    seed, count = fuzz_settings(config)
    return f"rnnfused fuzzer: {count} configurations from seed {seed} (--fuzz-seed, --fuzz-count)"


def pytest_runtest_setup(item):
    """Tests marked `cuda` skip without a GPU, or fail with RNNFUSED_REQUIRE_CUDA=1 (make
    gpu-check: a run on the GPU machine must not pass by skipping everything)."""
    if item.get_closest_marker("cuda") is None or CUDA_USABLE:
        return
    reason = ("no CUDA device" if not torch.cuda.is_available()
              else "this build of rnnfused has no CUDA kernels")
    if os.environ.get("RNNFUSED_REQUIRE_CUDA") == "1":
        pytest.fail(f"RNNFUSED_REQUIRE_CUDA=1 but {reason}", pytrace=False)
    pytest.skip(f"needs a CUDA device and a build with the CUDA kernels ({reason})")


def make_twins(mode, *args, dtype=torch.float64, device="cpu", seed=0, **kwargs):
    """(torch.nn module, rnnfused module) with identical parameters."""
    torch_cls, ours_cls, extra = MODES[mode]
    torch.manual_seed(seed)
    theirs = torch_cls(*args, **extra, **kwargs).to(device=device, dtype=dtype)
    ours = ours_cls(*args, **extra, **kwargs).to(device=device, dtype=dtype)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def flatten(result):
    """(output, hidden) of any of the modules -> [output (packed data), h_n(, c_n)]."""
    output, hidden = result
    if isinstance(output, PackedSequence):
        output = output.data
    return [output] + (list(hidden) if isinstance(hidden, tuple) else [hidden])


def run_and_grad(fn, x, hx, leaves, params=None, seed=1):
    """fn(x, hx), then the gradients of sum(result * fixed random weights) with respect to
    `leaves` and `params` (default: fn's parameters). Returns (results, gradients)."""
    params = list(fn.parameters()) if params is None else list(params)
    values = flatten(fn(x, hx))
    # Drawn on the CPU whatever the device, so that a CUDA run and a CPU run get the same weights.
    generator = torch.Generator().manual_seed(seed)
    loss = sum((v * torch.randn(v.shape, generator=generator, dtype=v.dtype).to(v.device)).sum() for v in values)
    grads = torch.autograd.grad(loss, list(leaves) + params)
    return [v.detach() for v in values], list(grads)


def max_error(actual, expected):
    """Largest max|a - e| / max(1, max|e|) over paired tensors of equal shapes; infinite where
    one is NaN and the other is not (a NaN must never compare as a small error)."""
    assert len(actual) == len(expected)
    worst = 0.0
    for a, e in zip(actual, expected):
        assert a.shape == e.shape, (a.shape, e.shape)
        if not e.numel():
            continue
        a, e = a.double(), e.double()
        if not torch.equal(a.isnan(), e.isnan()):
            return float("inf")
        finite = ~e.isnan()
        scale = max(1.0, e[finite].abs().max().item()) if finite.any() else 1.0
        difference = torch.where(a == e, 0.0, (a - e).abs())[finite]  # equal infinities: no error
        if difference.numel():
            worst = max(worst, difference.max().item() / scale)
    return worst


@contextlib.contextmanager
def tf32_switch(api, value, module=None):
    """Sets torch.backends.cuda.matmul.<api> (``allow_tf32`` or ``fp32_precision``) and
    restores it through the same API (pytest's monkeypatch cannot restore these properties)."""
    module = torch.backends.cuda.matmul if module is None else module
    old = getattr(module, api)
    setattr(module, api, value)
    try:
        yield
    finally:
        setattr(module, api, old)
