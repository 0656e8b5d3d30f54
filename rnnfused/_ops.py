"""The operators ``torch.ops.rnnfused.layer_forward`` and ``layer_backward`` (one layer, one
direction), defined in C++ (csrc/bindings.cpp) with CPU and CUDA kernels; their fake
(meta) kernels and autograd formula are registered here.

Shapes follow ``csrc/params.h``: T steps, B batch, N rows (T*B padded, or the packed rows),
I inputs, H hidden units, P = proj_size or H, G gate rows (4H LSTM, 3H GRU, H RNN).
``weights`` is ``[w_ih, w_hh]``, then ``b_ih, b_hh`` when ``has_biases``, then ``w_hr`` for
an LSTM with projection. Outputs that do not apply are empty tensors of shape [0].
"""

import enum

import torch

from . import _C  # noqa: F401  (loading the extension defines the operators)


class Cell(enum.IntEnum):
    """The cells, numbered as the ``int cell`` argument of the operators (csrc/params.h)."""

    LSTM = 0
    GRU = 1  # PyTorch / cuDNN form: r applied to (W_hn h + b_hn)
    GRU_CHO = 2  # Cho et al. 2014 form: r applied to h before W_hn
    RNN_TANH = 3
    RNN_RELU = 4


GATES_PER_UNIT = {Cell.LSTM: 4, Cell.GRU: 3, Cell.GRU_CHO: 3, Cell.RNN_TANH: 1, Cell.RNN_RELU: 1}
# Activations saved per hidden unit: LSTM i, f, g, o | GRU r, z, n, W_hn h + b_hn | GRU_CHO r, z, n
SAVED_PER_UNIT = {Cell.LSTM: 4, Cell.GRU: 4, Cell.GRU_CHO: 3, Cell.RNN_TANH: 0, Cell.RNN_RELU: 0}


class Norm(enum.IntEnum):
    """The normalizations, numbered as the ``int norm`` argument of the operators."""

    NONE = 0
    BATCH = 1
    LAYER = 2


def layer_forward(cell, x, batch_sizes, h0, c0, weights, *, has_biases, reverse, save_for_backward,
                  cell_clip, grad_clip, norm=Norm.NONE, norm_weights=(), running_stats=(), training=True, eps=1e-5):
    """Runs one layer in one direction.

    x is [T, B, I] (padded, ``batch_sizes`` None) or [N, I] (packed, ``batch_sizes`` the int64
    CPU tensor of a PackedSequence); h0 [B, P]; c0 [B, H] for LSTM, else None. Returns
    ``(y, h_n, c_n, hidden, gates, cells, proj_in, norm_saved, batch_stats)``: y in the layout of
    x with P features, h_n [B, P], c_n [B, H] (LSTM), and what backward needs when
    ``save_for_backward``: a private copy of y, the activations [N, saved * H] (fp32, fp64 for
    fp64), LSTM cell states [N, H] and the projection's input [N, H]. ``grad_clip`` is used by
    the backward.

    Normalized layers (``norm`` BATCH or LAYER): ``norm_weights`` is ``[gamma_x, gamma_h]`` [G]
    (+ LSTM ``[gamma_c, beta_c]`` [H]); batch norm takes ``running_stats``, the statistics of
    every step ``[mean_x, var_x, mean_h, var_h]`` [T, G] (+ LSTM ``[mean_c, var_c]`` [T, H]), used
    in eval (``training`` False) and at training steps with a single active row. Outputs
    ``norm_saved`` (for backward: x̂ [N, width] and 1/sqrt(var + eps) of each normalization) and,
    batch norm in training, ``batch_stats``: the mean and biased variance of every step, in the
    order of ``running_stats``, in the accumulation dtype.
    """
    return torch.ops.rnnfused.layer_forward(int(cell), x, batch_sizes, h0, c0, list(weights), has_biases, reverse,
                                            save_for_backward, cell_clip, grad_clip, int(norm), list(norm_weights),
                                            list(running_stats), training, eps)


