"""rnnfused.LSTMCell / GRUCell / RNNCell against torch.nn's cells (float64: outputs and every
gradient), their module surface and errors, the extras against the reference, a loop of
cell steps against the sequence layer, gradcheck and torch.compile in a user's loop."""

import itertools
import warnings

import pytest
import torch
from torch import nn
from torch.autograd import gradcheck

import rnnfused
from rnnfused import reference
from conftest import max_error

CELLS = {
    "LSTMCell": (nn.LSTMCell, rnnfused.LSTMCell, {}),
    "GRUCell": (nn.GRUCell, rnnfused.GRUCell, {}),
    "RNNCell": (nn.RNNCell, rnnfused.RNNCell, {}),
    "RNNCell_relu": (nn.RNNCell, rnnfused.RNNCell, {"nonlinearity": "relu"}),
}


def _twins(name, *args, seed=0, **kwargs):
    theirs_cls, ours_cls, extra = CELLS[name]
    torch.manual_seed(seed)
    theirs = theirs_cls(*args, **extra, **kwargs).double()
    torch.manual_seed(seed)
    ours = ours_cls(*args, **extra, **kwargs).double()
    return theirs, ours


def _state(name, batch, hidden, g):
    shape = (batch, hidden) if batch else (hidden,)
    h = torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
    if name != "LSTMCell":
        return h, [h]
    c = torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
    return (h, c), [h, c]


def _run(cell, name, batch, hidden, with_hx, seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*((batch,) if batch else ()), cell.input_size, generator=g, dtype=torch.float64,
                    requires_grad=True)
    hx, leaves = _state(name, batch, hidden, g) if with_hx else (None, [])
    out = cell(x, hx)
    outputs = list(out) if isinstance(out, tuple) else [out]
    loss = sum((o * torch.linspace(-1, 2, o.numel(), dtype=o.dtype).view_as(o)).sum() for o in outputs)
    return [o.detach() for o in outputs], torch.autograd.grad(loss, [x] + leaves + list(cell.parameters()))


GRID = list(itertools.product(CELLS, (1, 5, 7), (0, 1, 4), (True, False), (True, False)))


@pytest.mark.parametrize("name,hidden,batch,bias,with_hx", GRID)
def test_matches_torch_nn(name, hidden, batch, bias, with_hx):
    theirs, ours = _twins(name, 3, hidden, bias=bias)
    expected, actual = _run(theirs, name, batch, hidden, with_hx), _run(ours, name, batch, hidden, with_hx)
    assert max_error(actual[0], expected[0]) <= 1e-10
    assert max_error(actual[1], expected[1]) <= 1e-10


def test_batch_of_zero():
    theirs, ours = _twins("LSTMCell", 3, 4)
    x = torch.randn(0, 3, dtype=torch.float64)
    assert [t.shape for t in ours(x)] == [t.shape for t in theirs(x)]


@pytest.mark.parametrize("name", CELLS)
def test_module_surface_matches(name):
    for kwargs in ({}, {"bias": False}):
        theirs, ours = _twins(name, 3, 5, **kwargs)
        assert [(n, p.shape) for n, p in ours.named_parameters()] == [(n, p.shape) for n, p in
                                                                      theirs.named_parameters()]
        assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), theirs.parameters()))
        assert repr(ours) == "rnnfused." + repr(theirs)  # the same but for the name, which tells them apart
        ours.load_state_dict(theirs.state_dict())
        theirs.load_state_dict(ours.state_dict())
        assert ours.bias_ih is None if kwargs else ours.bias_ih is not None


