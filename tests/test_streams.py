"""What runs on several CUDA streams, checked on the CPU: a bidirectional layer's two
directions at once, and the layer pipeline (RNNFUSED_WAVEFRONT=n: a unidirectional stack run
over n slices of the steps, layer l on slice k once layer l-1 has finished it). On the CPU
the pipeline's slices run one after another: these tests check the slicing, the carried
states, the step flags and the gradients against the stack run layer after layer in float64,
and, with fake streams, the order of the waits and launches on CUDA. tests/test_cuda.py
compares the results on a GPU."""

import contextlib

import pytest
import torch
from torch.autograd import gradcheck
from torch.nn.utils.rnn import pack_sequence

import rnnfused
from rnnfused import dispatch
from rnnfused._ops import Cell

# (class, constructor kwargs): every cell and form the fused kernels run.
VARIANTS = [(rnnfused.LSTM, {}), (rnnfused.LSTM, {"proj_size": 3}), (rnnfused.GRU, {}),
            (rnnfused.GRU, {"reset_after": False}), (rnnfused.RNN, {"nonlinearity": "relu"})]
IDS = ["LSTM", "LSTMP", "GRU", "GRU_CHO", "RNN_RELU"]


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.fixture
def slice_lengths(monkeypatch):
    """The number of steps of every run_layer call, in order."""
    calls = []
    run_layer = rnnfused.modules.run_layer

    def spy(options, x, *args, **kwargs):
        calls.append(x.size(0))
        return run_layer(options, x, *args, **kwargs)

    monkeypatch.setattr(rnnfused.modules, "run_layer", spy)
    return calls


def _run(module, x, hx, flags, setting, monkeypatch):
    """Output, states and the gradients of a fixed weighting of them, under RNNFUSED_WAVEFRONT=setting."""
    monkeypatch.setenv("RNNFUSED_WAVEFRONT", setting)
    x = x.detach().requires_grad_()
    leaves = [x] + list(module.parameters())
    output, state = module(x, hx, **flags)
    values = [output] + list(state if isinstance(state, tuple) else (state,))
    loss = sum((v * _randn(*v.shape, seed=i + 7)).sum() for i, v in enumerate(values))
    return values + list(torch.autograd.grad(loss, leaves))


@pytest.mark.parametrize("form", ["padded", "h0_batch_first", "lengths_resets"])
@pytest.mark.parametrize("cls,extra", VARIANTS, ids=IDS)
def test_slices_give_what_layer_after_layer_gives(cls, extra, form, slice_lengths, monkeypatch):
    batch_first = form == "h0_batch_first"
    torch.manual_seed(0)
    module = cls(3, 5, num_layers=3, batch_first=batch_first, **extra).double()
    x = _randn(4, 11, 3, seed=1) if batch_first else _randn(11, 4, 3, seed=1)
    hx, flags = None, {}
    if batch_first:
        width = extra.get("proj_size", 5)
        hx = _randn(3, 4, width, seed=2)
        hx = (hx, _randn(3, 4, 5, seed=3)) if cls is rnnfused.LSTM else hx
    if form == "lengths_resets":
        resets = torch.zeros(11, 4, dtype=torch.bool)
        resets[4, 1] = resets[8, 2] = resets[3, 3] = True  # one on a slice's first step (3)
        flags = {"lengths": torch.tensor([11, 2, 7, 5]), "resets": resets}
    layer_after_layer = _run(module, x, hx, flags, "0", monkeypatch)
    assert slice_lengths == [11, 11, 11]
    slice_lengths.clear()
    sliced = _run(module, x, hx, flags, "3", monkeypatch)
    assert slice_lengths == [3] * 3 + [4] * 6  # slices [0, 3), [3, 7), [7, 11), each through the 3 layers
    assert max((a - b).abs().max().item() for a, b in zip(sliced, layer_after_layer)) <= 1e-12


def test_gradcheck(monkeypatch):
    monkeypatch.setenv("RNNFUSED_WAVEFRONT", "2")
    torch.manual_seed(0)
    module = rnnfused.LSTM(2, 3, num_layers=2).double()
    x = _randn(5, 2, 2).requires_grad_()
    assert gradcheck(lambda x, *weights: module(x)[0], [x] + list(module.parameters()))


