"""Every autograd mode torch.nn supports: double backward, forward-mode AD, torch.func (grad,
vjp, jacrev, jvp, vmap), TorchScript tracing; and the places where a drop-in must behave as
torch.nn does: in-place ops on outputs, resize_, autocast of float64, meta and fake tensors,
non-finite values, invalid cells."""

import pytest
import torch
from torch import nn
from torch.autograd import gradcheck, gradgradcheck
from torch.autograd import forward_ad

import rnnfused
from rnnfused.functional import Cell, recurrent_layer
from conftest import MODES, flatten, make_twins, max_error

# (mode, extra constructor arguments): every cell and form, the extras that change the math.
VARIANTS = [("LSTM", {}), ("LSTM", {"proj_size": 2}), ("LSTM", {"cell_clip": 0.3, "grad_clip": 0.5}),
            ("GRU", {}), ("GRU", {"reset_after": False, "grad_clip": 0.5}), ("RNN_TANH", {}), ("RNN_RELU", {})]
CLASSES = {"LSTM": rnnfused.LSTM, "GRU": rnnfused.GRU, "RNN_TANH": rnnfused.RNN, "RNN_RELU": rnnfused.RNN}


def _small(mode, options, **kwargs):
    torch.manual_seed(0)
    extra = {"nonlinearity": "relu"} if mode == "RNN_RELU" else {}
    return CLASSES[mode](2, 3, **extra, **options, **kwargs).double()


