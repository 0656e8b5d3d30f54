"""PackedSequence in, PackedSequence out: the same layout, values, final states (per
sequence) and gradients as torch.nn, sorted and unsorted, with and without h0."""

import itertools

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pack_sequence

import rnnfused
from conftest import MODES, TOLERANCE, make_twins, max_error, run_and_grad

INPUT, HIDDEN = 4, 6
LENGTHS = {True: [9, 6, 6, 2, 1], False: [3, 9, 1, 6, 2]}  # enforce_sorted -> lengths


def _packed(enforce_sorted, with_h0, mode, layers, bidirectional, proj):
    generator = torch.Generator().manual_seed(11)
    seqs = [torch.randn(n, INPUT, generator=generator, dtype=torch.float64).requires_grad_()
            for n in LENGTHS[enforce_sorted]]
    packed = pack_sequence(seqs, enforce_sorted=enforce_sorted)
    hx = None
    if with_h0:
        states = layers * (2 if bidirectional else 1)
        h0 = torch.randn(states, len(seqs), proj or HIDDEN, generator=generator, dtype=torch.float64)
        hx = h0.requires_grad_()
        if mode == "LSTM":
            c0 = torch.randn(states, len(seqs), HIDDEN, generator=generator, dtype=torch.float64)
            hx = (h0, c0.requires_grad_())
    leaves = seqs + ([] if hx is None else list(hx) if isinstance(hx, tuple) else [hx])
    return packed, hx, leaves


@pytest.mark.parametrize("mode,enforce_sorted,with_h0,bidirectional,proj", [
    (mode, enforce_sorted, with_h0, bidirectional, proj)
    for mode, enforce_sorted, with_h0, bidirectional in itertools.product(
        MODES, (True, False), (True, False), (False, True))
    for proj in ((0, 2) if mode == "LSTM" else (0,))
])
def test_packed_matches_torch_nn(mode, enforce_sorted, with_h0, bidirectional, proj):
    kwargs = dict(num_layers=2, bidirectional=bidirectional)
    if proj:
        kwargs["proj_size"] = proj
    theirs, ours = make_twins(mode, INPUT, HIDDEN, **kwargs)
    results = []
    for module in (theirs, ours):
        packed, hx, leaves = _packed(enforce_sorted, with_h0, mode, 2, bidirectional, proj)
        results.append(run_and_grad(module, packed, hx, leaves))
    assert max_error(results[1][0], results[0][0]) <= TOLERANCE[torch.float64]
    assert max_error(results[1][1], results[0][1]) <= TOLERANCE[torch.float64]


@pytest.mark.parametrize("mode", list(MODES))
def test_packed_output_layout(mode):
    _, ours = make_twins(mode, INPUT, HIDDEN, bidirectional=True)
    packed, _, _ = _packed(False, False, mode, 1, True, 0)
    output, _ = ours(packed)
    assert isinstance(output, PackedSequence)
    assert torch.equal(output.batch_sizes, packed.batch_sizes)
    assert torch.equal(output.sorted_indices, packed.sorted_indices)
    assert torch.equal(output.unsorted_indices, packed.unsorted_indices)
    assert output.data.shape == (packed.data.shape[0], 2 * HIDDEN)


@pytest.mark.parametrize("mode", list(MODES))
def test_packed_equals_each_sequence_alone(mode):
    """Each sequence of a packed batch gets exactly what it gets when run by itself: no
    padding leaks into the states in either direction."""
    _, ours = make_twins(mode, INPUT, HIDDEN, bidirectional=True)
    generator = torch.Generator().manual_seed(12)
    seqs = [torch.randn(n, INPUT, generator=generator, dtype=torch.float64) for n in (5, 2, 7)]
    output, hidden = ours(pack_sequence(seqs, enforce_sorted=False))
    padded, _ = torch.nn.utils.rnn.pad_packed_sequence(output)
    h_n = hidden[0] if mode == "LSTM" else hidden
    for i, seq in enumerate(seqs):
        alone, alone_hidden = ours(seq.unsqueeze(1))
        alone_h = alone_hidden[0] if mode == "LSTM" else alone_hidden
        assert (padded[: len(seq), i] - alone[:, 0]).abs().max() < 1e-12
        assert (h_n[:, i] - alone_h[:, 0]).abs().max() < 1e-12


def test_packed_from_padded_batch_first():
    theirs, ours = make_twins("GRU", INPUT, HIDDEN, batch_first=True)
    x = torch.randn(3, 5, INPUT, dtype=torch.float64)
    packed = pack_padded_sequence(x, torch.tensor([5, 2, 4]), batch_first=True, enforce_sorted=False)
    expected = theirs(packed)
    actual = ours(packed)
    assert max_error([actual[0].data, actual[1]], [expected[0].data, expected[1]]) <= TOLERANCE[torch.float64]


def test_reference_handles_packed_input():
    _, ours = make_twins("LSTM", INPUT, HIDDEN, num_layers=2, bidirectional=True)
    packed, hx, _ = _packed(False, True, "LSTM", 2, True, 0)
    expected = rnnfused.reference.forward(ours, packed, hx)
    actual = ours(packed, hx)
    assert max_error([actual[0].data, *actual[1]], [expected[0].data, *expected[1]]) <= TOLERANCE[torch.float64]