@pytest.mark.parametrize("case", ["one_layer", "bidirectional", "packed", "dropout", "regularised", "norm",
                                  "fewer_steps_than_slices"])
def test_what_runs_layer_after_layer(case, slice_lengths, monkeypatch):
    """The pipeline takes a padded unidirectional stack of several layers with no random draws
    per layer call, at most one slice per step; anything else runs as before."""
    monkeypatch.setenv("RNNFUSED_WAVEFRONT", "3" if case != "fewer_steps_than_slices" else "20")
    kwargs = {"one_layer": {"num_layers": 1}, "bidirectional": {"bidirectional": True},
              "dropout": {"dropout": 0.5}, "regularised": {"zoneout": 0.1}, "norm": {"norm": "layer"}}
    module = rnnfused.GRU(3, 5, **{"num_layers": 2, **kwargs.get(case, {})})
    x = torch.randn(11, 4, 3)
    module(pack_sequence([x[:, 0], x[:7, 1]]) if case == "packed" else x)
    if case == "fewer_steps_than_slices":  # 11 steps, 20 asked: one step per slice
        assert slice_lengths == [1] * 22
    else:  # one call per layer direction, each over all the steps (rows, when packed)
        assert slice_lengths == [18 if case == "packed" else 11] * (module.num_layers * (1 + module.bidirectional))
    module.eval()
    if case in ("dropout", "regularised"):  # in eval: no dropout; zoneout's expectation still is per step
        slice_lengths.clear()
        module(x)
        assert slice_lengths == ([3, 3, 4, 4, 4, 4] if case == "dropout" else [11, 11])


def test_explain_names_the_pipeline(monkeypatch):
    module = rnnfused.LSTM(3, 5, num_layers=2)
    x = torch.randn(11, 4, 3)
    assert not any("pipelined" in choice.reason for choice in rnnfused.explain(module, x))
    monkeypatch.setenv("RNNFUSED_WAVEFRONT", "4")
    assert all("pipelined over 4 slices" in choice.reason for choice in rnnfused.explain(module, x))


def test_auto_slices_as_the_planner_says(slice_lengths, monkeypatch):
    """RNNFUSED_WAVEFRONT=auto asks the planner (_C.pipeline_choice, tested in
    test_persistent.py) about the call's layers, dtype under autocast, step flags and pass, and
    runs and explains what it answers."""
    asked = []

    def planner(*args):
        asked.append(args)
        return {"chunks": 3, "reason": "the layers pipelined over 3 slices of the steps: an estimated 1 us"}

    monkeypatch.setenv("RNNFUSED_WAVEFRONT", "auto")
    monkeypatch.setattr(dispatch._C, "pipeline_choice", planner)
    monkeypatch.setattr(dispatch, "_PIPELINES", {})  # nothing planned before by the real planner
    module = rnnfused.GRU(3, 5, num_layers=3)
    x = torch.randn(11, 4, 3)
    module(x)
    assert slice_lengths == [3] * 3 + [4] * 6
    with torch.no_grad():
        module(x, resets=torch.zeros(11, 4, dtype=torch.bool))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reasons = [choice.reason for choice in rnnfused.explain(module, x)]
    assert asked == [(int(Cell.GRU), 11, 3, 5, 5, 4, torch.float32, "cpu", False, False),
                     (int(Cell.GRU), 11, 3, 5, 5, 4, torch.float32, "cpu", True, True),
                     (int(Cell.GRU), 11, 3, 5, 5, 4, torch.bfloat16, "cpu", False, False)]
    assert all(reason.endswith("; RNNFUSED_WAVEFRONT=auto: the layers pipelined over 3 slices of the steps: "
                               "an estimated 1 us") for reason in reasons)


def test_auto_runs_layer_after_layer_off_the_gpu(slice_lengths, monkeypatch):
    monkeypatch.setenv("RNNFUSED_WAVEFRONT", "auto")
    module, x = rnnfused.LSTM(3, 5, num_layers=2), torch.randn(11, 4, 3)
    module(x)
    assert slice_lengths == [11, 11]
    assert all(choice.reason.endswith("; RNNFUSED_WAVEFRONT=auto: layer after layer: off the GPU the slices would "
                                      "run one after another") for choice in rnnfused.explain(module, x))


