"""rnnfused.explain on any module: a whole model is walked and every recurrent layer and
cell explained (rnnfused's with the kernels they run for the input they got, torch.nn's
as running torch's kernels, with the convert call that swaps them); anything else that is
not a module is a TypeError."""

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import rnnfused
from rnnfused.explain import KernelChoice


class Tagger(nn.Module):
    """An encoder over packed input, then a cell run in a loop, a linear head, and one
    layer the forward never calls."""

    def __init__(self, library):
        super().__init__()
        self.encoder = library.LSTM(3, 8, num_layers=2, bidirectional=True)
        self.decoder = library.GRUCell(16, 8)
        self.unused = library.RNN(3, 4)
        self.head = nn.Linear(8, 2)

    def forward(self, packed, steps=3):
        _, (h, _) = self.encoder(packed)
        state, context = None, torch.cat([h[-2], h[-1]], dim=1)
        for _ in range(steps):
            state = self.decoder(context, state)
        return self.head(state)


def _packed():
    return pack_padded_sequence(torch.randn(12, 4, 3), torch.tensor([12, 9, 9, 2]))


def test_a_model_of_rnnfused_layers_is_explained_for_the_input_its_layers_got():
    torch.manual_seed(0)
    model = Tagger(rnnfused)
    explained = rnnfused.explain(model, _packed(), steps=4)
    assert [(e.name, e.layer) for e in explained] == [("encoder", "rnnfused.LSTM"), ("decoder", "rnnfused.GRUCell"),
                                                      ("unused", "rnnfused.RNN")]
    encoder, decoder, unused = explained
    # The encoder's choices are those of the per-layer explanation for the packed input it got.
    assert encoder.choices == rnnfused.explain(model.encoder, _packed())
    assert [(c.layer, c.direction) for c in encoder.choices] == [(0, "forward"), (0, "reverse"), (1, "forward"),
                                                                 (1, "reverse")]
    assert all(isinstance(c, KernelChoice) for c in encoder.choices + decoder.choices)
    assert decoder.note == "called 4 times, explained for the first call" and len(decoder.choices) == 1
    assert unused.choices == [] and unused.note == "not called by this forward"
    text = "\n".join(map(str, explained))
    assert "encoder (rnnfused.LSTM)\n  layer 0 forward: " in text
    # No hook is left behind and no gradient was recorded.
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


def test_torch_layers_are_named_with_the_call_that_swaps_them():
    model = Tagger(nn)
    explained = rnnfused.explain(model, _packed())
    assert [e.layer for e in explained] == ["torch.nn.LSTM", "torch.nn.GRUCell", "torch.nn.RNN"]
    assert all(e.choices == [] for e in explained)
    assert "runs torch.nn's own kernels" in explained[0].note
    assert "rnnfused.convert(model) swaps it for rnnfused.LSTM" in explained[0].note
    assert "rnnfused.GRUCell" in explained[1].note
    # A torch.nn layer on its own is walked too (it used to raise AttributeError).
    alone, = rnnfused.explain(nn.GRU(3, 4))
    assert alone.name == "" and "rnnfused.GRU" in alone.note and str(alone).startswith("(the model itself)")


def test_without_an_input_the_layers_are_listed():
    explained = rnnfused.explain(nn.Sequential(rnnfused.GRU(3, 4), nn.LSTM(4, 4), nn.ReLU()))
    assert [e.name for e in explained] == ["0", "1"]
    assert "rnnfused.explain(model, x)" in explained[0].note
    assert rnnfused.explain(nn.Linear(3, 4)) == []


def test_a_subclass_of_a_torch_layer_is_reported_as_refused_by_convert():
    class Mine(nn.LSTM):
        pass

    explained, = rnnfused.explain(nn.Sequential(Mine(3, 4)))
    assert explained.layer.endswith("Mine") and "subclass of torch.nn.LSTM" in explained.note


def test_anything_else_is_a_type_error():
    for bad in (3, "LSTM", [rnnfused.LSTM(3, 4)], torch.zeros(3)):
        with pytest.raises(TypeError, match="explain: expected an nn.Module"):
            rnnfused.explain(bad, torch.zeros(2, 1, 3))
    with pytest.raises(TypeError, match="one input"):
        rnnfused.explain(rnnfused.LSTM(3, 4))


def test_a_single_rnnfused_layer_still_returns_its_kernel_choices():
    choices = rnnfused.explain(rnnfused.LSTM(3, 4, num_layers=2), torch.zeros(10, 2, 3))
    assert [type(c) for c in choices] == [KernelChoice, KernelChoice]
    assert rnnfused.explain(rnnfused.RNNCell(3, 4), torch.zeros(2, 3))[0].layer == 0
