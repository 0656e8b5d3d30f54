"""ONNX export with both of torch's exporters (rnnfused.onnx): the graph's nodes, and
onnxruntime against eager in float32 at other batch and sequence sizes than exported."""

import io
import warnings

import pytest
import torch

import rnnfused
from rnnfused.onnx import UnsupportedExport

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

CLASSES = {"LSTM": rnnfused.LSTM, "GRU": rnnfused.GRU, "RNN": rnnfused.RNN}


def _module(name, **kwargs):
    torch.manual_seed(0)
    return CLASSES[name](3, 5, **kwargs).eval()


def _states(module, batch):
    layers = module.num_layers * (2 if module.bidirectional else 1)
    h0 = torch.randn(layers, batch, module.proj_size or module.hidden_size)
    return (h0, torch.randn(layers, batch, module.hidden_size)) if module.mode == "LSTM" else h0


def _export(module, args, dynamo, dynamic_shapes=None, input_names=None, dynamic_axes=None):
    """The ONNX model's bytes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            return torch.onnx.export(module, args, dynamo=True, dynamic_shapes=dynamic_shapes,
                                     verbose=False).model_proto.SerializeToString()
        buffer = io.BytesIO()
        torch.onnx.export(module, args, buffer, dynamo=False, input_names=input_names, dynamic_axes=dynamic_axes)
        return buffer.getvalue()


def _export_layer(module, with_states, dynamo):
    """A layer exported at batch 2, 4 steps, with batch and steps dynamic (h0/c0: their batch)."""
    batch_first = module.batch_first
    x = torch.randn(2, 4, 3) if batch_first else torch.randn(4, 2, 3)
    args = (x, _states(module, 2)) if with_states else (x,)
    if dynamo:
        steps, batch = torch.export.Dim("steps"), torch.export.Dim("batch")
        shapes = ({0: batch, 1: steps} if batch_first else {0: steps, 1: batch},)
        if with_states:
            state = {1: batch}
            shapes += ((state, state) if module.mode == "LSTM" else state,)
        return _export(module, args, True, dynamic_shapes=shapes)
    names = ["x"] + (["h0", "c0"] if module.mode == "LSTM" else ["h0"]) * with_states
    axes = {"x": {0: "batch", 1: "steps"} if batch_first else {0: "steps", 1: "batch"}}
    axes.update({name: {1: "batch"} for name in names[1:]})
    return _export(module, args, False, input_names=names, dynamic_axes=axes)


def _run(model, module, with_states, steps=6, batch=3):
    """onnxruntime's outputs and eager's (flattened) for a new input of other sizes."""
    x = torch.randn(batch, steps, 3) if module.batch_first else torch.randn(steps, batch, 3)
    inputs = [x]
    if with_states:
        states = _states(module, batch)
        inputs += list(states) if isinstance(states, tuple) else [states]
    session = ort.InferenceSession(model)
    got = session.run(None, {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)})
    with torch.no_grad():
        output, hidden = module(x, states) if with_states else module(x)
    expected = [output] + (list(hidden) if isinstance(hidden, tuple) else [hidden])
    return [torch.from_numpy(g) for g in got], expected


def _node_types(model):
    return [node.op_type for node in onnx.load_from_string(model).graph.node]


def _assert_close(got, expected):
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.shape == e.shape
        assert (g - e).abs().max().item() <= 1e-5


# (class, kwargs, the ONNX node that computes the layers)
STANDARD = [
    ("LSTM", {}, "LSTM"),
    ("LSTM", dict(num_layers=2, bidirectional=True, batch_first=True), "LSTM"),
    ("GRU", {}, "GRU"),
    ("GRU", dict(num_layers=2, bidirectional=True), "GRU"),
    ("GRU", dict(reset_after=False, batch_first=True), "GRU"),
    ("RNN", dict(nonlinearity="relu", bias=False), "RNN"),
    ("RNN", dict(num_layers=2, bidirectional=True), "RNN"),
    ("LSTM", dict(bias=False, grad_clip=1.0), "LSTM"),  # grad_clip: backward only, the forward is exact
]


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
@pytest.mark.parametrize("with_states", [False, True], ids=["zero-states", "h0-given"])
@pytest.mark.parametrize("name,kwargs,node", STANDARD)
def test_standard_layers_export_as_onnx_recurrent_nodes(name, kwargs, node, with_states, dynamo):
    module = _module(name, **kwargs)
    model = _export_layer(module, with_states, dynamo)
    types = _node_types(model)
    directions = 2 if module.bidirectional else 1
    assert types.count(node) == module.num_layers * directions
    if name == "GRU":
        gru = [n for n in onnx.load_from_string(model).graph.node if n.op_type == "GRU"]
        linear_before_reset = {a.name: a.i for n in gru for a in n.attribute}["linear_before_reset"]
        assert linear_before_reset == (1 if module.reset_after else 0)
    _assert_close(*_run(model, module, with_states))


# LSTM extras the ONNX LSTM node cannot express: an ONNX Loop (dynamo exporter).
LOOPED = [
    dict(proj_size=2),
    dict(proj_size=2, num_layers=2, bidirectional=True, batch_first=True),
    dict(cell_clip=0.05),
]


@pytest.mark.parametrize("with_states", [False, True], ids=["zero-states", "h0-given"])
@pytest.mark.parametrize("kwargs", LOOPED, ids=str)
def test_lstm_projection_and_cell_clip_export_as_a_loop(kwargs, with_states):
    module = _module("LSTM", **kwargs)
    model = _export_layer(module, with_states, dynamo=True)
    types = _node_types(model)
    assert "LSTM" not in types and "Loop" in types
    _assert_close(*_run(model, module, with_states))


def test_lstm_lengths_export_as_a_loop():
    module = _module("LSTM", bidirectional=True)

    class WithLengths(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = module

        def forward(self, x, lengths):
            return self.lstm(x, lengths=lengths)[0]

    wrapper = WithLengths().eval()
    steps, batch = torch.export.Dim("steps"), torch.export.Dim("batch")
    model = _export(wrapper, (torch.randn(4, 2, 3), torch.tensor([4, 2])), True,
                    dynamic_shapes=({0: steps, 1: batch}, {0: batch}))
    x, lengths = torch.randn(6, 3, 3), torch.tensor([2, 6, 5])
    session = ort.InferenceSession(model)
    got, = session.run(None, {i.name: t.numpy() for i, t in zip(session.get_inputs(), (x, lengths))})
    with torch.no_grad():
        expected = wrapper(x, lengths)
    _assert_close([torch.from_numpy(got)], [expected])


@pytest.mark.parametrize("name", ["LSTMCell", "GRUCell", "RNNCell"])
def test_cells_export(name):
    torch.manual_seed(0)
    cell = getattr(rnnfused, name)(3, 5).eval()
    batch = torch.export.Dim("batch")
    model = _export(cell, (torch.randn(2, 3),), True, dynamic_shapes=({0: batch},))
    assert name[:-4] in _node_types(model)
    x = torch.randn(4, 3)
    session = ort.InferenceSession(model)
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        expected = cell(x)
    _assert_close([torch.from_numpy(g) for g in got], list(expected) if isinstance(expected, tuple) else [expected])


def test_the_torchscript_exporter_names_what_needs_the_dynamo_exporter():
    with pytest.raises(UnsupportedExport, match="proj_size.*dynamo exporter"):
        _export_layer(_module("LSTM", proj_size=2), False, dynamo=False)


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_normalized_layers_are_refused_by_name(dynamo):
    with pytest.raises(Exception) as raised:
        _export_layer(_module("GRU", norm="layer"), False, dynamo=dynamo)
    assert "norm='layer'" in "".join(str(e) for e in _chain(raised.value))


def _chain(error):
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__