def layer_backward(cell, x, batch_sizes, h0, c0, weights, saved, dy, dh_n, dc_n, *, has_biases, reverse,
                   cell_clip, grad_clip, need_dx, need_weights, norm=Norm.NONE, norm_weights=(), training=True,
                   norm_saved=()):
    """Gradients of one layer in one direction; ``saved`` is ``(hidden, gates, cells, proj_in)``
    and ``norm_saved`` the list of that name from :func:`layer_forward` (None where the cell has
    none). Returns ``(dx, dh0, dc0, dweights, dnorm_weights)``: dx as x (empty unless
    ``need_dx``), dh0 [B, P], dc0 [B, H] (LSTM), dweights and dnorm_weights shaped as ``weights``
    and ``norm_weights`` (empty unless ``need_weights``)."""
    hidden, gates, cells, proj_in = saved
    return torch.ops.rnnfused.layer_backward(int(cell), x, batch_sizes, h0, c0, list(weights), has_biases, reverse,
                                             cell_clip, grad_clip, hidden, gates, cells, proj_in, dy, dh_n, dc_n,
                                             need_dx, need_weights, int(norm), list(norm_weights), training,
                                             list(norm_saved))


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_devices(x, named):
    """The device check of the C++ kernels, for the fake kernels: with a meta tensor among
    the arguments the dispatcher runs the fake kernel even when others are on a real device."""
    for name, tensor in named:
        if tensor is not None and tensor.device != x.device:
            raise RuntimeError(f"rnnfused: {name} is on {tensor.device} but the input is on {x.device}; "
                               "move both to the same device")


@torch.library.register_fake("rnnfused::layer_forward")
def _layer_forward_fake(cell, x, batch_sizes, h0, c0, weights, has_biases, reverse, save_for_backward, cell_clip,
                        grad_clip, norm=0, norm_weights=(), running_stats=(), training=True, eps=1e-5):
    cell = Cell(cell)
    _check_devices(x, [("weight_ih", weights[0]), ("weight_hh", weights[1]), ("h0", h0), ("c0", c0)])
    hidden_size = weights[0].shape[0] // GATES_PER_UNIT[cell]
    gate_rows = weights[0].shape[0]
    width = weights[1].shape[1]
    rows = x.shape[0] if batch_sizes is not None else x.shape[0] * x.shape[1]
    steps = batch_sizes.shape[0] if batch_sizes is not None else x.shape[0]
    batch = h0.shape[0]
    acc = _acc_dtype(x.dtype)
    saved = SAVED_PER_UNIT[cell]

    def absent():
        return x.new_empty(0)

    y = x.new_empty((*x.shape[:-1], width))
    c_n = x.new_empty(batch, hidden_size) if cell == Cell.LSTM else absent()
    hidden = x.new_empty(y.shape) if save_for_backward else absent()
    gates = x.new_empty(rows, saved * hidden_size, dtype=acc) if save_for_backward and saved else absent()
    cells = x.new_empty(rows, hidden_size, dtype=acc) if save_for_backward and cell == Cell.LSTM else absent()
    proj_in = x.new_empty(rows, hidden_size) if save_for_backward and width != hidden_size else absent()
    norm_saved, batch_stats = [], []
    if norm != Norm.NONE:
        widths = [gate_rows, gate_rows] + ([hidden_size] if cell == Cell.LSTM else [])
        for side, w in enumerate(widths):
            if norm == Norm.BATCH:
                line_shape = (steps, w)
            else:
                line_shape = (rows, 2 if cell == Cell.GRU_CHO else 1) if side == 1 else (rows,)
            if save_for_backward:
                norm_saved += [x.new_empty(rows, w, dtype=acc), x.new_empty(line_shape, dtype=acc)]
            if norm == Norm.BATCH and training:
                batch_stats += [x.new_empty(steps, w, dtype=acc), x.new_empty(steps, w, dtype=acc)]
    return y, x.new_empty(batch, width), c_n, hidden, gates, cells, proj_in, norm_saved, batch_stats


