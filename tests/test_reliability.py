"""What a hostile user found (issue 26), each against torch.nn where torch.nn has the feature:
tensors left on another device, sizes the operators and the reference equations must refuse
alike, projections of zero or H rows, NaN through the relu backward, result dtypes under
autocast, batch norm on an empty batch, the cells' hx errors, torch.jit.script, batched
backward, and what the thread count changes."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn
from torch.autograd import gradcheck

import rnnfused
from conftest import MODES, make_twins, max_error
from rnnfused.functional import Cell, recurrent_layer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _x(*shape, seed=1, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _raised(fn):
    """(exception type, message) of what fn() raised; fails when it raised nothing."""
    with pytest.raises(Exception) as error:
        fn()
    return type(error.value), str(error.value).splitlines()[0]


# --- tensors on another device ------------------------------------------------------------------

def _meta_initialised(cls, missing, **kwargs):
    """A module built on the meta device, then given a checkpoint without ``missing`` by
    load_state_dict(assign=True, strict=False): that one tensor stays on meta."""
    torch.manual_seed(0)
    state = cls(3, 4, **kwargs).state_dict()
    with torch.device("meta"):
        module = cls(3, 4, **kwargs)
    del state[missing]
    module.load_state_dict(state, assign=True, strict=False)
    return module


@pytest.mark.parametrize("missing", ["bias_ih_l0", "weight_hh_l0_reverse", "weight_hr_l0"])
def test_a_parameter_left_on_meta_raises_torch_nn_s_error(missing):
    kwargs = dict(proj_size=2, bidirectional=True)
    inputs = _x(5, 2, 3, dtype=torch.float32)
    expected = _raised(lambda: _meta_initialised(nn.LSTM, missing, **kwargs)(inputs))
    assert expected[1].startswith("Input and parameter tensors are not at the same device")
    assert _raised(lambda: _meta_initialised(rnnfused.LSTM, missing, **kwargs)(inputs)) == expected


@pytest.mark.parametrize("missing", ["norm_weight_hh_l0", "norm_bias_c_l0", "running_var_c_l0"])
def test_a_norm_weight_or_running_statistic_left_on_meta_raises(missing):
    module = _meta_initialised(rnnfused.LSTM, missing, norm="batch")
    error = _raised(lambda: module(_x(5, 2, 3, dtype=torch.float32)))
    assert error == (RuntimeError, "Input and parameter tensors are not at the same device, found input tensor at "
                                   "cpu and parameter tensor at meta")


def test_a_hidden_state_on_another_device_raises_torch_nn_s_error():
    h0 = torch.zeros(1, 2, 4, device="meta")
    expected = _raised(lambda: nn.GRU(3, 4)(_x(5, 2, 3, dtype=torch.float32), h0))
    assert _raised(lambda: rnnfused.GRU(3, 4)(_x(5, 2, 3, dtype=torch.float32), h0)) == expected


@pytest.mark.parametrize("cls", [rnnfused.LSTMCell, rnnfused.GRUCell, rnnfused.RNNCell])
def test_a_cell_parameter_on_meta_raises(cls):
    cell = cls(3, 4)
    cell.bias_hh = nn.Parameter(torch.empty(cell.bias_hh.shape, device="meta"))
    error = _raised(lambda: cell(_x(2, 3, dtype=torch.float32)))
    assert error[0] is RuntimeError and "not at the same device" in error[1] and "meta" in error[1]


@pytest.mark.parametrize("index", range(4))
def test_the_raw_operator_refuses_any_tensor_on_meta(index):
    """With one meta tensor among CPU ones the dispatcher runs the fake kernel, which must
    refuse it rather than return shapes (the real kernel would have read no memory)."""
    inf = float("inf")
    tensors = [torch.zeros(12, 2), torch.zeros(12, 4), torch.zeros(12), torch.zeros(12)]
    tensors[index] = tensors[index].to("meta")
    names = ["weight_ih", "weight_hh", "bias_ih", "bias_hh"]
    error = _raised(lambda: torch.ops.rnnfused.layer_forward(torch.zeros(3, 2, 2), None, torch.zeros(2, 4), None,
                                                             tensors, [], [], None, [], int(Cell.GRU), True, False, inf,
                                                             inf, 0, True, 1e-5, 1, False))
    assert error == (RuntimeError, f"rnnfused: {names[index]} is on meta but the input is on cpu; move both to the "
                                   "same device")


# --- sizes: the operator, its fake kernel and the reference equations refuse alike ---------------

def _z(*shape):
    return torch.zeros(*shape)


# Each: recurrent_layer's arguments (cell, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr) + keywords.
BAD_SIZES = {
    "h0 of too few rows": ((Cell.GRU, _z(3, 2, 2), _z(1, 4), None, _z(12, 2), _z(12, 4)), {}),
    "h0 too wide": ((Cell.GRU, _z(3, 2, 2), _z(2, 5), None, _z(12, 2), _z(12, 4)), {}),
    "a bias of one element": ((Cell.GRU, _z(3, 2, 2), _z(2, 4), None, _z(12, 2), _z(12, 4), _z(1), _z(12)), {}),
    "weight_ih of the wrong width": ((Cell.GRU, _z(3, 2, 2), _z(2, 4), None, _z(12, 3), _z(12, 4)), {}),
    "weight_hh of the wrong width": ((Cell.RNN_TANH, _z(3, 2, 2), _z(2, 4), None, _z(4, 2), _z(4, 3)), {}),
    "c0 of one row": ((Cell.LSTM, _z(3, 2, 2), _z(2, 4), _z(1, 4), _z(16, 2), _z(16, 4)), {}),
    "weight_hr of the wrong width": ((Cell.LSTM, _z(3, 2, 2), _z(2, 2), _z(2, 4), _z(16, 2), _z(16, 2), None, None,
                                      _z(2, 3)), {}),
    "h0 of a projection's width missing": ((Cell.LSTM, _z(3, 2, 2), _z(2, 4), _z(2, 4), _z(16, 2), _z(16, 2), None,
                                            None, _z(2, 4)), {}),
    "2-D input without batch_sizes": ((Cell.GRU, _z(3, 2), _z(2, 4), None, _z(12, 2), _z(12, 4)), {}),
    "a norm weight too short": ((Cell.GRU, _z(3, 2, 2), _z(2, 4), None, _z(12, 2), _z(12, 4)),
                                {"norm": "layer", "norm_weights": [_z(12), _z(11)]}),
    "running statistics of the wrong width": ((Cell.RNN_TANH, _z(3, 2, 2), _z(2, 4), None, _z(4, 2), _z(4, 4)),
                                              {"norm": "batch", "norm_weights": [_z(4), _z(4)], "training": False,
                                               "running_stats": [_z(3, 4), _z(3, 4), _z(3, 5), _z(3, 4)]}),
    "batch_sizes summing to more rows": ((Cell.GRU, _z(3, 2), _z(2, 4), None, _z(12, 2), _z(12, 4)),
                                         {"batch_sizes": torch.tensor([2, 2])}),
    "batch_sizes increasing": ((Cell.GRU, _z(3, 2), _z(1, 4), None, _z(12, 2), _z(12, 4)),
                               {"batch_sizes": torch.tensor([1, 2])}),
}


def _on(device, value):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, list):
        return [_on(device, v) for v in value]
    return value


@pytest.mark.parametrize("case", list(BAD_SIZES))
def test_bad_sizes_raise_the_same_error_on_every_path(case):
    """The fused operator (C++ checks), its fake kernel (every tensor on meta, as under
    torch.compile) and the reference equations (torch.func transforms, reference=True), which
    once broadcast a wrong size into a silently wrong result."""
    args, kwargs = BAD_SIZES[case]

    def call(device, reference):
        meta_kwargs = {k: (v if k == "batch_sizes" else _on(device, v)) for k, v in kwargs.items()}
        return recurrent_layer(*[_on(device, a) for a in args], **meta_kwargs, reference=reference)

    fused = _raised(lambda: call("cpu", False))
    assert fused[0] in (RuntimeError, ValueError)
    assert _raised(lambda: call("meta", False)) == fused
    assert _raised(lambda: call("cpu", True)) == fused


# --- projections of zero rows and of as many rows as the hidden size -----------------------------

_PROJECTION_CHILD = """
import torch
from torch.nn.utils.rnn import pack_padded_sequence
from rnnfused.functional import Cell, recurrent_layer
def case(P, packed, reference=False):
    g = torch.Generator().manual_seed(P)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)
    T, B, I, H = 4, 3, 3, 5
    x, w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0 = r(T, B, I), r(4 * H, I), r(4 * H, P), r(4 * H), r(4 * H), r(P, H), \\
        r(B, P), r(B, H)
    leaves = [x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr]
    lengths = torch.tensor([4, 2, 1])
    kwargs = {}
    inp = x
    if packed:
        packed_x = pack_padded_sequence(x, lengths)
        inp, kwargs = packed_x.data, {"batch_sizes": packed_x.batch_sizes}
    y, h, c = recurrent_layer(Cell.LSTM, inp, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reference=reference, **kwargs)
    weights = torch.Generator().manual_seed(7)
    loss = sum((t * torch.randn(t.shape, generator=weights, dtype=t.dtype)).sum() for t in (y, h, c))
    return [y, h, c], list(torch.autograd.grad(loss, leaves))
