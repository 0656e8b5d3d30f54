"""Padded input with per-sequence ``lengths`` and episode ``resets`` inside the fused kernels.

lengths: identical to torch.nn run on ``pack_padded_sequence(input, lengths,
enforce_sorted=False)`` and padded back. resets: identical to running every segment through
torch.nn as a sequence of its own. Both in float64 to 1e-10, outputs and every gradient,
on the stepwise kernels and on the CPU threads (RNNFUSED_KERNEL=persistent), plus
gradcheck, the cells' ``reset=``, the reverse direction's segment starts, and the errors."""

import pytest
import torch
from torch.autograd import gradcheck
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import rnnfused
from conftest import MODES, TOLERANCE, make_twins, max_error

# (mode, constructor kwargs): every cell of torch.nn, LSTM with a projection.
VARIANTS = [(mode, {}) for mode in MODES] + [("LSTM", {"proj_size": 3})]
# auto: on the CPU threads (persistent), which run the same steps, for T >= 8 and no projection
KERNELS = ["stepwise", "auto"]


@pytest.fixture(params=KERNELS)
def kernel(request, monkeypatch):
    monkeypatch.setenv("RNNFUSED_KERNEL", request.param)
    return request.param


def _randn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _state(mode, module, batch, seed):
    """A random hx for ``module``: h, or (h, c) for LSTM."""
    layers = module.num_layers * (2 if module.bidirectional else 1)
    width = module.proj_size if getattr(module, "proj_size", 0) else module.hidden_size
    h = _randn(layers, batch, width, seed=seed)
    return (h, _randn(layers, batch, module.hidden_size, seed=seed + 1)) if mode == "LSTM" else h


def _outputs_and_grads(fn, x, hx, module, seed=7):
    """Outputs of fn(x, hx) and the gradients of a fixed random weighting of them w.r.t. x, hx
    and the parameters."""
    x = x.detach().requires_grad_()
    hx = None if hx is None else (tuple(s.detach().requires_grad_() for s in hx) if isinstance(hx, tuple)
                                  else hx.detach().requires_grad_())
    output, state = fn(x, hx)
    outputs = [output] + (list(state) if isinstance(state, tuple) else [state])
    loss = sum((o * _randn(*o.shape, seed=seed + i)).sum() for i, o in enumerate(outputs))
    leaves = [x] + ([] if hx is None else list(hx) if isinstance(hx, tuple) else [hx]) + list(module.parameters())
    return outputs, torch.autograd.grad(loss, leaves, allow_unused=True)


def test_auto_runs_these_layers_on_the_cpu_threads():
    module = rnnfused.GRU(3, 5, bidirectional=True)
    assert {choice.kernel for choice in rnnfused.explain(module, torch.zeros(9, 4, 3))} == {"persistent"}


# --- lengths ---------------------------------------------------------------------------------

@pytest.mark.parametrize("mode,extra", VARIANTS)
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("with_hx", [False, True])
@pytest.mark.parametrize("route", ["packing", "flags"])
def test_lengths_match_torch_nn_on_packed_input(mode, extra, batch_first, with_hx, route, kernel):
    """route: CPU lengths alone run as the packed sequence they describe; with resets (here all
    False) they become step flags, the path a GPU takes."""
    steps, batch = 9, 5
    theirs, ours = make_twins(mode, 4, 6, num_layers=2, bidirectional=True, batch_first=batch_first, **extra)
    x = _randn(batch, steps, 4, seed=1) if batch_first else _randn(steps, batch, 4, seed=1)
    lengths = torch.tensor([3, 9, 1, 6, 9])  # unsorted, with the full length and a single step
    hx = _state(mode, ours, batch, seed=2) if with_hx else None
    resets = None if route == "packing" else torch.zeros(batch, steps, dtype=torch.bool)
    if resets is not None and not batch_first:
        resets = resets.t()

    def packed(a, h):
        out, state = theirs(pack_padded_sequence(a, lengths, batch_first=batch_first, enforce_sorted=False), h)
        return pad_packed_sequence(out, batch_first=batch_first, total_length=steps)[0], state

    expected, expected_grads = _outputs_and_grads(packed, x, hx, theirs)
    values, grads = _outputs_and_grads(lambda a, h: ours(a, h, lengths=lengths, resets=resets), x, hx, ours)
    assert max_error(values, expected) <= TOLERANCE[torch.float64]
    assert max_error(grads, expected_grads) <= TOLERANCE[torch.float64]


