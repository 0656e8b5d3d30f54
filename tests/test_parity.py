"""rnnfused against torch.nn and against the reference, float64 on the CPU: outputs, final
states and the gradients of the input, the initial states and every parameter."""

import itertools

import pytest
import torch

import rnnfused
from conftest import MODES, TOLERANCE, make_twins, max_error, run_and_grad

INPUT, HIDDEN, PROJ = 5, 7, 3  # odd sizes on purpose


def _inputs(mode, steps, batch, layers, bidirectional, batch_first, with_h0, proj, seed=2):
    """(x, hx) as fresh leaf tensors; the same values for the same arguments."""
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, steps, INPUT) if batch_first else (steps, batch, INPUT)
    x = torch.randn(shape, generator=generator, dtype=torch.float64).requires_grad_()
    if not with_h0:
        return x, None
    states = layers * (2 if bidirectional else 1)
    h0 = torch.randn(states, batch, proj or HIDDEN, generator=generator, dtype=torch.float64)
    if mode != "LSTM":
        return x, h0.requires_grad_()
    c0 = torch.randn(states, batch, HIDDEN, generator=generator, dtype=torch.float64)
    return x, (h0.requires_grad_(), c0.requires_grad_())


def _leaves(x, hx):
    if hx is None:
        return [x]
    return [x] + (list(hx) if isinstance(hx, tuple) else [hx])


GRID = [
    (mode, layers, bidirectional, batch_first, bias, steps, batch, with_h0, proj)
    for mode, layers, bidirectional, batch_first, bias, steps, batch, with_h0 in itertools.product(
        MODES, (1, 3), (False, True), (False, True), (True, False), (1, 2, 17), (1, 3), (True, False))
    for proj in ((0, PROJ) if mode == "LSTM" else (0,))
]


@pytest.mark.parametrize("mode,layers,bidirectional,batch_first,bias,steps,batch,with_h0,proj", GRID)
def test_matches_torch_nn(mode, layers, bidirectional, batch_first, bias, steps, batch, with_h0, proj):
    kwargs = dict(num_layers=layers, bias=bias, batch_first=batch_first, bidirectional=bidirectional)
    if proj:
        kwargs["proj_size"] = proj
    theirs, ours = make_twins(mode, INPUT, HIDDEN, **kwargs)
    results = {}
    for name, module in (("torch", theirs), ("ours", ours)):
        x, hx = _inputs(mode, steps, batch, layers, bidirectional, batch_first, with_h0, proj)
        results[name] = run_and_grad(module, x, hx, _leaves(x, hx))
    (values, grads), (expected_values, expected_grads) = results["ours"], results["torch"]
    assert max_error(values, expected_values) <= TOLERANCE[torch.float64]
    assert max_error(grads, expected_grads) <= TOLERANCE[torch.float64]


# The reference is slow (a Python loop); a smaller grid covers its cases.
REFERENCE_GRID = [
    (mode, layers, bidirectional, batch_first, steps, proj)
    for mode, layers, bidirectional, batch_first, steps in itertools.product(
        MODES, (1, 2), (False, True), (False, True), (1, 6))
    for proj in ((0, PROJ) if mode == "LSTM" else (0,))
]


@pytest.mark.parametrize("mode,layers,bidirectional,batch_first,steps,proj", REFERENCE_GRID)
def test_matches_reference(mode, layers, bidirectional, batch_first, steps, proj):
    kwargs = dict(num_layers=layers, batch_first=batch_first, bidirectional=bidirectional)
    if proj:
        kwargs["proj_size"] = proj
    _, ours = make_twins(mode, INPUT, HIDDEN, **kwargs)
    x, hx = _inputs(mode, steps, 3, layers, bidirectional, batch_first, True, proj)
    values, grads = run_and_grad(ours, x, hx, _leaves(x, hx))
    x, hx = _inputs(mode, steps, 3, layers, bidirectional, batch_first, True, proj)
    expected, expected_grads = run_and_grad(lambda a, b: rnnfused.reference.forward(ours, a, b), x, hx,
                                            _leaves(x, hx), params=ours.parameters())
    assert max_error(values, expected) <= TOLERANCE[torch.float64]
    assert max_error(grads, expected_grads) <= TOLERANCE[torch.float64]