def vf(P):  # torch's own LSTM with projection, for P != H (it tells a projection by h's width)
    g = torch.Generator().manual_seed(P)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)
    T, B, I, H = 4, 3, 3, 5
    x, w_ih, w_hh, b_ih, b_hh, w_hr, h0, c0 = r(T, B, I), r(4 * H, I), r(4 * H, P), r(4 * H), r(4 * H), r(P, H), \\
        r(B, P), r(B, H)
    y, h, c = torch._VF.lstm(x, (h0[None], c0[None]), [w_ih, w_hh, b_ih, b_hh, w_hr], True, 1, 0.0, False, False,
                             False)
    weights = torch.Generator().manual_seed(7)
    loss = sum((t * torch.randn(t.shape, generator=weights, dtype=t.dtype)).sum() for t in (y, h[0], c[0]))
    leaves = [x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr]
    return [y, h[0], c[0]], list(torch.autograd.grad(loss, leaves))
def error(a, b):
    return max(((p - q).abs().max().item() if p.numel() else 0.0) for p, q in zip(a, b))
for P in (0, 2, 5, 7):  # H = 5
    for packed in (False, True):
        values, grads = case(P, packed)
        ref_values, ref_grads = case(P, packed, reference=True)
        print("reference", P, packed, error(values, ref_values), error(grads, ref_grads), flush=True)
    if P != 5:
        values, grads = case(P, False)
        vf_values, vf_grads = vf(P)
        print("vf", P, error(values, vf_values), error(grads, vf_grads), flush=True)
