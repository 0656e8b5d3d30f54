"""The CUDA kernels (skipped without a GPU): fp64 against the reference, fp32 against cuDNN
and against the CPU path, fp16/bf16 no less accurate than torch.nn in the same dtype,
packed and deep bidirectional input, strided input, streams, determinism, devices."""

import pytest
import torch
from torch.nn.utils.rnn import pack_sequence

import rnnfused
from conftest import MODES, make_twins, max_error, requires_cuda, run_and_grad

pytestmark = [requires_cuda, pytest.mark.cuda]

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
def test_fp32_matches_cudnn_and_cpu(mode, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    extra = {"proj_size": 5} if mode == "LSTM_PROJ" else {}
    theirs, ours = make_twins("LSTM" if mode == "LSTM_PROJ" else mode, 16, 24, num_layers=2,
                              bidirectional=True, dtype=torch.float32, device="cuda", **extra)
    results = []
    for module in (theirs, ours):
        x = _x(30, 8, 16, torch.float32)
        results.append(run_and_grad(module, x, None, [x]))
    assert max_error(results[1][0], results[0][0]) <= 1e-5
    assert max_error(results[1][1], results[0][1]) <= 1e-5
    cpu = ours.to("cpu")
    x = _x(30, 8, 16, torch.float32).detach().cpu().requires_grad_()
    on_cpu = run_and_grad(cpu, x, None, [x])
    assert max_error([v.cpu() for v in results[1][0]], on_cpu[0]) <= 1e-5
    assert max_error([g.cpu() for g in results[1][1]], on_cpu[1]) <= 1e-5


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
