"""``rnnfused.convert(model)``: swap the torch.nn recurrent layers of a model for rnnfused's
(and back with ``to="torch"``)."""

import logging
from typing import NamedTuple

from torch import nn

from . import cells, modules

_TO_OURS = {nn.LSTM: modules.LSTM, nn.GRU: modules.GRU, nn.RNN: modules.RNN, nn.LSTMCell: cells.LSTMCell,
            nn.GRUCell: cells.GRUCell, nn.RNNCell: cells.RNNCell}
_TO_TORCH = {ours: theirs for theirs, ours in _TO_OURS.items()}
# Hooks that belong to the module object and mean the same on its replacement.
_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks",
               "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
               "_load_state_dict_post_hooks")

logger = logging.getLogger("rnnfused.convert")


class Replacement(NamedTuple):
    """One module that ``convert`` replaced: where it sits (its qualified name in the model,
    ``""`` for the model itself; a module shared by several parents is listed once, under
    the first name ``model.named_modules()`` gives it) and the classes before and after."""

    name: str
    old: type
    new: type

    def __str__(self):
        return f"{self.name or '(the model itself)'}: {_qualname(self.old)} -> {_qualname(self.new)}"


def _qualname(cls):
    module = cls.__module__
    return f"torch.nn.{cls.__name__}" if module.startswith("torch.nn") else f"{module.split('.')[0]}.{cls.__name__}"


def convert(model, to="rnnfused", *, return_replaced=False):
    """Returns ``model`` with every ``nn.LSTM``, ``nn.GRU``, ``nn.RNN`` and every
    ``nn.LSTMCell``, ``nn.GRUCell``, ``nn.RNNCell`` in it (the model itself or nested
    anywhere, in Sequential, ModuleList, ModuleDict or attributes) replaced by the rnnfused
    class with the same configuration, training flag and parameters; with ``to="torch"``
    the other way round.

    The whole model is checked before anything changes: if any layer cannot be converted
    without losing something, ``convert`` raises and the model is left exactly as it was.
    Refused are: a subclass (its own code would be lost; TypeError), a parametrized layer
    (TypeError) or one with other extra parameters or buffers such as ``weight_norm``'s
    (ValueError), and, towards torch, rnnfused's extras (``reset_after=False``,
    ``cell_clip``, ``grad_clip``, ``norm``, the regularisers; ValueError). The message lists
    every refused layer by name.

    The replacement uses the very same ``nn.Parameter`` objects (device, dtype, values and
    ``requires_grad`` unchanged; an optimizer built on the model keeps working) and carries
    the module's hooks. The model is changed in place (containers get the new layers) and
    returned, since the model itself may be replaced. Each replacement is logged at INFO
    level on the ``rnnfused.convert`` logger; with ``return_replaced=True`` the result is
    ``(model, replaced)``, ``replaced`` a list of :class:`Replacement` (name, old class,
    new class), empty when the model has no layer to convert.
    """
    if to not in ("rnnfused", "torch"):
        raise ValueError(f"convert: to must be 'rnnfused' or 'torch', got {to!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: expected an nn.Module, got {type(model).__name__}")
    table = _TO_OURS if to == "rnnfused" else _TO_TORCH

    # 1. Find every layer to replace and every problem, changing nothing.
    found = {}  # id(layer) -> (first name, layer); a layer shared by several parents counts once
    places = []  # (parent, attribute, layer) for every place a layer to replace sits
    problems = []  # (exception type, message)
    refused = set()
    for name, module in model.named_modules(remove_duplicate=False):
        problem = _subclass_problem(module, table)
        if problem:
            if id(module) not in refused:
                refused.add(id(module))
                problems.append((TypeError, f"{name or '(the model itself)'}: {problem}"))
            continue
        if type(module) in table:
            found.setdefault(id(module), (name, module))
        for attribute, child in module._modules.items():
            if child is not None and type(child) in table:
                places.append((module, attribute, child))
    new_layers = {}
    for key, (name, layer) in found.items():
        try:
            new_layers[key] = _convert_layer(layer, table[type(layer)], to)
        except (TypeError, ValueError) as error:
            problems.append((type(error), f"{name or '(the model itself)'}: {error}"))
    if problems:
        kind = problems[0][0]
        raise kind("convert: nothing was changed; " + "; ".join(message for _, message in problems))

    # 2. Replace them all.
    for parent, attribute, child in places:
        setattr(parent, attribute, new_layers[id(child)])
    replaced = [Replacement(name, type(layer), type(new_layers[key])) for key, (name, layer) in found.items()]
    for item in replaced:
        logger.info("convert: replaced %s", item)
    if not replaced:
        logger.info("convert: no %s recurrent layer or cell found", "torch.nn" if to == "rnnfused" else "rnnfused")
    result = new_layers.get(id(model), model)
    return (result, replaced) if return_replaced else result


