"""The operators rnnfused::layer_forward / layer_backward: torch.library.opcheck, and the
layers under torch.compile(fullgraph=True, dynamic=True) and torch.export."""

import io
import itertools

import pytest
import torch
from torch.nn.utils.rnn import pack_sequence

import rnnfused
from rnnfused._ops import GATES_PER_UNIT, Cell, LayerOptions
from conftest import CUDA_USABLE, flatten, make_twins, max_error

INF = float("inf")
DEVICES = ["cpu"] + (["cuda"] if CUDA_USABLE else [])


def _operator_args(cell, packed, proj, requires_grad, dtype, device, flags=False, masks=False):
    """Arguments of layer_forward for a small layer (B=3, T=4, I=3, H=4); ``flags``: with step
    flags (padded input: resets and inactive rows); ``masks``: with recurrent dropout and
    zoneout masks (training's 0/1 weights of the previous state for h, eval's 0.3 for c; none
    for c but an LSTM's)."""
    g = torch.Generator().manual_seed(0)
    hidden, width = 4, (2 if proj else 4)
    gates = GATES_PER_UNIT[cell] * hidden

    def t(*shape, grad=requires_grad):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device, dtype).requires_grad_(grad)

    if packed:
        batch_sizes = torch.tensor([3, 3, 2, 1])
        x = t(int(batch_sizes.sum()), 3)
    else:
        batch_sizes, x = None, t(4, 3, 3)
    weights = [t(gates, 3), t(gates, width), t(gates), t(gates)] + ([t(width, hidden)] if proj else [])
    c0 = t(3, hidden) if cell == Cell.LSTM else None
    step_flags = None
    if flags:
        step_flags = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 2], [1, 2, 2]], dtype=torch.int32, device=device)
    mask_list = []
    if masks:
        mask_list = [(t(3, width, grad=False) > 0).to(dtype) * 2, (t(4, 3, width, grad=False) > 0).to(dtype),
                     torch.full((4, 3, hidden), 0.3, dtype=dtype, device=device) if cell == Cell.LSTM
                     else torch.empty(0, dtype=dtype, device=device)]
    options = LayerOptions(cell, has_biases=True, reverse=False, cell_clip=INF, grad_clip=0.5)
    return (x, batch_sizes, t(3, width), c0, weights, [], [], step_flags, mask_list, *options.op_args(), True)


# (cell, packed, proj, flags, masks, requires_grad, dtype, device); step flags go with padded
# input; the masks with float32 and float64.
OPCHECK_CASES = [
    (cell, packed, proj, flags, masks, requires_grad, dtype, device)
    for cell, packed, requires_grad, dtype, device in itertools.product(
        Cell, (False, True), (False, True), (torch.float32, torch.float64, torch.bfloat16), DEVICES)
    for proj in ((False, True) if cell == Cell.LSTM else (False,))
    for flags in ((False,) if packed else (False, True))
    for masks in ((False,) if dtype == torch.bfloat16 else (False, True))
]


@pytest.mark.parametrize("cell,packed,proj,flags,masks,requires_grad,dtype,device", OPCHECK_CASES)
def test_opcheck_layer_forward(cell, packed, proj, flags, masks, requires_grad, dtype, device):
    args = _operator_args(cell, packed, proj, requires_grad, dtype, device, flags, masks)
    torch.library.opcheck(torch.ops.rnnfused.layer_forward.default, args)


@pytest.mark.parametrize("cell,packed,proj,flags,masks,requires_grad,dtype,device",
                         [c for c in OPCHECK_CASES if not c[5]])
def test_opcheck_layer_backward(cell, packed, proj, flags, masks, requires_grad, dtype, device):
    args = _operator_args(cell, packed, proj, False, dtype, device, flags, masks)
    x, batch_sizes, h0, c0, weights, norm_weights, _, step_flags, mask_list = args[:9]
    options = args[9:-1]
    y, h_n, c_n, saved, _ = torch.ops.rnnfused.layer_forward(*args)
    is_lstm = cell == Cell.LSTM
    backward_args = (x, batch_sizes, h0, c0, weights, norm_weights, step_flags, mask_list, saved, torch.randn_like(y),
                     torch.randn_like(h_n), torch.randn_like(c_n) if is_lstm else None, *options, True, True)
    torch.library.opcheck(torch.ops.rnnfused.layer_backward.default, backward_args)


# (class, constructor kwargs, input kind, backend) for compiled-vs-eager parity. Inductor for
# one case of each input kind; aot_eager for the others: the same graph, fake kernels and
# autograd formulas (what is ours) in half the time, without inductor's code generation.
COMPILE_CASES = [
    ("LSTM", dict(num_layers=2, bidirectional=True), "padded", "inductor"),
    ("LSTM", dict(proj_size=2, batch_first=True), "padded", "aot_eager"),
    ("LSTM", dict(), "unbatched", "inductor"),
    ("LSTM", dict(num_layers=2), "packed_unsorted", "inductor"),
    ("LSTM", dict(bidirectional=True), "packed_sorted", "inductor"),
    ("GRU", dict(num_layers=3, bidirectional=True), "padded", "aot_eager"),
    ("GRU", dict(reset_after=False), "packed_unsorted", "aot_eager"),
    ("RNN_TANH", dict(num_layers=2, batch_first=True), "padded", "aot_eager"),
    ("RNN_RELU", dict(bidirectional=True), "unbatched", "aot_eager"),
]


