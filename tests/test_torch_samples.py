"""PyTorch's own test samples for nn.RNN / GRU / LSTM (torch.testing._internal's ModuleInfo
database): the same outputs and gradients as torch.nn, and the same construction and
forward errors."""

import re

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

import rnnfused
from conftest import max_error, run_and_grad

common_modules = pytest.importorskip("torch.testing._internal.common_modules")

OURS = {nn.RNN: rnnfused.RNN, nn.GRU: rnnfused.GRU, nn.LSTM: rnnfused.LSTM}
INFOS = {info.module_cls: info for info in common_modules.module_db if info.module_cls in OURS}


def _samples(cls, requires_grad, training=False):
    info = INFOS[cls]
    kwargs = {} if cls is nn.LSTM else {"with_packed_sequence": True}
    return info.module_inputs_func(info, device="cpu", dtype=torch.float64, requires_grad=requires_grad,
                                   training=training, **kwargs)


@pytest.mark.parametrize("cls", list(OURS), ids=lambda c: c.__name__)
def test_pytorch_samples_match(cls):
    samples = _samples(cls, requires_grad=True)
    assert samples
    for sample in samples:
        args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
        torch.manual_seed(0)
        theirs = cls(*args, **kwargs).double()
        ours = OURS[cls](*args, **kwargs).double()
        ours.load_state_dict(theirs.state_dict())
        results = []
        for module in (theirs, ours):
            inputs = [_fresh(a) for a in sample.forward_input.args]
            x, hx = inputs[0], (inputs[1] if len(inputs) > 1 else None)
            results.append(run_and_grad(module, x, hx, _leaves(inputs)))
        assert max_error(results[1][0], results[0][0]) <= 1e-10, sample
        assert max_error(results[1][1], results[0][1]) <= 1e-10, sample


def _fresh(value):
    """A new leaf with the same values (so both modules get separate graphs)."""
    if isinstance(value, PackedSequence):  # a namedtuple: test it before tuple
        data = value.data.detach().clone().requires_grad_()
        return PackedSequence(data, value.batch_sizes, value.sorted_indices, value.unsorted_indices)
    if isinstance(value, tuple):
        return tuple(_fresh(v) for v in value)
    return value.detach().clone().requires_grad_()


def _leaves(inputs):
    out = []
    for value in inputs:
        if isinstance(value, PackedSequence):
            out.append(value.data)
        elif isinstance(value, tuple):
            out += _leaves(list(value))
        else:
            out.append(value)
    return out


@pytest.mark.parametrize("cls", list(OURS), ids=lambda c: c.__name__)
def test_pytorch_error_samples_match(cls):
    info = INFOS[cls]
    samples = info.module_error_inputs_func(info, device="cpu", dtype=torch.float32, requires_grad=False,
                                            training=False)
    assert samples
    for error_sample in samples:
        sample = error_sample.module_error_input
        ctor = sample.constructor_input
        construction = error_sample.error_on == common_modules.ModuleErrorEnum.CONSTRUCTION_ERROR
        with pytest.raises(error_sample.error_type) as caught:
            module = OURS[cls](*ctor.args, **ctor.kwargs)
            if not construction:  # a construction error must come from the constructor itself
                module(*sample.forward_input.args, **sample.forward_input.kwargs)
        assert re.search(error_sample.error_regex, str(caught.value)), (error_sample.error_regex, caught.value)


@pytest.mark.parametrize("cls", list(OURS), ids=lambda c: c.__name__)
def test_pytorch_samples_gradcheck_with_batched_grad(cls):
    """test_modules.py's test_grad with our classes: gradcheck over the sample's inputs and the
    parameters with check_batched_grad=True (autograd's vmap over the backward), which failed
    before layer_backward had batching rules. Every third sample (their options repeat in
    fours: hidden sizes, padded and packed input), to keep the run short."""
    for sample in _samples(cls, requires_grad=True)[::3]:
        args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
        torch.manual_seed(0)
        module = OURS[cls](*args, **kwargs).double()
        names = [name for name, _ in module.named_parameters()]
        inputs = [_fresh(a) for a in sample.forward_input.args]
        leaves = _leaves(inputs)

        def fn(*flat, inputs=inputs, module=module, names=names, count=len(leaves)):
            replaced = iter(flat[:count])
            rebuilt = [_replace(value, replaced) for value in inputs]
            result = torch.func.functional_call(module, dict(zip(names, flat[count:])), tuple(rebuilt))
            output, hidden = result
            output = output.data if isinstance(output, PackedSequence) else output
            return (output, *(hidden if isinstance(hidden, tuple) else (hidden,)))

        params = [p.detach().requires_grad_() for p in module.parameters()]
        assert torch.autograd.gradcheck(fn, (*leaves, *params), eps=1e-6, atol=1e-6, check_batched_grad=True)


def _replace(value, leaves):
    """``value`` (a tensor, PackedSequence or tuple of them) with its tensors taken from ``leaves``."""
    if isinstance(value, PackedSequence):
        return PackedSequence(next(leaves), value.batch_sizes, value.sorted_indices, value.unsorted_indices)
    if isinstance(value, tuple):
        return tuple(_replace(v, leaves) for v in value)
    return next(leaves)