def test_a_setting_that_is_not_a_number_raises(monkeypatch):
    monkeypatch.setenv("RNNFUSED_WAVEFRONT", "yes")
    with pytest.raises(ValueError, match="RNNFUSED_WAVEFRONT must be a number of slices or auto, got 'yes'"):
        rnnfused.GRU(3, 5, num_layers=2)(torch.randn(4, 2, 3))


class _FakeStream:
    """Stands for a CUDA stream: logs its waits and events."""

    def __init__(self, name, log):
        self.name, self.log, self.events = name, log, 0

    def wait_stream(self, other):
        self.log.append(f"{self.name} waits for {other.name}")

    def record_event(self):
        self.events += 1
        event = f"{self.name}#{self.events}"
        self.log.append(f"{event} recorded")
        return event

    def wait_event(self, event):
        self.log.append(f"{self.name} waits for {event}")


@pytest.fixture
def stream_log(monkeypatch):
    """(log, stream): fake streams made by stream(name) log into log, torch.cuda.stream(s)
    makes s current, and every layer call logs "<direction> <steps> on <current stream>"
    (main outside any torch.cuda.stream), then " beside <n - 1>" where its options say it is
    one of n recurrences side by side."""
    log, current = [], []

    @contextlib.contextmanager
    def on(stream):
        current.append(stream)
        yield
        current.pop()

    def logged(options, x, *args, **kwargs):
        stream = current[-1].name if current else "main"
        beside = f" beside {options.side_by_side - 1}" if options.side_by_side > 1 else ""
        log.append(f"{'reverse' if options.reverse else 'forward'} {x.size(0)} on {stream}{beside}")
        return run_layer(options, x, *args, **kwargs)

    run_layer = rnnfused.modules.run_layer
    monkeypatch.setattr(torch.cuda, "stream", on)
    monkeypatch.setattr(rnnfused.modules, "run_layer", logged)
    return log, lambda name: _FakeStream(name, log)


def test_the_reverse_direction_is_queued_between_the_fork_and_the_join(stream_log, monkeypatch):
    """Per layer the second stream waits for the caller's before the forward direction is
    queued (else it would wait for that too), the reverse direction runs on the second stream
    only, and the caller's stream waits for it before the next layer reads both outputs; both
    directions plan as one of two recurrences side by side. Normalized layers keep one stream
    and plan alone."""
    log, stream = stream_log
    main, side = stream("main"), stream("side")
    monkeypatch.setattr(dispatch, "directions_side_by_side", lambda device, reference: not reference)
    monkeypatch.setattr(dispatch, "side_streams", lambda device, count, caller: [side])
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: main)
    rnnfused.GRU(3, 4, num_layers=2, bidirectional=True)(torch.randn(5, 2, 3))
    assert log == ["side waits for main", "forward 5 on main beside 1", "reverse 5 on side beside 1",
                   "main waits for side"] * 2
    log.clear()
    rnnfused.GRU(3, 4, num_layers=2, bidirectional=True, norm="layer")(torch.randn(5, 2, 3))
    assert log == ["forward 5 on main", "reverse 5 on main"] * 2


def test_each_layer_waits_for_the_slice_below_on_its_own_stream(stream_log, monkeypatch):
    """Layer l queues slice k on its stream after waiting for the event the layer below
    recorded once it had queued slice k; the other streams start after the caller's work and
    the caller's stream waits for all of them at the end. As many layers as slices (2 of 3)
    run at once, and each plans as one of them."""
    log, stream = stream_log
    streams = [stream(f"s{layer}") for layer in range(3)]
    monkeypatch.setenv("RNNFUSED_WAVEFRONT", "2")
    monkeypatch.setattr(dispatch, "pipeline_streams", lambda device, count: streams[:count])
    rnnfused.LSTM(3, 5, num_layers=3)(torch.randn(6, 2, 3))
    assert log == ["s1 waits for s0", "s2 waits for s0",
                   "forward 3 on s0 beside 1", "s0#1 recorded",
                   "s1 waits for s0#1", "forward 3 on s1 beside 1", "s1#1 recorded",
                   "s2 waits for s1#1", "forward 3 on s2 beside 1",
                   "forward 3 on s0 beside 1", "s0#2 recorded",
                   "s1 waits for s0#2", "forward 3 on s1 beside 1", "s1#2 recorded",
                   "s2 waits for s1#2", "forward 3 on s2 beside 1",
                   "s0 waits for s1", "s0 waits for s2"]
