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