def test_lengths_on_the_gru_cho_form_match_the_reference(kernel):
    module = rnnfused.GRU(3, 5, num_layers=2, bidirectional=True, reset_after=False).double()
    x, lengths = _randn(10, 4, 3, seed=3), torch.tensor([10, 2, 7, 1])
    values, grads = _outputs_and_grads(lambda a, h: module(a, h, lengths=lengths), x, None, module)
    expected, expected_grads = _outputs_and_grads(
        lambda a, h: rnnfused.reference.forward(module, a, h, lengths=lengths), x, None, module)
    assert max_error(values, expected) <= TOLERANCE[torch.float64]
    assert max_error(grads, expected_grads) <= TOLERANCE[torch.float64]


def test_lengths_past_the_end_give_zero_outputs_and_no_gradient():
    module = rnnfused.LSTM(3, 4).double()
    x = _randn(6, 2, 3).requires_grad_()
    out, (h_n, c_n) = module(x, lengths=torch.tensor([6, 2]))
    assert torch.equal(out[2:, 1], torch.zeros(4, 4, dtype=torch.float64))
    assert torch.equal(h_n[0, 1], out[1, 1])
    out.sum().backward()
    assert torch.equal(x.grad[2:, 1], torch.zeros(4, 3, dtype=torch.float64))
    assert x.grad[:2, 1].abs().sum() > 0


def test_lengths_accept_a_list_and_any_integer_dtype():
    module = rnnfused.GRU(3, 4).double()
    x = _randn(5, 3, 3)
    expected = module(x, lengths=torch.tensor([5, 1, 3]))
    for lengths in ([5, 1, 3], torch.tensor([5, 1, 3], dtype=torch.int32)):
        out = module(x, lengths=lengths)
        assert torch.equal(out[0], expected[0]) and torch.equal(out[1], expected[1])


# --- resets ----------------------------------------------------------------------------------

def _segments(resets_row, length):
    """[(start, end)] of one sequence: a segment starts at 0 and at every reset before length."""
    starts = [0] + [t for t in range(1, length) if resets_row[t]]
    return list(zip(starts, starts[1:] + [length]))


def _segmentwise(theirs, mode, x, hx, resets, lengths):
    """What the layer with resets must compute, from torch.nn run on every segment apart
    (time-major x [T, B, I]); outputs past a sequence's length are zero."""
    steps, batch = x.shape[:2]
    directions = 2 if theirs.bidirectional else 1
    outputs, h_n, c_n = [], [], []
    for b in range(batch):
        length = steps if lengths is None else int(lengths[b])
        segments = _segments(resets[:, b].tolist(), length)
        pieces, first_state, last_state = [], None, None
        for k, (start, end) in enumerate(segments):
            def start_state(state):
                # The forward direction starts the first segment from hx (zeros if it resets at
                # step 0), the reverse direction the last segment; every other start is zero.
                s = torch.zeros_like(state[:, b:b + 1])
                for index in range(state.size(0)):
                    forward_from_hx = index % directions == 0 and k == 0 and not resets[0, b]
                    if forward_from_hx or (index % directions == 1 and k == len(segments) - 1):
                        s[index] = state[index, b]
                return s
            if hx is None:
                segment_hx = None
            elif mode == "LSTM":
                segment_hx = (start_state(hx[0]), start_state(hx[1]))
            else:
                segment_hx = start_state(hx)
            out, state = theirs(x[start:end, b:b + 1], segment_hx)
            pieces.append(out)
            first_state = state if k == 0 else first_state
            last_state = state
        pieces.append(x.new_zeros(steps - length, 1, pieces[0].size(-1)))
        outputs.append(torch.cat(pieces))

        def final(first, last):  # forward directions end on the last segment, reverse on the first
            return torch.stack([last[i] if i % directions == 0 else first[i] for i in range(last.size(0))])
        if mode == "LSTM":
            h_n.append(final(first_state[0], last_state[0]))
            c_n.append(final(first_state[1], last_state[1]))
        else:
            h_n.append(final(first_state, last_state))
    output = torch.cat(outputs, dim=1)
    h_n = torch.cat(h_n, dim=1)
    return output, ((h_n, torch.cat(c_n, dim=1)) if mode == "LSTM" else h_n)


