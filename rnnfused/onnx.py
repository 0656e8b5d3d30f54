"""ONNX export of rnnfused's layers: translations of the operator ``rnnfused::layer_forward``
(one layer, one direction) for both of torch's exporters, registered by ``import rnnfused``.

* ``torch.onnx.export(model, args, f)`` (the dynamo exporter, torch's default): an
  onnxscript function, registered with the exporter's operator table when torch imports it.
* ``torch.onnx.export(..., dynamo=False)`` (the TorchScript exporter): a symbolic function
  (``torch.onnx.register_custom_op_symbolic``, opset 13 and later).

What each layer becomes:

* Standard ONNX ``LSTM`` / ``GRU`` / ``RNN`` nodes (one per layer and direction, directions
  ``forward`` / ``reverse``) wherever they compute the layer exactly: every cell, with or
  without biases, the PyTorch GRU (``linear_before_reset=1``) and the Cho et al. GRU
  (``reset_after=False``: ``linear_before_reset=0``). The gate rows are reordered to ONNX's
  order (LSTM i, o, f, c from torch's i, f, g, o; GRU z, r, h from r, z, n).
* An LSTM with ``proj_size``, ``cell_clip`` (ONNX's ``clip`` clamps the gate pre-activations,
  not the cell) or ``lengths`` / ``resets`` (dynamo exporter only): the input projection as
  one MatMul, then an ONNX ``Loop`` over the steps (``rnnfused._onnx_functions``).
* ``grad_clip`` changes only gradients: the forward exported is exact.
* Refused, with an error naming the feature: normalized layers (``norm``), ``lengths`` /
  ``resets`` on GRU and RNN, PackedSequence input, and with the TorchScript exporter
  everything that needs the Loop.

Batch and sequence length stay dynamic (no size is baked into the graph but the weights').
"""

import math

import torch

from ._ops import GATES_PER_UNIT, STEP_INACTIVE, STEP_RESET, Cell, LayerOptions, Norm

__all__ = ["custom_translation_table"]

# Row blocks of torch's weights, in ONNX's gate order.
_ONNX_GATE_ORDER = {Cell.LSTM: (0, 3, 1, 2), Cell.GRU: (1, 0, 2), Cell.GRU_CHO: (1, 0, 2),
                    Cell.RNN_TANH: (0,), Cell.RNN_RELU: (0,)}
_INT64_MIN = -(2 ** 63)


class UnsupportedExport(RuntimeError):
    """A layer's feature has no ONNX translation."""


def _refuse(options, batch_sizes_given, flags_given, masks_given):
    """Raises UnsupportedExport naming what of this layer no exporter can translate."""
    what = None
    if masks_given:  # rnnfused's modules trace zoneout as the equations; a direct call of the operator
        what = "the operator's zoneout and recurrent dropout masks"
    elif options.norm != Norm.NONE:
        what = f"normalized layers (norm={'batch' if options.norm == Norm.BATCH else 'layer'!r})"
    elif batch_sizes_given:
        what = "PackedSequence input (pass the padded tensor, with lengths= for an LSTM)"
    elif flags_given and options.cell != Cell.LSTM:
        what = f"lengths / resets on {options.cell.name}"
    if what is not None:
        raise UnsupportedExport(f"rnnfused: ONNX export does not support {what} yet")


def _needs_loop(options, projected, flags_given):
    return options.cell == Cell.LSTM and (projected or flags_given or not math.isinf(options.cell_clip))


def _gate_rows(cell, hidden):
    """Row indices taking torch's gate blocks [G] into ONNX's order."""
    return [block * hidden + k for block in _ONNX_GATE_ORDER[cell] for k in range(hidden)]


def _node_attributes(cell, hidden, reverse):
    attributes = {"hidden_size": hidden, "direction": "reverse" if reverse else "forward"}
    if cell in (Cell.GRU, Cell.GRU_CHO):
        attributes["linear_before_reset"] = 1 if cell == Cell.GRU else 0
    if cell in (Cell.RNN_TANH, Cell.RNN_RELU):
        attributes["activations"] = ["Tanh" if cell == Cell.RNN_TANH else "Relu"]
    return attributes


# --- the dynamo exporter (onnxscript) --------------------------------------------------------

