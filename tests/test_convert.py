"""rnnfused.convert: every torch.nn recurrent layer of a model swapped for rnnfused's (and
back), with the same configuration, parameters, training flag and hooks; refusals where
something would be lost."""

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import rnnfused
from conftest import flatten, max_error


class Nested(nn.Module):
    def __init__(self):
        super().__init__()
        shared = nn.LSTM(3, 4)
        self.seq = nn.Sequential(shared, nn.Identity())
        self.layers = nn.ModuleList([nn.GRU(3, 4, num_layers=2, batch_first=True), shared])
        self.table = nn.ModuleDict({"relu": nn.RNN(3, 5, nonlinearity="relu", bias=False)})
        self.proj = nn.LSTM(3, 6, proj_size=2, bidirectional=True, dropout=0.25, num_layers=2)

    def forward(self, x):
        outputs = [self.seq[0](x)[0], self.layers[0](x.transpose(0, 1))[0].transpose(0, 1),
                   self.layers[1](x)[0], self.table["relu"](x)[0], self.proj(x)[0]]
        return torch.cat(outputs, dim=-1)


def _recurrent_types(model):
    return sorted(type(m).__module__.split(".")[0] + "." + type(m).__name__ for m in model.modules()
                  if isinstance(m, (nn.RNNBase, rnnfused.modules.RNNBase)))


def test_nested_model_converts_and_gives_the_same_outputs():
    torch.manual_seed(0)
    model = Nested().double().eval()
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    expected = model(x)
    params = {name: p for name, p in model.named_parameters()}
    converted = rnnfused.convert(model)
    assert converted is model
    assert _recurrent_types(model) == ["rnnfused.GRU", "rnnfused.LSTM", "rnnfused.LSTM", "rnnfused.RNN"]
    assert model.seq[0] is model.layers[1]  # still shared
    assert all(params[name] is p for name, p in model.named_parameters())  # the same Parameter objects
    assert not model.proj.training and model.proj.dropout == 0.25 and model.proj.proj_size == 2
    assert max_error([model(x)], [expected]) <= 1e-12
    back = rnnfused.convert(model, to="torch")
    assert _recurrent_types(back) == ["torch.GRU", "torch.LSTM", "torch.LSTM", "torch.RNN"]
    assert max_error([back(x)], [expected]) <= 1e-12


def test_the_model_itself_and_gradients():
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 4, num_layers=2).double()
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    grads = torch.autograd.grad(lstm(x)[0].sum(), [x] + list(lstm.parameters()))
    ours = rnnfused.convert(lstm)
    assert type(ours) is rnnfused.LSTM and ours.training
    assert max_error(torch.autograd.grad(ours(x)[0].sum(), [x] + list(ours.parameters())), grads) <= 1e-12


def test_hooks_are_carried():
    lstm = nn.LSTM(3, 4)
    seen = []
    lstm.register_forward_pre_hook(lambda module, args: seen.append("pre"))
    lstm.register_forward_hook(lambda module, args, output: seen.append("post"))
    ours = rnnfused.convert(lstm)
    ours(torch.randn(2, 1, 3))
    assert seen == ["pre", "post"]


def test_refusals():
    with pytest.raises(ValueError, match="reset_after"):
        rnnfused.convert(rnnfused.GRU(3, 4, reset_after=False), to="torch")
    with pytest.raises(ValueError, match="cell_clip, grad_clip"):
        rnnfused.convert(nn.Sequential(rnnfused.LSTM(3, 4, cell_clip=1.0, grad_clip=2.0)), to="torch")
    with pytest.raises(ValueError, match="to must be"):
        rnnfused.convert(nn.LSTM(3, 4), to="cudnn")

    class MyLSTM(nn.LSTM):
        pass

    with pytest.raises(TypeError, match="subclass"):
        rnnfused.convert(nn.Sequential(MyLSTM(3, 4)))
    parametrized = nn.GRU(3, 4)
    parametrize.register_parametrization(parametrized, "weight_hh_l0", nn.Identity())
    with pytest.raises(TypeError, match="parametrized"):
        rnnfused.convert(nn.Sequential(parametrized))
    normed = torch.nn.utils.weight_norm(nn.LSTM(3, 4), "weight_hh_l0")
    with pytest.raises(ValueError, match="weight_norm"):
        rnnfused.convert(normed)


def test_device_and_dtype_are_kept():
    lstm = nn.LSTM(3, 4).to(torch.bfloat16)
    ours = rnnfused.convert(lstm)
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    assert flatten(ours(torch.randn(2, 1, 3, dtype=torch.bfloat16)))[0].dtype == torch.bfloat16


