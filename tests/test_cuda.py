"""The CUDA kernels (skipped without a GPU): fp64 against the reference, fp32 against cuDNN
and against the CPU path, fp16/bf16 no less accurate than torch.nn in the same dtype,
packed and deep bidirectional input, strided input, streams, determinism, devices."""

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pack_sequence

import rnnfused
from conftest import MODES, TOLERANCE, flatten, make_twins, max_error, run_and_grad, tf32_switch

pytestmark = pytest.mark.cuda

CONFIGS = [
    dict(num_layers=1),
    dict(num_layers=3, bidirectional=True),
    dict(num_layers=2, bias=False, batch_first=True),
]


def _x(steps, batch, features, dtype, seed=3, batch_first=False):
    generator = torch.Generator(device="cuda").manual_seed(seed)
    shape = (batch, steps, features) if batch_first else (steps, batch, features)
    return torch.randn(shape, generator=generator, device="cuda", dtype=dtype).requires_grad_()


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("config", CONFIGS)
def test_fp64_matches_reference(mode, config):
    _, ours = make_twins(mode, 6, 9, device="cuda", **config)
    batch_first = config.get("batch_first", False)
    x = _x(11, 5, 6, torch.float64, batch_first=batch_first)
    values, grads = run_and_grad(ours, x, None, [x])
    x = _x(11, 5, 6, torch.float64, batch_first=batch_first)
    expected, expected_grads = run_and_grad(lambda a, h: rnnfused.reference.forward(ours, a, h), x, None, [x],
                                            params=ours.parameters())
    assert max_error(values, expected) <= 1e-10
    assert max_error(grads, expected_grads) <= 1e-10


@pytest.mark.parametrize("mode", list(MODES) + ["LSTM_PROJ"])
def test_fp32_matches_cudnn_and_cpu(mode):
    with tf32_switch("allow_tf32", False), tf32_switch("allow_tf32", False, torch.backends.cudnn):
        _fp32_matches_cudnn_and_cpu(mode)


def _fp32_matches_cudnn_and_cpu(mode):
    extra = {"proj_size": 5} if mode == "LSTM_PROJ" else {}
    theirs, ours = make_twins("LSTM" if mode == "LSTM_PROJ" else mode, 16, 24, num_layers=2,
                              bidirectional=True, dtype=torch.float32, device="cuda", **extra)
    results = []
    for module in (theirs, ours):
        x = _x(30, 8, 16, torch.float32)
        results.append(run_and_grad(module, x, None, [x]))
    assert max_error(results[1][0], results[0][0]) <= TOLERANCE[torch.float32]
    assert max_error(results[1][1], results[0][1]) <= TOLERANCE[torch.float32]
    cpu = ours.to("cpu")
    x = _x(30, 8, 16, torch.float32).detach().cpu().requires_grad_()
    on_cpu = run_and_grad(cpu, x, None, [x])
    assert max_error([v.cpu() for v in results[1][0]], on_cpu[0]) <= TOLERANCE[torch.float32]
    assert max_error([g.cpu() for g in results[1][1]], on_cpu[1]) <= TOLERANCE[torch.float32]


def _error_against_fp64(module, dtype, exact_values, exact_grads, seed=4):
    low = module.to(dtype)
    x = _x(40, 16, 32, torch.float64, seed=seed).detach().to(dtype).requires_grad_()
    values, grads = run_and_grad(low, x, None, [x])
    return max_error(values, exact_values), max_error(grads, exact_grads)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_no_worse_than_torch(mode, dtype):
    """|ours - exact| <= 2 |torch.nn - exact| + eps, both in `dtype`, exact = fp64."""
    theirs, ours = make_twins(mode, 32, 48, num_layers=2, device="cuda")
    x = _x(40, 16, 32, torch.float64, seed=4)
    exact_values, exact_grads = run_and_grad(theirs, x, None, [x])
    eps = 4 * torch.finfo(dtype).eps
    theirs_err = _error_against_fp64(theirs, dtype, exact_values, exact_grads)
    ours_err = _error_against_fp64(ours, dtype, exact_values, exact_grads)
    assert ours_err[0] <= 2 * theirs_err[0] + eps, (ours_err, theirs_err)
    assert ours_err[1] <= 2 * theirs_err[1] + eps, (ours_err, theirs_err)


