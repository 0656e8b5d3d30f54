"""What a hostile user tries: random configurations against torch.nn (hypothesis), a table of
bad inputs (each a clear exception, never a crash), memory that stays flat over many calls,
and sizes past 2^31 elements.

RNNFUSED_HYPOTHESIS_EXAMPLES sets the number of random configurations (default 150, fixed
seed); RNNFUSED_TEST_LARGE=1 runs the > 2^31-element case on the CPU (about 17 GB of memory;
on a GPU it runs with the CUDA tests)."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.utils.rnn import pack_padded_sequence

import rnnfused
from conftest import make_twins, max_error, run_and_grad

EXAMPLES = int(os.environ.get("RNNFUSED_HYPOTHESIS_EXAMPLES", "150"))


@st.composite
def configurations(draw):
    mode = draw(st.sampled_from(["LSTM", "GRU", "RNN_TANH", "RNN_RELU"]))
    hidden = draw(st.integers(1, 6))
    config = dict(
        mode=mode, input_size=draw(st.integers(1, 5)), hidden=hidden, layers=draw(st.integers(1, 3)),
        bidirectional=draw(st.booleans()), batch_first=draw(st.booleans()), bias=draw(st.booleans()),
        proj=draw(st.integers(0, hidden - 1)) if mode == "LSTM" else 0, steps=draw(st.integers(1, 6)),
        batch=draw(st.integers(1, 4)), with_h0=draw(st.booleans()), packed=draw(st.booleans()),
        sorted=draw(st.booleans()), seed=draw(st.integers(0, 2**16)))
    config["lengths"] = draw(st.lists(st.integers(1, config["steps"]), min_size=config["batch"],
                                      max_size=config["batch"]))
    return config


def _run(module, config):
    c = config
    g = torch.Generator().manual_seed(c["seed"])
    x = torch.randn(c["steps"], c["batch"], c["input_size"], generator=g, dtype=torch.float64)
    leaves = [x.requires_grad_()]
    hx = None
    if c["with_h0"]:
        states = c["layers"] * (2 if c["bidirectional"] else 1)
        h0 = torch.randn(states, c["batch"], c["proj"] or c["hidden"], generator=g, dtype=torch.float64)
        hx = h0.requires_grad_()
        leaves.append(h0)
        if c["mode"] == "LSTM":
            c0 = torch.randn(states, c["batch"], c["hidden"], generator=g, dtype=torch.float64).requires_grad_()
            hx = (h0, c0)
            leaves.append(c0)
    if c["packed"]:
        lengths = sorted(c["lengths"], reverse=True) if c["sorted"] else c["lengths"]
        lengths[0] = c["steps"] if c["sorted"] else lengths[0]
        inp = pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=c["sorted"])
    else:
        inp = x.transpose(0, 1) if c["batch_first"] else x
    return run_and_grad(module, inp, hx, leaves)


@settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None)
@given(configurations())
def test_random_configurations_match_torch_nn(config):
    c = config
    kwargs = dict(num_layers=c["layers"], bidirectional=c["bidirectional"], bias=c["bias"],
                  batch_first=c["batch_first"] and not c["packed"])
    if c["proj"]:
        kwargs["proj_size"] = c["proj"]
    theirs, ours = make_twins(c["mode"], c["input_size"], c["hidden"], seed=c["seed"], **kwargs)
    (values, grads), (expected_values, expected_grads) = _run(ours, c), _run(theirs, c)
    assert max_error(values, expected_values) <= 1e-10
    assert max_error(grads, expected_grads) <= 1e-10


# Each case: (description, code that must raise). They run in one subprocess, so that a crash
# (a segfault from a bad pointer) fails this test instead of killing the test run.
BAD_INPUTS = {
    "batch_sizes summing to more rows than the input": (
        "layer_forward(0, torch.zeros(3, 2), torch.tensor([2, 2]), torch.zeros(2, 4), torch.zeros(2, 4),"
        " [torch.zeros(16, 2), torch.zeros(16, 4)], False, False, True, inf, inf)"),
    "increasing batch_sizes": (
        "layer_forward(1, torch.zeros(3, 2), torch.tensor([1, 2]), torch.zeros(1, 4), None,"
        " [torch.zeros(12, 2), torch.zeros(12, 4)], False, False, True, inf, inf)"),
    "negative batch_sizes": (
        "layer_forward(1, torch.zeros(0, 2), torch.tensor([1, -1]), torch.zeros(1, 4), None,"
        " [torch.zeros(12, 2), torch.zeros(12, 4)], False, False, True, inf, inf)"),
    "batch_sizes on the wrong device type": (
        "layer_forward(1, torch.zeros(2, 2), torch.tensor([2.0]), torch.zeros(2, 4), None,"
        " [torch.zeros(12, 2), torch.zeros(12, 4)], False, False, True, inf, inf)"),
    "h0 with fewer rows than batch_sizes[0]": (
        "layer_forward(1, torch.zeros(3, 2), torch.tensor([2, 1]), torch.zeros(1, 4), None,"
        " [torch.zeros(12, 2), torch.zeros(12, 4)], False, False, True, inf, inf)"),
    "weight_ih of the wrong width": (
        "layer_forward(1, torch.zeros(3, 2, 2), None, torch.zeros(2, 4), None,"
        " [torch.zeros(12, 3), torch.zeros(12, 4)], False, False, True, inf, inf)"),
    "weight_hh of the wrong shape": (
        "layer_forward(1, torch.zeros(3, 2, 2), None, torch.zeros(2, 4), None,"
        " [torch.zeros(12, 2), torch.zeros(12, 5)], False, False, True, inf, inf)"),
    "gate rows not a multiple of the gates": (
        "layer_forward(0, torch.zeros(3, 2, 2), None, torch.zeros(2, 4), torch.zeros(2, 4),"
        " [torch.zeros(15, 2), torch.zeros(15, 4)], False, False, True, inf, inf)"),
    "one weight only": (
        "layer_forward(1, torch.zeros(3, 2, 2), None, torch.zeros(2, 4), None, [torch.zeros(12, 2)],"
        " False, False, True, inf, inf)"),
    "biases missing although has_biases": (
        "layer_forward(1, torch.zeros(3, 2, 2), None, torch.zeros(2, 4), None,"
        " [torch.zeros(12, 2), torch.zeros(12, 4)], True, False, True, inf, inf)"),
    "projection on a GRU": (
        "layer_forward(1, torch.zeros(3, 2, 2), None, torch.zeros(2, 3), None,"
        " [torch.zeros(12, 2), torch.zeros(12, 3), torch.zeros(3, 4)], False, False, True, inf, inf)"),
    "LSTM without c0": (
        "layer_forward(0, torch.zeros(3, 2, 2), None, torch.zeros(2, 4), None,"
        " [torch.zeros(16, 2), torch.zeros(16, 4)], False, False, True, inf, inf)"),
    "c0 of the wrong shape": (
        "layer_forward(0, torch.zeros(3, 2, 2), None, torch.zeros(2, 4), torch.zeros(3, 4),"
        " [torch.zeros(16, 2), torch.zeros(16, 4)], False, False, True, inf, inf)"),
    "integer input": (
        "layer_forward(1, torch.zeros(3, 2, 2, dtype=torch.long), None, torch.zeros(2, 4, dtype=torch.long),"
        " None, [torch.zeros(12, 2, dtype=torch.long), torch.zeros(12, 4, dtype=torch.long)], False, False,"
        " True, inf, inf)"),
    "mixed dtypes": (
        "layer_forward(1, torch.zeros(3, 2, 2), None, torch.zeros(2, 4, dtype=torch.float64), None,"
        " [torch.zeros(12, 2), torch.zeros(12, 4)], False, False, True, inf, inf)"),
    "zero steps": (
        "layer_forward(1, torch.zeros(0, 2, 2), None, torch.zeros(2, 4), None,"
        " [torch.zeros(12, 2), torch.zeros(12, 4)], False, False, True, inf, inf)"),
    "negative cell_clip": (
        "layer_forward(0, torch.zeros(3, 2, 2), None, torch.zeros(2, 4), torch.zeros(2, 4),"
        " [torch.zeros(16, 2), torch.zeros(16, 4)], False, False, True, -1.0, inf)"),
    "NaN grad_clip": (
        "layer_forward(1, torch.zeros(3, 2, 2), None, torch.zeros(2, 4), None,"
        " [torch.zeros(12, 2), torch.zeros(12, 4)], False, False, True, inf, float('nan'))"),
    "backward with gates of the wrong size": (
        "layer_backward(1, torch.zeros(3, 2, 2), None, torch.zeros(2, 4), None,"
        " [torch.zeros(12, 2), torch.zeros(12, 4)], False, False, inf, inf, torch.zeros(3, 2, 4),"
        " torch.zeros(5, 16), None, None, torch.zeros(3, 2, 4), torch.zeros(2, 4), None, True, True)"),
    "backward without gates": (
        "layer_backward(1, torch.zeros(3, 2, 2), None, torch.zeros(2, 4), None,"
        " [torch.zeros(12, 2), torch.zeros(12, 4)], False, False, inf, inf, torch.zeros(3, 2, 4),"
        " None, None, None, torch.zeros(3, 2, 4), torch.zeros(2, 4), None, True, True)"),
    "step_flags of the wrong shape": (
        "layer_forward(1, torch.zeros(3, 2, 2), None, torch.zeros(2, 4), None,"
        " [torch.zeros(12, 2), torch.zeros(12, 4)], False, False, True, inf, inf, torch.zeros(2, 3, dtype=torch.int32))"),
    "step_flags of the wrong dtype": (
        "layer_forward(1, torch.zeros(3, 2, 2), None, torch.zeros(2, 4), None,"
        " [torch.zeros(12, 2), torch.zeros(12, 4)], False, False, True, inf, inf, torch.zeros(3, 2, dtype=torch.bool))"),
    "step_flags with packed input": (
        "layer_forward(1, torch.zeros(3, 2), torch.tensor([2, 1]), torch.zeros(2, 4), None,"
        " [torch.zeros(12, 2), torch.zeros(12, 4)], False, False, True, inf, inf, torch.zeros(2, 2, dtype=torch.int32))"),
    "masks not three entries": (
        "layer_forward(1, torch.zeros(3, 2, 2), None, torch.zeros(2, 4), None,"
        " [torch.zeros(12, 2), torch.zeros(12, 4)], False, False, True, inf, inf, None, [torch.ones(2, 4)])"),
    "recurrent_mask of the wrong shape": (
        "layer_forward(1, torch.zeros(3, 2, 2), None, torch.zeros(2, 4), None,"
        " [torch.zeros(12, 2), torch.zeros(12, 4)], False, False, True, inf, inf, None, [torch.ones(3, 4), torch.ones(0), torch.ones(0)])"),
    "keep_h with too few steps": (
        "layer_forward(1, torch.zeros(3, 2, 2), None, torch.zeros(2, 4), None,"
        " [torch.zeros(12, 2), torch.zeros(12, 4)], False, False, True, inf, inf, None, [torch.ones(0), torch.ones(2, 2, 4), torch.ones(0)])"),
    "keep_h of another dtype": (
        "layer_forward(1, torch.zeros(3, 2, 2), None, torch.zeros(2, 4), None,"
        " [torch.zeros(12, 2), torch.zeros(12, 4)], False, False, True, inf, inf, None,"
        " [torch.ones(0), torch.ones(3, 2, 4, dtype=torch.float64), torch.ones(0)])"),
    "keep_c on a GRU": (
        "layer_forward(1, torch.zeros(3, 2, 2), None, torch.zeros(2, 4), None,"
        " [torch.zeros(12, 2), torch.zeros(12, 4)], False, False, True, inf, inf, None, [torch.ones(0), torch.ones(0), torch.ones(3, 2, 4)])"),
    "module: 4-D input": "rnnfused.LSTM(2, 4)(torch.zeros(1, 3, 2, 2))",
    "module: wrong feature size": "rnnfused.GRU(2, 4)(torch.zeros(3, 2, 5))",
    "module: int input": "rnnfused.RNN(2, 4)(torch.zeros(3, 2, 2, dtype=torch.long))",
    "module: hx with the wrong batch": "rnnfused.GRU(2, 4)(torch.zeros(3, 2, 2), torch.zeros(1, 5, 4))",
    "module: hx a list of three": "rnnfused.LSTM(2, 4)(torch.zeros(3, 2, 2), [torch.zeros(1, 2, 4)] * 3)",
}

_CHILD = """
import sys, torch, rnnfused
# The cases name the arguments of an unnormalized layer in this order (the operators take
# the tensors first, then the options).
def layer_forward(cell, x, batch_sizes, h0, c0, weights, has_biases, reverse, save, cell_clip, grad_clip,
                  step_flags=None, masks=()):
    return torch.ops.rnnfused.layer_forward(x, batch_sizes, h0, c0, weights, [], [], step_flags, list(masks), cell,
                                            has_biases, reverse, cell_clip, grad_clip, 0, True, 1e-5, 1, save)