@torch.library.register_fake("rnnfused::layer_backward")
def _layer_backward_fake(cell, x, batch_sizes, h0, c0, weights, has_biases, reverse, cell_clip, grad_clip, hidden,
                         gates, cells, proj_in, dy, dh_n, dc_n, need_dx, need_weights, norm=0, norm_weights=(),
                         training=True, norm_saved=()):
    cell = Cell(cell)
    hidden_size = weights[0].shape[0] // GATES_PER_UNIT[cell]
    dx = x.new_empty(x.shape) if need_dx else x.new_empty(0)
    dc0 = x.new_empty(h0.shape[0], hidden_size) if cell == Cell.LSTM else x.new_empty(0)
    dweights = [w.new_empty(w.shape) for w in weights] if need_weights else []
    dnorm_weights = [w.new_empty(w.shape) for w in norm_weights] if need_weights else []
    return dx, x.new_empty(h0.shape), dc0, dweights, dnorm_weights


# The autograd formula, in two wrappers: torch.library.register_autograd's for the operator
# (torch.compile, torch.export and direct calls), and _EagerLayer, the same formula with
# less Python per call (register_autograd's generic wrapper flattens the weight lists with
# pytree on every call: about 150 µs per layer's forward + backward, measured with
# `python -m bench.overhead`).

def _save(ctx, cell, x, batch_sizes, h0, c0, weights, has_biases, reverse, save_for_backward, cell_clip, grad_clip,
          norm, norm_weights, running_stats, training, eps, output):
    _, _, _, hidden, gates, cells, proj_in, norm_saved, batch_stats = output
    ctx.mark_non_differentiable(hidden, gates, cells, proj_in, *norm_saved, *batch_stats)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, batch_sizes, h0, c0, hidden, gates, cells, proj_in, *weights, *norm_weights,
                          *running_stats, *norm_saved)
    ctx.options = (Cell(cell), has_biases, reverse, save_for_backward, cell_clip, grad_clip, Norm(norm), training, eps)
    ctx.counts = (len(weights), len(norm_weights), len(running_stats))


def _gradients(ctx, dy, dh_n, dc_n, need_dx, need_dh0, need_dc0, need_dweights, need_dnorm_weights):
    """(dx, dh0, dc0, dweights, dnorm_weights) of the saved layer; None where not needed."""
    cell, has_biases, reverse, save_for_backward, cell_clip, grad_clip, norm, training, eps = ctx.options
    x, batch_sizes, h0, c0, hidden, gates, cells, proj_in, *rest = ctx.saved_tensors
    n_weights, n_norm_weights, n_running = ctx.counts
    weights = rest[:n_weights]
    norm_weights = rest[n_weights:n_weights + n_norm_weights]
    running_stats = rest[n_weights + n_norm_weights:n_weights + n_norm_weights + n_running]
    norm_saved = rest[n_weights + n_norm_weights + n_running:]
    if not save_for_backward:
        raise RuntimeError("rnnfused: layer_forward ran with save_for_backward=False, so it cannot be "
                           "differentiated; call it with save_for_backward=True")
    dy = torch.zeros_like(hidden) if dy is None else dy
    dh_n = torch.zeros_like(h0) if dh_n is None else dh_n
    is_lstm = cell == Cell.LSTM
    if is_lstm and dc_n is None:
        dc_n = torch.zeros_like(c0)
    if torch.is_grad_enabled():
        # create_graph=True: the fused backward has no graph of its own, so the gradients are
        # recomputed through the differentiable equations (rnnfused.reference).
        from .functional import reference_layer_gradients
        return reference_layer_gradients(cell, x, batch_sizes, h0, c0, weights, has_biases, reverse, cell_clip,
                                         grad_clip, (norm, norm_weights, running_stats, training, eps), dy, dh_n,
                                         dc_n, need_dx, need_dh0, need_dc0, need_dweights + need_dnorm_weights)
    projected = weights[1].shape[1] != weights[0].shape[0] // GATES_PER_UNIT[cell]
    saved = (hidden, gates if SAVED_PER_UNIT[cell] else None, cells if is_lstm else None,
             proj_in if projected else None)
    need_weights = any(need_dweights) or any(need_dnorm_weights)
    dx, dh0, dc0, dweights, dnorm_weights = layer_backward(
        cell, x, batch_sizes, h0, c0, weights, saved, dy, dh_n, dc_n if is_lstm else None, has_biases=has_biases,
        reverse=reverse, cell_clip=cell_clip, grad_clip=grad_clip, need_dx=need_dx, need_weights=need_weights,
        norm=norm, norm_weights=norm_weights, training=training, norm_saved=norm_saved)

    def wanted(grads, needs):
        return [g if need else None for g, need in zip(grads, needs)] if need_weights else [None] * len(needs)

    return (dx if need_dx else None, dh0 if need_dh0 else None, dc0 if is_lstm and need_dc0 else None,
            wanted(dweights, need_dweights) + wanted(dnorm_weights, need_dnorm_weights))