RESETS = torch.tensor([[1, 0, 0, 1],
                       [0, 1, 0, 1],  # consecutive resets in column 3
                       [0, 1, 0, 1],
                       [0, 0, 0, 0],
                       [1, 0, 0, 0],
                       [0, 0, 1, 1],
                       [0, 0, 0, 0],
                       [0, 1, 0, 0],
                       [0, 0, 0, 1]], dtype=torch.bool)  # [T=9, B=4]; a reset at step 0 too


@pytest.mark.parametrize("mode,extra", VARIANTS)
@pytest.mark.parametrize("with_hx", [False, True])
@pytest.mark.parametrize("with_lengths", [False, True])
def test_resets_match_torch_nn_run_segment_by_segment(mode, extra, with_hx, with_lengths, kernel):
    theirs, ours = make_twins(mode, 3, 5, num_layers=2, bidirectional=True, **extra)
    x = _randn(9, 4, 3, seed=4)
    hx = _state(mode, ours, 4, seed=5) if with_hx else None
    lengths = torch.tensor([9, 4, 7, 6]) if with_lengths else None
    expected, expected_grads = _outputs_and_grads(
        lambda a, h: _segmentwise(theirs, mode, a, h, RESETS, lengths), x, hx, theirs)
    values, grads = _outputs_and_grads(lambda a, h: ours(a, h, resets=RESETS, lengths=lengths), x, hx, ours)
    assert max_error(values, expected) <= TOLERANCE[torch.float64]
    assert max_error(grads, expected_grads) <= TOLERANCE[torch.float64]


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_resets_batch_first_and_unbatched(mode):
    theirs, time_major = make_twins(mode, 3, 4)
    ours = type(time_major)(3, 4, batch_first=True).double()
    ours.load_state_dict(time_major.state_dict())
    x = _randn(4, 9, 3, seed=6)
    out, _ = ours(x, resets=RESETS.t())
    expected, _ = _segmentwise(theirs, mode, x.transpose(0, 1), None, RESETS, None)
    assert max_error(out, expected.transpose(0, 1)) <= TOLERANCE[torch.float64]
    single, _ = ours(x[0], resets=RESETS[:, 0])  # unbatched: [T, I] and resets [T]
    assert max_error(single, out[0]) <= TOLERANCE[torch.float64]


def test_resets_of_the_gru_cho_form_match_the_reference(kernel):
    module = rnnfused.GRU(3, 5, bidirectional=True, reset_after=False).double()
    x = _randn(9, 4, 3, seed=8)
    values, grads = _outputs_and_grads(lambda a, h: module(a, h, resets=RESETS), x, None, module)
    expected, expected_grads = _outputs_and_grads(
        lambda a, h: rnnfused.reference.forward(module, a, h, resets=RESETS), x, None, module)
    assert max_error(values, expected) <= TOLERANCE[torch.float64]
    assert max_error(grads, expected_grads) <= TOLERANCE[torch.float64]


