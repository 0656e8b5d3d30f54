"""Autograd for one recurrent layer in one direction on the fused kernels.

:func:`recurrent_layer` is the building block of :mod:`rnnfused.modules`; it can be used
directly to run a single layer with explicit weights.
"""

import math

import torch

from . import _ops

Cell = _ops.Cell


class _RecurrentLayer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cell, x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, cell_clip,
                grad_clip):
        y, h_n, c_n, gates, cells, proj_in = _ops.layer_forward(
            cell, x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse=reverse,
            save_for_backward=True, cell_clip=cell_clip)
        ctx.save_for_backward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, y, gates, cells, proj_in)
        ctx.config = (cell, batch_sizes, reverse, cell_clip, grad_clip)
        return y, h_n, c_n

    @staticmethod
    def backward(ctx, dy, dh_n, dc_n):
        if torch.is_grad_enabled():
            # The gradients come from a fused kernel and have no graph of their own: a second
            # derivative through this layer would silently come out as zero.
            raise RuntimeError(
                "rnnfused: double backward (create_graph=True) through a recurrent layer is not "
                "supported; use torch.nn for higher-order gradients")
        x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, y, gates, cells, proj_in = ctx.saved_tensors
        cell, batch_sizes, reverse, cell_clip, grad_clip = ctx.config
        needs = ctx.needs_input_grad
        dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr = _ops.layer_backward(
            cell, x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, (y, gates, cells, proj_in),
            dy, dh_n, dc_n, reverse=reverse, cell_clip=cell_clip, grad_clip=grad_clip,
            need_dx=needs[1], need_weights=any(needs[5:10]))
        return (None, dx, None, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr, None, None, None)


def _clip_value(clip, name):
    if clip is None:
        return math.inf
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not clip > 0:
        raise ValueError(f"{name} must be None or a positive number, got {clip!r}")
    return float(clip)


def recurrent_layer(cell, x, h0, c0, w_ih, w_hh, b_ih=None, b_hh=None, w_hr=None, *,
                    batch_sizes=None, reverse=False, cell_clip=None, grad_clip=None):
    """One recurrent layer in one direction, fused forward and backward.

    Args:
        cell: an ``rnnfused.functional.Cell`` (LSTM, GRU, GRU_CHO, RNN_TANH, RNN_RELU).
        x: ``[T, B, I]`` padded input, or ``[N, I]`` packed rows when ``batch_sizes`` is given
            (the data and batch_sizes of a ``PackedSequence``).
        h0: ``[B, P]`` initial hidden state (P = projection size, else H).
        c0: ``[B, H]`` initial cell state (LSTM), else None.
        w_ih, w_hh, b_ih, b_hh, w_hr: weights in torch.nn's layout (``[G, I]``, ``[G, P]``,
            ``[G]``, ``[G]``, ``[P, H]``; G = 4H LSTM, 3H GRU, H RNN).
        reverse: walk the sequence from its end (the reverse direction of a bidirectional layer).
        cell_clip: LSTM only, clamp c_t to [-cell_clip, cell_clip].
        grad_clip: clamp the gradient of every gate pre-activation to [-grad_clip, grad_clip].

    Under autocast every tensor is cast to the autocast dtype first.

    Returns:
        ``(y, h_n, c_n)``: y ``[T, B, P]`` or ``[N, P]``, h_n ``[B, P]``, c_n ``[B, H]`` (LSTM)
        or None.
    """
    cell_clip = _clip_value(cell_clip, "cell_clip")
    grad_clip = _clip_value(grad_clip, "grad_clip")
    if torch.is_autocast_enabled(x.device.type):
        # As torch.nn's recurrent layers on CUDA: everything in the autocast dtype (the
        # casts are differentiable, so float32 parameters still get their gradients).
        dtype = torch.get_autocast_dtype(x.device.type)
        x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr = (
            None if t is None else t.to(dtype) for t in (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr))
    x = x.contiguous()
    tensors = (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return _RecurrentLayer.apply(cell, x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr,
                                     reverse, cell_clip, grad_clip)
    y, h_n, c_n, *_ = _ops.layer_forward(cell, x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr,
                                         reverse=reverse, save_for_backward=False,
                                         cell_clip=cell_clip)
    return y, h_n, c_n