@pytest.mark.parametrize("mode", list(MODES))
def test_packed_on_gpu(mode):
    theirs, ours = make_twins(mode, 5, 7, num_layers=2, bidirectional=True, device="cuda")
    results = []
    for module in (theirs, ours):
        generator = torch.Generator(device="cuda").manual_seed(6)
        seqs = [torch.randn(n, 5, generator=generator, device="cuda", dtype=torch.float64).requires_grad_()
                for n in (3, 9, 1, 6)]
        results.append(run_and_grad(module, pack_sequence(seqs, enforce_sorted=False), None, seqs))
    assert max_error(results[1][0], results[0][0]) <= 1e-10
    assert max_error(results[1][1], results[0][1]) <= 1e-10


def test_non_contiguous_input_on_gpu():
    theirs, ours = make_twins("LSTM", 6, 8, bidirectional=True, device="cuda")
    results = []
    for module in (theirs, ours):
        base = _x(7, 4, 12, torch.float64).detach()
        x = base[:, :, ::2].requires_grad_()
        assert not x.is_contiguous()
        results.append(run_and_grad(module, x, None, [x]))
    assert max_error(results[1][0], results[0][0]) <= 1e-10
    assert max_error(results[1][1], results[0][1]) <= 1e-10


@pytest.mark.parametrize("mode", list(MODES))
def test_non_default_stream_and_bitwise_repeatable_backward(mode):
    _, ours = make_twins(mode, 16, 32, num_layers=2, bidirectional=True, dtype=torch.float32, device="cuda")
    x = _x(25, 6, 16, torch.float32)
    output, _ = ours(x)
    weight = torch.randn_like(output)
    first = torch.autograd.grad(output, [x] + list(ours.parameters()), weight, retain_graph=True)
    second = torch.autograd.grad(output, [x] + list(ours.parameters()), weight)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        output_s, _ = ours(x)
        grads_s = torch.autograd.grad(output_s, [x] + list(ours.parameters()), weight)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    assert torch.equal(output_s, output)
    assert all(torch.equal(a, b) for a, b in zip(first, grads_s))


REGULARISED = {"recurrent_dropout": 0.3, "zoneout": 0.2, "weight_drop": 0.2, "dropout": 0.3,
               "dropout_mode": "variational"}


@pytest.mark.parametrize("regularised", [False, True], ids=["plain", "regularised"])
@pytest.mark.parametrize("form", ["padded", "packed", "lengths"])
@pytest.mark.parametrize("mode", list(MODES))
def test_directions_side_by_side_equal_one_stream_bitwise(mode, form, regularised, monkeypatch):
    """A bidirectional stack whose reverse directions run on the second stream gives, bit for
    bit, what one stream gives, forward and backward (masks from the same seed), and explain
    says where the reverse direction runs. (At H32 each direction's plan fits half the SMs, so
    both settings run the same plans.)"""
    monkeypatch.setenv("RNNFUSED_KERNEL", "ours")
    torch.manual_seed(0)
    _, cls, extra = MODES[mode]
    ours = cls(16, 32, num_layers=3, bidirectional=True, **extra, **(REGULARISED if regularised else {})).cuda()
    x = _x(25, 6, 16, torch.float32)
    lengths = torch.tensor([25, 3, 17, 25, 9, 1], device="cuda")
    results = {}
    for setting in ("0", "1"):
        monkeypatch.setenv("RNNFUSED_CONCURRENT_DIRECTIONS", setting)
        inputs = {"padded": (x, {}), "lengths": (x, {"lengths": lengths}),  # packed anew: its graph is freed
                  "packed": (pack_padded_sequence(x, lengths.cpu(), enforce_sorted=False), {})}
        data, flags = inputs[form]
        reasons = [choice.reason for choice in rnnfused.explain(ours, data, **flags) if choice.direction == "reverse"]
        assert len(reasons) == 3 and all(("second CUDA stream" in reason) == (setting == "1") for reason in reasons), \
            reasons
        torch.manual_seed(5)
        output, state = ours(data, **flags)
        output = output.data if form == "packed" else output
        values = [output] + list(state if isinstance(state, tuple) else (state,))
        weights = [torch.randn(v.shape, generator=torch.Generator().manual_seed(i)).to(v.device)
                   for i, v in enumerate(values)]
        grads = torch.autograd.grad(sum((v * w).sum() for v, w in zip(values, weights)),
                                    [x] + list(ours.parameters()))
        torch.cuda.synchronize()
        results[setting] = values + list(grads)
    assert all(torch.equal(a, b) for a, b in zip(results["0"], results["1"]))