def layer_forward_onnxscript(x, batch_sizes, h0, c0, weights, norm_weights, running_stats, step_flags, masks, cell,
                             has_biases, reverse, cell_clip, grad_clip, norm, training, eps, side_by_side,
                             save_for_backward):
    """The dynamo exporter's translation of ``rnnfused::layer_forward`` (trace-only onnxscript:
    called with the graph's values and the operator's scalar arguments)."""
    from onnxscript import opset18 as op

    from . import _onnx_functions

    options = LayerOptions.from_op_args(cell, has_biases, reverse, cell_clip, grad_clip, norm, training, eps,
                                        side_by_side)
    cell = options.cell
    hidden = weights[0].shape[0] // GATES_PER_UNIT[cell]
    projected = len(weights) > (4 if options.has_biases else 2)
    flags_given = step_flags is not None
    _refuse(options, batch_sizes is not None, flags_given, len(masks) > 0)
    w_ih, w_hh = weights[0], weights[1]
    b_ih, b_hh = (weights[2], weights[3]) if options.has_biases else (None, None)

    if _needs_loop(options, projected, flags_given):
        gx = op.MatMul(x, op.Transpose(w_ih, perm=[1, 0]))
        if b_ih is not None:
            gx = op.Add(gx, op.Add(b_ih, b_hh))
        w_hr_t = op.Transpose(weights[-1], perm=[1, 0]) if projected else \
            op.EyeLike(op.Slice(w_hh, [0], [hidden], [0]))
        bound = op.CastLike(op.Constant(value_float=options.cell_clip), x)
        if flags_given:
            flags = op.Unsqueeze(step_flags, [2])
            reset = op.Cast(op.BitwiseAnd(flags, op.Constant(value=_int32(STEP_RESET))), to=9)  # 9: BOOL
            active = op.Not(op.Cast(op.BitwiseAnd(flags, op.Constant(value=_int32(STEP_INACTIVE))), to=9))
        else:
            shape = op.Concat(op.Slice(op.Shape(x), [0], [2], [0]), op.Constant(value_ints=[1]), axis=0)
            reset = op.Expand(op.Constant(value=_bool(False)), shape)
            active = op.Expand(op.Constant(value=_bool(True)), shape)
        if options.reverse:
            gx, reset, active = (op.Slice(v, [-1], [_INT64_MIN], [0], [-1]) for v in (gx, reset, active))
        y, h_n, c_n = _onnx_functions.rnnfused_lstm_loop(gx, h0, c0, op.Transpose(w_hh, perm=[1, 0]), w_hr_t,
                                                         op.Neg(bound), bound, reset, active)
        if options.reverse:
            y = op.Slice(y, [-1], [_INT64_MIN], [0], [-1])
    else:
        rows = op.Constant(value_ints=_gate_rows(cell, hidden))
        zero_axis = op.Constant(value_ints=[0])

        def onnx_layout(w):
            return op.Unsqueeze(op.Gather(w, rows, axis=0), zero_axis)

        bias = None if b_ih is None else op.Unsqueeze(
            op.Concat(op.Gather(b_ih, rows, axis=0), op.Gather(b_hh, rows, axis=0), axis=0), zero_axis)
        attributes = _node_attributes(cell, hidden, options.reverse)
        initial_h = op.Unsqueeze(h0, zero_axis)
        if cell == Cell.LSTM:
            y, h_n, c_n = op.LSTM(x, onnx_layout(w_ih), onnx_layout(w_hh), bias, None, initial_h,
                                  op.Unsqueeze(c0, zero_axis), **attributes)
            c_n = op.Squeeze(c_n, zero_axis)
        else:
            node = op.GRU if cell in (Cell.GRU, Cell.GRU_CHO) else op.RNN
            y, h_n = node(x, onnx_layout(w_ih), onnx_layout(w_hh), bias, None, initial_h, **attributes)
        y = op.Squeeze(y, op.Constant(value_ints=[1]))
        h_n = op.Squeeze(h_n, zero_axis)
    if cell != Cell.LSTM:
        c_n = op.Slice(op.Reshape(h_n, op.Constant(value_ints=[-1])), [0], [0], [0])  # the operator's empty [0]
    # The operator's lists (what backward would need, batch norm's statistics) are sequences
    # here; nothing reads them in an exported inference graph. They hold as many values as the
    # operator's (so that reading one stays valid).
    saved = op.SequenceConstruct(y, y, y, y) if save_for_backward else op.SequenceEmpty()
    return y, h_n, c_n, saved, op.SequenceEmpty()


def _int32(value):
    """A constant of the step flags' dtype (int32)."""
    import onnx_ir as ir
    import numpy as np
    return ir.tensor(np.array(value, dtype=np.int32))


def _bool(value):
    import onnx_ir as ir
    import numpy as np
    return ir.tensor(np.array(value, dtype=np.bool_))


