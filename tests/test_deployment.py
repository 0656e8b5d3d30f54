"""Deployment and interop (docs/deployment.md): torch.jit.trace, isinstance of the torch.nn
classes (with torch.compile still tracing ours whole), quantize_dynamic, exported programs
decomposed to ATen and loaded without rnnfused, checkpoints under weights_only=True."""

import copy
import io
import os
import pickle
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torch import nn

import rnnfused
from conftest import flatten, max_error

CELLS = {"LSTMCell": nn.LSTMCell, "GRUCell": nn.GRUCell, "RNNCell": nn.RNNCell}
LAYERS = {"LSTM": nn.LSTM, "GRU": nn.GRU, "RNN": nn.RNN}


def _flat(value):
    return [value] if isinstance(value, torch.Tensor) else [t for v in value for t in _flat(v)]


def _loss(values):
    return sum((v * torch.linspace(-1, 1, v.numel()).view_as(v)).sum() for v in values)


# --- torch.jit.trace ----------------------------------------------------------------------------

TRACE_CASES = [
    ("LSTM", dict(num_layers=2, bidirectional=True, proj_size=2)),
    ("GRU", dict(reset_after=False, batch_first=True)),
    ("RNN", dict(nonlinearity="relu")),
    ("LSTMCell", {}),
    ("GRUCell", {}),
    ("RNNCell", {}),
]


def _input(name, module, steps, batch):
    if name.endswith("Cell"):
        return torch.randn(batch, 3)
    return torch.randn(batch, steps, 3) if module.batch_first else torch.randn(steps, batch, 3)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name,kwargs", TRACE_CASES)
def test_trace_with_defaults_differentiates_saves_and_loads(name, kwargs, training):
    torch.manual_seed(0)
    module = getattr(rnnfused, name)(3, 4, **kwargs).train(training)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings of the shape checks, as torch.nn's
        traced = torch.jit.trace(module, _input(name, module, 5, 2))  # trace's own check must pass
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    x = _input(name, module, 7, 3)  # other sizes than traced
    expected_x = x.clone().requires_grad_()
    expected = _flat(module(expected_x))
    expected_grads = torch.autograd.grad(_loss(expected), [expected_x, *module.parameters()])
    for run in (traced, loaded):
        leaf = x.clone().requires_grad_()
        got = _flat(run(leaf))
        params = list(run.parameters())
        grads = torch.autograd.grad(_loss(got), [leaf, *params])
        assert max_error([g.detach() for g in got] + list(grads),
                         [e.detach() for e in expected] + list(expected_grads)) <= 1e-6


# --- isinstance -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", [*LAYERS, *CELLS])
def test_instances_of_the_torch_nn_classes_with_their_surface(name):
    torch.manual_seed(0)
    theirs_cls = {**LAYERS, **CELLS}[name]
    ours = getattr(rnnfused, name)(3, 4)
    theirs = theirs_cls(3, 4)
    assert isinstance(ours, theirs_cls)
    assert isinstance(ours, nn.RNNCellBase if name in CELLS else nn.RNNBase)
    assert repr(ours) == "rnnfused." + repr(theirs)
    assert ours._get_name() == f"rnnfused.{name}"
    copy.deepcopy(ours)
    restored = pickle.loads(pickle.dumps(ours))
    assert type(restored) is type(ours)
    assert all(torch.equal(a, b) for a, b in zip(restored.parameters(), ours.parameters()))
    if name in LAYERS:
        assert [w.shape for w in ours._flat_weights] == [w.shape for w in theirs._flat_weights]
        assert all(a is b for a, b in zip(ours._flat_weights, ours.parameters()))
        assert [[w.shape for w in ws] for ws in ours.all_weights] == [[w.shape for w in ws]
                                                                       for ws in theirs.all_weights]
        for method in ("flatten_parameters", "_init_flat_weights", "_update_flat_weights"):
            getattr(ours, method)()  # harmless
        assert not ours._weights_have_changed()
        replica = ours._replicate_for_data_parallel()
        assert replica._flat_weights_names == ours._flat_weights_names
        assert replica._flat_weights_names is not ours._flat_weights_names
        ours.weight_hh_l0 = nn.Parameter(torch.zeros_like(ours.weight_hh_l0))
        assert ours._flat_weights[1] is ours.weight_hh_l0