"""


def test_projections_of_zero_rows_and_of_the_hidden_size_run_as_torch_s_lstm():
    """Run in a subprocess: the buffer of a projection of 0 or H rows was once allocated only
    when P != H and written whenever a projection was given, a segmentation fault. P = 0 and
    P != H are compared with torch's _VF.lstm; P = H (which _VF.lstm cannot express: it tells
    a projection from the state widths) with the reference equations."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(_PROJECTION_CHILD)], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert done.returncode == 0, f"exit {done.returncode}: {done.stdout[-1000:]} {done.stderr[-2000:]}"
    lines = [line.split() for line in done.stdout.splitlines()]
    assert len([line for line in lines if line[0] == "reference"]) == 8
    assert len([line for line in lines if line[0] == "vf"]) == 3
    for line in lines:
        assert float(line[-2]) <= 1e-12 and float(line[-1]) <= 1e-12, line


# --- NaN through relu ------------------------------------------------------------------------------

def _nonfinite_cases(count):
    """(seed, where, value): one NaN, ±inf or huge value in the input or in one parameter."""
    values = [float("nan"), float("inf"), -float("inf"), 1e300]
    return [(seed, seed % 3, values[seed % 4]) for seed in range(count)]


@pytest.mark.parametrize("mode", list(MODES))
def test_non_finite_values_give_torch_nn_s_nan_and_inf_pattern(mode):
    """Outputs and every gradient: NaN and inf exactly where torch.nn has them (relu's backward
    once cut the gradient where h was NaN), the finite values close."""
    mismatched = []
    for seed, where, value in _nonfinite_cases(60):
        theirs, ours = make_twins(mode, 3, 4, num_layers=1 + seed % 2, seed=seed)
        x = _x(4, 2, 3, seed=seed)
        if where == 0:
            x.view(-1)[seed % x.numel()] = value
        else:
            params = list(theirs.parameters())
            with torch.no_grad():
                param = params[seed % len(params)]
                param.view(-1)[seed % param.numel()] = value
            ours.load_state_dict(theirs.state_dict())
        results = []
        for module in (theirs, ours):
            leaf = x.clone().requires_grad_()
            output = module(leaf)[0]
            results.append([output.detach(), *torch.autograd.grad(output.sum(), [leaf, *module.parameters()])])
        for expected, actual in zip(*results):
            if not (torch.equal(expected.isnan(), actual.isnan()) and torch.equal(expected.isinf(), actual.isinf())
                    and torch.equal(expected[expected.isinf()], actual[actual.isinf()])):
                mismatched.append((seed, where, value))
                break
            finite = expected.isfinite()
            assert max_error([actual[finite]], [expected[finite]]) <= 1e-8, (seed, where, value)
    assert not mismatched


