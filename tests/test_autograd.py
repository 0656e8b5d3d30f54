"""Autograd behaviour: gradcheck, repeatable backward, eval mode, dropout, empty batches."""

import pytest
import torch
from torch.autograd import gradcheck
from torch.nn.utils.rnn import pack_sequence

import rnnfused
from rnnfused.functional import Cell, recurrent_layer
from conftest import MODES, make_twins

CELLS = {"LSTM": Cell.LSTM, "GRU": Cell.GRU, "GRU_CHO": Cell.GRU_CHO, "RNN_TANH": Cell.RNN_TANH,
         "RNN_RELU": Cell.RNN_RELU}


def _layer_args(cell, steps=4, batch=3, inputs=3, hidden=2, proj=0, seed=0):
    gates = {"LSTM": 4, "GRU": 3, "GRU_CHO": 3}.get(cell, 1) * hidden
    width = proj or hidden
    g = torch.Generator().manual_seed(seed)

    def t(*shape):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * 0.5).requires_grad_()

    c0 = t(batch, hidden) if cell == "LSTM" else None
    return (t(steps, batch, inputs), t(batch, width), c0, t(gates, inputs), t(gates, width), t(gates),
            t(gates), t(width, hidden) if proj else None)


@pytest.mark.parametrize("cell,proj,reverse", [
    ("LSTM", 0, False), ("LSTM", 0, True), ("LSTM", 2, False), ("GRU", 0, False), ("GRU", 0, True),
    ("GRU_CHO", 0, False), ("RNN_TANH", 0, True), ("RNN_RELU", 0, False)])
def test_gradcheck_layer(cell, proj, reverse):
    args = _layer_args(cell, hidden=3 if proj else 2, proj=proj)

    def fn(*tensors):
        y, h, c = recurrent_layer(CELLS[cell], *tensors, reverse=reverse)
        return (y, h) if c is None else (y, h, c)

    inputs = tuple(a for a in args if a is not None)
    positions = [i for i, a in enumerate(args) if a is not None]

    def fn_from_present(*present):
        full = list(args)
        for i, value in zip(positions, present):
            full[i] = value
        return fn(*full)

    assert gradcheck(fn_from_present, inputs, eps=1e-6, atol=1e-8, check_batched_grad=True)


@pytest.mark.parametrize("mode", list(MODES))
def test_gradcheck_packed_bidirectional_module(mode):
    _, ours = make_twins(mode, 3, 2, bidirectional=True)
    generator = torch.Generator().manual_seed(1)
    seqs = [torch.randn(n, 3, generator=generator, dtype=torch.float64).requires_grad_() for n in (4, 1, 3)]

    def fn(*tensors):
        output, hidden = ours(pack_sequence(list(tensors), enforce_sorted=False))
        return (output.data,) + (hidden if isinstance(hidden, tuple) else (hidden,))

    assert gradcheck(fn, tuple(seqs), eps=1e-6, atol=1e-8, check_batched_grad=True)


@pytest.mark.parametrize("mode", list(MODES))
def test_repeated_backward_is_bitwise_identical(mode):
    _, ours = make_twins(mode, 5, 8, num_layers=2, bidirectional=True, dtype=torch.float32)
    x = torch.randn(7, 3, 5, requires_grad=True)
    output, _ = ours(x)
    weight = torch.randn_like(output)
    grads = [torch.autograd.grad(output, [x] + list(ours.parameters()), weight, retain_graph=True)
             for _ in range(3)]
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            assert torch.equal(a, b)


def test_backward_in_eval_mode():
    theirs, ours = make_twins("LSTM", 3, 4, num_layers=2, dropout=0.5)
    theirs.eval(), ours.eval()
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    g_ours = torch.autograd.grad(ours(x)[0].sum(), x)[0]
    g_theirs = torch.autograd.grad(theirs(x)[0].sum(), x)[0]
    assert (g_ours - g_theirs).abs().max() < 1e-10


def test_no_grad_saves_nothing_and_matches():
    _, ours = make_twins("GRU", 3, 4)
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        out = ours(x)[0]
    assert out.grad_fn is None
    assert torch.equal(out, ours(x)[0].detach())


@pytest.mark.parametrize("mode", list(MODES))
def test_batch_size_zero(mode):
    theirs, ours = make_twins(mode, 3, 4, num_layers=2, bidirectional=True)
    x = torch.randn(5, 0, 3, dtype=torch.float64, requires_grad=True)
    expected, actual = theirs(x), ours(x)
    assert actual[0].shape == expected[0].shape
    states = (actual[1], expected[1]) if mode != "LSTM" else (actual[1][1], expected[1][1])
    assert states[0].shape == states[1].shape
    actual[0].sum().backward()
    assert x.grad.shape == x.shape
    assert all(p.grad is not None and not p.grad.any() for p in ours.parameters())


def test_dropout_between_layers_in_training_only():
    theirs, ours = make_twins("LSTM", 3, 6, num_layers=3, dropout=0.5, dtype=torch.float32)
    x = torch.randn(5, 2, 3)
    ours.train(), theirs.train()
    torch.manual_seed(3)
    a = ours(x)[0]
    torch.manual_seed(3)
    b = ours(x)[0]
    c = ours(x)[0]
    assert torch.equal(a, b) and not torch.equal(a, c)  # seeded masks, fresh masks per call
    torch.manual_seed(3)
    expected = theirs(x)[0]
    assert (a - expected).abs().max() < 1e-5  # the same masks as torch.nn for the same seed
    ours.eval()
    evaluated = ours(x)[0]
    ours.dropout = 0.0
    ours.train()
    assert torch.equal(ours(x)[0], evaluated)  # assigning .dropout later takes effect
    one_layer = rnnfused.GRU(3, 4, num_layers=1)
    one_layer.dropout = 0.9  # no layer to drop after: no effect
    y = torch.randn(4, 1, 3)
    assert torch.equal(one_layer(y)[0], one_layer.eval()(y)[0])


@pytest.mark.parametrize("mode", list(MODES))
def test_autocast_runs_in_the_autocast_dtype(mode):
    theirs, ours = make_twins(mode, 3, 8, num_layers=2, dtype=torch.float32)
    x = torch.randn(6, 2, 3, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output, hidden = ours(x)
        try:
            their_dtype = theirs(x)[0].dtype
        except RuntimeError:  # oneDNN has no bfloat16 LSTM on CPUs without AVX-512: torch.nn cannot run here
            their_dtype = None
    # torch.nn's dtype: bfloat16 for LSTM and RNN; the GRU's h' = (1 - z) n + z h meets the
    # float32 state and promotes to float32 (rnnfused.functional.autocast_result_dtypes).
    expected_dtype = torch.float32 if mode == "GRU" else torch.bfloat16
    assert output.dtype == expected_dtype and their_dtype in (None, expected_dtype)
    expected, _ = ours(x)
    assert (output.float() - expected).abs().max() < 0.05
    output.float().sum().backward()
    assert x.grad.dtype == torch.float32 and ours.weight_hh_l1.grad.dtype == torch.float32