@pytest.mark.parametrize("name", [*LAYERS, *CELLS])
def test_script_says_what_to_use_instead(name):
    with pytest.raises(RuntimeError, match="torch.jit.script.*torch.compile or torch.export, or torch.jit.trace"):
        torch.jit.script(getattr(rnnfused, name)(3, 4))


def test_a_subclass_keeps_its_own_name_in_repr():
    class Mine(rnnfused.GRU):
        pass

    assert repr(Mine(3, 4)).startswith("Mine(3, 4")


def test_init_code_that_finds_torch_nn_layers_finds_ours():
    model = nn.Sequential(rnnfused.LSTM(3, 4), rnnfused.GRUCell(4, 4))
    found = [m for m in model.modules() if isinstance(m, (nn.LSTM, nn.GRUCell))]
    assert found == [model[0], model[1]]


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = rnnfused.LSTM(3, 4, num_layers=2, bidirectional=True)
        self.decoder = rnnfused.GRUCell(8, 4)

    def forward(self, x):
        y, _ = self.encoder(x)
        return self.decoder(y[-1])


def test_compile_fullgraph_traces_our_layers_nested_and_leaves_torch_nn_alone():
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = _Net()
    explanation = torch._dynamo.explain(net)(torch.randn(5, 2, 3))
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons
    compiled = torch.compile(net, fullgraph=True, dynamic=True, backend="aot_eager")  # tracing is what is tested
    x = torch.randn(6, 3, 3)
    assert max_error([compiled(x)], [net(x)]) <= 1e-6
    assert torch._dynamo.config.allow_rnn is False  # set for our modules only, while they are wrapped
    torch._dynamo.reset()
    with pytest.raises(Exception, match="RNN, GRU, or LSTM"):
        torch.compile(nn.GRU(3, 4), fullgraph=True)(torch.randn(5, 2, 3))  # torch's own behaviour, unchanged


