"""The decomposition of ``rnnfused::layer_forward`` into core ATen operations: the reference
recurrence (:func:`rnnfused.reference.cell_step`) inside torch's ``scan`` operator.

``ep.run_decompositions(rnnfused.decompositions.table())`` (torch's default table plus this
one) turns an exported program into one of ATen operations and ``scan`` only, which saves
and loads in a process without rnnfused (docs/deployment.md).

Why a table to pass, not ``run_decompositions()`` alone: torch's default table reaches an
operator outside aten only through a CompositeImplicitAutograd kernel, and decomposes such a
kernel only where autograd would have (``autograd_would_have_decomposed`` in
torch/utils/_python_dispatch.py: never for an operator with a kernel for the input's device,
as ours has for CPU and CUDA); a custom operator given in the table is decomposed.

What the decomposition computes: the operator's y, h_n, c_n exactly as the reference does
(padded input with or without step flags through ``scan``, so the sequence length stays
symbolic; packed input and normalized layers through the reference's loop over the steps,
which fixes the sequence length). Its other outputs (what backward would read, batch norm's
statistics) are placeholders of the right shapes, which nothing in an inference graph reads;
the decomposed graph differentiates through its ATen operations (without ``grad_clip``, a
backward-only extra that is not part of it).
"""

import dataclasses
import math

import torch

from . import _ops, reference
from ._ops import STEP_INACTIVE, STEP_RESET, Cell, LayerOptions, Norm

__all__ = ["layer_forward_decomposition", "table"]


def _named_weights(options, weights):
    names = ["w_ih", "w_hh"] + (["b_ih", "b_hh"] if options.has_biases else [])
    named = {"w_ih": None, "w_hh": None, "b_ih": None, "b_hh": None, "w_hr": None}
    named.update(zip(names, weights))
    if len(weights) > len(names):
        named["w_hr"] = weights[len(names)]
    return named


def _scan_layer(options, x, h0, c0, weights, step_flags):
    """One padded layer direction through torch's scan operator: (y [T, B, P], h_n, c_n or
    None). The operator itself, not torch's ``scan()`` function: that one compiles its body
    with dynamo, which fails inside run_decompositions' retrace; the operator traces it as
    part of the graph (and runs it as a loop in eager mode)."""
    from torch._higher_order_ops.scan import scan_op  # torch's private module: imported when used

    mode, reset_after = ("GRU", False) if options.cell == Cell.GRU_CHO else (options.cell.name, True)
    cell_clip = None if math.isinf(options.cell_clip) else options.cell_clip
    is_lstm = options.cell == Cell.LSTM
    flagged = step_flags is not None
    n_carry, n_xs = (2 if is_lstm else 1), (2 if flagged else 1)

    def step(*args):  # the carried states, the step's inputs, then the weights
        h, c = args[0], (args[1] if is_lstm else None)
        x_t = args[n_carry]
        flags_t = args[n_carry + 1] if flagged else None
        named = _named_weights(options, args[n_carry + n_xs:])
        if flagged:  # the operator's step flags, as rnnfused.reference.layer reads them
            zero = ((flags_t & STEP_RESET) != 0).unsqueeze(1)
            h = torch.where(zero, torch.zeros_like(h), h)
            c = torch.where(zero, torch.zeros_like(c), c) if is_lstm else None
        h_new, c_new = reference.cell_step(mode, x_t, h, c, named, reset_after=reset_after, cell_clip=cell_clip)
        y_t = h_new
        if flagged:
            active = ((flags_t & STEP_INACTIVE) == 0).unsqueeze(1)
            y_t = torch.where(active, h_new, torch.zeros_like(h_new))
            h_new = torch.where(active, h_new, h)
            c_new = torch.where(active, c_new, c) if is_lstm else None
        # scan's outputs may not alias one another: y_t is a copy where it would be h_new itself
        return [h_new] + ([c_new] if is_lstm else []) + [y_t.clone()]

    xs = [x] + ([step_flags] if flagged else [])
    if options.reverse:
        xs = [torch.flip(v, [0]) for v in xs]
    init = [h0] + ([c0] if is_lstm else [])
    *carry, y = scan_op(step, init, xs, tuple(weights))  # the final carried states, then the stacked y_t
    if options.reverse:
        y = torch.flip(y, [0])
    return y, carry[0], (carry[1] if is_lstm else None)


def _reference_masks(masks):
    """The operators' masks as the reference's rnnfused.regularisers.Masks (None: none)."""
    from .regularisers import Masks
    return Masks(None, *(m if _ops.mask_given(m) else None for m in masks)) if masks else None


def layer_forward_decomposition(x, batch_sizes, h0, c0, weights, norm_weights, running_stats, step_flags, masks,
                                cell, has_biases, reverse, cell_clip, grad_clip, norm, training, eps, side_by_side,
                                save_for_backward):
    """``rnnfused::layer_forward`` in ATen operations (the operator's arguments and results)."""
    options = LayerOptions.from_op_args(cell, has_biases, reverse, cell_clip, grad_clip, norm, training, eps,
                                        side_by_side)
    # The placeholders (and the checks of the fake kernel): shapes as the operator's.
    _, _, empty_c_n, saved, batch_stats = _ops._layer_forward_fake(
        x, batch_sizes, h0, c0, weights, norm_weights, running_stats, step_flags, masks, cell, has_biases, reverse,
        cell_clip, grad_clip, norm, training, eps, side_by_side, save_for_backward)
    if batch_sizes is None and options.norm == Norm.NONE and not masks:
        y, h_n, c_n = _scan_layer(options, x, h0, c0, weights, step_flags)
    else:
        from .functional import _reference_layer
        y, h_n, c_n, batch_stats = _reference_layer(dataclasses.replace(options, grad_clip=math.inf),
                                                    x, batch_sizes, h0, c0, weights, norm_weights, running_stats,
                                                    step_flags, _reference_masks(masks))
        batch_stats = list(batch_stats)
    return y, h_n, (c_n if c_n is not None else empty_c_n), saved, batch_stats


def table():
    """torch's default decomposition table (``torch.export.default_decompositions()``) with
    rnnfused's operator added: ``ep.run_decompositions(rnnfused.decompositions.table())``."""
    decompositions = torch.export.default_decompositions()
    decompositions[torch.ops.rnnfused.layer_forward.default] = layer_forward_decomposition
    return decompositions