def _outcome(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            fn()
        except Exception as error:  # noqa: BLE001 - comparing exactly what torch.nn raises
            return type(error).__name__, str(error)
    return "ok", None


@pytest.mark.parametrize("name", CELLS)
def test_errors_match_torch_nn(name):
    theirs, ours = _twins(name, 3, 4)
    lstm = name == "LSTMCell"

    def hx(*shape):
        return (torch.zeros(*shape, dtype=torch.float64),) * 2 if lstm else torch.zeros(*shape, dtype=torch.float64)

    cases = {
        "3-D input": (torch.zeros(1, 2, 3), None),
        "0-D input": (torch.zeros(()), None),
        "wrong input size": (torch.zeros(2, 5), None),
        "hidden batch": (torch.zeros(2, 3), hx(3, 4)),
        "hidden width": (torch.zeros(2, 3), hx(2, 5)),
        "3-D hidden": (torch.zeros(2, 3), hx(1, 2, 4)),
        "2-D hidden for 1-D input": (torch.zeros(3), hx(2, 4)),
    }
    for case, (x, state) in cases.items():
        x = x.double()
        assert _outcome(lambda: ours(x, state)) == _outcome(lambda: theirs(x, state)), case
    if name.startswith("RNNCell"):
        theirs.nonlinearity = ours.nonlinearity = "sigmoid"
        x = torch.zeros(2, 3, dtype=torch.float64)
        assert _outcome(lambda: ours(x)) == _outcome(lambda: theirs(x))


def test_extras_match_the_reference():
    torch.manual_seed(0)
    variants = [(rnnfused.GRUCell(3, 5, reset_after=False, grad_clip=0.05), "GRU", {"reset_after": False}),
                (rnnfused.LSTMCell(3, 5, cell_clip=0.3, grad_clip=0.05), "LSTM", {"cell_clip": 0.3}),
                (rnnfused.RNNCell(3, 5, nonlinearity="relu", grad_clip=0.05), "RNN_RELU", {})]
    for cell, mode, options in variants:
        cell.double()
        with torch.no_grad():
            for p in cell.parameters():
                p.mul_(3)  # large enough that the clips fire
        weights = {"w_ih": cell.weight_ih, "w_hh": cell.weight_hh, "b_ih": cell.bias_ih, "b_hh": cell.bias_hh,
                   "w_hr": None}
        results = []
        for fn in (lambda x, h, c: cell(x, (h, c)) if c is not None else (cell(x, h), None),
                   lambda x, h, c: reference.cell_step(mode, x, h, c, weights, grad_clip=0.05, **options)):
            g = torch.Generator().manual_seed(1)
            x, h = (torch.randn(4, n, generator=g, dtype=torch.float64, requires_grad=True) for n in (3, 5))
            c = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True) if mode == "LSTM" else None
            outputs = [o for o in fn(x, h, c) if o is not None]
            loss = sum((o * torch.linspace(-1, 2, o.numel(), dtype=o.dtype).view_as(o)).sum() for o in outputs)
            leaves = [x, h] + ([c] if c is not None else []) + list(cell.parameters())
            results.append([o.detach() for o in outputs] + list(torch.autograd.grad(loss, leaves)))
        assert max_error(results[0], results[1]) <= 1e-10, mode


@pytest.mark.parametrize("name,layer_cls", [("LSTMCell", rnnfused.LSTM), ("GRUCell", rnnfused.GRU),
                                            ("RNNCell", rnnfused.RNN)])
def test_a_loop_of_steps_equals_the_sequence_layer(name, layer_cls):
    _, cell = _twins(name, 3, 4)
    layer = layer_cls(3, 4).double()
    layer.load_state_dict({f"{k}_l0": v for k, v in cell.state_dict().items()})
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    state = None
    outputs = []
    for step in x:
        state = cell(step, state)
        outputs.append(state[0] if isinstance(state, tuple) else state)
    output, _ = layer(x)
    assert max_error([torch.stack(outputs)], [output]) <= 1e-12


@pytest.mark.parametrize("name", CELLS)
def test_gradcheck(name):
    _, cell = _twins(name, 2, 3)
    names = [n for n, _ in cell.named_parameters()]

    def fn(x, h, *params):
        hx = (h, h * 0.5) if name == "LSTMCell" else h
        out = torch.func.functional_call(cell, dict(zip(names, params)), (x, hx))
        return out if isinstance(out, tuple) else (out,)

    x = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    h = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    params = tuple(p.detach().requires_grad_() for p in cell.parameters())
    assert gradcheck(fn, (x, h) + params, eps=1e-6, atol=1e-8, check_batched_grad=True)


def test_compiles_in_a_python_loop_without_graph_breaks():
    torch._dynamo.reset()
    _, cell = _twins("LSTMCell", 3, 4)

    def unroll(x):
        state = None
        for step in x:
            state = cell(step, state)
        return state[0]

    # aot_eager: the same graph and autograd without inductor's code generation (test_operators.py
    # compiles the same operator with inductor): 3 s instead of 14 with a cold inductor cache.
    compiled = torch.compile(unroll, fullgraph=True, backend="aot_eager")
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    expected = unroll(x)
    grad, = torch.autograd.grad(expected.sum(), x)
    actual = compiled(x)
    actual_grad, = torch.autograd.grad(actual.sum(), x)
    assert max_error([actual, actual_grad], [expected.detach(), grad]) <= 1e-12