def _setup_context(ctx, inputs, output):
    _save(ctx, *inputs, output)


def _backward(ctx, dy, dh_n, dc_n, *unused):
    needs = ctx.needs_input_grad  # one per input; a list of bools for each list of tensors
    dx, dh0, dc0, dweights = _gradients(ctx, dy, dh_n, dc_n, needs[1], needs[3], needs[4], list(needs[5]),
                                        list(needs[12]))
    n_weights = ctx.counts[0]
    # Lists of inputs get lists of gradients (register_autograd checks the structure).
    return (None, dx, None, dh0, dc0, dweights[:n_weights], None, None, None, None, None, None,
            dweights[n_weights:], [None] * ctx.counts[2], None, None)


torch.library.register_autograd("rnnfused::layer_forward", _backward, setup_context=_setup_context)


class _EagerLayer(torch.autograd.Function):
    """layer_forward with save_for_backward=True and the operator's autograd formula, for
    eager mode; the weights and then the norm weights come last, one argument each."""

    @staticmethod
    def forward(ctx, cell, x, batch_sizes, h0, c0, has_biases, reverse, cell_clip, grad_clip, norm, running_stats,
                training, eps, n_weights, *all_weights):
        weights, norm_weights = all_weights[:n_weights], all_weights[n_weights:]
        output = torch.ops.rnnfused.layer_forward(int(cell), x, batch_sizes, h0, c0, list(weights), has_biases,
                                                  reverse, True, cell_clip, grad_clip, int(norm), list(norm_weights),
                                                  list(running_stats), training, eps)
        _save(ctx, cell, x, batch_sizes, h0, c0, weights, has_biases, reverse, True, cell_clip, grad_clip, norm,
              norm_weights, running_stats, training, eps, output)
        return (*output[:7], *output[7], *output[8])

    @staticmethod
    def backward(ctx, dy, dh_n, dc_n, *unused):
        needs = ctx.needs_input_grad
        n_weights = ctx.counts[0]
        dx, dh0, dc0, dweights = _gradients(ctx, dy, dh_n, dc_n, needs[1], needs[3], needs[4],
                                            list(needs[14:14 + n_weights]), list(needs[14 + n_weights:]))
        return (None, dx, None, dh0, dc0, None, None, None, None, None, None, None, None, None, *dweights)


def differentiable_layer_forward(cell, x, batch_sizes, h0, c0, weights, *, has_biases, reverse, cell_clip,
                                 grad_clip, norm=Norm.NONE, norm_weights=(), running_stats=(), training=True,
                                 eps=1e-5):
    """layer_forward with save_for_backward=True, differentiable: through _EagerLayer in
    eager mode, through the operator's registered autograd when compiling or exporting.
    Returns ``(y, h_n, c_n, hidden, gates, cells, proj_in, batch_stats)``."""
    if torch.compiler.is_compiling():
        output = layer_forward(cell, x, batch_sizes, h0, c0, weights, has_biases=has_biases, reverse=reverse,
                               save_for_backward=True, cell_clip=cell_clip, grad_clip=grad_clip, norm=norm,
                               norm_weights=norm_weights, running_stats=running_stats, training=training, eps=eps)
        return output[:7] + (output[8],)
    output = _EagerLayer.apply(cell, x, batch_sizes, h0, c0, has_biases, reverse, cell_clip, grad_clip, norm,
                               running_stats, training, eps, len(weights), *weights, *norm_weights)
    normalized_sides = 0 if norm == Norm.NONE else 3 if cell == Cell.LSTM else 2
    return (*output[:7], list(output[7 + 2 * normalized_sides:]))  # norm_saved: 2 per side