def test_cells_convert_both_ways():
    torch.manual_seed(0)
    model = nn.ModuleDict({"lstm": nn.LSTMCell(3, 4), "gru": nn.GRUCell(3, 4, bias=False),
                           "relu": nn.RNNCell(3, 4, nonlinearity="relu")}).double()
    x = torch.randn(2, 3, dtype=torch.float64)

    def run(m):
        return [m["lstm"](x)[0], m["gru"](x), m["relu"](x)]

    expected = run(model)
    rnnfused.convert(model)
    assert [type(m).__name__ for m in model.values()] == ["LSTMCell", "GRUCell", "RNNCell"]
    assert all(type(m).__module__ == "rnnfused.cells" for m in model.values())
    assert max_error(run(model), expected) <= 1e-12
    rnnfused.convert(model, to="torch")
    assert all(type(m).__module__ == "torch.nn.modules.rnn" for m in model.values())
    with pytest.raises(ValueError, match="reset_after"):
        rnnfused.convert(rnnfused.GRUCell(3, 4, reset_after=False), to="torch")


class MyLSTM(nn.LSTM):
    """A subclass: convert must refuse it (its own code would be lost)."""


def test_a_refusal_changes_nothing_anywhere_in_the_model():
    """The GRU comes first in the walk: it must not be replaced when a later layer is refused."""
    model = nn.Sequential(nn.GRU(3, 4), nn.Sequential(nn.Linear(4, 4), MyLSTM(4, 4)),
                          nn.ModuleDict({"cell": nn.GRUCell(3, 4)}))
    before = [type(m) for m in model.modules()]
    with pytest.raises(TypeError, match=r"nothing was changed; 1\.1: MyLSTM is a subclass of LSTM"):
        rnnfused.convert(model)
    assert [type(m) for m in model.modules()] == before


def test_every_refused_layer_is_named_in_one_message():
    model = nn.Sequential(rnnfused.GRU(3, 4, reset_after=False), rnnfused.LSTM(4, 4),
                          rnnfused.LSTMCell(4, 4, cell_clip=1.0))
    with pytest.raises(ValueError) as raised:
        rnnfused.convert(model, to="torch")
    message = str(raised.value)
    assert "0: torch.nn.GRU has no equivalent of reset_after" in message
    assert "2: torch.nn.LSTMCell has no equivalent of cell_clip" in message
    assert type(model[1]) is rnnfused.LSTM  # the convertible one was left alone too


def test_what_was_replaced_is_returned_and_logged(caplog):
    shared = nn.LSTM(3, 4)
    model = nn.ModuleDict({"enc": nn.Sequential(shared, nn.ReLU()), "again": shared, "dec": nn.GRUCell(4, 4),
                           "head": nn.Linear(4, 2)})
    with caplog.at_level("INFO", logger="rnnfused.convert"):
        result, replaced = rnnfused.convert(model, return_replaced=True)
    assert result is model
    assert [(r.name, r.old, r.new) for r in replaced] == [("enc.0", nn.LSTM, rnnfused.LSTM),
                                                          ("dec", nn.GRUCell, rnnfused.GRUCell)]
    assert model["enc"][0] is model["again"]  # a shared layer is replaced once, everywhere
    assert "enc.0: torch.nn.LSTM -> rnnfused.LSTM" in caplog.text
    assert "dec: torch.nn.GRUCell -> rnnfused.GRUCell" in caplog.text
    back, replaced = rnnfused.convert(model, to="torch", return_replaced=True)
    assert [str(r) for r in replaced] == ["enc.0: rnnfused.LSTM -> torch.nn.LSTM",
                                          "dec: rnnfused.GRUCell -> torch.nn.GRUCell"]
    assert rnnfused.convert(nn.Linear(2, 2), return_replaced=True)[1] == []
    model_itself = rnnfused.convert(nn.RNN(3, 4), return_replaced=True)[1]
    assert [str(r) for r in model_itself] == ["(the model itself): torch.nn.RNN -> rnnfused.RNN"]


def test_nested_layers_and_cells_round_trip():
    torch.manual_seed(0)
    model = nn.ModuleList([nn.Sequential(nn.LSTM(3, 4, num_layers=2, bidirectional=True)),
                           nn.ModuleDict({"cell": nn.LSTMCell(3, 4), "rnn": nn.RNNCell(3, 4, nonlinearity="relu")})]
                          ).double()
    x = torch.randn(5, 2, 3, dtype=torch.float64)

    def run(m):
        return [m[0][0](x)[0], m[1]["cell"](x[0])[1], m[1]["rnn"](x[0])]

    expected = run(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rnnfused.convert(model)
    assert {type(m).__module__.split(".")[0] for m in model.modules()
            if isinstance(m, (rnnfused.modules.RNNBase, rnnfused.cells.RNNCellBase))} == {"rnnfused"}
    assert max_error(run(model), expected) <= 1e-12
    rnnfused.convert(model, to="torch")
    assert {type(m) for m in model.modules()} >= {nn.LSTM, nn.LSTMCell, nn.RNNCell}
    assert max_error(run(model), expected) <= 1e-12
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_not_a_module():
    with pytest.raises(TypeError, match="expected an nn.Module, got dict"):
        rnnfused.convert({"lstm": nn.LSTM(3, 4)})
