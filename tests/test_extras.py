"""The seed's extras: the Cho et al. 2014 GRU (reset_after=False), cell_clip (LSTM) and
grad_clip (every cell), against the autograd reference and the hand-written BPTT oracle."""

import itertools

import numpy as np
import pytest
import torch
from torch.autograd import gradcheck
from torch.nn.utils.rnn import pack_sequence

import rnnfused
from rnnfused.functional import Cell, recurrent_layer
from conftest import max_error, run_and_grad

bptt = pytest.importorskip("rnnfused.bptt", reason="the BPTT oracle needs numba")

CLASSES = {"LSTM": rnnfused.LSTM, "GRU": rnnfused.GRU, "RNN_TANH": rnnfused.RNN, "RNN_RELU": rnnfused.RNN}
EXTRA = {"RNN_RELU": {"nonlinearity": "relu"}}

# (mode, module options): every extra alone and together
VARIANTS = [
    ("GRU", {"reset_after": False}),
    ("GRU", {"reset_after": False, "grad_clip": 0.05}),
    ("GRU", {"grad_clip": 0.05}),
    ("LSTM", {"cell_clip": 0.5}),
    ("LSTM", {"grad_clip": 0.05}),
    ("LSTM", {"cell_clip": 0.5, "grad_clip": 0.05}),
    ("LSTM", {"cell_clip": 0.5, "grad_clip": 0.05, "proj_size": 3}),
    ("RNN_TANH", {"grad_clip": 0.05}),
    ("RNN_RELU", {"grad_clip": 0.05}),
]


def _module(mode, options, **kwargs):
    torch.manual_seed(0)
    module = CLASSES[mode](5, 7, **EXTRA.get(mode, {}), **options, **kwargs).double()
    with torch.no_grad():  # larger weights, so that the clips are active
        for p in module.parameters():
            p.mul_(3)
    return module


@pytest.mark.parametrize("mode,options", VARIANTS)
@pytest.mark.parametrize("layers,bidirectional,packed", [(1, False, False), (2, True, False), (2, True, True)])
def test_module_matches_reference(mode, options, layers, bidirectional, packed):
    module = _module(mode, options, num_layers=layers, bidirectional=bidirectional)
    results = []
    for fn, params in ((module, None), (lambda a, h: rnnfused.reference.forward(module, a, h), module.parameters())):
        generator = torch.Generator().manual_seed(1)
        if packed:
            leaves = [torch.randn(n, 5, generator=generator, dtype=torch.float64).requires_grad_() for n in (7, 2, 5)]
            x = pack_sequence(leaves, enforce_sorted=False)
        else:
            x = torch.randn(7, 3, 5, generator=generator, dtype=torch.float64).requires_grad_()
            leaves = [x]
        results.append(run_and_grad(fn, x, None, leaves, params=params))
    assert max_error(results[0][0], results[1][0]) <= 1e-10
    assert max_error(results[0][1], results[1][1]) <= 1e-10


CELLS = {"LSTM": Cell.LSTM, "GRU": Cell.GRU, "GRU_CHO": Cell.GRU_CHO, "RNN_TANH": Cell.RNN_TANH,
         "RNN_RELU": Cell.RNN_RELU}
ORACLE_CASES = [
    (cell, clips, reverse)
    for cell, clips, reverse in itertools.product(
        CELLS, ({}, {"grad_clip": 0.05}, {"cell_clip": 0.5}, {"cell_clip": 0.5, "grad_clip": 0.05}), (False, True))
    if cell == "LSTM" or "cell_clip" not in clips
]


def _layer_inputs(cell, seed=3):
    g = torch.Generator().manual_seed(seed)
    hidden, gates = 6, {"LSTM": 4, "GRU": 3, "GRU_CHO": 3}.get(cell, 1) * 6

    def t(*shape, scale=1.5):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).requires_grad_()

    x, h0 = t(8, 3, 4), t(3, hidden)
    c0 = t(3, hidden) if cell == "LSTM" else None
    weights = dict(w_ih=t(gates, 4), w_hh=t(gates, hidden), b_ih=t(gates), b_hh=t(gates))
    return x, h0, c0, weights


@pytest.mark.parametrize("cell,clips,reverse", ORACLE_CASES)
def test_backward_matches_hand_written_bptt(cell, clips, reverse):
    x, h0, c0, w = _layer_inputs(cell)
    y, h_n, c_n = recurrent_layer(CELLS[cell], x, h0, c0, w["w_ih"], w["w_hh"], w["b_ih"], w["b_hh"], reverse=reverse,
                                  **clips)
    g = torch.Generator().manual_seed(4)
    outs = [y, h_n] + ([c_n] if c_n is not None else [])
    out_grads = [torch.randn(o.shape, generator=g, dtype=torch.float64) for o in outs]
    leaves = [x, h0] + ([c0] if c0 is not None else []) + list(w.values())
    grads = torch.autograd.grad(outs, leaves, out_grads)
    mode = "GRU" if cell == "GRU_CHO" else cell
    outputs, oracle = bptt.layer(mode, x.detach(), h0.detach(), None if c0 is None else c0.detach(),
                                 {k: v.detach() for k, v in w.items()}, *[o.numpy() for o in out_grads],
                                 reverse=reverse, reset_after=cell != "GRU_CHO", **clips)
    names = ["x", "h0"] + (["c0"] if c0 is not None else []) + ["w_ih", "w_hh", "b_ih", "b_hh"]
    assert np.abs(y.detach().numpy() - outputs["y"]).max() <= 1e-10
    for name, grad in zip(names, grads):
        assert np.abs(grad.numpy() - oracle[name]).max() <= 1e-10, name