def test_rnn_cell_relu_passes_nan_gradients_as_torch_nn():
    torch.manual_seed(0)
    theirs = nn.RNNCell(3, 4, nonlinearity="relu").double()
    ours = rnnfused.RNNCell(3, 4, nonlinearity="relu").double()
    ours.load_state_dict(theirs.state_dict())
    x = _x(2, 3)
    x[0, 1] = float("nan")
    grads = []
    for cell in (theirs, ours):
        leaf = x.clone().requires_grad_()
        grads.append(torch.autograd.grad(cell(leaf).sum(), [leaf, *cell.parameters()]))
    assert any(g.isnan().any() for g in grads[0])
    assert max_error(grads[1], grads[0]) <= 1e-12  # NaN where torch.nn's are, the other values equal


# --- autocast ---------------------------------------------------------------------------------------

def _dtypes(result):
    if isinstance(result, torch.Tensor):
        return [result.dtype]
    return [dtype for part in result for dtype in _dtypes(part)]


STACKS = [("LSTM", {}), ("LSTM", {"proj_size": 2}), ("LSTM", {"num_layers": 2, "bidirectional": True}), ("GRU", {}),
          ("GRU", {"num_layers": 2}), ("RNN", {}), ("RNN", {"nonlinearity": "relu"})]


def _autocast_results(module, args, device, dtype):
    try:
        with torch.autocast(device, dtype=dtype):
            return _dtypes(module(*args))
    except RuntimeError as error:  # torch.nn's oneDNN LSTM has no float16 kernels on some CPUs
        return type(error)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("state_dtype", [None, torch.float32, "low"])
@pytest.mark.parametrize("name,kwargs", STACKS)
def test_result_dtypes_under_cpu_autocast_are_torch_nn_s(name, kwargs, state_dtype, dtype):
    state_dtype = dtype if state_dtype == "low" else state_dtype
    torch.manual_seed(0)
    theirs, ours = getattr(nn, name)(3, 4, **kwargs), getattr(rnnfused, name)(3, 4, **kwargs)
    x = _x(5, 2, 3, dtype=torch.float32)
    hx = None
    if state_dtype is not None:
        layers = kwargs.get("num_layers", 1) * (2 if kwargs.get("bidirectional") else 1)
        h = torch.zeros(layers, 2, kwargs.get("proj_size") or 4, dtype=state_dtype)
        hx = (h, torch.zeros(layers, 2, 4, dtype=state_dtype)) if name == "LSTM" else h
    expected = _autocast_results(theirs, (x, hx), "cpu", dtype)
    if expected is RuntimeError:
        pytest.skip("torch.nn fails here (oneDNN's LSTM without float16 kernels on this CPU)")
    assert _autocast_results(ours, (x, hx), "cpu", dtype) == expected


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("state_dtype", [None, torch.float32, "low"])
@pytest.mark.parametrize("name", ["LSTMCell", "GRUCell", "RNNCell"])
def test_cell_result_dtypes_under_cpu_autocast_are_torch_nn_s(name, state_dtype, dtype):
    state_dtype = dtype if state_dtype == "low" else state_dtype
    torch.manual_seed(0)
    theirs, ours = getattr(nn, name)(3, 4), getattr(rnnfused, name)(3, 4)
    x = _x(2, 3, dtype=torch.float32)
    hx = None
    if state_dtype is not None:
        hx = torch.zeros(2, 4, dtype=state_dtype)
        hx = (hx, hx.clone()) if name == "LSTMCell" else hx
    assert _autocast_results(ours, (x, hx), "cpu", dtype) == _autocast_results(theirs, (x, hx), "cpu", dtype)