def test_compile_traces_our_layers_when_dynamo_was_imported_before_rnnfused():
    code = ("import torch, torch._dynamo, rnnfused; "
            "layer = torch.compile(rnnfused.GRU(3, 4), fullgraph=True, backend='aot_eager'); "
            "print(layer(torch.randn(5, 2, 3))[0].shape)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "torch.Size([5, 2, 4])" in result.stdout


def test_convert_leaves_our_layers_alone_and_converts_back():
    model = nn.Sequential(rnnfused.GRU(3, 4), nn.LSTM(4, 4))
    converted = rnnfused.convert(model)
    assert type(converted[0]) is rnnfused.GRU and type(converted[1]) is rnnfused.LSTM
    back = rnnfused.convert(converted, to="torch")
    assert type(back[0]) is nn.GRU and type(back[1]) is nn.LSTM


# --- quantize_dynamic -------------------------------------------------------------------------------

class _Quantizable(nn.Module):
    def __init__(self, lstm, gru, cells):
        super().__init__()
        self.lstm, self.gru, self.cells = lstm, gru, nn.ModuleList(cells)

    def forward(self, x):
        y, _ = self.lstm(x)
        y, _ = self.gru(y)
        return [y] + [_flat(cell(y[-1]))[0] for cell in self.cells]


def _quantizable_twins():
    torch.manual_seed(0)
    theirs = _Quantizable(nn.LSTM(3, 6, num_layers=2, bidirectional=True), nn.GRU(12, 6),
                          [nn.LSTMCell(6, 5), nn.GRUCell(6, 5), nn.RNNCell(6, 5)]).eval()
    return theirs, rnnfused.convert(copy.deepcopy(theirs))


def test_quantize_dynamic_naming_our_classes_matches_torch_nn_quantized():
    theirs, ours = _quantizable_twins()
    spec_theirs = {nn.LSTM, nn.GRU, nn.LSTMCell, nn.GRUCell, nn.RNNCell}
    spec_ours = {rnnfused.LSTM, rnnfused.GRU, rnnfused.LSTMCell, rnnfused.GRUCell, rnnfused.RNNCell}
    quantized_theirs = torch.ao.quantization.quantize_dynamic(theirs, spec_theirs, dtype=torch.qint8)
    quantized_ours = torch.ao.quantization.quantize_dynamic(ours, spec_ours, dtype=torch.qint8)
    for name in ("lstm", "gru"):
        assert type(getattr(quantized_ours, name)) is type(getattr(quantized_theirs, name))
    assert [type(c) for c in quantized_ours.cells] == [type(c) for c in quantized_theirs.cells]
    assert type(quantized_ours.lstm).__module__.startswith("torch.ao.nn.quantized.dynamic")
    x = torch.randn(5, 2, 3)
    assert max_error(quantized_ours(x), quantized_theirs(x)) == 0
    assert max_error(quantized_ours(x), ours(x)) > 0  # really quantized


def test_quantize_dynamic_naming_torch_nn_classes_leaves_ours_in_float():
    # torch.ao matches modules by exact type (docs/deployment.md): ours need their own names.
    _, ours = _quantizable_twins()
    quantized = torch.ao.quantization.quantize_dynamic(ours, {nn.LSTM, nn.GRU}, dtype=torch.qint8)
    assert type(quantized.lstm) is rnnfused.LSTM


def test_quantize_dynamic_refuses_what_torch_ao_cannot_quantize_by_name():
    model = nn.Sequential(rnnfused.GRU(3, 4, reset_after=False))
    with pytest.raises(ValueError, match="reset_after"):
        torch.ao.quantization.quantize_dynamic(model, {rnnfused.GRU}, dtype=torch.qint8)


# --- exported programs without rnnfused -----------------------------------------------------------

def _python_without_rnnfused(code, tmp_path):
    """Runs code in a new Python that does not import rnnfused (asserted at its end)."""
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(code) + "\nassert 'rnnfused' not in sys.modules\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)


DECOMPOSE_CASES = [
    ("LSTM", dict(num_layers=2, bidirectional=True, proj_size=2, cell_clip=0.5), False),
    ("GRU", dict(reset_after=False, batch_first=True), False),
    ("RNN_RELU", dict(bidirectional=True), False),
    ("LSTM", dict(bidirectional=True), True),  # with lengths: the step flags inside the scan
]


@pytest.mark.parametrize("mode,kwargs,with_lengths", DECOMPOSE_CASES)
def test_decomposed_program_loads_and_runs_without_rnnfused(mode, kwargs, with_lengths, tmp_path):
    torch.manual_seed(0)
    extra = {"nonlinearity": "relu"} if mode == "RNN_RELU" else {}
    ours = getattr(rnnfused, mode.split("_")[0])(3, 5, **extra, **kwargs).eval()

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = ours

        def forward(self, x, lengths=None):
            return self.rnn(x, lengths=lengths)

    batch_first = ours.batch_first
    steps, batch = torch.export.Dim("steps", min=2), torch.export.Dim("batch", min=2)
    x = torch.randn(3, 4, 3) if batch_first else torch.randn(4, 3, 3)
    args, shapes = (x,), ({0: batch, 1: steps} if batch_first else {0: steps, 1: batch},)
    if with_lengths:
        args, shapes = (x, torch.tensor([4, 2, 3])), shapes + ({0: batch},)
    program = torch.export.export(Wrapper().eval(), args, dynamic_shapes=shapes)
    decomposed = program.run_decompositions(rnnfused.decompositions.table())
    targets = {str(node.target) for node in decomposed.graph.nodes if node.op == "call_function"}
    assert not any("rnnfused" in target for target in targets) and "scan" in targets
    torch.export.save(decomposed, tmp_path / "program.pt2")
    new_x = torch.randn(5, 7, 3) if batch_first else torch.randn(7, 5, 3)  # other sizes than exported
    new_args = (new_x, torch.tensor([7, 1, 4, 7, 2])) if with_lengths else (new_x,)
    with torch.no_grad():
        torch.save((new_args, _flat(Wrapper()(*new_args))), tmp_path / "expected.pt")
    result = _python_without_rnnfused("""
        import sys, torch
        program = torch.export.load("program.pt2")
        args, expected = torch.load("expected.pt")
        flat = lambda v: [v] if isinstance(v, torch.Tensor) else [t for u in v for t in flat(u)]
        got = flat(program.module()(*args))
        assert len(got) == len(expected)
        error = max((g - e).abs().max().item() for g, e in zip(got, expected))
        assert error <= 1e-5, error
    """, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]


def test_programs_that_keep_our_operator_name_it_when_loaded_without_rnnfused(tmp_path):
    module = rnnfused.GRU(3, 4).eval()
    torch.export.save(torch.export.export(module, (torch.randn(5, 2, 3),)), tmp_path / "program.pt2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(module, torch.randn(5, 2, 3)), str(tmp_path / "traced.pt"))
    for load in ('torch.export.load("program.pt2")', 'torch.jit.load("traced.pt")'):
        result = _python_without_rnnfused(f"""
            import sys, torch
            try:
                {load}
            except Exception as error:
                print("refused:", error)
            else:
                print("loaded")
        """, tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "refused" in result.stdout
        assert "rnnfused::layer_forward" in result.stdout + result.stderr or \
            "rnnfused.layer_forward" in result.stdout + result.stderr


# --- checkpoints --------------------------------------------------------------------------------------

class _Model(nn.Module):
    def __init__(self, rnn, cell):
        super().__init__()
        self.rnn, self.cell, self.drop = rnn, cell, nn.Dropout(0.1)


def test_whole_model_checkpoints_load_with_weights_only_and_torch_nn_allow_list(tmp_path):
    torch.manual_seed(0)
    model = _Model(rnnfused.LSTM(3, 4, num_layers=2, proj_size=2, norm="batch"), rnnfused.GRUCell(2, 2))
    torch.save(model, tmp_path / "model.pt")
    # What a script that saves whole torch.nn models allows (e.g. pytorch/examples'
    # word_language_model): its own class and torch.nn's; ours are allowed by `import rnnfused`.
    allowed = [_Model, nn.Dropout, nn.LSTM, nn.GRUCell]
    with torch.serialization.safe_globals(allowed):
        loaded = torch.load(tmp_path / "model.pt")  # weights_only=True, torch's default
    assert type(loaded.rnn) is rnnfused.LSTM and type(loaded.cell) is rnnfused.GRUCell
    x = torch.randn(5, 2, 3)
    loaded.eval(), model.eval()
    assert max_error(flatten(loaded.rnn(x)), flatten(model.rnn(x))) == 0


@pytest.mark.parametrize("name", ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell"])
def test_state_dicts_move_both_ways(name):
    torch.manual_seed(0)
    theirs = {**LAYERS, **CELLS}[name](3, 4)
    ours = getattr(rnnfused, name)(3, 4)
    ours.load_state_dict(theirs.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), theirs.parameters()))
    fresh = {**LAYERS, **CELLS}[name](3, 4)
    fresh.load_state_dict(ours.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), ours.parameters()))


# --- per-call cost ------------------------------------------------------------------------------------

def test_bench_overhead_reports_ours_next_to_torch_nn(capsys):
    from bench import overhead
    assert overhead.main(["--calls", "3", "--cells", "GRU", "LSTMCell"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines[2:]]
    assert [(row[0], row[1]) for row in rows] == [("GRU", "rnnfused"), ("GRU", "torch"), ("LSTMCell", "rnnfused"),
                                                   ("LSTMCell", "torch")]
    assert all(float(value) > 0 for row in rows for value in row[2:])