@pytest.mark.parametrize("cell,clips", [(c, k) for c, k, r in ORACLE_CASES if not r])
def test_oracle_matches_autograd_on_the_reference(cell, clips):
    """The two oracles agree with each other, so neither is tuned to the kernels."""
    x, h0, c0, w = _layer_inputs(cell, seed=5)
    mode = "GRU" if cell == "GRU_CHO" else cell
    y, h_n, c_n = rnnfused.reference.layer(mode, x, h0, c0, {**w, "w_hr": None}, reset_after=cell != "GRU_CHO",
                                           cell_clip=clips.get("cell_clip"), grad_clip=clips.get("grad_clip"))
    outs = [y, h_n] + ([c_n] if c_n is not None else [])
    out_grads = [torch.ones_like(o) * 0.5 for o in outs]
    leaves = [x, h0] + ([c0] if c0 is not None else []) + list(w.values())
    grads = torch.autograd.grad(outs, leaves, out_grads)
    _, oracle = bptt.layer(mode, x.detach(), h0.detach(), None if c0 is None else c0.detach(),
                           {k: v.detach() for k, v in w.items()}, *[o.numpy() for o in out_grads],
                           reset_after=cell != "GRU_CHO", **clips)
    names = ["x", "h0"] + (["c0"] if c0 is not None else []) + ["w_ih", "w_hh", "b_ih", "b_hh"]
    for name, grad in zip(names, grads):
        assert np.abs(grad.numpy() - oracle[name]).max() <= 1e-10, name


def test_clips_are_active_in_these_tests():
    """Agreement above would mean little if no clamp fired: check that they do."""
    x, h0, c0, w = _layer_inputs("LSTM")
    args = (Cell.LSTM, x, h0, c0, w["w_ih"], w["w_hh"], w["b_ih"], w["b_hh"])
    y_plain, _, c_plain = recurrent_layer(*args)
    y_clip, _, c_clip = recurrent_layer(*args, cell_clip=0.5)
    assert c_plain.abs().max() > 0.5 and c_clip.abs().max() <= 0.5 and not torch.equal(y_plain, y_clip)
    g_plain = torch.autograd.grad(y_plain.sum(), w["w_hh"])[0]
    g_clip = torch.autograd.grad(recurrent_layer(*args, grad_clip=0.05)[0].sum(), w["w_hh"])[0]
    assert not torch.allclose(g_plain, g_clip)


@pytest.mark.parametrize("cell,clips", [("GRU_CHO", {}), ("LSTM", {"cell_clip": 0.8})])
def test_gradcheck(cell, clips):
    x, h0, c0, w = _layer_inputs(cell, seed=6)
    inputs = [x, h0] + ([c0] if c0 is not None else []) + list(w.values())

    def fn(*tensors):
        if c0 is None:
            tensors = tensors[:2] + (None,) + tensors[2:]
        return recurrent_layer(CELLS[cell], *tensors, **clips)[:2]

    assert gradcheck(fn, tuple(inputs), eps=1e-7, atol=1e-6, check_batched_grad=True)


def test_cho_gru_has_the_same_parameters_and_differs_from_pytorch_form():
    torch.manual_seed(1)
    pytorch_form = rnnfused.GRU(4, 6, num_layers=2)
    torch.manual_seed(1)
    cho = rnnfused.GRU(4, 6, num_layers=2, reset_after=False)
    assert [(n, p.shape) for n, p in cho.named_parameters()] == [(n, p.shape) for n, p in pytorch_form.named_parameters()]
    cho.load_state_dict(torch.nn.GRU(4, 6, num_layers=2).state_dict())  # weights interchange
    x = torch.randn(5, 2, 4)
    pytorch_form.load_state_dict(cho.state_dict())
    assert not torch.allclose(cho(x)[0], pytorch_form(x)[0])
    assert "reset_after=False" in repr(cho)


@pytest.mark.parametrize("make,error,match", [
    (lambda: rnnfused.GRU(3, 4, cell_clip=1.0), ValueError, "cell_clip is only supported for LSTM"),
    (lambda: rnnfused.LSTM(3, 4, reset_after=False), ValueError, "reset_after is only supported for GRU"),
    (lambda: rnnfused.LSTM(3, 4, cell_clip=0), ValueError, "cell_clip must be None or a positive number"),
    (lambda: rnnfused.RNN(3, 4, grad_clip=-1.0), ValueError, "grad_clip must be None or a positive number"),
    (lambda: rnnfused.GRU(3, 4, grad_clip="1"), ValueError, "grad_clip must be None or a positive number"),
    (lambda: rnnfused.GRU(3, 4, reset_after=0), TypeError, "reset_after should be of type bool"),
])
def test_extra_argument_validation(make, error, match):
    with pytest.raises(error, match=match):
        make()