def _subclass_problem(module, table):
    """Why ``module`` cannot be converted although it is one of the table's kinds (None if it can)."""
    if table is _TO_OURS and isinstance(module, tuple(_TO_TORCH)):
        return None  # already rnnfused (ours subclass torch.nn's classes): left as it is
    for base in table:
        if isinstance(module, base) and type(module) not in table:
            return (f"{type(module).__name__} is a subclass of {base.__name__}; converting it would lose its own "
                    "code (parametrized layers are such subclasses too)")
    return None


def _convert_layer(old, cls, to):
    """The replacement of one layer, built without touching ``old``."""
    is_cell = cls in (nn.LSTMCell, nn.GRUCell, nn.RNNCell, cells.LSTMCell, cells.GRUCell, cells.RNNCell)
    if to == "torch":
        extras = {"reset_after": getattr(old, "reset_after", True) is not True,
                  "cell_clip": getattr(old, "cell_clip", None) is not None, "grad_clip": old.grad_clip is not None,
                  "norm": getattr(old, "norm", None) is not None}
        regularisers = getattr(old, "regularisers", None)
        if regularisers is not None:
            extras.update({"weight_drop": regularisers.weight_drop > 0,
                           "recurrent_dropout": regularisers.recurrent_dropout > 0,
                           "zoneout": regularisers.zoneout_h > 0 or regularisers.zoneout_c > 0,
                           "dropout_mode='variational'": regularisers.variational_dropout})
        used = [name for name, on in extras.items() if on]
        if used:
            raise ValueError(f"torch.nn.{cls.__name__} has no equivalent of {', '.join(used)}; "
                             "keep this layer as rnnfused")
    if is_cell:
        weight_names = ["weight_ih", "weight_hh"] + (["bias_ih", "bias_hh"] if old.bias else [])
        kwargs = dict(bias=old.bias)
    else:
        weight_names = old._flat_weights_names
        kwargs = dict(num_layers=old.num_layers, bias=old.bias, batch_first=old.batch_first, dropout=old.dropout,
                      bidirectional=old.bidirectional)
        if cls in (nn.LSTM, modules.LSTM):
            kwargs["proj_size"] = old.proj_size
    if cls in (nn.RNN, modules.RNN, nn.RNNCell, cells.RNNCell):
        kwargs["nonlinearity"] = old.nonlinearity
    names = [name for name, p in old.named_parameters(recurse=False) if p is not None]
    if sorted(names) != sorted(weight_names) or list(old._buffers):
        raise ValueError(f"the {type(old).__name__} has parameters or buffers beyond its weights "
                         f"({', '.join(names + list(old._buffers))}), e.g. from weight_norm; they would be lost")
    first = next(old.parameters())
    new = cls(old.input_size, old.hidden_size, device="meta", dtype=first.dtype, **kwargs)
    for name in weight_names:
        setattr(new, name, getattr(old, name))
    new.train(old.training)
    for hooks in _HOOK_DICTS:
        if hasattr(old, hooks) and hasattr(new, hooks):
            getattr(new, hooks).update(getattr(old, hooks))
    return new