def test_a_reset_cuts_the_gradient_to_earlier_steps():
    module = rnnfused.GRU(2, 3).double()
    x = _randn(6, 1, 2).requires_grad_()
    resets = torch.zeros(6, 1, dtype=torch.bool)
    resets[3] = True
    out, _ = module(x, resets=resets)
    out[3:].sum().backward()
    assert torch.equal(x.grad[:3], torch.zeros(3, 1, 2, dtype=torch.float64))
    assert x.grad[3:].abs().sum() > 0


def test_no_resets_is_the_plain_layer():
    module = rnnfused.LSTM(3, 4, bidirectional=True).double()
    x = _randn(9, 4, 3, seed=9)
    plain, none = module(x), module(x, resets=torch.zeros(9, 4, dtype=torch.bool), lengths=torch.full((4,), 9))
    assert max_error(list(none[1]) + [none[0]], list(plain[1]) + [plain[0]]) <= TOLERANCE[torch.float64]


@pytest.mark.parametrize("mode,extra", [("LSTM", {}), ("LSTM", {"proj_size": 2}), ("GRU", {}),
                                        ("GRU", {"reset_after": False}), ("RNN_TANH", {}), ("RNN_RELU", {})])
def test_gradcheck_with_resets_and_lengths(mode, extra):
    cls = {"LSTM": rnnfused.LSTM, "GRU": rnnfused.GRU, "RNN_TANH": rnnfused.RNN, "RNN_RELU": rnnfused.RNN}[mode]
    kwargs = {"nonlinearity": "relu"} if mode == "RNN_RELU" else {}
    torch.manual_seed(0)
    module = cls(2, 3, bidirectional=True, **kwargs, **extra).double()
    names = [name for name, _ in module.named_parameters()]
    resets = torch.tensor([[0, 1, 0], [1, 0, 0], [0, 0, 1], [0, 1, 0]], dtype=torch.bool)
    lengths = torch.tensor([4, 3, 2])

    def fn(x, *params):
        out, state = torch.func.functional_call(module, dict(zip(names, params)), (x,),
                                                {"resets": resets, "lengths": lengths})
        return (out,) + (tuple(state) if isinstance(state, tuple) else (state,))

    x = _randn(4, 3, 2, seed=10).requires_grad_()
    params = tuple(p.detach().requires_grad_() for p in module.parameters())
    assert gradcheck(fn, (x,) + params, eps=1e-6, atol=1e-7, check_batched_grad=True)


# --- cells -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["LSTMCell", "GRUCell", "RNNCell"])
def test_cell_reset_starts_rows_from_zeros(name):
    torch.manual_seed(0)
    cell = getattr(rnnfused, name)(3, 4).double()
    x = _randn(5, 3, seed=11)
    hx = (_randn(5, 4, seed=12), _randn(5, 4, seed=13)) if name == "LSTMCell" else _randn(5, 4, seed=12)
    reset = torch.tensor([True, False, True, False, False])
    zeroed = tuple(torch.where(reset.unsqueeze(1), 0.0, s) for s in hx) if name == "LSTMCell" else \
        torch.where(reset.unsqueeze(1), 0.0, hx)
    got, expected = cell(x, hx, reset=reset), cell(x, zeroed)
    assert max_error(list(got) if name == "LSTMCell" else [got],
                     list(expected) if name == "LSTMCell" else [expected]) <= TOLERANCE[torch.float64]
    unbatched = cell(x[0], tuple(s[0] for s in hx) if name == "LSTMCell" else hx[0], reset=torch.tensor(True))
    assert max_error(list(unbatched) if name == "LSTMCell" else [unbatched],
                     [s[0] for s in expected] if name == "LSTMCell" else [expected[0]]) <= TOLERANCE[torch.float64]


# --- errors ----------------------------------------------------------------------------------