def layer_backward(cell, x, batch_sizes, h0, c0, weights, has_biases, reverse, cell_clip, grad_clip, hidden, gates,
                   cells, proj_in, dy, dh_n, dc_n, need_dx, need_weights):
    saved = [hidden] + [torch.empty(0) if t is None else t for t in (gates, cells, proj_in, None)]
    return torch.ops.rnnfused.layer_backward(x, batch_sizes, h0, c0, weights, [], None, [], saved, dy, dh_n, dc_n, cell,
                                             has_biases, reverse, cell_clip, grad_clip, 0, True, 1e-5, 1, need_dx,
                                             need_weights)
inf = float("inf")
for name, code in CASES.items():
    print("start", name, flush=True)
    try:
        eval(code)
    except Exception as error:  # the expected outcome: any clear exception
        print("raised", name, type(error).__name__, str(error).splitlines()[0][:200], flush=True)
    else:
        print("accepted", name, flush=True)
"""


def test_bad_inputs_raise_clear_exceptions_and_never_crash():
    child = f"CASES = {BAD_INPUTS!r}\n" + textwrap.dedent(_CHILD)
    # The timeout only stops a hang; it is far above the seconds the child takes on a loaded machine.
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=600,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    lines = done.stdout.splitlines()
    started = [line[6:] for line in lines if line.startswith("start ")]
    assert done.returncode == 0, f"crashed (exit {done.returncode}) in case {started[-1]!r}: {done.stderr[-2000:]}"
    accepted = [line for line in lines if line.startswith("accepted ")]
    assert not accepted, accepted
    raised = [line for line in lines if line.startswith("raised ")]
    assert len(raised) == len(BAD_INPUTS)
    # Messages say what is wrong: none is a bare internal assertion.
    assert not [line for line in raised if "INTERNAL ASSERT" in line], raised


def _resident_bytes():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads the resident size from /proc")
def test_memory_stays_flat_over_many_calls():
    module = rnnfused.LSTM(64, 128, num_layers=2, bidirectional=True)
    packed_module = rnnfused.GRU(64, 128)

    def step():
        x = torch.randn(40, 8, 64, requires_grad=True)
        module(x)[0].sum().backward()
        lengths = torch.randint(1, 41, (8,))
        packed_module(pack_padded_sequence(x.detach(), lengths, enforce_sorted=False))[0].data.sum().backward()
        with torch.no_grad():
            module(x)

    for _ in range(30):
        step()
    before = _resident_bytes()
    for _ in range(200):
        step()
    grown = _resident_bytes() - before
    assert grown < 16 * 2**20, f"resident memory grew by {grown / 2**20:.1f} MiB over 200 calls"


def _large_case(device, dtype, monkeypatch):
    """An RNN whose output has more than 2^31 elements. Batch rows are independent, so the
    last rows (whose elements lie past 2^31) must equal a run of those rows alone. Both runs
    on the stepwise kernels: the 3 rows alone would otherwise run the persistent kernel, whose
    sums are ordered differently (the whole batch does not fit on chip and runs stepwise;
    seen on an H100)."""
    monkeypatch.setenv("RNNFUSED_KERNEL", "stepwise")
    steps, batch, hidden = (2048, 1025, 1024) if device == "cuda" else (65536, 1025, 32)
    assert steps * batch * hidden > 2**31
    torch.manual_seed(0)
    module = rnnfused.RNN(1, hidden).to(device, dtype)
    x = torch.randn(steps, batch, 1, device=device, dtype=dtype)
    with torch.no_grad():
        tail = module(x)[0][:, -3:].clone()
        alone = module(x[:, -3:].contiguous())[0]
    assert torch.equal(tail, alone)


@pytest.mark.skipif(os.environ.get("RNNFUSED_TEST_LARGE") != "1", reason="set RNNFUSED_TEST_LARGE=1 (~17 GB)")
def test_more_than_2_to_the_31_elements_on_the_cpu(monkeypatch):
    _large_case("cpu", torch.float32, monkeypatch)


@pytest.mark.cuda
def test_more_than_2_to_the_31_elements_on_the_gpu(monkeypatch):
    _large_case("cuda", torch.float16, monkeypatch)