def test_lstm_result_dtypes_follow_torch_nn_with_onednn_off():
    """torch.nn's CPU LSTM runs oneDNN's layer (autocast dtype) only where oneDNN is on; off, its
    cell equations meet the float32 state."""
    torch.manual_seed(0)
    theirs, ours = nn.LSTM(3, 4), rnnfused.LSTM(3, 4)
    x = _x(5, 2, 3, dtype=torch.float32)
    with torch.backends.mkldnn.flags(enabled=False):
        expected = _autocast_results(theirs, (x, None), "cpu", torch.bfloat16)
        assert _autocast_results(ours, (x, None), "cpu", torch.bfloat16) == expected


@pytest.mark.parametrize("name,kwargs", [("LSTM", {}), ("LSTM", {"proj_size": 2}), ("LSTMCell", {})])
def test_result_dtypes_under_autocast_compile_without_graph_breaks(name, kwargs):
    """The dtype rules read oneDNN's switches, which torch.compile cannot trace."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    theirs, ours = getattr(nn, name)(3, 4, **kwargs), getattr(rnnfused, name)(3, 4, **kwargs)
    x = _x(2, 3, dtype=torch.float32) if name.endswith("Cell") else _x(5, 2, 3, dtype=torch.float32)

    def run(module):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return _dtypes(module(x))

    try:
        expected = run(theirs)
    except RuntimeError:
        pytest.skip("torch.nn fails here (oneDNN's LSTM without bfloat16 kernels on this CPU)")
    assert torch.compile(lambda: run(ours), fullgraph=True)() == expected


@pytest.mark.cuda
@pytest.mark.parametrize("name,kwargs", STACKS + [("LSTMCell", {}), ("GRUCell", {}), ("RNNCell", {})])
def test_result_dtypes_under_cuda_autocast_are_torch_nn_s(name, kwargs):
    torch.manual_seed(0)
    theirs, ours = getattr(nn, name)(3, 4, **kwargs).cuda(), getattr(rnnfused, name)(3, 4, **kwargs).cuda()
    x = torch.randn(2, 3, device="cuda") if name.endswith("Cell") else torch.randn(5, 2, 3, device="cuda")
    for dtype in (torch.float16, torch.bfloat16):
        assert _autocast_results(ours, (x,), "cuda", dtype) == _autocast_results(theirs, (x,), "cuda", dtype)


# --- batch norm with an empty batch -------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_batch_norm_trains_on_an_empty_batch_as_batchnorm1d(mode):
    """nn.BatchNorm1d in training takes a batch of 0 (an empty result, the running statistics
    unchanged) and refuses a batch of 1."""
    bn = nn.BatchNorm1d(4).train()
    assert bn(torch.zeros(0, 4)).shape == (0, 4)
    module = getattr(rnnfused, mode)(3, 4, norm="batch").double().train()
    before = {name: buffer.clone() for name, buffer in module.named_buffers()}
    x = torch.zeros(5, 0, 3, dtype=torch.float64, requires_grad=True)
    output = module(x)[0]
    assert output.shape == (5, 0, 4)
    grads = torch.autograd.grad(output.sum(), [x, *module.parameters()])
    assert all(g.abs().sum() == 0 for g in grads)
    for name, buffer in module.named_buffers():
        assert torch.equal(buffer, before[name]), name
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        module(torch.zeros(5, 1, 3, dtype=torch.float64))


# --- the cells' hx; torch.jit.script ------------------------------------------------------------------

def test_lstm_cell_with_a_tensor_as_hx_raises_torch_nn_s_type_error():
    x = _x(2, 3, dtype=torch.float32)
    for hx in (torch.zeros(2, 2, 4), torch.zeros(2, 4)):
        expected = _raised(lambda: nn.LSTMCell(3, 4)(x, hx))
        assert expected[0] is TypeError
        assert _raised(lambda: rnnfused.LSTMCell(3, 4)(x, hx)) == expected


def test_unbatched_lstm_cell_takes_a_tensor_hx_as_torch_nn():
    """torch.nn unpacks hx into (hx[0], hx[1]) for unbatched input, a tensor included."""
    torch.manual_seed(0)
    theirs, ours = nn.LSTMCell(3, 4), rnnfused.LSTMCell(3, 4)
    ours.load_state_dict(theirs.state_dict())
    x, hx = _x(3, dtype=torch.float32), _x(2, 4, seed=2, dtype=torch.float32)
    assert max_error(list(ours(x, hx)), [t.detach() for t in theirs(x, hx)]) <= 1e-6


@pytest.mark.parametrize("module", [rnnfused.LSTM(3, 4), rnnfused.GRU(3, 4), rnnfused.RNN(3, 4),
                                    rnnfused.LSTMCell(3, 4), rnnfused.GRUCell(3, 4), rnnfused.RNNCell(3, 4)],
                         ids=lambda m: type(m).__name__)
def test_jit_script_says_what_to_use_instead(module):
    with pytest.raises(RuntimeError, match=r"use torch\.compile or torch\.export, or torch\.jit\.trace"):
        torch.jit.script(module)


# --- batched backward -------------------------------------------------------------------------------

BATCHED = [("LSTM", {"bidirectional": True, "proj_size": 2}), ("LSTM", {"norm": "layer", "cell_clip": 0.5}),
           ("GRU", {"num_layers": 2}), ("GRU", {"reset_after": False, "norm": "batch"}),
           ("RNN", {"nonlinearity": "relu", "grad_clip": 0.3}), ("RNN", {})]


def _module(name, kwargs):
    torch.manual_seed(0)
    return getattr(rnnfused, name)(2, 3, **kwargs).double()


@pytest.mark.parametrize("name,kwargs", BATCHED, ids=lambda v: str(v))
def test_batched_backward_equals_a_loop(name, kwargs):
    """torch.autograd.grad(..., is_grads_batched=True) (autograd's own vmap) and
    torch.func.vmap over autograd.grad (the rule registered with torch.library.register_vmap)
    give the gradients of one backward per row of grad_outputs."""
    module = _module(name, kwargs)
    x = _x(4, 3, 2).requires_grad_()
    output, hidden = module(x)
    outputs = [output, *(hidden if isinstance(hidden, tuple) else (hidden,))]
    vectors = [_x(5, *o.shape, seed=10 + i) for i, o in enumerate(outputs)]
    leaves = [x, *module.parameters()]
    looped = [torch.autograd.grad(outputs, leaves, [v[i] for v in vectors], retain_graph=True) for i in range(5)]
    looped = [torch.stack(parts) for parts in zip(*looped)]
    batched = torch.autograd.grad(outputs, leaves, vectors, retain_graph=True, is_grads_batched=True)
    assert max_error(batched, looped) <= 1e-12
    mapped = torch.func.vmap(lambda *v: torch.autograd.grad(outputs, leaves, v, retain_graph=True))(*vectors)
    assert max_error(mapped, looped) <= 1e-12


@pytest.mark.parametrize("name", ["LSTMCell", "GRUCell", "RNNCell"])
def test_vectorized_jacobian_of_a_cell_equals_the_looped_one(name):
    cell = getattr(rnnfused, name)(2, 3).double()
    x = _x(2, 2)

    def fn(x):
        result = cell(x)
        return torch.cat(result, -1) if isinstance(result, tuple) else result

    vectorized = torch.autograd.functional.jacobian(fn, x, vectorize=True)
    assert max_error([vectorized], [torch.autograd.functional.jacobian(fn, x)]) <= 1e-12


# Without grad_clip (its gradients are clipped, not the derivative) and batch norm in training.
@pytest.mark.parametrize("name,kwargs", BATCHED[:3] + BATCHED[5:] + [("RNN", {"nonlinearity": "relu"})],
                         ids=lambda v: str(v))
def test_gradcheck_with_batched_grad(name, kwargs):
    module = _module(name, kwargs)
    names = [n for n, _ in module.named_parameters()]

    def fn(x, *params):
        output, hidden = torch.func.functional_call(module, dict(zip(names, params)), (x,))
        return (output, *(hidden if isinstance(hidden, tuple) else (hidden,)))

    inputs = (_x(3, 2, 2).requires_grad_(), *[p.detach().requires_grad_() for p in module.parameters()])
    assert gradcheck(fn, inputs, eps=1e-6, atol=1e-7, check_batched_grad=True)


# --- thread count ----------------------------------------------------------------------------------

_THREADS_CHILD = """
import sys, torch, rnnfused
threads, mode, T, B, I, H = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:7])
torch.set_num_threads(int(threads))
torch.manual_seed(0)
module = getattr(rnnfused, mode)(I, H)
x = torch.randn(T, B, I, requires_grad=True)
output, hidden = module(x)
hidden = hidden if isinstance(hidden, tuple) else (hidden,)
g = torch.Generator().manual_seed(1)
loss = sum((t * torch.randn(t.shape, generator=g)).sum() for t in (output, *hidden))
loss.backward()
# Products of the shapes MKL forms them in (README): the input projection x W_ihᵀ, dx = dG W_ih.
G = module.weight_ih_l0.size(0)
products = [x.detach().reshape(T * B, I) @ module.weight_ih_l0.detach().t(), torch.randn(T * B, G) @ torch.randn(G, I)]
torch.save({"results": [output.detach(), *[h.detach() for h in hidden]], "dx": x.grad,
            "weights": [p.grad for p in module.parameters()], "products": products}, sys.argv[7])
