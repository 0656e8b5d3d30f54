"""Thin wrappers over the compiled kernels in ``rnnfused._C`` (one layer, one direction).

Shapes follow ``csrc/params.h``: T steps, B = batch_sizes[0], N rows in all, I inputs,
H hidden units, P = proj_size or H, G gate rows (4H LSTM, 3H GRU, H RNN).
"""

from . import _C

Cell = _C.Cell


def layer_forward(cell, x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, *, reverse,
                  save_for_backward, cell_clip):
    """Runs one layer in one direction.

    x is [T, B, I] (padded, ``batch_sizes`` None) or [N, I] (packed, ``batch_sizes`` the
    int64 CPU tensor of a PackedSequence). Returns ``[y, h_n, c_n, gates, cells, proj_in]``:
    y in the layout of x with P features, h_n [B, P], c_n [B, H] (LSTM, else None), and the
    activations backward needs (None when ``save_for_backward`` is False or not used).
    """
    return _C.forward(cell, x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse,
                      save_for_backward, cell_clip)


def layer_backward(cell, x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, saved, dy, dh_n,
                   dc_n, *, reverse, cell_clip, grad_clip, need_dx, need_weights):
    """Gradients of one layer in one direction; ``saved`` is ``(y, gates, cells, proj_in)``
    from :func:`layer_forward`. Returns ``[dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr]``
    (None where not asked for or not applicable)."""
    y, gates, cells, proj_in = saved
    return _C.backward(cell, x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse,
                       cell_clip, grad_clip, y, gates, cells, proj_in, dy, dh_n, dc_n, need_dx,
                       need_weights)
