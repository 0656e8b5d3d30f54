"""One recurrent layer in one direction on the fused kernels, with autograd.

:func:`recurrent_layer` is the building block of :mod:`rnnfused.modules`; it can be used
directly to run a single layer with explicit weights. The fused operators
(``torch.ops.rnnfused.layer_forward`` / ``layer_backward``, see :mod:`rnnfused._ops`) carry
ordinary training, ``torch.compile`` and ``torch.export``. What they have no rule for,
double backward, forward-mode AD and the ``torch.func`` transforms, runs through the same
equations written with differentiable torch operations (:mod:`rnnfused.reference`).
"""

import math
import os
import warnings

import torch
from torch.autograd import forward_ad
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from . import _ops, reference
from ._ops import Cell, Norm

__all__ = ["Cell", "recurrent_layer"]

_NORMS = {None: Norm.NONE, "batch": Norm.BATCH, "layer": Norm.LAYER}


def _clip_value(clip, name):
    if clip is None:
        return math.inf
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not clip > 0:
        raise ValueError(f"{name} must be None or a positive number, got {clip!r}")
    return float(clip)


def _cell(cell):
    try:
        return Cell(cell)
    except (ValueError, TypeError):
        raise ValueError(f"rnnfused: cell must be one of {', '.join(c.name for c in Cell)} "
                         f"(rnnfused.functional.Cell), got {cell!r}") from None