def custom_translation_table():
    """``{torch.ops.rnnfused.layer_forward.default: translation}`` for
    ``torch.onnx.export(..., custom_translation_table=...)``; only needed where the automatic
    registration (at the exporter's import) is unavailable."""
    return {torch.ops.rnnfused.layer_forward.default: layer_forward_onnxscript}


def register_with_dynamo_exporter(registration=None):
    """Adds the translation to the dynamo exporter's table of torchlib functions
    (``torch.onnx._internal.exporter._torchlib._torchlib_registry``), which every export reads."""
    from torch.onnx._internal.exporter._torchlib import _torchlib_registry
    _torchlib_registry.onnx_impl(torch.ops.rnnfused.layer_forward.default, trace_only=True)(layer_forward_onnxscript)


# --- the TorchScript exporter (dynamo=False) -------------------------------------------------

def _constant(g, values, dtype=torch.int64):
    return g.op("Constant", value_t=torch.tensor(values, dtype=dtype))


def layer_forward_symbolic(g, x, batch_sizes, h0, c0, weights, norm_weights, running_stats, step_flags, masks, cell,
                           has_biases, reverse, cell_clip, grad_clip, norm, training, eps, side_by_side,
                           save_for_backward):
    """The TorchScript exporter's symbolic of ``rnnfused::layer_forward`` (opset >= 13)."""
    from torch.onnx._internal.torchscript_exporter import symbolic_helper as sh

    scalars = [sh._maybe_get_const(v, kind) for v, kind in
               ((cell, "i"), (has_biases, "b"), (reverse, "b"), (cell_clip, "f"), (grad_clip, "f"), (norm, "i"),
                (training, "b"), (eps, "f"), (side_by_side, "i"))]
    options = LayerOptions.from_op_args(*scalars)
    cell = options.cell
    weights = sh._unpack_list(weights)
    projected = len(weights) > (4 if options.has_biases else 2)
    flags_given = not sh._is_none(step_flags)
    _refuse(options, not sh._is_none(batch_sizes), flags_given, len(sh._unpack_list(masks)) > 0)
    if _needs_loop(options, projected, flags_given):
        what = "proj_size" if projected else "cell_clip" if not math.isinf(options.cell_clip) else "lengths / resets"
        raise UnsupportedExport(f"rnnfused: the TorchScript ONNX exporter (dynamo=False) cannot export an LSTM with "
                                f"{what}; the dynamo exporter (torch.onnx.export's default) can")
    hidden = sh._get_tensor_sizes(weights[0])[0] // GATES_PER_UNIT[cell]
    rows = _constant(g, _gate_rows(cell, hidden))
    zero_axis = _constant(g, [0])

    def onnx_layout(w):
        return g.op("Unsqueeze", g.op("Gather", w, rows, axis_i=0), zero_axis)

    absent = g.op("prim::Constant")
    absent.setType(torch._C.OptionalType.ofTensor())
    bias = absent
    if options.has_biases:
        bias = g.op("Unsqueeze", g.op("Concat", g.op("Gather", weights[2], rows, axis_i=0),
                                      g.op("Gather", weights[3], rows, axis_i=0), axis_i=0), zero_axis)
    # g.op names an attribute's type by a suffix: _i integers, _s strings.
    attributes = {f"{name}_{'i' if isinstance(value, int) else 's'}": value
                  for name, value in _node_attributes(cell, hidden, options.reverse).items()}
    inputs = [x, onnx_layout(weights[0]), onnx_layout(weights[1]), bias, absent, g.op("Unsqueeze", h0, zero_axis)]
    if cell == Cell.LSTM:
        y, h_n, c_n = g.op("LSTM", *inputs, g.op("Unsqueeze", c0, zero_axis), outputs=3, **attributes)
        c_n = g.op("Squeeze", c_n, zero_axis)
    else:
        y, h_n = g.op("GRU" if cell in (Cell.GRU, Cell.GRU_CHO) else "RNN", *inputs, outputs=2, **attributes)
    h_n = g.op("Squeeze", h_n, zero_axis)
    if cell != Cell.LSTM:
        c_n = g.op("Slice", g.op("Reshape", h_n, _constant(g, [-1])), zero_axis, zero_axis, zero_axis)
    return (g.op("Squeeze", y, _constant(g, [1])), h_n, c_n, g.op("SequenceEmpty"), g.op("SequenceEmpty"))


def register_with_torchscript_exporter():
    torch.onnx.register_custom_op_symbolic("rnnfused::layer_forward", layer_forward_symbolic, 13)
