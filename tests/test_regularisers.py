"""The recurrent regularisers (rnnfused.regularisers): weight drop, recurrent (variational)
dropout, zoneout and variational between-layer dropout. Each call's masks are recorded and
the reference equations replay them; the fused path must match in float64."""

import pytest
import torch
from torch.nn.utils.rnn import pack_sequence

import rnnfused
from rnnfused import dispatch, reference
from rnnfused.regularisers import captured_masks, keep_weights, philox_bits

MODES = [("LSTM", {}), ("LSTM", {"proj_size": 3}), ("GRU", {}), ("GRU", {"reset_after": False}), ("RNN", {}),
         ("RNN", {"nonlinearity": "relu"})]
MODE_IDS = ["LSTM", "LSTMP", "GRU", "GRU_CHO", "RNN_TANH", "RNN_RELU"]
OPTIONS = [{"weight_drop": 0.4}, {"recurrent_dropout": 0.3}, {"zoneout": 0.25},
           {"dropout": 0.5, "dropout_mode": "variational"},
           {"weight_drop": 0.3, "recurrent_dropout": 0.2, "zoneout": 0.1, "dropout": 0.3, "dropout_mode": "variational"}]
OPTION_IDS = ["weight_drop", "recurrent_dropout", "zoneout", "variational", "all"]


def _module(mode, extra, options, **kwargs):
    torch.manual_seed(0)
    return getattr(rnnfused, mode)(3, 5, num_layers=2, bidirectional=True, **extra, **options, **kwargs).double()


