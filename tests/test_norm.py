"""Normalized layers (norm="batch" | "layer"): the fused kernels against the reference
equations in float64 (outputs, states and every gradient, γ and β included), running
statistics against a hand computation, gradcheck, errors, state_dict, the operator."""

import itertools

import pytest
import torch
from torch.nn.utils.rnn import pack_sequence

import rnnfused
from rnnfused import reference
from conftest import TOLERANCE, flatten, max_error

MODES = {"LSTM": (rnnfused.LSTM, {}), "GRU": (rnnfused.GRU, {}), "GRU_CHO": (rnnfused.GRU, {"reset_after": False}),
         "RNN_TANH": (rnnfused.RNN, {}), "RNN_RELU": (rnnfused.RNN, {"nonlinearity": "relu"})}
GATES = {"LSTM": 4, "GRU": 3, "GRU_CHO": 3, "RNN_TANH": 1, "RNN_RELU": 1}


def _module(mode, norm, *args, seed=0, perturb=True, **kwargs):
    """A float64 module; with perturb, parameters and running statistics moved off their
    initial values (γ = 0.1 and zero means would hide errors in the γ and mean terms)."""
    cls, extra = MODES[mode]
    torch.manual_seed(seed)
    module = cls(*args, norm=norm, dtype=torch.float64, **extra, **kwargs)
    if perturb:
        with torch.no_grad():
            for p in module.parameters():
                p.add_(0.3 * torch.randn_like(p))
            for name, b in module.named_buffers():
                b.add_(0.3 * torch.rand_like(b) if "var" in name else 0.2 * torch.randn_like(b))
    return module


