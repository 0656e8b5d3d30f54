"""The low-precision rule (flash-attention's): in float16 and bfloat16 the error of our outputs and
of every gradient (input, states, each weight) against a float64 reference is at most twice
the error torch.nn makes computing the same thing in the same dtype, plus one unit roundoff of
the value's scale. Per tensor, over a grid of modules, cells and shapes, on the CPU (torch.nn
computes float16 and bfloat16 there too) and on CUDA when present.

The inputs, states and parameters are first rounded to the low dtype and the float64 reference
runs on those rounded values, so the error measured is the computation's, not the rounding of
the inputs."""

import pytest
import torch
from torch import nn

import rnnfused
from conftest import MODES

DTYPES = [torch.bfloat16, torch.float16]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
# (mode, constructor arguments); the shapes (T, B, I, H): one element, the stepwise kernels (fewer
# than 8 steps), the persistent CPU threads (8 or more), and odd sizes.
STACKS = [("LSTM", {}), ("LSTM", {"proj_size": 5}), ("LSTM", {"num_layers": 2, "bidirectional": True}),
          ("GRU", {}), ("GRU", {"num_layers": 2}), ("RNN_TANH", {}), ("RNN_RELU", {"bidirectional": True})]
SHAPES = [(1, 1, 1, 6), (5, 3, 7, 16), (12, 4, 9, 24)]
CELLS = {"LSTMCell": (nn.LSTMCell, rnnfused.LSTMCell, {}), "GRUCell": (nn.GRUCell, rnnfused.GRUCell, {}),
         "RNNCell": (nn.RNNCell, rnnfused.RNNCell, {"nonlinearity": "tanh"}),
         "RNNCell_relu": (nn.RNNCell, rnnfused.RNNCell, {"nonlinearity": "relu"})}


def _values(result):
    """The tensors a module or cell returns: (output, h_n[, c_n]), (h', c') or h'."""
    if isinstance(result, torch.Tensor):
        return [result]
    return [result[0], *result[1]] if isinstance(result[1], tuple) else list(result)


def _results(module, x, states, weights):
    """The results of module(x, states) and the gradients of sum(result * weights) w.r.t. x, the
    states and every parameter, all as float64."""
    x = x.detach().clone().requires_grad_()
    states = [s.detach().clone().requires_grad_() for s in states]
    values = _values(module(x, tuple(states) if len(states) == 2 else states[0]))
    loss = sum((v * w.to(v.dtype)).sum() for v, w in zip(values, weights))
    grads = torch.autograd.grad(loss, [x, *states, *module.parameters()])
    return [t.detach().double() for t in (*values, *grads)]


def _check(exact_module, theirs, ours, x, states, dtype, device):
    """Rounds everything to ``dtype``, then compares the errors tensor by tensor."""
    with torch.no_grad():
        for module in (exact_module, theirs, ours):
            module.to(device)
        rounded = {k: v.to(dtype).double() for k, v in exact_module.state_dict().items()}
        exact_module.load_state_dict(rounded)
        theirs.to(dtype).load_state_dict(rounded)
        ours.to(dtype).load_state_dict(rounded)
    x = x.to(device=device, dtype=dtype).double()
    states = [s.to(device=device, dtype=dtype).double() for s in states]
    with torch.no_grad():
        shapes = [v.shape for v in _values(exact_module(x, tuple(states) if len(states) == 2 else states[0]))]
    generator = torch.Generator().manual_seed(11)
    weights = [torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype).double().to(device)
               for shape in shapes]
    exact = _results(exact_module, x, states, weights)
    low_x, low_states = x.to(dtype), [s.to(dtype) for s in states]
    theirs_results = _results(theirs, low_x, low_states, weights)
    ours_results = _results(ours, low_x, low_states, weights)
    unit_roundoff = torch.finfo(dtype).eps / 2
    for index, (e, t, o) in enumerate(zip(exact, theirs_results, ours_results)):
        if not e.numel():
            continue
        theirs_error, ours_error = (t - e).abs().max().item(), (o - e).abs().max().item()
        allowed = 2 * theirs_error + unit_roundoff * max(1.0, e.abs().max().item())
        assert ours_error <= allowed, (f"result {index} (values, then gradients of x, states, parameters): ours "
                                       f"{ours_error:.3g}, torch.nn {theirs_error:.3g}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}B{}I{}H{}".format(*s))
@pytest.mark.parametrize("mode,kwargs", STACKS, ids=lambda v: str(v))
def test_stack_error_at_most_twice_torch_nn_s(mode, kwargs, shape, dtype, device):
    steps, batch, inputs, hidden = shape
    torch_cls, ours_cls, extra = MODES[mode]
    torch.manual_seed(0)
    exact = torch_cls(inputs, hidden, **extra, **kwargs).double()
    theirs, ours = torch_cls(inputs, hidden, **extra, **kwargs), ours_cls(inputs, hidden, **extra, **kwargs)
    generator = torch.Generator().manual_seed(1)
    layers = kwargs.get("num_layers", 1) * (2 if kwargs.get("bidirectional") else 1)
    x = torch.randn(steps, batch, inputs, generator=generator, dtype=torch.float64)
    states = [torch.randn(layers, batch, kwargs.get("proj_size") or hidden, generator=generator, dtype=torch.float64)]
    if mode == "LSTM":
        states.append(torch.randn(layers, batch, hidden, generator=generator, dtype=torch.float64))
    _check(exact, theirs, ours, x, states, dtype, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(CELLS))
def test_cell_error_at_most_twice_torch_nn_s(name, dtype, device):
    torch_cls, ours_cls, extra = CELLS[name]
    torch.manual_seed(0)
    exact, theirs, ours = torch_cls(9, 24, **extra).double(), torch_cls(9, 24, **extra), ours_cls(9, 24, **extra)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(5, 9, generator=generator, dtype=torch.float64)
    states = [torch.randn(5, 24, generator=generator, dtype=torch.float64)
              for _ in range(2 if name == "LSTMCell" else 1)]
    _check(exact, theirs, ours, x, states, dtype, device)
