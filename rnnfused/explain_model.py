"""``rnnfused.explain(module, *inputs)`` for any module: walks it and explains every
recurrent layer and cell in it, around the per-layer explanation of :mod:`rnnfused.explain`."""

from typing import NamedTuple

from torch import nn

from .explain import explain as _explain_layer
from .cells import RNNCellBase
from .modules import RNNBase

_OURS = (RNNBase, RNNCellBase)
_THEIRS = (nn.RNNBase, nn.RNNCellBase)
_TORCH_NAMES = {nn.LSTM: "LSTM", nn.GRU: "GRU", nn.RNN: "RNN", nn.LSTMCell: "LSTMCell", nn.GRUCell: "GRUCell",
                nn.RNNCell: "RNNCell"}


class LayerExplanation(NamedTuple):
    """What runs one recurrent layer or cell of a model.

    ``name``: its qualified name in the model (``""`` for the model itself); ``layer``: its
    class (``"rnnfused.LSTM"``, ``"torch.nn.GRU"``, ...); ``choices``: one
    :class:`~rnnfused.explain.KernelChoice` per layer and direction for an rnnfused layer
    that the forward called (empty otherwise); ``note``: what runs it or why there are no
    choices."""

    name: str
    layer: str
    choices: list
    note: str

    def __str__(self):
        head = f"{self.name or '(the model itself)'} ({self.layer})" + (f": {self.note}" if self.note else "")
        return "\n".join([head] + [f"  {choice}" for choice in self.choices])


def explain(module, *args, **kwargs):
    """Which kernels run the recurrent layers of ``module``, and why.

    * ``module`` an rnnfused layer or cell (``rnnfused.LSTM``, ``rnnfused.GRUCell``, ...)
      and one input, what you would pass to it (``[T, B, I]``, ``[B, T, I]`` with
      ``batch_first``, unbatched ``[T, I]``, a PackedSequence; ``[B, I]`` or ``[I]`` for a
      cell): a list of ``KernelChoice(layer, direction, kernel, reason)``, one per layer
      and direction.
    * any other ``nn.Module`` (a whole model, or a torch.nn layer) and optionally the
      arguments of its forward: a list of :class:`LayerExplanation`, one per recurrent
      layer or cell found in it, in ``named_modules()`` order. With arguments, the model's
      forward runs once, in the caller's grad mode (the kernel choice may differ between
      training and inference: wrap the call in ``torch.no_grad()`` to see inference's), and
      each rnnfused layer is explained for the input it received (in training mode that
      forward updates running statistics as any forward does: call ``model.eval()`` first
      if that matters); without them the rnnfused layers are only listed. torch.nn layers
      run torch's own kernels, which the note says, with the ``rnnfused.convert`` call that
      swaps them.

    ``print(*rnnfused.explain(model, x), sep="\\n")`` shows the result. Raises TypeError for
    anything that is not an ``nn.Module``.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"explain: expected an nn.Module (an rnnfused layer or cell, or a model that contains "
                        f"recurrent layers), got {type(module).__name__}")
    if isinstance(module, _OURS):
        if len(args) != 1:
            raise TypeError(f"explain: an rnnfused {type(module).__name__} is explained for one input, "
                            f"explain(layer, input); got {len(args)} positional arguments")
        return _explain_layer(module, args[0], **kwargs)

    layers = [(name, layer) for name, layer in module.named_modules() if isinstance(layer, _THEIRS)]  # ours are torch.nn subclasses
    explained, calls = {}, {}

    def record(name, layer, layer_args, layer_kwargs):
        calls[name] = calls.get(name, 0) + 1
        if name not in explained:
            flags = {key: layer_kwargs[key] for key in ("lengths", "resets") if key in layer_kwargs}
            explained[name] = _explain_layer(layer, layer_args[0] if layer_args else layer_kwargs["input"], **flags)

    if args or kwargs:
        handles = [layer.register_forward_pre_hook(lambda layer, a, k, name=name: record(name, layer, a, k),
                                                   with_kwargs=True)
                   for name, layer in layers if isinstance(layer, _OURS)]
        try:
            module(*args, **kwargs)  # in the caller's grad mode: training and inference may differ
        finally:
            for handle in handles:
                handle.remove()

    out = []
    for name, layer in layers:
        if not isinstance(layer, _OURS):  # ours subclass torch.nn's too (isinstance interop): test ours first
            cls = type(layer)
            label = f"torch.nn.{cls.__name__}" if cls in _TORCH_NAMES else f"{cls.__module__}.{cls.__qualname__}"
            out.append(LayerExplanation(name, label, [], _torch_note(layer)))
        elif name in explained:
            note = f"called {calls[name]} times, explained for the first call" if calls[name] > 1 else ""
            out.append(LayerExplanation(name, f"rnnfused.{type(layer).__name__}", explained[name], note))
        else:
            note = ("not called by this forward" if args or kwargs else
                    "pass the model's input to see its kernels: rnnfused.explain(model, x)")
            out.append(LayerExplanation(name, f"rnnfused.{type(layer).__name__}", [], note))
    return out


def _torch_note(layer):
    on_gpu = any(p.is_cuda for p in layer.parameters())
    if isinstance(layer, nn.RNNBase):
        kind = "cuDNN" if on_gpu else "torch's CPU kernels"
    else:
        kind = "torch's CUDA cell kernels" if on_gpu else "torch's CPU kernels"
    if type(layer) in _TORCH_NAMES:
        return (f"runs torch.nn's own kernels ({kind}), not rnnfused's; rnnfused.convert(model) swaps it for "
                f"rnnfused.{_TORCH_NAMES[type(layer)]}")
    base = next((cls for cls in type(layer).__mro__ if cls in _TORCH_NAMES), type(layer).__mro__[1])
    return (f"runs torch.nn's own kernels ({kind}), not rnnfused's; a subclass of torch.nn.{base.__name__}, "
            "which rnnfused.convert refuses (its own code would be lost)")