def _autocast(tensors, device_type):
    """What torch's autocast does to the inputs of an op it runs in lower precision: floating
    tensors other than float64 are cast to the autocast dtype (the casts are differentiable,
    so float32 parameters still get their gradients)."""
    if not (torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return [t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t
            for t in tensors]


def _needs_differentiable_equations(tensors):
    """True under a torch.func transform or with forward-mode AD tangents: the fused operators
    have formulas for reverse-mode autograd only."""
    if torch.compiler.is_compiling():
        return False
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return True
    return forward_ad._current_level >= 0 and any(
        t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors)


# The fused normalized layers have not yet run on a GPU: until a GPU run of tests/test_norm.py
# passes and sets this, CUDA computes normalized layers through the reference equations
# (exact, slower), unless RNNFUSED_CUDA_NORM=fused asks for the fused kernels.
_FUSED_NORM_VERIFIED_ON_CUDA = False


def fused_norm_on(device):
    """Whether normalized layers on ``device`` run the fused kernels, or else the reference
    equations (CUDA, until the fused kernels have passed their tests on a GPU)."""
    return (torch.device(device).type != "cuda" or _FUSED_NORM_VERIFIED_ON_CUDA
            or os.environ.get("RNNFUSED_CUDA_NORM") == "fused")


def _norm_kind(norm):
    if isinstance(norm, str) and norm in _NORMS or norm is None:
        return _NORMS[norm]
    raise ValueError(f"norm must be None, 'batch' or 'layer', got {norm!r}")


def _step_statistics(running_stats, steps, dtype):
    """Running statistics kept for steps 0..max_steps-1 ([max_steps, *]) as the kernels read
    them, one row per step [T, *]: steps from max_steps on use the last row."""
    index = torch.arange(steps, device=running_stats[0].device).clamp_(max=running_stats[0].size(0) - 1)
    return [r.index_select(0, index).to(dtype) for r in running_stats]


def _update_running_stats(running_stats, batch_stats, counts, momentum):
    """As nn.BatchNorm1d, per step t < max_steps with at least 2 active rows:
    running[t] = (1 - momentum) running[t] + momentum stat[t], the variance unbiased."""
    with torch.no_grad():
        steps = min(counts.numel(), running_stats[0].size(0))
        device, dtype = running_stats[0].device, running_stats[0].dtype
        n = counts[:steps].to(device=device, dtype=dtype).unsqueeze(1)
        for k, (running, stat) in enumerate(zip(running_stats, batch_stats)):
            stat = stat[:steps].to(dtype)
            if k % 2:
                stat = stat * n / (n - 1).clamp(min=1)
            rows = running[:steps]
            rows.copy_(torch.where(n >= 2, torch.lerp(rows, stat, momentum), rows))


def _reference_layer(cell, x, batch_sizes, h0, c0, weights, has_biases, reverse, cell_clip, grad_clip,
                     normalization=None):
    """The layer through rnnfused.reference (differentiable torch operations), in the fused
    layer's layout: x [T, B, I], or packed rows [N, I] with ``batch_sizes``. ``normalization``:
    (norm, norm_weights, step_statistics, training, eps) of a normalized layer. Returns (y, h_n,
    c_n, batch_stats) (batch_stats as the operator's, for batch norm in training)."""
    mode, reset_after = ("GRU", False) if cell == Cell.GRU_CHO else (cell.name, True)
    names = ["w_ih", "w_hh"] + (["b_ih", "b_hh"] if has_biases else [])
    named = dict(zip(names, weights))
    named["w_hr"] = weights[len(names)] if len(weights) > len(names) else None
    for name in ("b_ih", "b_hh"):
        named.setdefault(name, None)
    norm = None
    if normalization is not None and normalization[0] != Norm.NONE:
        kind, norm_weights, step_statistics, training, eps = normalization
        norm = reference.Normalization("batch" if kind == Norm.BATCH else "layer", *norm_weights, eps=eps,
                                       training=training, running=list(step_statistics) or None)
    options = dict(reverse=reverse, reset_after=reset_after, norm=norm,
                   cell_clip=None if math.isinf(cell_clip) else cell_clip,
                   grad_clip=None if math.isinf(grad_clip) else grad_clip)
    if batch_sizes is None:
        y, h_n, c_n = reference.layer(mode, x, h0, c0, named, **options)
    else:
        padded, lengths = pad_packed_sequence(PackedSequence(x, batch_sizes))  # the packed (sorted) order
        y, h_n, c_n = reference.layer(mode, padded, h0, c0, named, lengths=lengths, **options)
        y = torch.cat([y[t, :n] for t, n in enumerate(batch_sizes.tolist())])
    batch_stats = norm.batch_stats if norm is not None and norm.kind == "batch" and norm.training else []
    return y, h_n, c_n, batch_stats


def reference_layer_gradients(cell, x, batch_sizes, h0, c0, weights, has_biases, reverse, cell_clip, grad_clip,
                              normalization, dy, dh_n, dc_n, need_dx, need_dh0, need_dc0, need_dweights):
    """(dx, dh0, dc0, dweights) of one layer as a differentiable computation (for
    create_graph=True); None where not needed. ``weights`` and ``need_dweights`` go on with the
    norm weights of ``normalization`` (see _reference_layer)."""
    norm_weights = normalization[1]
    with torch.enable_grad():
        y, h_n, c_n, _ = _reference_layer(cell, x, batch_sizes, h0, c0, weights, has_biases, reverse, cell_clip,
                                          grad_clip, normalization)
    outputs, grad_outputs = [y, h_n], [dy, dh_n]
    if cell == Cell.LSTM:
        outputs.append(c_n)
        grad_outputs.append(dc_n)
    candidates = [(need_dx, x), (need_dh0, h0), (cell == Cell.LSTM and need_dc0, c0)]
    candidates += list(zip(need_dweights, [*weights, *norm_weights]))
    wanted = [t for need, t in candidates if need]
    grads = iter(torch.autograd.grad(outputs, wanted, grad_outputs, create_graph=True, allow_unused=True))
    dx, dh0, dc0, *dweights = [next(grads) if need else None for need, _ in candidates]
    return dx, dh0, dc0, dweights


def recurrent_layer(cell, x, h0, c0, w_ih, w_hh, b_ih=None, b_hh=None, w_hr=None, *,
                    batch_sizes=None, reverse=False, cell_clip=None, grad_clip=None,
                    norm=None, norm_weights=(), running_stats=(), training=True, momentum=0.1, eps=1e-5):
    """One recurrent layer in one direction, fused forward and backward.

    Args:
        cell: an ``rnnfused.functional.Cell`` (LSTM, GRU, GRU_CHO, RNN_TANH, RNN_RELU).
        x: ``[T, B, I]`` padded input, or ``[N, I]`` packed rows when ``batch_sizes`` is given
            (the data and batch_sizes of a ``PackedSequence``).
        h0: ``[B, P]`` initial hidden state (P = projection size, else H).
        c0: ``[B, H]`` initial cell state (LSTM only; None for the other cells).
        w_ih, w_hh, b_ih, b_hh, w_hr: weights in torch.nn's layout (``[G, I]``, ``[G, P]``,
            ``[G]``, ``[G]``, ``[P, H]``; G = 4H LSTM, 3H GRU, H RNN); both biases or neither.
        reverse: walk the sequence from its end (the reverse direction of a bidirectional layer).
        cell_clip: LSTM only, clamp c_t to [-cell_clip, cell_clip].
        grad_clip: clamp the gradient of every gate pre-activation to [-grad_clip, grad_clip].
        norm: None, ``"batch"`` or ``"layer"``: a normalized layer (see :mod:`rnnfused.modules`).
        norm_weights: normalized layers, ``[gamma_x, gamma_h]`` ``[G]`` (+ LSTM ``[gamma_c,
            beta_c]`` ``[H]``).
        running_stats: batch norm, the running statistics ``[mean_x, var_x, mean_h, var_h]``
            ``[max_steps, G]`` (+ LSTM ``[mean_c, var_c]`` ``[max_steps, H]``) of time steps
            0..max_steps-1 (later steps use the last row). Read in eval (``training`` False) and
            at training steps with a single active row; updated in place in training, as
            ``torch.nn.functional.batch_norm`` does, with ``momentum``.
        eps: added to the variance of every normalization.

    Under autocast the floating inputs other than float64 are cast to the autocast dtype,
    as torch's autocast does for an op that runs in lower precision.

    Returns:
        ``(y, h_n, c_n)``: y ``[T, B, P]`` or ``[N, P]``, h_n ``[B, P]``, c_n ``[B, H]`` (LSTM)
        or None.
    """
    cell = _cell(cell)
    is_lstm = cell == Cell.LSTM
    if cell_clip is not None and not is_lstm:
        raise ValueError("cell_clip is only supported for LSTM")
    if (c0 is None) == is_lstm:
        raise ValueError("rnnfused: LSTM needs c0" if is_lstm else f"rnnfused: c0 is only for LSTM, not {cell.name}")
    if (b_ih is None) != (b_hh is None):
        raise ValueError("rnnfused: give both biases or neither")
    if w_hr is not None and not is_lstm:
        raise ValueError("rnnfused: projections (w_hr) exist only for LSTM")
    cell_clip = _clip_value(cell_clip, "cell_clip")
    grad_clip = _clip_value(grad_clip, "grad_clip")
    norm = _norm_kind(norm)
    norm_weights, running_stats = list(norm_weights), list(running_stats)
    if norm == Norm.BATCH:
        if not running_stats:
            raise ValueError("rnnfused: batch norm needs running_stats (the statistics of every step)")
        if training and h0.size(0) < 2:
            raise ValueError("Expected more than 1 value per channel when training, got input size "
                             f"{torch.Size([h0.size(0), w_ih.size(0)])}")
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, *norm_weights = _autocast(
        (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, *norm_weights), x.device.type)
    has_biases = b_ih is not None
    weights = [w for w in (w_ih, w_hh, b_ih, b_hh, w_hr) if w is not None]
    tensors = (x, h0, c0, *weights, *norm_weights)
    steps = batch_sizes.numel() if batch_sizes is not None else x.size(0)
    step_statistics = _step_statistics(running_stats, steps, x.dtype) if norm == Norm.BATCH and running_stats else []
    normalization = dict(norm=norm, norm_weights=norm_weights, running_stats=step_statistics, training=training,
                         eps=eps)
    unverified = norm != Norm.NONE and not fused_norm_on(x.device)
    if unverified:
        warnings.warn("rnnfused: normalized layers on CUDA run the reference equations (exact, slower) until "
                      "their fused kernels have passed their GPU tests; RNNFUSED_CUDA_NORM=fused runs those")
    if unverified or _needs_differentiable_equations(tensors):
        y, h_n, c_n, batch_stats = _reference_layer(cell, x, batch_sizes, h0, c0, weights, has_biases, reverse,
                                                    cell_clip, grad_clip, tuple(normalization.values()))
    else:
        options = dict(has_biases=has_biases, reverse=reverse, cell_clip=cell_clip, grad_clip=grad_clip,
                       **normalization)
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
            y, h_n, c_n, *_, batch_stats = _ops.differentiable_layer_forward(cell, x, batch_sizes, h0, c0, weights,
                                                                             **options)
        else:
            y, h_n, c_n, *_, batch_stats = _ops.layer_forward(cell, x, batch_sizes, h0, c0, weights,
                                                              save_for_backward=False, **options)
    if norm == Norm.BATCH and training:
        counts = batch_sizes if batch_sizes is not None else torch.full((steps,), x.size(1))
        _update_running_stats(running_stats, batch_stats, counts, momentum)
    return y, h_n, (c_n if is_lstm else None)