@pytest.mark.parametrize("mode", list(MODES))
def test_reference_matches_torch_nn(mode):
    """The oracle itself agrees with torch.nn (so agreeing with it means something)."""
    kwargs = dict(num_layers=2, bidirectional=True)
    if mode == "LSTM":
        kwargs["proj_size"] = PROJ
    theirs, _ = make_twins(mode, INPUT, HIDDEN, **kwargs)
    x, hx = _inputs(mode, 6, 3, 2, True, False, True, PROJ if mode == "LSTM" else 0)
    expected, expected_grads = run_and_grad(theirs, x, hx, _leaves(x, hx))
    x, hx = _inputs(mode, 6, 3, 2, True, False, True, PROJ if mode == "LSTM" else 0)
    values, grads = run_and_grad(lambda a, b: rnnfused.reference.forward(theirs, a, b), x, hx,
                                 _leaves(x, hx), params=theirs.parameters())
    assert max_error(values, expected) <= TOLERANCE[torch.float64]
    assert max_error(grads, expected_grads) <= TOLERANCE[torch.float64]


@pytest.mark.parametrize("mode", list(MODES))
def test_unbatched_input(mode):
    theirs, ours = make_twins(mode, INPUT, HIDDEN, num_layers=2, bidirectional=True)
    for batch_first in (False, True):
        theirs.batch_first = ours.batch_first = batch_first
        results = []
        for module in (theirs, ours):
            x = torch.randn(4, INPUT, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
            x.requires_grad_()
            h0 = torch.randn(4, HIDDEN, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
            hx = (h0.requires_grad_(), torch.zeros(4, HIDDEN, dtype=torch.float64).requires_grad_()) \
                if mode == "LSTM" else h0.requires_grad_()
            results.append(run_and_grad(module, x, hx, _leaves(x, hx)))
        assert [v.shape for v in results[1][0]] == [v.shape for v in results[0][0]]
        assert max_error(results[1][0], results[0][0]) <= TOLERANCE[torch.float64]
        assert max_error(results[1][1], results[0][1]) <= TOLERANCE[torch.float64]


@pytest.mark.parametrize("mode", list(MODES))
def test_non_contiguous_input_and_states(mode):
    theirs, ours = make_twins(mode, INPUT, HIDDEN, num_layers=2, bidirectional=True)
    results = []
    for module in (theirs, ours):
        generator = torch.Generator().manual_seed(5)
        base = torch.randn(3, 9, 2 * INPUT, generator=generator, dtype=torch.float64)
        x = base.transpose(0, 1)[:, :, ::2].detach().requires_grad_()  # strided view as a leaf
        assert not x.is_contiguous()
        h0 = torch.randn(3, 4, HIDDEN, generator=generator, dtype=torch.float64).transpose(0, 1)
        h0 = h0.detach().requires_grad_()
        hx = (h0, h0.detach().clone().requires_grad_()) if mode == "LSTM" else h0
        results.append(run_and_grad(module, x, hx, _leaves(x, hx)))
    assert max_error(results[1][0], results[0][0]) <= TOLERANCE[torch.float64]
    assert max_error(results[1][1], results[0][1]) <= TOLERANCE[torch.float64]


@pytest.mark.parametrize("mode", list(MODES))
def test_float32_close_to_torch_nn(mode):
    theirs, ours = make_twins(mode, 16, 32, num_layers=2, bidirectional=True, dtype=torch.float32)
    results = []
    for module in (theirs, ours):
        x = torch.randn(20, 4, 16, generator=torch.Generator().manual_seed(6)).requires_grad_()
        results.append(run_and_grad(module, x, None, [x]))
    assert max_error(results[1][0], results[0][0]) <= TOLERANCE[torch.float32]
    assert max_error(results[1][1], results[0][1]) <= 10 * TOLERANCE[torch.float32]
