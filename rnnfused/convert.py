"""``rnnfused.convert(model)``: swap the torch.nn recurrent layers of a model for rnnfused's
(and back with ``to="torch"``)."""

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


def convert(model, to="rnnfused"):
    """Returns ``model`` with every ``nn.LSTM``, ``nn.GRU``, ``nn.RNN`` and every
    ``nn.LSTMCell``, ``nn.GRUCell``, ``nn.RNNCell`` in it (the model itself or nested
    anywhere, in Sequential, ModuleList, ModuleDict or attributes) replaced by the rnnfused
    class with the same configuration, training flag and parameters; with ``to="torch"``
    the other way round.

    The replacement uses the very same ``nn.Parameter`` objects (device, dtype, values and
    ``requires_grad`` unchanged; an optimizer built on the model keeps working) and carries
    the module's hooks. A layer that cannot be converted without losing something raises:
    a subclass (its own code would be lost), a parametrized or weight-normalized layer
    (parameters other than the standard ones), and, towards torch, rnnfused's extras
    (``reset_after=False``, ``cell_clip``, ``grad_clip``, ``norm``). The model is changed in place
    (containers get the new layers) and returned, since the model itself may be replaced.
    """
    if to not in ("rnnfused", "torch"):
        raise ValueError(f"convert: to must be 'rnnfused' or 'torch', got {to!r}")
    table = _TO_OURS if to == "rnnfused" else _TO_TORCH
    converted = {}  # id(old) -> new: a layer shared by several parents is converted once

    def replace(module):
        if id(module) not in converted:
            converted[id(module)] = _convert_layer(module, table[type(module)], to)
        return converted[id(module)]

    def visit(module):
        for name, child in list(module._modules.items()):
            if child is None:
                continue
            _refuse_subclass(child, table)
            if type(child) in table:
                setattr(module, name, replace(child))
            else:
                visit(child)

    _refuse_subclass(model, table)
    if type(model) in table:
        return replace(model)
    visit(model)
    return model


def _refuse_subclass(module, table):
    if table is _TO_OURS and isinstance(module, tuple(_TO_TORCH)):
        return  # already rnnfused (ours subclass torch.nn's classes): left as it is
    for base in table:
        if isinstance(module, base) and type(module) not in table:
            raise TypeError(f"convert: {type(module).__name__} is a subclass of {base.__name__}; converting it "
                            "would lose its own code (parametrized layers are such subclasses too)")


def _convert_layer(old, cls, to):
    is_cell = cls in (nn.LSTMCell, nn.GRUCell, nn.RNNCell, cells.LSTMCell, cells.GRUCell, cells.RNNCell)
    if to == "torch":
        extras = {"reset_after": getattr(old, "reset_after", True) is not True,
                  "cell_clip": getattr(old, "cell_clip", None) is not None, "grad_clip": old.grad_clip is not None,
                  "norm": getattr(old, "norm", None) is not None}
        used = [name for name, on in extras.items() if on]
        if used:
            raise ValueError(f"convert: torch.nn.{cls.__name__} has no equivalent of {', '.join(used)}; "
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
        raise ValueError(f"convert: the {type(old).__name__} has parameters or buffers beyond its weights "
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