def _x(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _as_function(module):
    """The module as a function of (input, *parameters) returning a tuple of tensors."""
    names = [name for name, _ in module.named_parameters()]

    def fn(x, *params):
        return tuple(flatten(torch.func.functional_call(module, dict(zip(names, params)), (x,))))
    return fn, tuple(p.detach().requires_grad_() for p in module.parameters())


@pytest.mark.parametrize("mode,options", VARIANTS)
def test_gradgradcheck(mode, options):
    module = _small(mode, options, bidirectional=True)
    fn, params = _as_function(module)
    x = _x(3, 2, 2).requires_grad_()
    assert gradgradcheck(fn, (x,) + params, eps=1e-6, atol=1e-7, check_batched_grad=True)


@pytest.mark.parametrize("mode,options", VARIANTS)
def test_forward_mode_gradcheck(mode, options):
    module = _small(mode, options, num_layers=2)
    fn, params = _as_function(module)
    x = _x(3, 2, 2).requires_grad_()
    assert gradcheck(fn, (x,) + params, eps=1e-6, atol=1e-7, check_forward_ad=True, check_backward_ad=False,
                     check_undefined_grad=False, check_batched_grad=False)


def test_double_backward_matches_torch_nn():
    theirs, ours = make_twins("LSTM", 3, 4, num_layers=2, bidirectional=True)
    results = []
    for module in (theirs, ours):
        x = _x(5, 2, 3).requires_grad_()
        grad, = torch.autograd.grad(module(x)[0].pow(2).sum(), x, create_graph=True)
        results.append(torch.autograd.grad(grad.pow(2).sum(), [x] + list(module.parameters())))
    assert max_error(results[1], results[0]) <= 1e-10


@pytest.mark.parametrize("mode", list(MODES))
def test_torch_func_grad_vjp_jacrev_jvp_match_torch_nn(mode):
    theirs, ours = make_twins(mode, 3, 4, bidirectional=True)
    x = _x(4, 2, 3)
    tangent = _x(4, 2, 3, seed=5)
    results = []
    for module in (theirs, ours):
        params = {k: v.detach() for k, v in module.named_parameters()}

        def loss(p, a, module=module):
            return torch.func.functional_call(module, p, (a,))[0].pow(2).sum()

        def output(a, module=module):
            return module(a)[0]

        grads = torch.func.grad(loss, argnums=(0, 1))(params, x)
        _, vjp_fn = torch.func.vjp(output, x)
        (vjp,) = vjp_fn(torch.ones(4, 2, 8, dtype=torch.float64))
        jacobian = torch.func.jacrev(output)(x)
        _, jvp = torch.func.jvp(output, (x,), (tangent,))
        results.append([*grads[0].values(), grads[1], vjp, jacobian, jvp])
    assert max_error(results[1], results[0]) <= 1e-10


def test_vmap_equals_a_loop():
    _, ours = make_twins("GRU", 3, 4, num_layers=2)
    batch = _x(3, 5, 2, 3)
    mapped = torch.func.vmap(lambda a: ours(a)[0])(batch)
    looped = torch.stack([ours(a)[0] for a in batch])
    assert max_error([mapped], [looped.detach()]) <= 1e-12


def test_forward_ad_dual_tensors_match_torch_nn():
    theirs, ours = make_twins("LSTM", 3, 4)
    tangents = []
    for module in (theirs, ours):
        with forward_ad.dual_level():
            dual = forward_ad.make_dual(_x(5, 2, 3), _x(5, 2, 3, seed=7))
            tangents.append(forward_ad.unpack_dual(module(dual)[0]).tangent)
    assert max_error([tangents[1]], [tangents[0]]) <= 1e-12


@pytest.mark.parametrize("cell", [7, -1, 1000, "LSTM", None])
def test_invalid_cell_is_a_value_error(cell):
    x, h0 = torch.zeros(2, 1, 3), torch.zeros(1, 4)
    with pytest.raises(ValueError, match="cell must be one of"):
        recurrent_layer(cell, x, h0, None, torch.zeros(4, 3), torch.zeros(4, 4))


@pytest.mark.parametrize("cell", [7, -1, 1000])
def test_invalid_cell_is_a_value_error_in_the_operator(cell):
    inf = float("inf")
    with pytest.raises(ValueError, match="cell must be one of"):
        torch.ops.rnnfused.layer_forward(torch.zeros(2, 1, 3), None, torch.zeros(1, 4), None,
                                         [torch.zeros(4, 3), torch.zeros(4, 4)], [], [], None, [], cell, False, False,
                                         inf, inf, 0, True, 1e-5, 1, False)


def test_recurrent_layer_refuses_what_does_not_apply():
    x, h0, w_ih, w_hh = torch.zeros(2, 1, 3), torch.zeros(1, 4), torch.zeros(12, 3), torch.zeros(12, 4)
    with pytest.raises(ValueError, match="cell_clip is only supported for LSTM"):
        recurrent_layer(Cell.GRU, x, h0, None, w_ih, w_hh, cell_clip=1.0)
    with pytest.raises(ValueError, match="c0 is only for LSTM"):
        recurrent_layer(Cell.GRU, x, h0, torch.zeros(1, 4), w_ih, w_hh)
    with pytest.raises(ValueError, match="LSTM needs c0"):
        recurrent_layer(Cell.LSTM, x, h0, None, torch.zeros(16, 3), torch.zeros(16, 4))


def test_jit_trace_under_no_grad_gives_a_correct_module():
    _, ours = make_twins("LSTM", 3, 4, num_layers=2, bidirectional=True, dtype=torch.float32)
    with torch.no_grad():
        traced = torch.jit.trace(ours, torch.randn(5, 2, 3))
        other = torch.randn(5, 2, 3)
        assert max_error(flatten(traced(other)), flatten(ours(other))) == 0


def test_jit_script_says_what_to_use_instead():
    with pytest.raises(RuntimeError, match="torch.compile or torch.export"):
        torch.jit.script(rnnfused.GRU(3, 4))


def test_autocast_leaves_float64_alone():
    _, ours = make_twins("LSTM", 3, 4)
    x = _x(5, 2, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = ours(x)[0]
    assert output.dtype == torch.float64
    assert torch.equal(output, ours(x)[0])


def test_meta_module_gives_meta_outputs_of_torch_nn_shapes():
    theirs, ours = make_twins("LSTM", 3, 4, num_layers=2, bidirectional=True, proj_size=2)
    theirs, ours = theirs.to("meta"), ours.to("meta")
    x = torch.randn(5, 2, 3, device="meta", dtype=torch.float64)
    expected, actual = flatten(theirs(x)), flatten(ours(x))
    assert [(t.shape, t.device.type) for t in actual] == [(t.shape, t.device.type) for t in expected]


def test_fake_tensor_mode_gives_shapes_without_touching_data():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        module = rnnfused.GRU(3, 4, bidirectional=True)
        output, h_n = module(torch.randn(5, 2, 3, requires_grad=True))
        output.sum().backward()
        assert output.shape == (5, 2, 8) and h_n.shape == (2, 2, 4)


@pytest.mark.parametrize("mode", list(MODES))
def test_in_place_op_on_the_output_then_backward_matches_torch_nn(mode):
    theirs, ours = make_twins(mode, 3, 4)
    grads = []
    for module in (theirs, ours):
        x = _x(5, 2, 3).requires_grad_()
        output = nn.ReLU(inplace=True)(module(x)[0])
        grads.append(torch.autograd.grad(output.sum(), [x] + list(module.parameters())))
    assert max_error(grads[1], grads[0]) <= 1e-10


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_saved_tensor_hooks_see_what_backward_keeps(mode):
    """What the backward reads (the private copy of the hidden states, the gates, LSTM's cell
    states) goes through torch.autograd.graph.saved_tensors_hooks, as torch.nn's saved tensors
    do (activation offloading and compression rely on them): the hooks see at least those
    bytes, and the gradient through packed copies is the plain one."""
    steps, batch, hidden = 20, 3, 16
    module = CLASSES[mode](4, hidden).double()
    x = _x(steps, batch, 4).requires_grad_()
    expected = torch.autograd.grad(module(x)[0].sum(), [x, *module.parameters()])
    packed = []

    def pack(tensor):
        packed.append(tensor.numel() * tensor.element_size())
        return tensor.clone()  # backward must read these copies, or the gradient cannot match

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = module(x)[0]
    actual = torch.autograd.grad(output.sum(), [x, *module.parameters()])
    # fp64 gates (LSTM: 4 per unit, GRU: 4 saved per unit) plus the copy of h (LSTM: and c).
    kept = steps * batch * hidden * 8 * (4 + 1 + (1 if mode == "LSTM" else 0))
    assert sum(packed) >= kept
    assert max_error(actual, expected) <= 1e-12


def test_large_outputs_can_be_resized_like_torch_nn_ones():
    with torch.no_grad():
        output = rnnfused.LSTM(64, 256)(torch.randn(100, 16, 64))[0]
    assert output.numel() * output.element_size() >= 1 << 18  # from the CPU block cache
    output.resize_(20, 10)
    output.resize_(200, 16, 256)
    output.fill_(1)
    assert output.sum().item() == output.numel()


def test_gru_with_infinite_h0_gives_torch_nn_nans():
    theirs, ours = make_twins("GRU", 3, 4, dtype=torch.float32)
    h0 = torch.zeros(1, 2, 4)
    h0[0, 0, 1] = float("inf")
    h0[0, 1, 2] = -float("inf")
    x = torch.randn(3, 2, 3)
    expected, actual = theirs(x, h0)[0], ours(x, h0)[0]
    assert torch.equal(expected.isnan(), actual.isnan())
    assert torch.equal(expected.isinf(), actual.isinf())
    finite = expected.isfinite()
    assert (expected[finite] - actual[finite]).abs().max() <= 1e-5


def test_lstm_with_infinite_c0_passes_its_gradient_as_torch_nn():
    theirs, ours = make_twins("LSTM", 3, 4)
    grads = []
    for module in (theirs, ours):
        c0 = torch.zeros(1, 2, 4, dtype=torch.float64)
        c0[0, 0, 0] = float("inf")
        c0.requires_grad_()
        h0 = torch.zeros(1, 2, 4, dtype=torch.float64, requires_grad=True)
        output, (h_n, c_n) = module(_x(3, 2, 3), (h0, c0))
        grads.append(torch.autograd.grad(output.sum(), [c0]))
    assert torch.equal(grads[0][0].isnan(), grads[1][0].isnan())
    finite = grads[0][0].isfinite()
    assert (grads[0][0][finite] - grads[1][0][finite]).abs().max() <= 1e-12
    assert grads[1][0][0, 0, 0] != 0


def test_unknown_keyword_error_names_rnnbase_as_torch_nn():
    for cls in ("LSTM", "GRU", "RNN"):
        with pytest.raises(TypeError) as theirs:
            getattr(nn, cls)(3, 4, foo=1)
        with pytest.raises(TypeError) as ours:
            getattr(rnnfused, cls)(3, 4, foo=1)
        assert str(ours.value) == str(theirs.value)