def test_bad_lengths_raise_as_torch_nn_pack_functions_do():
    module = rnnfused.GRU(3, 4)
    x = torch.randn(5, 3, 3)
    with pytest.raises(RuntimeError, match="Length of all samples has to be greater than 0"):
        module(x, lengths=torch.tensor([5, 0, 2]))
    with pytest.raises(RuntimeError, match="Expected `len\\(lengths\\)` to be equal to batch_size"):
        module(x, lengths=torch.tensor([5, 2]))
    with pytest.raises(RuntimeError, match="must not exceed the sequence length 5"):
        module(x, lengths=torch.tensor([6, 2, 1]))
    with pytest.raises(ValueError, match="integer"):
        module(x, lengths=torch.tensor([5.0, 2.0, 1.0]))
    with pytest.raises(ValueError, match="batched input"):
        module(x[:, 0], lengths=torch.tensor([5]))


def test_bad_resets_raise():
    module = rnnfused.LSTM(3, 4)
    x = torch.randn(5, 3, 3)
    with pytest.raises(ValueError, match=r"shape \(5, 3\)"):
        module(x, resets=torch.zeros(3, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool tensor"):
        module(x, resets=torch.zeros(5, 3))
    with pytest.raises(TypeError, match="bool tensor"):
        module(x, resets=[[False] * 3] * 5)
    packed = pack_padded_sequence(x, torch.tensor([5, 3, 1]))
    with pytest.raises(ValueError, match="PackedSequence carries its own lengths"):
        module(packed, resets=torch.zeros(5, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="normalized layers"):
        rnnfused.LSTM(3, 4, norm="layer")(x, resets=torch.zeros(5, 3, dtype=torch.bool))


@pytest.mark.parametrize("norm", ["layer", "batch"])
def test_normalized_layers_take_lengths_as_packed_input(norm):
    module = rnnfused.GRU(3, 4, norm=norm, bidirectional=True).double().eval()
    x, lengths = _randn(6, 3, 3, seed=16), torch.tensor([6, 2, 4])
    out, h_n = module(x, lengths=lengths)
    packed_out, packed_h = module(pack_padded_sequence(x, lengths, enforce_sorted=False))
    assert max_error([out, h_n], [pad_packed_sequence(packed_out, total_length=6)[0], packed_h]) == 0


# --- CUDA ------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("mode,extra", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("flags_on", ["cuda", "cpu"])  # the lengths and resets: a CPU copy is queued, never waited for
def test_cuda_resets_and_lengths_match_the_cpu_without_a_host_sync(mode, extra, dtype, flags_on, monkeypatch):
    monkeypatch.setenv("RNNFUSED_KERNEL", "stepwise")
    _, ours = make_twins(mode, 3, 8, num_layers=2, bidirectional=True, dtype=dtype, **extra)
    x = _randn(9, 4, 3, seed=14, dtype=dtype)
    lengths = torch.tensor([9, 4, 7, 6])
    weights = [_randn(9, 4, 2 * (3 if extra else 8), seed=15, dtype=dtype)]

    def run(module, a, resets, lens):
        a = a.detach().requires_grad_()
        out, state = module(a, resets=resets, lengths=lens)
        loss = (out * weights[0].to(out.device)).sum() + sum(s.sum() for s in (state if mode == "LSTM" else [state]))
        return [out], torch.autograd.grad(loss, [a] + list(module.parameters()))

    on_cpu = run(ours, x, RESETS, lengths)
    ours = ours.cuda()
    x, resets, lengths = x.cuda(), RESETS.to(flags_on), lengths.to(flags_on)
    weights[0] = weights[0].cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # no copy of the lengths or resets that waits for the GPU
    try:
        on_gpu = run(ours, x, resets, lengths)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert max_error([v.cpu() for v in on_gpu[0]], on_cpu[0]) <= TOLERANCE[dtype]
    assert max_error([g.cpu() for g in on_gpu[1]], on_cpu[1]) <= TOLERANCE[dtype]