def _input(packed, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    if packed:
        return x, pack_sequence([x[:6, 0], x[:2, 1], x[:4, 2], x[:1, 3]], enforce_sorted=False)
    return x, x


def _values_and_grads(module, x, output):
    y = output[0].data if isinstance(output[0], torch.nn.utils.rnn.PackedSequence) else output[0]
    states = output[1] if isinstance(output[1], tuple) else (output[1],)
    values = [y, *states]
    weights = torch.Generator().manual_seed(2)
    loss = sum((v * torch.randn(v.shape, generator=weights, dtype=v.dtype).to(v.device)).sum() for v in values)
    return values, torch.autograd.grad(loss, [x, *module.parameters()], retain_graph=True)


def _max_error(a, b):
    return max((p - q).abs().max().item() for p, q in zip(a, b))


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("options", OPTIONS, ids=OPTION_IDS)
@pytest.mark.parametrize("mode,extra", MODES, ids=MODE_IDS)
def test_a_call_matches_the_reference_with_its_own_masks(mode, extra, options, packed):
    module = _module(mode, extra, options)
    for training in (True, False):
        module.train(training)
        x, inp = _input(packed)
        with captured_masks() as calls:
            output = module(inp)
        assert len(calls) == 1
        expected = reference.forward(module, inp, masks=calls[0])
        values, grads = _values_and_grads(module, x, output)
        ref_values, ref_grads = _values_and_grads(module, x, expected)
        assert _max_error(values, ref_values) <= 1e-10
        assert _max_error(grads, ref_grads) <= 1e-10


def test_the_masks_are_the_ones_the_call_used():
    """Replaying other masks gives other results: the comparison above can fail."""
    module = _module("LSTM", {}, OPTIONS[-1])
    x, _ = _input(False)
    with captured_masks() as calls:
        y = module(x)[0]
        module(x)
    assert (y - reference.forward(module, x, masks=calls[1])[0]).abs().max() > 1e-3


@pytest.mark.parametrize("options", OPTIONS, ids=OPTION_IDS)
@pytest.mark.parametrize("mode,extra", [MODES[0], MODES[3], MODES[4]], ids=["LSTM", "GRU_CHO", "RNN_TANH"])
def test_gradcheck(mode, extra, options):
    """The same masks at every evaluation (the generator reseeded), float64."""
    torch.manual_seed(0)
    module = getattr(rnnfused, mode)(2, 3, num_layers=2, **extra, **options).double()
    params = list(module.parameters())
    x = torch.randn(3, 2, 2, dtype=torch.float64, requires_grad=True)

    def run(x, *weights):
        with torch.random.fork_rng():
            torch.manual_seed(5)
            output = torch.func.functional_call(module, dict(zip([n for n, _ in module.named_parameters()], weights)),
                                                (x,))
        return output[0]

    assert torch.autograd.gradcheck(run, (x, *params), eps=1e-6, atol=1e-7)


def _keep_fraction(mask):
    return (mask != 0).double().mean().item()


@pytest.fixture
def kernels_draw(monkeypatch):
    """Zoneout drawn in the kernels on the CPU too, as on a GPU (regularisers.kernels_draw)."""
    monkeypatch.setattr(rnnfused.regularisers, "kernels_draw", lambda device: True)


@pytest.mark.parametrize("drawn", [False, True], ids=["stored", "drawn"])
def test_keep_rates_and_scales(drawn, monkeypatch):
    """Each mask keeps 1 - p of its entries (or p for zoneout's k), within 5 standard
    deviations, and scales what it keeps by 1 / (1 - p); recurrent dropout's mask is one per
    row for every step, variational dropout's one per sequence."""
    monkeypatch.setattr(rnnfused.regularisers, "kernels_draw", lambda device: drawn)
    torch.manual_seed(0)
    module = rnnfused.LSTM(64, 128, num_layers=2, dropout=0.5, dropout_mode="variational", weight_drop=0.3,
                           recurrent_dropout=0.2, zoneout=(0.1, 0.4))
    x = torch.randn(20, 32, 64)
    with captured_masks() as calls:
        module(x)
    layer, between = calls[0].layers[0], calls[0].between[0]

    def near(fraction, expected, n):
        assert abs(fraction - expected) <= 5 * (expected * (1 - expected) / n) ** 0.5, (fraction, expected)

    near(_keep_fraction(layer.weight), 0.7, layer.weight.numel())
    assert torch.allclose(layer.weight[layer.weight != 0], torch.tensor(1 / 0.7))
    assert layer.hidden.shape == (32, 128)
    near(_keep_fraction(layer.hidden), 0.8, layer.hidden.numel())
    # drawn: the kernels' (seed, threshold)
    assert layer.keep_h.shape == layer.keep_c.shape == ((2,) if drawn else (20, 32, 128))
    keep_h, keep_c = (keep_weights(keep, (20, 32, 128), torch.float32) for keep in (layer.keep_h, layer.keep_c))
    near(_keep_fraction(keep_h), 0.1, keep_h.numel())
    near(_keep_fraction(keep_c), 0.4, keep_c.numel())
    assert between.shape == (32, 128)
    near(_keep_fraction(between), 0.5, between.numel())
    assert torch.allclose(between[between != 0], torch.tensor(2.0))
    assert len(calls[0].layers) == 2 and len(calls[0].between) == 1


def test_eval_is_plain_but_zoneout_takes_its_expectation():
    plain = _module("GRU", {}, {})
    x, _ = _input(False)
    regularised = _module("GRU", {}, {"weight_drop": 0.5, "recurrent_dropout": 0.5, "dropout": 0.5,
                                      "dropout_mode": "variational"}).eval()
    plain.eval()
    assert torch.equal(regularised(x)[0], plain(x)[0])
    # zoneout in eval: h_t = p h_{t-1} + (1 - p) h̃_t, checked on the first step by hand
    p = 0.3
    zoned = getattr(rnnfused, "GRU")(3, 5).double().eval()
    zoned.zoneout = p
    h0 = torch.randn(1, 4, 5, dtype=torch.float64)
    y = zoned(x, h0)[0]
    weights = {"w_ih": zoned.weight_ih_l0, "w_hh": zoned.weight_hh_l0, "b_ih": zoned.bias_ih_l0,
               "b_hh": zoned.bias_hh_l0, "w_hr": None}
    new, _ = reference.cell_step("GRU", x[0], h0[0], None, weights)
    assert torch.allclose(y[0], p * h0[0] + (1 - p) * new, atol=1e-12, rtol=0)


@pytest.mark.parametrize("mode,extra", MODES, ids=MODE_IDS)
def test_zero_probabilities_are_no_option(mode, extra):
    """p = 0 (and variational mode without dropout) gives the results without the options,
    bitwise, and draws no random numbers."""
    x, _ = _input(False)
    plain = _module(mode, extra, {})
    off = _module(mode, extra, {"weight_drop": 0.0, "recurrent_dropout": 0.0, "zoneout": 0.0,
                                "dropout_mode": "variational"})
    torch.manual_seed(3)
    expected = plain(x)[0]
    state = torch.get_rng_state()
    assert torch.equal(off(x)[0], expected)
    assert torch.equal(torch.get_rng_state(), state)


def test_masks_follow_torch_manual_seed():
    module = _module("LSTM", {}, OPTIONS[-1])
    x, _ = _input(False)
    torch.manual_seed(11)
    first = module(x)[0]
    torch.manual_seed(11)
    assert torch.equal(module(x)[0], first)
    assert not torch.equal(module(x)[0], first)


def test_weight_drop_masks_the_gradient_and_leaves_the_parameters_alone():
    module = rnnfused.LSTM(3, 8, weight_drop=0.5)
    names = list(dict(module.named_parameters()))
    assert names == list(dict(torch.nn.LSTM(3, 8).named_parameters()))
    before = module.weight_hh_l0.detach().clone()
    with captured_masks() as calls:
        module(torch.randn(5, 2, 3))[0].sum().backward()
    mask = calls[0].layers[0].weight
    assert (mask == 0).any()
    assert torch.all(module.weight_hh_l0.grad[mask == 0] == 0)
    assert torch.equal(module.weight_hh_l0.detach(), before)
    assert isinstance(module.weight_hh_l0, torch.nn.Parameter)


def test_with_layer_norm_and_lengths():
    torch.manual_seed(0)
    module = rnnfused.LSTM(3, 5, bidirectional=True, norm="layer", weight_drop=0.3, recurrent_dropout=0.2,
                           zoneout=0.2).double()
    x, _ = _input(False)
    lengths = torch.tensor([6, 2, 4, 1])
    with captured_masks() as calls:
        y = module(x, lengths=lengths)[0]
    expected = reference.forward(module, x, lengths=lengths, masks=calls[0])[0]
    assert (y - expected).abs().max() <= 1e-10


def _spy_on_the_reference(monkeypatch):
    """The calls of the reference equations a layer makes (rnnfused.functional._reference_layer)."""
    from rnnfused import functional
    calls = []
    original = functional._reference_layer

    def spy(*args, **kwargs):
        calls.append(args[0].cell)
        return original(*args, **kwargs)

    monkeypatch.setattr(functional, "_reference_layer", spy)
    return calls


@pytest.mark.parametrize("mode,extra", MODES, ids=MODE_IDS)
def test_the_fused_kernels_run_them(mode, extra, monkeypatch):
    """Recurrent dropout and zoneout run in the stepwise kernels (fewer than 8 steps here), in
    training and eval, and explain says so; only zoneout in a normalized layer runs the
    reference equations."""
    calls = _spy_on_the_reference(monkeypatch)
    x, _ = _input(False)
    module = _module(mode, extra, {"recurrent_dropout": 0.2, "zoneout": 0.3})
    for training in (True, False):
        module.train(training)
        module(x)[0].sum().backward()
        assert {choice.kernel for choice in rnnfused.explain(module, x)} == {"stepwise"}
    assert calls == []
    if "proj_size" in extra:
        return
    normalized = _module(mode, extra, {"recurrent_dropout": 0.2}, norm="layer")
    normalized(x)[0].sum().backward()
    assert calls == []
    normalized.zoneout = 0.3
    normalized(x)
    assert calls
    assert {choice.kernel for choice in rnnfused.explain(normalized, x)} == {"reference equations"}


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("mode,extra", MODES, ids=MODE_IDS)
def test_zoneout_drawn_in_the_kernels_matches_the_reference(mode, extra, packed, kernels_draw):
    """The kernels' Philox draws (csrc/philox.h) are the reference's (regularisers.drawn_keep),
    element for element, forward and backward, in training and eval."""
    module = _module(mode, extra, OPTIONS[-1])
    for training in (True, False):
        module.train(training)
        x, inp = _input(packed)
        with captured_masks() as calls:
            output = module(inp)
        if training:
            assert all(layer.keep_h.dtype == torch.int64 for layer in calls[0].layers)
        expected = reference.forward(module, inp, masks=calls[0])
        values, grads = _values_and_grads(module, x, output)
        ref_values, ref_grads = _values_and_grads(module, x, expected)
        assert _max_error(values, ref_values) <= 1e-10
        assert _max_error(grads, ref_grads) <= 1e-10


@pytest.mark.parametrize("drawn", [False, True], ids=["stored", "drawn"])
@pytest.mark.parametrize("mode,extra", MODES, ids=MODE_IDS)
def test_with_lengths_and_resets(mode, extra, drawn, monkeypatch):
    """Step flags and masks together in the fused kernels: a reset zeroes the state zoneout
    keeps and recurrent dropout masks; a finished row holds it."""
    monkeypatch.setattr(rnnfused.regularisers, "kernels_draw", lambda device: drawn)
    calls = _spy_on_the_reference(monkeypatch)
    module = _module(mode, extra, {"recurrent_dropout": 0.3, "zoneout": 0.4})
    x, _ = _input(False)
    lengths = torch.tensor([6, 2, 5, 1])
    resets = torch.zeros(6, 4, dtype=torch.bool)
    resets[2, 0] = resets[3, 2] = resets[1, 1] = True
    for training in (True, False):
        module.train(training)
        with captured_masks() as recorded:
            output = module(x, lengths=lengths, resets=resets)
        expected = reference.forward(module, x, lengths=lengths, resets=resets, masks=recorded[0])
        values, grads = _values_and_grads(module, x, output)
        ref_values, ref_grads = _values_and_grads(module, x, expected)
        assert _max_error(values, ref_values) <= 1e-10
        assert _max_error(grads, ref_grads) <= 1e-10
    assert calls == []


@pytest.fixture(params=[1, 3], ids=["1thread", "3threads"])
def thread_count(request):
    old = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(old)


@pytest.mark.parametrize("drawn", [False, True], ids=["stored", "drawn"])
@pytest.mark.parametrize("form", ["padded", "packed", "lengths_resets"])
@pytest.mark.parametrize("mode,extra", [m for m in MODES if "proj_size" not in m[1]],
                         ids=[i for i in MODE_IDS if i != "LSTMP"])
def test_the_cpu_threads_run_them(mode, extra, form, drawn, thread_count, monkeypatch):
    """From 8 steps on, the CPU's persistent threads (each with a slice of the units: 3
    threads split H = 5 as 2, 2, 1) take recurrent dropout and zoneout through the same step
    functors as the stepwise kernels: explain says so (it asks the operators' own rule), the
    reference does not run, and each call matches it with its masks."""
    monkeypatch.setattr(rnnfused.regularisers, "kernels_draw", lambda device: drawn)
    calls = _spy_on_the_reference(monkeypatch)
    module = _module(mode, extra, {"recurrent_dropout": 0.3, "zoneout": 0.4})
    g = torch.Generator().manual_seed(3)
    x = torch.randn(12, 4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    inp, flags = x, {}
    if form == "packed":
        inp = pack_sequence([x[:12, 0], x[:5, 1], x[:9, 2], x[:8, 3]], enforce_sorted=False)
    elif form == "lengths_resets":
        resets = torch.zeros(12, 4, dtype=torch.bool)
        resets[4, 0] = resets[2, 2] = resets[9, 3] = True
        flags = {"lengths": torch.tensor([12, 3, 9, 10]), "resets": resets}
    for training in (True, False):
        module.train(training)
        choices = rnnfused.explain(module, inp, **flags)
        assert all(choice.kernel == "persistent" and f"on {thread_count} CPU thread" in choice.reason
                   for choice in choices)
        with captured_masks() as recorded:
            output = module(inp, **flags)
        expected = reference.forward(module, inp, **flags, masks=recorded[0])
        values, grads = _values_and_grads(module, x, output)
        ref_values, ref_grads = _values_and_grads(module, x, expected)
        assert _max_error(values, ref_values) <= 1e-10
        assert _max_error(grads, ref_grads) <= 1e-10
    assert calls == []


@pytest.mark.parametrize("mode,extra", [MODES[0], MODES[1], MODES[2], MODES[4]], ids=["LSTM", "LSTMP", "GRU", "RNN_TANH"])
def test_float32_within_the_float32_tolerance(mode, extra):
    module = _module(mode, extra, {"recurrent_dropout": 0.3, "zoneout": 0.2}).float()
    x = torch.randn(20, 8, 3, requires_grad=True)
    with captured_masks() as recorded:
        output = module(x)
    masks = recorded[0]
    double = _module(mode, extra, {}).double()
    double.load_state_dict(module.state_dict())
    for layer in masks.layers:  # the same masks in float64
        for name in ("hidden", "keep_h", "keep_c"):
            if isinstance(getattr(layer, name), torch.Tensor) and getattr(layer, name).is_floating_point():
                setattr(layer, name, getattr(layer, name).double())
    expected = reference.forward(double, x.detach().double().requires_grad_(), masks=masks)
    assert _max_error([output[0]], [expected[0]]) <= 1e-5


def test_compiled_matches_eager_with_the_same_seed():
    """torch.compile keeps the fused kernels and their masks (aot_eager draws the random
    numbers as eager does, so the same seed gives the same masks)."""
    torch._dynamo.reset()
    module = _module("LSTM", {}, {"recurrent_dropout": 0.3, "zoneout": 0.2})
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    x, _ = _input(False)
    for training in (True, False):
        module.train(training)
        torch.manual_seed(5)
        expected = _values_and_grads(module, x, module(x))
        torch.manual_seed(5)
        actual = _values_and_grads(module, x, compiled(x))
        assert _max_error(actual[0] + list(actual[1]), expected[0] + list(expected[1])) <= 1e-12


def test_the_dispatch_never_gives_them_to_cudnn():
    module = rnnfused.GRU(3, 5, num_layers=2, dropout=0.2, dropout_mode="variational", weight_drop=0.1,
                          recurrent_dropout=0.1, zoneout=0.1)
    lacks = dispatch.what_cudnn_lacks(module, None)
    assert {"weight_drop=0.1", "recurrent_dropout=0.1", "zoneout=(0.1, 0.0)", "dropout_mode='variational'"} <= set(lacks)
    module.eval()
    assert dispatch.what_cudnn_lacks(module, None) == ["zoneout=(0.1, 0.0)"]  # eval: its expectation


@pytest.mark.parametrize("kwargs,message", [
    ({"weight_drop": 1.0}, "weight_drop must be a probability in \\[0, 1\\)"),
    ({"recurrent_dropout": -0.1}, "recurrent_dropout must be a probability"),
    ({"zoneout": True}, "zoneout must be a probability"),
    ({"dropout_mode": "locked"}, "dropout_mode must be 'standard' or 'variational'"),
])
def test_bad_options_are_value_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        rnnfused.LSTM(3, 5, **kwargs)


def test_a_zoneout_pair_is_for_lstm_only():
    assert rnnfused.LSTM(3, 5, zoneout=(0.1, 0.2)).regularisers.zoneout_c == 0.2
    with pytest.raises(ValueError, match="only for LSTM"):
        rnnfused.GRU(3, 5, zoneout=(0.1, 0.2))


def test_repr_names_them():
    text = repr(rnnfused.LSTM(3, 5, weight_drop=0.5, zoneout=(0.1, 0.2), dropout_mode="variational"))
    assert "weight_drop=0.5" in text and "zoneout=(0.1, 0.2)" in text and "dropout_mode='variational'" in text


def test_a_module_saved_before_the_options_existed_runs_without_them():
    """Whole-model checkpoints of earlier versions lack the attributes: off."""
    torch.manual_seed(0)
    module = rnnfused.GRU(3, 5)
    x = torch.randn(4, 2, 3)
    expected = module(x)[0]
    for name in ("weight_drop", "recurrent_dropout", "zoneout", "dropout_mode"):
        delattr(module, name)
    assert torch.equal(module(x)[0], expected)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mode,extra", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("drawn", [True, False], ids=["drawn", "stored"])
def test_cuda_stepwise_kernels_match_the_reference_with_their_masks(mode, extra, dtype, drawn, monkeypatch):
    """The CUDA stepwise kernels with every regulariser, training and eval, padded and with
    lengths and resets (RNNFUSED_KERNEL=stepwise runs them before a GPU check verified them);
    zoneout drawn in the kernels (the GPU's default) and stored."""
    monkeypatch.setenv("RNNFUSED_KERNEL", "stepwise")
    monkeypatch.setattr(rnnfused.regularisers, "kernels_draw", lambda device: drawn)
    calls = _spy_on_the_reference(monkeypatch)
    module = _module(mode, extra, OPTIONS[-1]).to("cuda", dtype)
    x = torch.randn(6, 4, 3, device="cuda", dtype=dtype, requires_grad=True)
    resets = torch.zeros(6, 4, dtype=torch.bool, device="cuda")
    resets[2, 0] = True
    tolerance = 1e-10 if dtype == torch.float64 else 2e-5
    for training, flags in ((True, {}), (False, {}), (True, {"lengths": torch.tensor([6, 2, 5, 1]), "resets": resets})):
        module.train(training)
        with captured_masks() as recorded:
            output = module(x, **flags)
        assert calls == []
        expected = reference.forward(module, x, **flags, masks=recorded[0])
        values, grads = _values_and_grads(module, x, output)
        ref_values, ref_grads = _values_and_grads(module, x, expected)
        assert _max_error(values, ref_values) <= tolerance
        assert _max_error(grads, ref_grads) <= tolerance


def test_philox_matches_its_known_answer():
    """Philox4x32-10's published known-answer vector (Salmon et al. 2011, Random123): counter
    and key zero give 0x6627e8d5 as the first word; the kernels' csrc/philox.h agrees with this
    copy wherever the parity tests above draw zoneout."""
    assert philox_bits(torch.tensor(0), torch.tensor([0])).item() == 0x6627E8D5
    bits = philox_bits(torch.tensor(12345), torch.arange(1 << 16))
    assert bits.min() >= 0 and bits.max() < 2**32
    assert abs(bits.double().mean().item() / 2**32 - 0.5) < 0.01  # uniform over 32 bits


def _saved_bytes(module, x):
    """The bytes autograd keeps for backward of one training call."""
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        module(x)
    return total


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_zoneout_saves_seeds_not_masks(mode, kernels_draw):
    """In training zoneout keeps two int64 per mask for backward, not [T, B, H] weights: the
    saved bytes are those without zoneout plus what the cells' own backward needs (LSTM: the
    cell before zoneout)."""
    x = torch.randn(50, 16, 8)
    plain, zoned = (getattr(rnnfused, mode)(8, 64, **options) for options in ({}, {"zoneout": 0.2}))
    extra = _saved_bytes(zoned, x) - _saved_bytes(plain, x)
    steps, batch, hidden = 50, 16, 64
    cell_before_zoneout = steps * batch * hidden * 4 if mode == "LSTM" else 0
    masks = 2 if mode == "LSTM" else 1
    assert extra == cell_before_zoneout + masks * 2 * 8


@pytest.mark.parametrize("cell,options", [("LSTMCell", {}), ("LSTMCell", {"zoneout": (0.2, 0.6)}), ("GRUCell", {}),
                                          ("GRUCell", {"reset_after": False}), ("RNNCell", {}),
                                          ("RNNCell", {"nonlinearity": "relu"})],
                         ids=["LSTM", "LSTM_pair", "GRU", "GRU_CHO", "RNN_TANH", "RNN_RELU"])
@pytest.mark.parametrize("drawn", [False, True], ids=["stored", "drawn"])
def test_cell_zoneout(cell, options, drawn, monkeypatch):
    """A cell's zoneout: h' = k ⊙ h + (1 - k) ⊙ h̃ (c' alike) with the call's recorded k in
    training and k = p in eval, in float64 against the cell equations, gradients included."""
    monkeypatch.setattr(rnnfused.regularisers, "kernels_draw", lambda device: drawn)
    options = {"zoneout": 0.4, **options}
    torch.manual_seed(0)
    module = getattr(rnnfused, cell)(3, 5, **options).double()
    mode = module.mode
    lstm = mode == "LSTM"
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    h = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    c = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    weights = {"w_ih": module.weight_ih, "w_hh": module.weight_hh, "b_ih": module.bias_ih, "b_hh": module.bias_hh,
               "w_hr": None}
    p_h, p_c = (options["zoneout"] if isinstance(options["zoneout"], tuple) else (options["zoneout"],) * 2)
    for training in (True, False):
        module.train(training)
        with captured_masks() as calls:
            out = module(x, (h, c) if lstm else h)
        out = out if lstm else (out,)
        masks = calls[0].layers[0]
        keep_h, keep_c = ((keep_weights(keep, (1, 4, 5), x.dtype)[0] if training and keep is not None else p)
                          for keep, p in ((masks.keep_h, p_h), (masks.keep_c, p_c)))
        if training:
            assert 0 < keep_h.sum() < keep_h.numel()
        new_h, new_c = reference.cell_step(mode, x, h, c if lstm else None, weights,
                                           reset_after=options.get("reset_after", True))
        expected = [keep_h * h + (1 - keep_h) * new_h] + ([keep_c * c + (1 - keep_c) * new_c] if lstm else [])
        assert _max_error(out, expected) <= 1e-12
        grads = torch.autograd.grad(sum(o.sum() for o in out), [x, h, c, *module.parameters()], allow_unused=True)
        ref_grads = torch.autograd.grad(sum(e.sum() for e in expected), [x, h, c, *module.parameters()],
                                        allow_unused=True)
        assert _max_error([g for g in grads if g is not None], [g for g in ref_grads if g is not None]) <= 1e-12


def test_cell_zoneout_is_checked_repr_and_convert():
    with pytest.raises(ValueError, match="zoneout must be a probability"):
        rnnfused.GRUCell(3, 5, zoneout=1.5)
    with pytest.raises(ValueError, match="only for LSTM"):
        rnnfused.RNNCell(3, 5, zoneout=(0.1, 0.2))
    cell = rnnfused.LSTMCell(3, 5, zoneout=(0.1, 0.2))
    assert "zoneout=(0.1, 0.2)" in repr(cell)
    with pytest.raises(ValueError, match="no equivalent of zoneout"):
        rnnfused.convert(torch.nn.Sequential(cell), to="torch")
    with pytest.raises(ValueError, match="no equivalent of weight_drop"):
        rnnfused.convert(torch.nn.Sequential(rnnfused.LSTM(3, 5, weight_drop=0.2)), to="torch")