@pytest.mark.parametrize("dtype,kernel", [(torch.float64, "stepwise"), (torch.float32, "ours")], ids=["f64", "f32"])
@pytest.mark.parametrize("mode", list(MODES))
def test_layer_pipeline_matches_layer_after_layer(mode, dtype, kernel, monkeypatch):
    """RNNFUSED_WAVEFRONT=4 (a stream per layer, slice k of layer l after slice k of layer
    l-1) gives what the stack gives layer after layer, forward and backward, with lengths and
    resets; the weight gradients sum over the slices in another order, so not bit for bit."""
    monkeypatch.setenv("RNNFUSED_KERNEL", kernel)
    _, ours = make_twins(mode, 16, 32, num_layers=4, dtype=dtype, device="cuda")
    x = _x(25, 6, 16, dtype)
    resets = torch.zeros(25, 6, dtype=torch.bool, device="cuda")
    resets[7, 1] = resets[13, 4] = True
    flags = {"lengths": torch.tensor([25, 3, 17, 25, 9, 1], device="cuda"), "resets": resets}
    results = {}
    for setting in ("0", "4"):
        monkeypatch.setenv("RNNFUSED_WAVEFRONT", setting)
        results[setting] = run_and_grad(lambda a, hx: ours(a, hx, **flags), x, None, [x], ours.parameters())
        torch.cuda.synchronize()
    assert max_error(results["4"][0], results["0"][0]) <= TOLERANCE[dtype]
    assert max_error(results["4"][1], results["0"][1]) <= TOLERANCE[dtype]


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_auto_pipeline_matches_layer_after_layer(mode, monkeypatch):
    """RNNFUSED_WAVEFRONT=auto on a stack whose layers run the persistent kernel (ours, TF32):
    small layers share the SMs, so the planner pipelines them, and the results are what the
    stack gives layer after layer, within TF32's rounding (the pipeline's plans, for layers side
    by side, may split K otherwise)."""
    monkeypatch.setenv("RNNFUSED_KERNEL", "ours")
    _, ours = make_twins(mode, 16, 32, num_layers=4, dtype=torch.float32, device="cuda")
    x = _x(64, 6, 16, torch.float32)
    results = {}
    with tf32_switch("allow_tf32", True):
        for setting in ("0", "auto"):
            monkeypatch.setenv("RNNFUSED_WAVEFRONT", setting)
            reasons = [choice.reason for choice in rnnfused.explain(ours, x)]
            assert all(("the layers pipelined over" in reason) == (setting == "auto") for reason in reasons), reasons
            results[setting] = run_and_grad(lambda a, hx: ours(a, hx), x, None, [x], ours.parameters())
            torch.cuda.synchronize()
    assert max_error(results["auto"][0], results["0"][0]) <= 5e-3
    assert max_error(results["auto"][1], results["0"][1]) <= 5e-3


def test_input_and_weights_on_different_devices():
    ours = rnnfused.GRU(3, 4).cuda()
    with pytest.raises(RuntimeError, match="weight_ih is on cuda.* but the input is on cpu"):
        ours(torch.randn(2, 1, 3))
    cpu_module = rnnfused.GRU(3, 4)
    with pytest.raises(RuntimeError, match="is on cpu but the input is on cuda"):
        cpu_module(torch.randn(2, 1, 3, device="cuda"))


def test_batch_size_zero_on_gpu():
    theirs, ours = make_twins("LSTM", 3, 4, device="cuda")
    x = torch.randn(5, 0, 3, device="cuda", dtype=torch.float64, requires_grad=True)
    assert ours(x)[0].shape == theirs(x)[0].shape
    ours(x)[0].sum().backward()
    assert x.grad.shape == x.shape