def _compile_input(kind, steps, batch, seed, batch_first=False):
    g = torch.Generator().manual_seed(seed)
    if kind == "unbatched":
        return torch.randn(steps, 3, generator=g, dtype=torch.float64, requires_grad=True)
    if kind.startswith("packed"):
        lengths = list(range(steps, steps - batch, -1))
        if kind == "packed_unsorted":
            lengths = lengths[::-1]
        seqs = [torch.randn(n, 3, generator=g, dtype=torch.float64, requires_grad=True) for n in lengths]
        return pack_sequence(seqs, enforce_sorted=kind == "packed_sorted")
    shape = (batch, steps, 3) if batch_first else (steps, batch, 3)
    return torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)


def _leaves(x):
    return [x] if isinstance(x, torch.Tensor) else [x.data]


def _hidden(mode, module, batch, given, kind):
    if not given:
        return None
    layers = module.num_layers * (2 if module.bidirectional else 1)
    shape = (layers, module.proj_size or module.hidden_size) if kind == "unbatched" else (
        layers, batch, module.proj_size or module.hidden_size)
    h0 = torch.randn(*shape, dtype=torch.float64)
    if mode != "LSTM":
        return h0
    return h0, torch.randn(*shape[:-1], module.hidden_size, dtype=torch.float64)


def _outputs_and_grads(module, x, hx):
    values = flatten(module(x, hx))
    loss = sum((v * torch.linspace(-1, 1, v.numel(), dtype=v.dtype).view_as(v)).sum() for v in values)
    grads = torch.autograd.grad(loss, _leaves(x) + list(module.parameters()))
    return [v.detach() for v in values] + list(grads)


@pytest.mark.parametrize("mode,kwargs,kind,backend", COMPILE_CASES)
@pytest.mark.parametrize("hx_given", [False, True])
def test_compiled_matches_eager(mode, kwargs, kind, backend, hx_given):
    torch._dynamo.reset()
    torch.manual_seed(0)
    cls = {"LSTM": rnnfused.LSTM, "GRU": rnnfused.GRU, "RNN_TANH": rnnfused.RNN, "RNN_RELU": rnnfused.RNN}[mode]
    extra = {"nonlinearity": "relu"} if mode == "RNN_RELU" else {}
    ours = cls(3, 4, **extra, **kwargs).double()
    compiled = torch.compile(ours, fullgraph=True, dynamic=True, backend=backend)
    for steps, batch in ((5, 3), (7, 4)):
        batch_first = kwargs.get("batch_first", False)
        x = _compile_input(kind, steps, batch, steps, batch_first)
        hx = _hidden(mode, ours, batch, hx_given, kind)
        expected = _outputs_and_grads(ours, x, hx)
        actual = _outputs_and_grads(compiled, _compile_input(kind, steps, batch, steps, batch_first), hx)
        assert max_error(actual, expected) <= 1e-12
        with torch.no_grad():
            assert max_error(flatten(compiled(x, hx)), flatten(ours(x, hx))) <= 1e-12
        with torch.inference_mode():
            assert max_error(flatten(compiled(x, hx)), flatten(ours(x, hx))) <= 1e-12


def test_one_graph_no_breaks_and_no_recompiles_across_shapes():
    torch._dynamo.reset()
    _, ours = make_twins("LSTM", 3, 4, num_layers=2, bidirectional=True, dtype=torch.float32)
    explanation = torch._dynamo.explain(ours)(torch.randn(5, 2, 3))
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons
    compiled = torch.compile(ours, fullgraph=True, dynamic=True)
    compiled(torch.randn(5, 2, 3, requires_grad=True))[0].sum().backward()
    with torch.compiler.set_stance("fail_on_recompile"):
        for steps, batch in ((3, 7), (11, 2), (6, 5)):
            compiled(torch.randn(steps, batch, 3, requires_grad=True))[0].sum().backward()


@pytest.mark.parametrize("outside", [True, False])
def test_compiled_autocast_matches_eager(outside):
    torch._dynamo.reset()
    theirs, ours = make_twins("GRU", 3, 4, num_layers=2, dtype=torch.float32)

    def run(x):
        if outside:
            return ours(x)[0]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return ours(x)[0]

    compiled = torch.compile(run, fullgraph=True, dynamic=True)
    x = torch.randn(5, 2, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=outside):
        expected, actual = run(x), compiled(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch_nn_dtype = theirs(x)[0].dtype  # float32: the GRU's h' = (1 - z) n + z h meets the float32 state
    assert actual.dtype == expected.dtype == torch_nn_dtype
    assert torch.equal(actual, expected)


@pytest.mark.parametrize("strict", [True, False])
def test_export_with_dynamic_steps_and_batch_save_load_and_backward(strict):
    _, ours = make_twins("LSTM", 3, 4, num_layers=2, bidirectional=True, dtype=torch.float32)
    steps, batch = torch.export.Dim("steps", min=2, max=512), torch.export.Dim("batch", min=2, max=512)
    program = torch.export.export(ours, (torch.randn(5, 3, 3),), dynamic_shapes=({0: steps, 1: batch},),
                                  strict=strict)
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer).module()
    for module in (program.module(), loaded):
        x = torch.randn(7, 4, 3, requires_grad=True)
        out = module(x)[0]
        grad, = torch.autograd.grad(out.sum(), x)
        x2 = x.detach().requires_grad_()
        expected = ours(x2)[0]
        expected_grad, = torch.autograd.grad(expected.sum(), x2)
        assert max_error([out.detach(), grad], [expected.detach(), expected_grad]) <= 1e-6
