"""The module surface of torch.nn: constructor, validation, attributes, parameters and their
initialisation, state_dict, serialisation, device/dtype moves, and forward errors."""

import copy
import io
import pickle
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_sequence

import rnnfused
from conftest import MODES, make_twins, tf32_switch


def _outcome(fn):
    """(exception type name, message) or ("ok", None)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            fn()
        except Exception as error:  # noqa: BLE001 - comparing exactly what torch.nn raises
            return type(error).__name__, str(error)
    return "ok", None


CONSTRUCTOR_CASES = [
    ((3, 4), {}),
    ((3, 4, 2), {"dropout": 0.5}),
    ((3, 4), {"dropout": 1.5}),
    ((3, 4), {"dropout": -0.1}),
    ((3, 4), {"dropout": True}),
    ((3, 4), {"dropout": "0.1"}),
    ((3, 4), {"bias": 1}),
    ((3, 4), {"batch_first": None}),
    ((3.0, 4), {}),
    ((0, 4), {}),
    ((3, 0), {}),
    ((3, -2), {}),
    ((3, 4.0), {}),
    ((3, 4, 0), {}),
    ((3, 4, 2.0), {}),
    ((3, 4), {"proj_size": -1}),
    ((3, 4), {"proj_size": 4}),
    ((3, 4), {"proj_size": 2}),
    ((3, 4, 2, True, False, 0.0, True), {}),
]


@pytest.mark.parametrize("cls_name", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("args,kwargs", CONSTRUCTOR_CASES)
def test_constructor_validation_matches(cls_name, args, kwargs):
    theirs = _outcome(lambda: getattr(nn, cls_name)(*args, **kwargs))
    ours = _outcome(lambda: getattr(rnnfused, cls_name)(*args, **kwargs))
    assert ours == theirs


@pytest.mark.parametrize("args,kwargs", [((3, 4, 1, "relu"), {}), ((3, 4), {"nonlinearity": "relu"}),
                                         ((3, 4), {"nonlinearity": "sigmoid"}), ((3, 4, 1, "gelu"), {})])
def test_rnn_nonlinearity_argument(args, kwargs):
    assert _outcome(lambda: rnnfused.RNN(*args, **kwargs)) == _outcome(lambda: nn.RNN(*args, **kwargs))
    if _outcome(lambda: nn.RNN(*args, **kwargs))[0] == "ok":
        assert rnnfused.RNN(*args, **kwargs).nonlinearity == nn.RNN(*args, **kwargs).nonlinearity


def test_dropout_warning_for_one_layer():
    with pytest.warns(UserWarning, match="num_layers greater than 1"):
        rnnfused.LSTM(3, 4, dropout=0.2)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("kwargs", [{}, {"num_layers": 3, "bidirectional": True}, {"bias": False},
                                    {"num_layers": 2, "proj_size": 2}])
def test_parameters_and_initialisation_match(mode, kwargs):
    if "proj_size" in kwargs and mode != "LSTM":
        pytest.skip("projections are LSTM only")
    torch_cls, ours_cls, extra = MODES[mode]
    torch.manual_seed(7)
    theirs = torch_cls(5, 6, **extra, **kwargs)
    torch.manual_seed(7)
    ours = ours_cls(5, 6, **extra, **kwargs)
    theirs_params, ours_params = list(theirs.named_parameters()), list(ours.named_parameters())
    assert [n for n, _ in ours_params] == [n for n, _ in theirs_params]
    for (_, a), (_, b) in zip(ours_params, theirs_params):
        assert torch.equal(a, b)  # same shapes and the same random draws
    assert ours._flat_weights_names == theirs._flat_weights_names
    assert ours._all_weights == theirs._all_weights
    assert [[tuple(w.shape) for w in ws] for ws in ours.all_weights] == \
        [[tuple(w.shape) for w in ws] for ws in theirs.all_weights]
    for name in ("mode", "input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout",
                 "bidirectional", "proj_size"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert repr(ours).split("(", 1)[1] == repr(theirs).split("(", 1)[1]


@pytest.mark.parametrize("mode", list(MODES))
def test_state_dict_round_trips_both_ways(mode):
    theirs, ours = make_twins(mode, 5, 6, num_layers=2, bidirectional=True, dtype=torch.float32)
    fresh_ours = MODES[mode][1](5, 6, num_layers=2, bidirectional=True, **MODES[mode][2])
    fresh_ours.load_state_dict(theirs.state_dict(), strict=True)
    fresh_theirs = MODES[mode][0](5, 6, num_layers=2, bidirectional=True, **MODES[mode][2])
    fresh_theirs.load_state_dict(ours.state_dict(), strict=True)
    for a, b in zip(fresh_ours.state_dict().values(), fresh_theirs.state_dict().values()):
        assert torch.equal(a, b)
    assert list(ours.state_dict()) == list(theirs.state_dict())


@pytest.mark.parametrize("mode", list(MODES))
def test_pickle_deepcopy_and_torch_save(mode):
    _, ours = make_twins(mode, 5, 6, num_layers=2, dtype=torch.float64)
    x = torch.randn(4, 2, 5, dtype=torch.float64)
    expected = ours(x)[0]
    buffer = io.BytesIO()
    torch.save(ours, buffer)
    buffer.seek(0)
    copies = [pickle.loads(pickle.dumps(ours)), copy.deepcopy(ours),
              torch.load(buffer, weights_only=False)]
    for clone in copies:
        assert type(clone) is type(ours)
        assert torch.equal(clone(x)[0], expected)


def test_to_and_double_keep_working():
    module = rnnfused.LSTM(3, 4, num_layers=2)
    module.double()
    assert module.weight_ih_l0.dtype == torch.float64
    out, _ = module(torch.randn(2, 1, 3, dtype=torch.float64))
    assert out.dtype == torch.float64
    module.to(torch.float32)
    out, _ = module(torch.randn(2, 1, 3))
    assert out.dtype == torch.float32
    module.flatten_parameters()  # a no-op, present for compatibility


def test_factory_kwargs():
    module = rnnfused.GRU(3, 4, dtype=torch.float64, device="cpu")
    assert all(p.dtype == torch.float64 for p in module.parameters())


def test_assigning_a_parameter_is_used():
    _, ours = make_twins("GRU", 3, 4, dtype=torch.float64)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    before = ours(x)[0]
    ours.weight_hh_l0 = nn.Parameter(torch.zeros_like(ours.weight_hh_l0))
    after = ours(x)[0]
    assert not torch.equal(before, after)
    reference = rnnfused.reference.forward(ours, x)[0]
    assert (after - reference).abs().max() < 1e-12


def _bad_inputs(mode):
    x = torch.randn(5, 2, 3)
    hidden = torch.zeros(1, 2, 4)
    good_hx = (hidden, hidden.clone()) if mode == "LSTM" else hidden

    def wrap(h):
        return (h, hidden.clone()) if mode == "LSTM" else h

    cases = {
        "4-D input": (torch.randn(1, 5, 2, 3), None),
        "1-D input": (torch.randn(3), None),
        "wrong input size": (torch.randn(5, 2, 4), None),
        "float64 input": (x.double(), None),
        "int input": (torch.ones(5, 2, 3, dtype=torch.long), None),
        "hidden batch size": (x, wrap(torch.zeros(1, 3, 4))),
        "hidden layers": (x, wrap(torch.zeros(2, 2, 4))),
        "hidden width": (x, wrap(torch.zeros(1, 2, 5))),
        "2-D hidden for 3-D input": (x, wrap(torch.zeros(2, 4))),
        "3-D hidden for 2-D input": (torch.randn(5, 3), good_hx),
        "zero-length sequence": (torch.randn(0, 2, 3), None),
        "zero-length unbatched": (torch.randn(0, 3), None),
    }
    if mode == "LSTM":
        cases["cell batch size"] = (x, (hidden, torch.zeros(1, 3, 4)))
        cases["hx as one tensor"] = (x, hidden)
        cases["hx as three tensors"] = (x, (hidden, hidden.clone(), hidden.clone()))
    else:
        cases["hx as tuple"] = (x, (hidden,))
    return cases


@pytest.mark.parametrize("mode", list(MODES))
def test_forward_errors_match(mode):
    theirs, ours = make_twins(mode, 3, 4, dtype=torch.float32)
    for name, (x, hx) in _bad_inputs(mode).items():
        assert _outcome(lambda: ours(x, hx)) == _outcome(lambda: theirs(x, hx)), name


def test_lstm_hx_as_one_4d_tensor_is_a_type_error():
    """torch.nn fails in its C++ binding with a TypeError; rnnfused says what it expected."""
    theirs, ours = make_twins("LSTM", 3, 4, dtype=torch.float32)
    x, hx = torch.randn(5, 2, 3), torch.zeros(2, 1, 2, 4)
    assert _outcome(lambda: theirs(x, hx))[0] == "TypeError"
    assert _outcome(lambda: ours(x, hx)) == (
        "TypeError", "LSTM expects hx as a tuple (h_0, c_0) of tensors, got Tensor")


@pytest.mark.parametrize("mode", list(MODES))
def test_hidden_dtype_mismatch_is_a_runtime_error(mode):
    """torch.nn raises RuntimeError with a backend-specific message; ours says what is wrong."""
    theirs, ours = make_twins(mode, 3, 4, dtype=torch.float32)
    hidden = torch.zeros(1, 2, 4, dtype=torch.float64)
    hx = (hidden, hidden.float()) if mode == "LSTM" else hidden
    x = torch.randn(5, 2, 3)
    assert _outcome(lambda: theirs(x, hx))[0] == "RuntimeError"
    kind, message = _outcome(lambda: ours(x, hx))
    assert kind == "RuntimeError" and "dtype" in message


def test_packed_lstm_wrong_hidden_is_a_runtime_error():
    theirs, ours = make_twins("LSTM", 3, 4, dtype=torch.float32)
    packed = pack_sequence([torch.randn(4, 3), torch.randn(2, 3)])
    hx = (torch.zeros(1, 3, 4), torch.zeros(1, 2, 4))
    assert _outcome(lambda: theirs(packed, hx))[0] == "RuntimeError"
    assert _outcome(lambda: ours(packed, hx)) == ("RuntimeError", "Expected hidden[0] size (1, 2, 4), got [1, 3, 4]")


def test_weights_on_another_device_is_torch_nn_s_error():
    other = "cuda" if torch.cuda.is_available() else "meta"
    theirs, ours = torch.nn.GRU(3, 4).to(other), rnnfused.GRU(3, 4).to(other)
    x = torch.randn(2, 1, 3)
    expected = _outcome(lambda: theirs(x))
    assert expected[0] == "RuntimeError" and other in expected[1]
    assert _outcome(lambda: ours(x)) == expected


TF32_SWITCHES = [("fp32_precision", "tf32"), ("fp32_precision", "ieee"), ("allow_tf32", True),
                 ("allow_tf32", False)]


@pytest.mark.parametrize("api,value", TF32_SWITCHES)
def test_tf32_switch_of_either_api_leaves_cpu_layers_working(api, value):
    """Setting torch's TF32 switch through its newer API made every call fail (torch refuses
    a read through the legacy getter then); on the CPU the switch changes nothing."""
    if not hasattr(torch.backends.cuda.matmul, api):
        pytest.skip(f"this torch has no torch.backends.cuda.matmul.{api}")
    theirs, ours = make_twins("LSTM", 3, 4)
    x = torch.randn(2, 1, 3, dtype=torch.float64)
    with tf32_switch(api, value):
        assert (ours(x)[0] - theirs(x)[0]).abs().max() <= 1e-12
        ours(x.requires_grad_())[0].sum().backward()


def _saved_lstm_layer(device="cpu"):
    """A forward of the LSTM operator, and backward(**replaced) with some saved tensors replaced."""
    from rnnfused import _ops
    inf = float("inf")
    x = torch.randn(3, 2, 4, device=device)
    h0, c0 = torch.zeros(2, 5, device=device), torch.zeros(2, 5, device=device)
    weights = [torch.randn(20, 4, device=device), torch.randn(20, 5, device=device)]
    options = _ops.LayerOptions(_ops.Cell.LSTM, has_biases=False, cell_clip=inf, grad_clip=inf)
    y, h_n, c_n, (hidden, gates, cells, proj_in, state_new), _ = _ops.layer_forward(options, x, None, h0, c0, weights,
                                                                                    save_for_backward=True)

    def backward(**replaced):
        saved = {"hidden": hidden, "gates": gates, "cells": cells, "dy": torch.ones_like(y), **replaced}
        return _ops.layer_backward(
            options, x, None, h0, c0, weights, [], None, [],
            (saved["hidden"], saved["gates"], saved["cells"], proj_in, state_new),
            saved["dy"], torch.zeros_like(h_n), torch.zeros_like(c_n), need_dx=True, need_weights=True)
    return backward, hidden, gates, cells


def test_backward_checks_the_saved_tensors_and_output_gradient():
    backward, hidden, gates, cells = _saved_lstm_layer()
    backward()  # as saved: fine
    bad = {
        "hidden": [(hidden[:2], "saved hidden states must have shape"),
                   (hidden.double(), "saved hidden states has dtype")],
        "dy": [(torch.ones(3, 2, 4), "grad of output must have shape"),
               (torch.ones_like(hidden).half(), "grad of output has dtype")],
        "gates": [(gates[:, :8], "saved gates must have shape"), (gates.double(), "saved gates has dtype")],
        "cells": [(cells[:1], "saved cells must have shape"), (cells.half(), "saved cells has dtype")],
    }
    for name, cases in bad.items():
        for value, message in cases:
            with pytest.raises(RuntimeError, match=message):
                backward(**{name: value})
