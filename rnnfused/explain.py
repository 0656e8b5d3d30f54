"""``rnnfused.explain(module, input)``: which kernel runs each layer direction, and why."""

from typing import NamedTuple

import torch
from torch.nn.utils.rnn import PackedSequence

from . import _C, dispatch
from . import regularisers as _regularisers
from .cells import GRUCell, LSTMCell, RNNCell
from .functional import Cell, fused_norm_on
from .modules import RNNBase


class KernelChoice(NamedTuple):
    layer: int
    direction: str  # "forward" or "reverse"
    # "stepwise", "persistent", "persistent (host simulation)", "cudnn" or "reference equations"
    kernel: str
    reason: str
    row: dict = None  # the measured table row behind a choice between ours and cuDNN

    def __str__(self):
        return f"layer {self.layer} {self.direction}: {self.kernel} ({self.reason})"


def explain(module, input, *, lengths=None, resets=None):
    """The kernel that runs the recurrence of every layer and direction of ``module`` (an
    rnnfused RNN/GRU/LSTM or cell) for ``input`` (what you would pass to it), and why: the
    stepwise kernels, or the persistent kernel that keeps W_hh on chip for the whole
    sequence with its tiling, or the reason it does not apply (dtype, size, device, the
    RNNFUSED_KERNEL setting); on CUDA first whether the stack runs ours, cuDNN (torch's own
    RNN op) or the reference equations, and the measured table row or the rule behind it
    (rnnfused.dispatch). ``lengths`` / ``resets``: as you would pass them (they keep a layer
    off cuDNN). Explain where you would call the module: under torch.no_grad (or with no
    parameter that requires grad) the persistent plan is the inference one, for the forward
    alone. Returns a list of ``KernelChoice(layer, direction, kernel, reason, row)``;
    ``print(*rnnfused.explain(m, x), sep="\\n")`` shows them."""
    weight = module.weight_ih_l0 if isinstance(module, RNNBase) else module.weight_ih
    dtype = dispatch.effective_dtype(weight)
    device = str(weight.device)
    training = torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters())
    if isinstance(module, (LSTMCell, GRUCell, RNNCell)):
        cell = {LSTMCell: Cell.LSTM, GRUCell: Cell.GRU if getattr(module, "reset_after", True) else Cell.GRU_CHO,
                RNNCell: Cell.RNN_RELU if getattr(module, "nonlinearity", "tanh") == "relu" else Cell.RNN_TANH}
        batch = input.size(0) if input.dim() == 2 else 1
        kernel, reason = _C.kernel_choice(int(cell[type(module)]), 1, module.hidden_size, module.hidden_size, batch,
                                          dtype, device, inference=not training)
        return [KernelChoice(0, "forward", kernel, reason + _regularisers_words(module, kernel, weight.device))]
    if not isinstance(module, RNNBase):
        raise TypeError(f"explain: expected an rnnfused recurrent layer or cell, got {type(module).__name__}")
    if isinstance(input, PackedSequence):
        batch = input.sorted_indices.size(0) if input.sorted_indices is not None else int(input.batch_sizes[0])
        steps = input.batch_sizes.numel()
    elif input.dim() == 2:
        batch, steps = 1, input.size(0)
    else:
        batch = input.size(0 if module.batch_first else 1)
        steps = input.size(1 if module.batch_first else 0)
    width = module.proj_size if getattr(module, "proj_size", 0) > 0 else module.hidden_size
    has_flags = lengths is not None or resets is not None
    stack = dispatch.choose(module, weight, batch, training, torch.empty(0) if has_flags else None)
    packed = isinstance(input, PackedSequence) or module._packs(input, lengths, resets)
    pipeline = module._pipeline(weight, steps, batch, packed=packed, step_flags=has_flags,
                                equations=stack.kernel == "reference" or module.norm is not None,
                                training=lambda: training)
    chunks = pipeline.chunks
    inside_steps = module.regularisers.inside_steps(module.training)
    zoneout = module.regularisers.zoneout_h or module.regularisers.zoneout_c
    beside = module.bidirectional and module.norm is None and \
        dispatch.directions_side_by_side(weight.device, stack.kernel == "reference")
    # The recurrences that run at once on the GPU (modules.RNNBase._run_stack, _run_wavefront).
    side_by_side = 2 if beside else min(module.num_layers, chunks) if chunks and weight.is_cuda else 1
    choices = []
    for layer in range(module.num_layers):
        for direction in ("forward", "reverse") if module.bidirectional else ("forward",):
            if stack.kernel == "cudnn":
                kernel, reason = "cudnn", stack.reason
            elif stack.kernel == "reference":
                kernel, reason = "reference equations", stack.reason
            elif module.norm is None:
                kernel, reason = _C.kernel_choice(int(module._cell()), steps, module.hidden_size, width, batch,
                                                  dtype, device, has_flags, inside_steps, side_by_side, not training)
            elif fused_norm_on(device):
                kernel, reason = "stepwise", "normalized layers run the stepwise kernels"
            else:
                kernel, reason = "reference equations", ("normalized layers on CUDA until their fused kernels have "
                                                         "passed their GPU tests (RNNFUSED_CUDA_NORM=fused)")
            if inside_steps and module.norm is not None and zoneout:
                kernel, reason = "reference equations", "zoneout in a normalized layer is not in the fused kernels"
            reason += _regularisers_words(module, kernel, weight.device)
            if pipeline.reason:
                reason += "; " + pipeline.reason
            if direction == "reverse" and beside and kernel not in ("cudnn", "reference equations"):
                reason += "; beside the forward direction, on a second CUDA stream"
            choices.append(KernelChoice(layer, direction, kernel, reason, stack.row))
    return choices


def _regularisers_words(module, kernel, device):
    """What explain adds for a module's active regularisers, and where zoneout's masks come from."""
    regularisers = module.regularisers
    active = regularisers.active(module.training, getattr(module, "dropout", 0))
    if not active:
        return ""
    words = "; regularisers: " + ", ".join(active)
    if module.training and (regularisers.zoneout_h or regularisers.zoneout_c) and kernel != "reference equations":
        words += (" (zoneout drawn in the kernels: Philox)" if _regularisers.kernels_draw(device)
                  else " (zoneout masks drawn per call and stored)")
    return words