"""


@pytest.mark.parametrize("mode,shape", [("LSTM", (40, 6, 33, 96)), ("GRU", (24, 5, 17, 64)),
                                        ("RNN", (30, 3, 300, 128))])
def test_recurrence_is_bitwise_the_same_for_one_and_two_threads(mode, shape, tmp_path):
    """The README's statement: the persistent CPU recurrence (8 steps or more) computes the
    same bits for any number of threads; what MKL computes (the input projection x W_ihᵀ, dx,
    the weight gradients) is MKL's and may not be. Where MKL's products of these shapes agree
    between thread counts, so do the outputs, the states and dx."""
    results = []
    for threads in (1, 2):
        out = tmp_path / f"{threads}.pt"
        done = subprocess.run([sys.executable, "-c", _THREADS_CHILD, str(threads), mode, *map(str, shape), str(out)],
                              capture_output=True, text=True, timeout=600, cwd=ROOT)
        assert done.returncode == 0, done.stderr[-2000:]
        results.append(torch.load(out))
    one, two = results
    if not all(torch.equal(a, b) for a, b in zip(one["products"], two["products"])):
        pytest.skip("MKL's products of these shapes differ between 1 and 2 threads on this machine")
    assert all(torch.equal(a, b) for a, b in zip(one["results"], two["results"]))
    assert torch.equal(one["dx"], two["dx"])


# --- GPU -------------------------------------------------------------------------------------------

@pytest.mark.cuda
def test_raw_operator_with_norm_on_cuda_is_gated():
    """The fused normalized layers are off on CUDA until they are fit for a GPU; the raw
    operator must not bypass the Python gate (csrc/bindings.cpp: kernel_for)."""
    if os.environ.get("RNNFUSED_CUDA_NORM") == "fused":
        pytest.skip("RNNFUSED_CUDA_NORM=fused turns the gate off")
    inf = float("inf")
    z = lambda *shape: torch.zeros(*shape, device="cuda")  # noqa: E731
    with pytest.raises(RuntimeError, match="the fused normalized layers are off on CUDA"):
        torch.ops.rnnfused.layer_forward(z(3, 2, 2), None, z(2, 4), None, [z(12, 2), z(12, 4)], [z(12), z(12)], [],
                                         None, [], int(Cell.GRU), False, False, inf, inf, 2, True, 1e-5, 1, False)
