"""What ``import rnnfused`` tells torch about its modules, so that torch's tools treat them as
the torch.nn classes they replace (docs/deployment.md):

* torch.compile: dynamo refuses to trace any instance of ``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM``
  unless ``torch._dynamo.config.allow_rnn`` is set (``VariableBuilder.wrap_module``, the one
  place it checks), and our layers are such instances. torch.nn's support there is marked
  experimental; ours are one custom operator per layer, which dynamo traces like any other,
  so wrapping one of *our* modules sets ``allow_rnn`` for that call only, and torch.nn's layers
  keep torch's behaviour. torch._dynamo takes seconds to import, so the patch is applied when
  torch imports it (an import hook), not by importing it here.
* ``torch.load(weights_only=True)``: our modules are on its safe-globals list.
* ``torch.ao.quantization.quantize_dynamic``: naming our classes quantizes them into torch.ao's
  dynamic quantized modules (torch.ao matches modules by exact type, so naming only torch.nn's
  classes cannot select ours).
* ``torch.onnx.export``: the translations of :mod:`rnnfused.onnx` (the TorchScript exporter's
  symbolic at once, the dynamo exporter's when torch imports that exporter).
"""

import importlib.abc
import importlib.machinery
import sys
import warnings

import torch

_BUILDER = "torch._dynamo.variables.builder"


def _ours():
    from . import cells, modules
    return modules.RNNBase, cells.RNNCellBase


# --- torch.compile -----------------------------------------------------------------------------

def _let_dynamo_trace_ours(builder):
    """Wraps ``builder.VariableBuilder.wrap_module`` so that it wraps our modules with
    ``allow_rnn`` set; does nothing where that method or flag is missing (another torch:
    compiling then graph-breaks on our layers as on torch.nn's, and tests/test_deployment.py says so)."""
    variable_builder = getattr(builder, "VariableBuilder", None)
    wrap_module = getattr(variable_builder, "wrap_module", None)
    config = getattr(builder, "config", None)
    if wrap_module is None or getattr(wrap_module, "_rnnfused", False) or not hasattr(config, "allow_rnn"):
        return

    def wrap_module_tracing_rnnfused(self, value):
        if isinstance(value, _ours()) and not config.allow_rnn:
            with config.patch(allow_rnn=True):
                return wrap_module(self, value)
        return wrap_module(self, value)

    wrap_module_tracing_rnnfused._rnnfused = True
    wrap_module_tracing_rnnfused.__wrapped__ = wrap_module
    variable_builder.wrap_module = wrap_module_tracing_rnnfused


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds the module ``name`` as Python would, and calls ``then(module)`` once it has been
    executed (a post-import hook: registering with a part of torch that is costly to import,
    without importing it)."""

    def __init__(self, name, then):
        self.name, self.then = name, then

    def find_spec(self, name, path, target=None):
        if name != self.name:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then(module):
            exec_module(module)
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            _call_safely(self.then, module, what=module.__name__)

        spec.loader.exec_module = exec_then
        return spec


def _call_safely(then, *args, what):
    # A registration that fails (another torch) must break neither `import rnnfused` nor the
    # import of torch's module: it costs only what it would have given.
    try:
        then(*args)
    except Exception as error:  # noqa: BLE001
        warnings.warn(f"rnnfused: could not register with {what} ({error!r}); torch's tools may treat "
                      "rnnfused's layers as unknown there (docs/deployment.md)", stacklevel=2)


def after_import(name, then):
    """Calls ``then(module)`` now if ``name`` is imported, else right after its import."""
    if name in sys.modules:
        _call_safely(then, sys.modules[name], what=name)
    elif not any(isinstance(f, _AfterImport) and f.name == name for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(name, then))


# --- torch.load(weights_only=True) -------------------------------------------------------------

def _register_safe_globals():
    from . import cells, modules
    torch.serialization.add_safe_globals([modules.LSTM, modules.GRU, modules.RNN, cells.LSTMCell, cells.GRUCell,
                                          cells.RNNCell])


# --- quantize_dynamic --------------------------------------------------------------------------

def _dynamic_quantized(torch_quantized, to_torch):
    """A stand-in for torch.ao's dynamic quantized class ``torch_quantized`` in its module
    mapping: ``from_float`` converts our float layer to the torch.nn one with the same
    parameters (``to_torch``) and returns torch.ao's quantized module made from it."""

    class DynamicQuantized:
        @classmethod
        def from_float(cls, mod, use_precomputed_fake_quant=False):
            float_module = to_torch(mod)
            float_module.qconfig = mod.qconfig
            return torch_quantized.from_float(float_module, use_precomputed_fake_quant=use_precomputed_fake_quant)

    DynamicQuantized.__name__ = DynamicQuantized.__qualname__ = f"{torch_quantized.__name__}FromRnnfused"
    return DynamicQuantized


def _register_dynamic_quantization():
    try:
        from torch.ao.nn.quantized import dynamic as nnqd
        from torch.ao.quantization.quantization_mappings import DEFAULT_DYNAMIC_QUANT_MODULE_MAPPINGS
    except ImportError:  # a torch without torch.ao's eager quantization
        return
    from . import cells, modules
    from .convert import convert

    def to_torch(mod):
        # convert refuses extras torch.ao cannot quantize (norm, clips, the Cho GRU) with their names.
        return convert(mod, to="torch")

    for ours, quantized in ((modules.LSTM, nnqd.LSTM), (modules.GRU, nnqd.GRU), (cells.LSTMCell, nnqd.LSTMCell),
                            (cells.GRUCell, nnqd.GRUCell), (cells.RNNCell, nnqd.RNNCell)):
        DEFAULT_DYNAMIC_QUANT_MODULE_MAPPINGS.setdefault(ours, _dynamic_quantized(quantized, to_torch))


# --- ONNX ---------------------------------------------------------------------------------------

# The exporter's table of translations (_torchlib_registry) is imported by _registration, whose
# classes it needs: register once _registration is complete.
_ONNX_REGISTRATION = "torch.onnx._internal.exporter._registration"


def _register_onnx():
    from . import onnx
    onnx.register_with_torchscript_exporter()
    after_import(_ONNX_REGISTRATION, onnx.register_with_dynamo_exporter)


def install():
    after_import(_BUILDER, _let_dynamo_trace_ours)
    _call_safely(_register_onnx, what="torch.onnx")
    _call_safely(_register_safe_globals, what="torch.serialization")
    _call_safely(_register_dynamic_quantization, what="torch.ao.quantization")