def _input(kind, steps, batch, features, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    if kind == "packed":  # unsorted lengths, one sequence the full length
        lengths = [steps] + torch.randint(1, steps + 1, (batch - 1,), generator=g).tolist()
        seqs = [torch.randn(n, features, generator=g, dtype=torch.float64).to(device).requires_grad_()
                for n in lengths]
        return pack_sequence(seqs, enforce_sorted=False), seqs
    x = torch.randn(steps, batch, features, generator=g, dtype=torch.float64).to(device).requires_grad_()
    return x, [x]


def _fused_and_reference(module, x, leaves, hx=None):
    """Results and gradients (inputs, hx, every parameter) of the module and of
    rnnfused.reference on the same module state; the running statistics the fused run left,
    and those before it (which the reference run uses)."""
    before = {k: v.clone() for k, v in module.named_buffers()}
    fused = flatten(module(x, hx))
    after = {k: v.clone() for k, v in module.named_buffers()}
    for k, v in before.items():
        getattr(module, k).copy_(v)
    expected = flatten(reference.forward(module, x, hx))
    g = torch.Generator().manual_seed(7)
    weights = [torch.randn(v.shape, generator=g, dtype=v.dtype).to(v.device) for v in fused]
    hx_leaves = [] if hx is None else list(hx) if isinstance(hx, tuple) else [hx]
    wrt = list(leaves) + hx_leaves + list(module.parameters())
    grads = [torch.autograd.grad(sum((v * w).sum() for v, w in zip(values, weights)), wrt, retain_graph=True)
             for values in (fused, expected)]  # retained: both runs share the packing of x
    return (fused, grads[0]), (expected, grads[1]), before, after


CASES = [(mode, norm, training, kind)
         for mode, norm, training, kind in itertools.product(MODES, ("batch", "layer"), (True, False),
                                                            ("padded", "packed"))]


@pytest.mark.parametrize("mode,norm,training,kind", CASES)
def test_matches_the_reference_in_float64(mode, norm, training, kind):
    """2 layers, bidirectional, h0 given, T=7 past max_steps=5 (eval then uses the last step's
    statistics): outputs, states and all gradients within 1e-10 of the reference."""
    module = _module(mode, norm, 3, 5, num_layers=2, bidirectional=True, max_steps=5).train(training)
    x, leaves = _input(kind, 7, 4, 3)
    h0 = torch.randn(4, 4, 5, dtype=torch.float64, requires_grad=True)
    hx = (h0, torch.randn(4, 4, 5, dtype=torch.float64, requires_grad=True)) if mode == "LSTM" else h0
    (values, grads), (exact_values, exact_grads), _, _ = _fused_and_reference(module, x, leaves, hx)
    assert max_error(values, exact_values) <= TOLERANCE[torch.float64]
    assert max_error(grads, exact_grads) <= TOLERANCE[torch.float64]


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("norm,training", [("batch", True), ("batch", False), ("layer", True)])
def test_inference_equals_the_training_path(mode, norm, training):
    """Under no_grad (nothing saved for backward: the kernels' other buffers) the outputs and
    the running statistics are those of a differentiable call."""
    module = _module(mode, norm, 3, 6, num_layers=2, bidirectional=True).train(training)
    x = torch.randn(9, 5, 3, dtype=torch.float64)
    buffers = {k: v.clone() for k, v in module.named_buffers()}
    with_grad = flatten(module(x))
    updated = {k: v.clone() for k, v in module.named_buffers()}
    for k, v in buffers.items():
        getattr(module, k).copy_(v)
    with torch.no_grad():
        inference = flatten(module(x))
    assert max_error(inference, with_grad) == 0
    assert all(torch.equal(v, updated[k]) for k, v in module.named_buffers())


@pytest.mark.parametrize("norm", ["batch", "layer"])
@pytest.mark.parametrize("extra", [dict(proj_size=3), dict(cell_clip=0.5, grad_clip=0.2, batch_first=True),
                                   dict(bias=False)])
def test_lstm_extras_match_the_reference(norm, extra):
    module = _module("LSTM", norm, 3, 5, **extra).train()
    x, leaves = _input("padded", 6, 3, 3)
    if extra.get("batch_first"):
        x = x.detach().transpose(0, 1).contiguous().requires_grad_()
        leaves = [x]
    (values, grads), (exact_values, exact_grads), _, _ = _fused_and_reference(module, x, leaves)
    assert max_error(values, exact_values) <= TOLERANCE[torch.float64]
    assert max_error(grads, exact_grads) <= TOLERANCE[torch.float64]


def test_running_statistics_follow_batchnorm1d_per_step():
    """Layer 0, input side: running[t] = (1 - momentum) running[t] + momentum stat_t over the
    batch of x_t W_ihᵀ, the variance unbiased; steps the sequence does not reach are kept.
    Hidden side at step 0 (h0 = 0): mean 0, variance 0."""
    module = rnnfused.LSTM(3, 4, norm="batch", momentum=0.25, max_steps=6, dtype=torch.float64)
    x = torch.randn(4, 5, 3, dtype=torch.float64)
    module(x)
    projection = x @ module.weight_ih_l0.T  # [T, B, G]
    expected_mean = torch.zeros(6, 16, dtype=torch.float64)
    expected_var = torch.ones(6, 16, dtype=torch.float64)
    expected_mean[:4] = 0.25 * projection.mean(1)
    expected_var[:4] = 0.75 + 0.25 * projection.var(1, unbiased=True)
    assert torch.allclose(module.running_mean_ih_l0, expected_mean, rtol=0, atol=1e-12)
    assert torch.allclose(module.running_var_ih_l0, expected_var, rtol=0, atol=1e-12)
    assert torch.allclose(module.running_mean_hh_l0[0], torch.zeros(16, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(module.running_var_hh_l0[0], torch.full((16,), 0.75, dtype=torch.float64), atol=1e-12)
    assert not torch.equal(module.running_var_hh_l0[1], torch.ones(16, dtype=torch.float64))
    assert torch.equal(module.running_var_c_l0[4:], torch.ones(2, 4, dtype=torch.float64))


def test_packed_steps_with_one_active_row_keep_their_running_statistics():
    """The step a single sequence reaches is normalized with the running statistics and does
    not update them (one row has no variance); the others update."""
    module = rnnfused.GRU(2, 3, norm="batch", max_steps=4, dtype=torch.float64)
    seqs = [torch.randn(n, 2, dtype=torch.float64) for n in (4, 2, 2)]
    before = module.running_mean_ih_l0.clone()
    module(pack_sequence(seqs, enforce_sorted=False))
    changed = (module.running_mean_ih_l0 != before).any(1)
    assert changed.tolist() == [True, True, False, False]


@pytest.mark.parametrize("mode", ["LSTM", "GRU_CHO", "RNN_TANH"])
@pytest.mark.parametrize("norm", ["batch", "layer"])
def test_gradcheck(mode, norm):
    module = _module(mode, norm, 2, 3, bidirectional=True).train()
    x = torch.randn(4, 3, 2, dtype=torch.float64, requires_grad=True)
    params = list(module.parameters())
    names = [name for name, _ in module.named_parameters()]

    def run(x, *values):
        state = {**dict(module.named_buffers()), **dict(zip(names, values))}
        return flatten(torch.func.functional_call(module, state, (x,)))

    # The running statistics change on every call in training; they do not enter the
    # training outputs, so gradcheck's repeated calls still see one function.
    assert torch.autograd.gradcheck(run, (x, *params), eps=1e-6, atol=1e-6, check_batched_grad=True)


@pytest.mark.parametrize("norm", ["batch", "layer"])
def test_double_backward_through_the_reference(norm):
    module = _module("LSTM", norm, 2, 3).train()
    x = torch.randn(3, 3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda x: module(x)[0], (x,), eps=1e-6, atol=1e-5, check_batched_grad=True)


def test_batch_of_one_in_training_is_an_error_as_batchnorm1d():
    module = rnnfused.LSTM(3, 4, norm="batch")
    with pytest.raises(ValueError, match=r"Expected more than 1 value per channel when training, got input size"):
        module(torch.randn(5, 1, 3))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        module(torch.randn(5, 3))  # unbatched: one row
    module.eval()
    assert module(torch.randn(5, 1, 3))[0].shape == (5, 1, 4)


def test_layer_norm_works_for_a_batch_of_one_and_unbatched_input():
    module = _module("GRU", "layer", 3, 4, perturb=False)
    x = torch.randn(5, 3, dtype=torch.float64)
    unbatched, h_n = module(x)
    batched, _ = module(x.unsqueeze(1))
    assert unbatched.shape == (5, 4) and h_n.shape == (1, 4)
    assert torch.equal(unbatched, batched.squeeze(1))


def test_eval_uses_running_statistics_and_changes_nothing():
    module = _module("RNN_TANH", "batch", 3, 4, num_layers=2).eval()
    buffers = {k: v.clone() for k, v in module.named_buffers()}
    x = torch.randn(6, 5, 3, dtype=torch.float64)
    first = module(x)[0]
    # Rows are independent in eval: a row alone gives the same output.
    assert torch.allclose(module(x[:, 2:3])[0], first[:, 2:3], rtol=0, atol=1e-12)
    assert all(torch.equal(v, buffers[k]) for k, v in module.named_buffers())


def test_initial_values_and_state_dict_names():
    lstm = rnnfused.LSTM(3, 4, norm="batch", bidirectional=True, max_steps=7)
    assert torch.equal(lstm.norm_weight_ih_l0, torch.full((16,), 0.1))
    assert torch.equal(lstm.norm_weight_c_l0_reverse, torch.full((4,), 0.1))
    assert torch.equal(lstm.norm_bias_c_l0, torch.zeros(4))
    assert torch.equal(lstm.running_var_hh_l0, torch.ones(7, 16))
    keys = set(lstm.state_dict())
    for suffix in ("_l0", "_l0_reverse"):
        assert {f"norm_weight_ih{suffix}", f"norm_weight_hh{suffix}", f"norm_weight_c{suffix}", f"norm_bias_c{suffix}",
                f"running_mean_ih{suffix}", f"running_var_ih{suffix}", f"running_mean_hh{suffix}",
                f"running_var_hh{suffix}", f"running_mean_c{suffix}", f"running_var_c{suffix}"} <= keys
    assert [w is getattr(lstm, n) for w, n in zip(lstm.all_weights[1], ["weight_ih_l0_reverse", "weight_hh_l0_reverse",
            "bias_ih_l0_reverse", "bias_hh_l0_reverse", "norm_weight_ih_l0_reverse", "norm_weight_hh_l0_reverse",
            "norm_weight_c_l0_reverse", "norm_bias_c_l0_reverse"])] == [True] * 8
    gru = rnnfused.GRU(3, 4, norm="layer")
    assert torch.equal(gru.norm_weight_hh_l0, torch.ones(12))
    assert not any(k.startswith("running") for k in gru.state_dict())
    assert "norm='layer'" in repr(gru) and "momentum=0.1, max_steps=7" in repr(lstm)
    # Without norm, the state_dict is torch.nn's.
    assert set(rnnfused.LSTM(3, 4).state_dict()) == set(torch.nn.LSTM(3, 4).state_dict())
    # The standard weights draw the same random numbers as without norm.
    torch.manual_seed(0)
    plain = rnnfused.GRU(3, 4)
    torch.manual_seed(0)
    normalized = rnnfused.GRU(3, 4, norm="batch")
    assert torch.equal(plain.weight_hh_l0, normalized.weight_hh_l0)


def test_state_dict_round_trip_keeps_running_statistics():
    source = _module("LSTM", "batch", 3, 4)
    target = rnnfused.LSTM(3, 4, norm="batch", dtype=torch.float64)
    target.load_state_dict(source.state_dict())
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    assert torch.equal(source.eval()(x)[0], target.eval()(x)[0])


def test_bad_configuration_errors():
    with pytest.raises(ValueError, match="norm must be None, 'batch' or 'layer', got 'group'"):
        rnnfused.LSTM(3, 4, norm="group")
    with pytest.raises(ValueError, match="max_steps must be a positive int"):
        rnnfused.GRU(3, 4, norm="batch", max_steps=0)
    with pytest.raises(TypeError, match="momentum should be a number"):
        rnnfused.RNN(3, 4, norm="batch", momentum="fast")


def test_explain_names_the_kernel_of_normalized_layers(monkeypatch):
    module = rnnfused.LSTM(3, 4, norm="layer", bidirectional=True)
    choices = rnnfused.explain(module, torch.zeros(10, 2, 3))
    assert [c.kernel for c in choices] == ["stepwise", "stepwise"]
    assert "normalized layers" in choices[0].reason
    # CUDA: the fused kernels only once verified on a GPU, or when asked for.
    from rnnfused.functional import _FUSED_NORM_VERIFIED_ON_CUDA, fused_norm_on
    monkeypatch.delenv("RNNFUSED_CUDA_NORM", raising=False)
    assert fused_norm_on("cpu") and fused_norm_on("cuda") == _FUSED_NORM_VERIFIED_ON_CUDA
    monkeypatch.setenv("RNNFUSED_CUDA_NORM", "fused")
    assert fused_norm_on("cuda")


def test_convert_refuses_to_make_torch_nn_of_a_normalized_layer():
    with pytest.raises(ValueError, match="norm"):
        rnnfused.convert(rnnfused.LSTM(3, 4, norm="layer"), to="torch")


@pytest.mark.parametrize("norm,training", [("batch", True), ("batch", False), ("layer", True)])
@pytest.mark.parametrize("cell", [0, 2])  # LSTM (c-normalization), GRU_CHO (two hidden groups)
def test_opcheck_with_normalization(norm, training, cell):
    from rnnfused._ops import GATES_PER_UNIT, Cell, LayerOptions, Norm
    g = torch.Generator().manual_seed(0)
    hidden = 4
    gates = GATES_PER_UNIT[Cell(cell)] * hidden

    def t(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    x, h0 = t(4, 3, 3).requires_grad_(), t(3, hidden)
    c0 = t(3, hidden) if cell == Cell.LSTM else None
    weights = [t(gates, 3).requires_grad_(), t(gates, hidden).requires_grad_(), t(gates), t(gates)]
    norm_weights = [t(gates).requires_grad_(), t(gates).requires_grad_()]
    # The operator takes the running statistics of the steps it runs: [T, width].
    running = [t(4, gates), t(4, gates).abs(), t(4, gates), t(4, gates).abs()]
    if cell == Cell.LSTM:
        norm_weights += [t(hidden).requires_grad_(), t(hidden).requires_grad_()]
        running += [t(4, hidden), t(4, hidden).abs()]
    kind = Norm.BATCH if norm == "batch" else Norm.LAYER
    options = LayerOptions(Cell(cell), norm=kind, training=training)
    args = (x, None, h0, c0, weights, norm_weights, running if kind == Norm.BATCH else [], None, [],
            *options.op_args(), True)
    torch.library.opcheck(torch.ops.rnnfused.layer_forward.default, args)


@pytest.mark.parametrize("norm", ["batch", "layer"])
def test_compiles_without_graph_breaks(norm):
    module = _module("LSTM", norm, 3, 4, num_layers=2).train()
    x = torch.randn(5, 3, 3, dtype=torch.float64, requires_grad=True)
    buffers = {k: v.clone() for k, v in module.named_buffers()}
    eager = flatten(module(x))
    for k, v in buffers.items():
        getattr(module, k).copy_(v)
    compiled = flatten(torch.compile(module, fullgraph=True, backend="aot_eager")(x))
    assert max_error(compiled, eager) <= TOLERANCE[torch.float64]
    eager_grad = torch.autograd.grad(sum(v.sum() for v in eager), x)
    compiled_grad = torch.autograd.grad(sum(v.sum() for v in compiled), x)
    assert max_error(compiled_grad, eager_grad) <= TOLERANCE[torch.float64]


@pytest.mark.cuda
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("norm", ["batch", "layer"])
@pytest.mark.parametrize("training", [True, False])
def test_cuda_matches_the_reference_in_float64(mode, norm, training, monkeypatch):
    monkeypatch.setenv("RNNFUSED_CUDA_NORM", "fused")  # the fused kernels, not the fallback
    assert all(c.kernel == "stepwise" for c in rnnfused.explain(_module(mode, norm, 3, 5).cuda(),
                                                                 torch.zeros(2, 2, 3, dtype=torch.float64,
                                                                             device="cuda")))
    module = _module(mode, norm, 3, 5, num_layers=2, bidirectional=True, max_steps=5).train(training).cuda()
    x, leaves = _input("packed", 7, 4, 3, device="cuda")
    (values, grads), (exact_values, exact_grads), _, _ = _fused_and_reference(module, x, leaves)
    assert max_error(values, exact_values) <= TOLERANCE[torch.float64]
    assert max_error(grads, exact_grads) <= TOLERANCE[torch.float64]