# Every cell and extra: (mode, module options). Weights are scaled up so the clips fire.
VARIANTS = [
    ("LSTM", {}), ("LSTM", {"proj_size": 3}), ("LSTM", {"cell_clip": 0.5, "grad_clip": 0.05}),
    ("GRU", {}), ("GRU", {"reset_after": False}), ("GRU", {"reset_after": False, "grad_clip": 0.05}),
    ("RNN_TANH", {"grad_clip": 0.05}), ("RNN_RELU", {}),
]


def _variant(mode, options, dtype, **kwargs):
    cls = {"LSTM": rnnfused.LSTM, "GRU": rnnfused.GRU, "RNN_TANH": rnnfused.RNN, "RNN_RELU": rnnfused.RNN}[mode]
    extra = {"nonlinearity": "relu"} if mode == "RNN_RELU" else {}
    torch.manual_seed(0)
    module = cls(5, 7, **extra, **options, **kwargs).to("cuda", dtype)
    with torch.no_grad():
        for p in module.parameters():
            p.mul_(3)
    return module


def _reference(module):
    return lambda a, h: rnnfused.reference.forward(module, a, h)


@pytest.mark.parametrize("mode,options", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_training_and_inference_match_reference(mode, options, dtype):
    """Training (saved activations) and no_grad inference (the kSave=false kernels, the
    separate input-projection buffer) against the reference, with every extra."""
    with tf32_switch("allow_tf32", False):
        _training_and_inference_match_reference(mode, options, dtype)


def _training_and_inference_match_reference(mode, options, dtype):
    module = _variant(mode, options, dtype, num_layers=2, bidirectional=True)
    tolerance = 1e-10 if dtype == torch.float64 else 2e-5
    trained = []
    for fn, params in ((module, None), (_reference(module), module.parameters())):
        x = _x(9, 4, 5, dtype, seed=8)
        trained.append(run_and_grad(fn, x, None, [x], params=params))
    assert max_error(trained[0][0], trained[1][0]) <= tolerance
    assert max_error(trained[0][1], trained[1][1]) <= tolerance
    x = _x(9, 4, 5, dtype, seed=8).detach()
    with torch.no_grad():
        inferred = flatten(module(x))
        expected = flatten(rnnfused.reference.forward(module, x))
    assert max_error(inferred, expected) <= tolerance


@pytest.mark.parametrize("mode,options", VARIANTS)
def test_autocast_matches_reference_in_autocast_dtype(mode, options):
    """Under torch.autocast the layer runs in float16, as torch.nn does on CUDA: its error
    against the float64 reference is within 2x (plus eps) of the reference run in float16."""
    module = _variant(mode, options, torch.float32)
    exact = flatten(rnnfused.reference.forward(module.double(), _x(9, 4, 5, torch.float64, seed=2).detach()))
    module = module.float()
    x = _x(9, 4, 5, torch.float32, seed=2).detach()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
        ours = flatten(module(x))
    assert all(v.dtype == torch.float16 for v in ours)
    with torch.no_grad():
        half_reference = flatten(rnnfused.reference.forward(module.half(), x.half()))
    eps = 4 * torch.finfo(torch.float16).eps
    assert max_error(ours, exact) <= 2 * max_error(half_reference, exact) + eps


@pytest.mark.parametrize("api", ["fp32_precision", "allow_tf32"])
def test_tf32_follows_torch_switch_with_either_api(api):
    """With TF32 off the fp32 result is fp32-accurate; with it on (either of torch's APIs)
    the matmuls round their inputs to TF32, so the error grows, as torch's own matmuls'."""
    if not hasattr(torch.backends.cuda.matmul, api):
        pytest.skip(f"this torch has no torch.backends.cuda.matmul.{api}")
    off, on = ("ieee", "tf32") if api == "fp32_precision" else (False, True)
    # Large enough matmuls that cuBLAS runs them on tensor cores when TF32 is allowed.
    _, ours = make_twins("LSTM", 256, 256, dtype=torch.float32, device="cuda")
    x = _x(10, 64, 256, torch.float32).detach()
    exact = flatten(ours.double()(x.double()))
    ours.float()
    errors = {}
    for value in (off, on):
        with tf32_switch(api, value), torch.no_grad():
            errors[value] = max_error(flatten(ours(x)), exact)
    assert errors[off] <= 1e-5, errors
    if torch.cuda.get_device_capability() >= (8, 0):  # TF32 exists from Ampere on
        assert errors[on] > 4 * errors[off], errors


@pytest.mark.parametrize("flags", [False, True], ids=["padded", "lengths_resets"])
@pytest.mark.parametrize("kernel", ["stepwise", "ours"])
@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_cuda_graph_capture_forward_and_backward(mode, kernel, flags, monkeypatch):
    """A forward + backward captured in a CUDA graph and replayed on new input gives what an
    eager run gives (the kernels allocate through torch, use torch's cuBLAS workspace and read
    lengths and resets on the device; the reverse directions fork to a second stream and
    join): the stepwise kernels and ours (the persistent kernel where it plans)."""
    monkeypatch.setenv("RNNFUSED_KERNEL", kernel)
    _, ours = make_twins(mode, 16, 32, num_layers=2, bidirectional=True, dtype=torch.float32, device="cuda")
    options = {}
    if flags:
        resets = torch.zeros(10, 4, dtype=torch.bool, device="cuda")
        resets[3, 0] = resets[6, 2] = True
        options = {"lengths": torch.tensor([10, 3, 7, 1], device="cuda"), "resets": resets}
    static_x = _x(10, 4, 16, torch.float32)
    weight = torch.randn(10, 4, 64, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, as torch requires
        for _ in range(2):
            ours(static_x, **options)[0].backward(weight)
    torch.cuda.current_stream().wait_stream(side)
    params = list(ours.parameters())
    for tensor in params + [static_x]:
        tensor.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = ours(static_x, **options)[0]
        static_out.backward(weight)
    fresh = _x(10, 4, 16, torch.float32, seed=11).detach()
    with torch.no_grad():
        static_x.copy_(fresh)
    graph.replay()
    torch.cuda.synchronize()
    captured = [static_out.clone(), static_x.grad.clone()] + [p.grad.clone() for p in params]
    x = fresh.clone().requires_grad_()
    out = ours(x, **options)[0]
    eager_grads = torch.autograd.grad(out, [x] + params, weight)
    assert max_error(captured, [out.detach()] + list(eager_grads)) <= 1e-6


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_compile_reduce_overhead_gives_what_eager_gives(mode, monkeypatch):
    """torch.compile(mode="reduce-overhead") (CUDA graph trees: recorded on a warm call,
    replayed after) runs our kernels, forward and backward, and matches eager on each input."""
    monkeypatch.setenv("RNNFUSED_KERNEL", "ours")
    torch._dynamo.reset()
    _, ours = make_twins(mode, 16, 32, num_layers=2, bidirectional=True, dtype=torch.float32, device="cuda")
    compiled = torch.compile(ours, mode="reduce-overhead")
    params = list(ours.parameters())
    weight = torch.randn(10, 4, 64, device="cuda")
    for seed in (1, 2, 3, 4):
        x = _x(10, 4, 16, torch.float32, seed=seed)
        out = compiled(x)[0]
        got = [out.detach().clone()] + [g.clone() for g in torch.autograd.grad(out, [x] + params, weight)]
        eager = ours(x)[0]
        expected = [eager.detach()] + list(torch.autograd.grad(eager, [x] + params, weight))
        assert max_error(got, expected) <= 1e-6, seed


def test_backward_checks_saved_tensors_device():
    """A saved tensor on the wrong device is a clear error, not an illegal memory access."""
    from test_module_api import _saved_lstm_layer
    backward, hidden, gates, cells = _saved_lstm_layer("cuda")
    for name, tensor in {"hidden": hidden, "gates": gates, "cells": cells, "dy": torch.ones_like(hidden)}.items():
        with pytest.raises(RuntimeError, match="is on cpu but the input is on cuda"):
            backward(**{name: tensor.cpu()})
