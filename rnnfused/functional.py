"""One recurrent layer in one direction on the fused kernels, with autograd.

:func:`recurrent_layer` is the building block of :mod:`rnnfused.modules`; it can be used
directly to run a single layer with explicit weights. The fused operators
(``torch.ops.rnnfused.layer_forward`` / ``layer_backward``, see :mod:`rnnfused._ops`) carry
ordinary training, ``torch.compile`` and ``torch.export``. What they have no rule for,
double backward, forward-mode AD and the ``torch.func`` transforms, runs through the same
equations written with differentiable torch operations (:mod:`rnnfused.reference`).
"""

import dataclasses
import math
import os
import warnings

import torch
from torch.autograd import forward_ad
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from . import _ops, reference
from . import regularisers as _regularisers
from ._ops import STEP_INACTIVE, STEP_RESET, Cell, LayerOptions, Norm

__all__ = ["Cell", "recurrent_layer", "step_flags"]

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


@torch.compiler.assume_constant_result
def _onednn_kernels():
    """(oneDNN on, its bfloat16 kernels, its float16 kernels) on this CPU; torch.compile reads
    it once per trace (it cannot trace torch.backends.mkldnn)."""
    on = torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
    return on, on and torch.ops.mkldnn._is_mkldnn_bf16_supported(), on and torch.ops.mkldnn._is_mkldnn_fp16_supported()


def _onednn_lstm(x):
    """Whether torch.nn's CPU LSTM (no projection) runs ``x`` on oneDNN (torch's use_mkldnn
    in aten/src/ATen/native/RNN.cpp): oneDNN on, a non-empty float32 input (bfloat16 where
    oneDNN has bfloat16 kernels, float16 where it has float16 kernels and without autograd)."""
    on, bfloat16, float16 = _onednn_kernels()
    if not on or x.numel() == 0:
        return False
    if x.dtype == torch.bfloat16:
        return bfloat16
    if x.dtype == torch.float16:
        return float16 and not torch.is_grad_enabled()
    return x.dtype == torch.float32


def autocast_result_dtypes(kind, x, h_dtype, c_dtype=None):
    """The dtypes torch.nn's ``kind`` ("LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell";
    "LSTMP": an LSTM with projection) returns under autocast for input ``x`` and states of
    ``h_dtype`` / ``c_dtype``, as ``(output and h, c)``; None where they are the autocast dtype
    that our layers return (autocast off for x's device, float64, CUDA, the Elman RNN).

    On CUDA every recurrent op is on autocast's lower-precision list (``_cudnn_rnn`` and the
    fused cells, ``lstm_cell`` and the other cells), so all results are in the autocast dtype.
    On the CPU only the products (``linear``) and oneDNN's LSTM layer are on it, and torch.nn's
    cell equations promote them with the states they meet: the GRU's h' = (1 - z) n + z h and
    the LSTM's c' = f c + i g, h' = o tanh(c') take the dtype of the state (float32 states give
    float32 results); the projection h = W_hr m is a product again (autocast dtype); the Elman
    cell is two products and its nonlinearity (autocast dtype); an LSTM without projection
    runs oneDNN's layer where torch would (autocast dtype), else the cell equations."""
    if not torch.is_autocast_enabled("cpu") or x.device.type != "cpu" or x.dtype == torch.float64:
        return None
    low = torch.get_autocast_dtype("cpu")
    if kind in ("GRU", "GRUCell"):
        return torch.promote_types(h_dtype, low), None
    if kind == "LSTMCell" or (kind == "LSTM" and not _onednn_lstm(x)):
        state = torch.promote_types(c_dtype, low)
        return state, state
    if kind == "LSTMP":
        return low, torch.promote_types(c_dtype, low)
    return None


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
        n = _ops.to_device(counts[:steps], device).to(dtype).unsqueeze(1)
        for k, (running, stat) in enumerate(zip(running_stats, batch_stats)):
            stat = stat[:steps].to(dtype)
            if k % 2:
                stat = stat * n / (n - 1).clamp(min=1)
            rows = running[:steps]
            rows.copy_(torch.where(n >= 2, torch.lerp(rows, stat, momentum), rows))


def check_lengths(lengths, steps, batch):
    """``lengths`` as an int64 tensor [batch], checked as torch.nn's pack functions check them:
    every length in 1..steps. Lengths on the CPU are checked at once; on a device (no host
    sync) by a device-side assertion."""
    if not isinstance(lengths, torch.Tensor):
        lengths = torch.as_tensor(lengths, dtype=torch.int64)
    if lengths.dim() != 1 or lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
        raise ValueError(f"lengths must be a 1-D integer tensor of one length per sequence, got a "
                         f"{lengths.dim()}-D {lengths.dtype} tensor")
    if lengths.size(0) != batch:
        raise RuntimeError(f"Expected `len(lengths)` to be equal to batch_size, but got {lengths.size(0)} "
                           f"(batch_size={batch})")
    lengths = lengths.to(torch.int64)
    if lengths.device.type == "cpu" and not torch.compiler.is_compiling():
        if batch and int(lengths.min()) <= 0:
            raise RuntimeError("Length of all samples has to be greater than 0, but found an element in 'lengths' "
                               "that is <= 0")
        if batch and int(lengths.max()) > steps:
            raise RuntimeError(f"rnnfused: lengths must not exceed the sequence length {steps}, got "
                               f"{int(lengths.max())}")
    elif batch:
        torch._assert_async(((lengths > 0) & (lengths <= steps)).all(),
                            f"rnnfused: every length must be in 1..{steps} (the sequence length)")
    return lengths


def check_resets(resets, steps, batch):
    """``resets`` as a bool tensor [steps, batch] (time-major), checked."""
    if not isinstance(resets, torch.Tensor):
        raise TypeError(f"resets must be a bool tensor, got {type(resets).__name__}")
    if resets.dtype.is_floating_point or resets.dtype.is_complex:
        raise ValueError(f"resets must be a bool tensor, got {resets.dtype}")
    if tuple(resets.shape) != (steps, batch):
        raise ValueError(f"resets must have one flag per step and sequence, shape {(steps, batch)} "
                         f"(time-major), got {tuple(resets.shape)}")
    return resets.bool()


def step_flags(steps, batch, device, *, lengths=None, resets=None, reverse=False):
    """The operators' step flags of one direction for padded input of ``steps`` x ``batch``:
    int32 [steps, batch] on ``device`` (None without lengths and resets), computed on the
    device without a host sync.

    lengths [batch] (checked, see :func:`check_lengths`): steps t >= lengths[b] of sequence b are
    inactive (its state held, its output zero), so the forward direction ends each sequence at
    its own last step and the reverse direction starts it there from h0. resets [steps, batch]
    bool (time-major; checked, see :func:`check_resets`): a new segment starts at every step t
    where it is True: the forward direction starts it from zero states; the reverse direction
    starts its walk through the previous segment from zero states at that segment's last step
    (t - 1). Resets at steps past a sequence's length are ignored.
    """
    if lengths is None and resets is None:
        return None
    inactive = None
    if lengths is not None:
        inactive = torch.arange(steps, device=device).unsqueeze(1) >= _ops.to_device(lengths, device).unsqueeze(0)
    if resets is not None:
        starts = _ops.to_device(resets, device)
        if inactive is not None:
            starts = starts & ~inactive
        if reverse:
            starts = torch.cat([starts[1:], torch.zeros_like(starts[:1])])
        flags = starts.to(torch.int32) * STEP_RESET
        return flags if inactive is None else flags + inactive.to(torch.int32) * STEP_INACTIVE
    return inactive.to(torch.int32) * STEP_INACTIVE


def _reference_layer(options, x, batch_sizes, h0, c0, weights, norm_weights=(), step_statistics=(), flags=None,
                     masks=None):
    """The layer through rnnfused.reference (differentiable torch operations), in the fused
    layer's layout: x [T, B, I], or packed rows [N, I] with ``batch_sizes``; the arguments as
    the operator's (``step_statistics``: batch norm's running statistics of every step;
    ``masks``: the regularisers' rnnfused.regularisers.Masks inside the steps, or None).
    Returns (y, h_n, c_n, batch_stats), batch_stats as the operator's (batch norm in training)."""
    mode, reset_after = ("GRU", False) if options.cell == Cell.GRU_CHO else (options.cell.name, True)
    names = ["w_ih", "w_hh"] + (["b_ih", "b_hh"] if options.has_biases else [])
    named = dict(zip(names, weights))
    named["w_hr"] = weights[len(names)] if len(weights) > len(names) else None
    for name in ("b_ih", "b_hh"):
        named.setdefault(name, None)
    norm = None
    if options.norm != Norm.NONE:
        norm = reference.Normalization("batch" if options.norm == Norm.BATCH else "layer", *norm_weights,
                                       eps=options.eps, training=options.training,
                                       running=list(step_statistics) or None)
    kwargs = dict(reverse=options.reverse, reset_after=reset_after, norm=norm,
                  cell_clip=None if math.isinf(options.cell_clip) else options.cell_clip,
                  grad_clip=None if math.isinf(options.grad_clip) else options.grad_clip)
    if batch_sizes is None:
        y, h_n, c_n = reference.layer(mode, x, h0, c0, named, step_flags=flags, masks=masks, **kwargs)
    else:
        padded, lengths = pad_packed_sequence(PackedSequence(x, batch_sizes))  # the packed (sorted) order
        y, h_n, c_n = reference.layer(mode, padded, h0, c0, named, lengths=lengths, masks=masks, **kwargs)
        y = torch.cat([y[t, :n] for t, n in enumerate(batch_sizes.tolist())])
    batch_stats = norm.batch_stats if norm is not None and norm.kind == "batch" and norm.training else []
    return y, h_n, c_n, batch_stats


def reference_layer_gradients(options, x, batch_sizes, h0, c0, weights, norm_weights, step_statistics, flags,
                              masks, dy, dh_n, dc_n, need_dx, need_dh0, need_dc0, need_dweights):
    """(dx, dh0, dc0, dweights) of one layer as a differentiable computation (for
    create_graph=True); None where not needed. ``masks`` as the operators'; ``need_dweights``
    covers ``weights`` and then ``norm_weights``."""
    steps_masks = _regularisers.Masks(None, *(m if _ops.mask_given(m) else None for m in masks)) if masks else None
    with torch.enable_grad():
        y, h_n, c_n, _ = _reference_layer(options, x, batch_sizes, h0, c0, weights, norm_weights, step_statistics,
                                          flags, steps_masks)
    outputs, grad_outputs = [y, h_n], [dy, dh_n]
    is_lstm = options.cell == Cell.LSTM
    if is_lstm:
        outputs.append(c_n)
        grad_outputs.append(dc_n)
    candidates = [(need_dx, x), (need_dh0, h0), (is_lstm and need_dc0, c0)]
    candidates += list(zip(need_dweights, [*weights, *norm_weights]))
    wanted = [t for need, t in candidates if need]
    grads = iter(torch.autograd.grad(outputs, wanted, grad_outputs, create_graph=True, allow_unused=True))
    dx, dh0, dc0, *dweights = [next(grads) if need else None for need, _ in candidates]
    return dx, dh0, dc0, dweights


def recurrent_layer(cell, x, h0, c0, w_ih, w_hh, b_ih=None, b_hh=None, w_hr=None, *,
                    batch_sizes=None, reverse=False, cell_clip=None, grad_clip=None,
                    norm=None, norm_weights=(), running_stats=(), training=True, momentum=0.1, eps=1e-5,
                    lengths=None, resets=None, reference=False):
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
        lengths: padded input only, ``[B]`` integers in 1..T: sequence b ends at step lengths[b] - 1
            (outputs past it are zero, h_n is its state there; the reverse direction starts
            there from h0), as torch.nn run on the packed sequence.
        resets: padded input only, ``[T, B]`` bool: a new segment starts at every step where it is
            True, exactly as if each segment were a sequence of its own (see :func:`step_flags`).
        reference: compute through the reference equations (differentiable torch operations)
            instead of the fused kernels.

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
    norm = _norm_kind(norm)
    if norm == Norm.BATCH and not running_stats:
        raise ValueError("rnnfused: batch norm needs running_stats (the statistics of every step)")
    options = LayerOptions(cell, has_biases=b_ih is not None, reverse=bool(reverse),
                           cell_clip=_clip_value(cell_clip, "cell_clip"), grad_clip=_clip_value(grad_clip, "grad_clip"),
                           norm=norm, training=bool(training), eps=eps)
    weights = [w for w in (w_ih, w_hh, b_ih, b_hh, w_hr) if w is not None]
    flags = None
    if lengths is not None or resets is not None:
        if batch_sizes is not None:
            raise ValueError("rnnfused: lengths and resets are for padded input, not packed rows")
        steps, batch = x.size(0), x.size(1)
        flags = step_flags(steps, batch, x.device, reverse=bool(reverse),
                           lengths=None if lengths is None else check_lengths(lengths, steps, batch),
                           resets=None if resets is None else check_resets(resets, steps, batch))
    y, h_n, c_n = run_layer(options, x, batch_sizes, h0, c0, weights, norm_weights, running_stats, momentum, flags,
                            reference)
    return y, h_n, (c_n if is_lstm else None)


def _recording_for_backward(tensors):
    """Whether the operator saves for backward: when autograd records, and always under
    torch.jit.trace (a module traced under no_grad or in eval can then still be differentiated,
    and trace's check records the same graph), but not when tracing for ONNX (an inference
    graph)."""
    if torch.jit.is_tracing():
        return not torch.onnx.is_in_onnx_export()
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _fused_masks_run(options, masks):
    """Whether the fused kernels take these masks inside the steps: not zoneout in a normalized
    layer (its statistics are of the state before zoneout), and not when exporting or tracing,
    whose graphs (ONNX, TorchScript) hold the equations instead."""
    if options.norm != Norm.NONE and (masks.keep_h is not None or masks.keep_c is not None):
        return False
    return not (torch.compiler.is_exporting() or torch.jit.is_tracing())


def _operator_masks(masks, x, h0, c0, steps):
    """The operators' ``[recurrent_mask, keep_h, keep_c]`` of a Masks, in the input's dtype (also
    under autocast; absent: shape [0]); zoneout's eval weight (a number) filled in over [T, B, width],
    its drawn form (int64 (seed, threshold)) as it is."""
    def tensor(mask, width):
        if mask is None:
            return x.new_empty(0)
        if isinstance(mask, torch.Tensor):
            return mask if mask.dtype == torch.int64 else mask.to(x.dtype)
        return torch.full((steps, h0.size(0), width), mask, dtype=x.dtype, device=x.device)

    return [tensor(masks.hidden, None), tensor(masks.keep_h, h0.size(1)),
            tensor(masks.keep_c, None if c0 is None else c0.size(1))]


def run_layer(options, x, batch_sizes, h0, c0, weights, norm_weights=(), running_stats=(), momentum=0.1,
              flags=None, reference=False, masks=None):
    """:func:`recurrent_layer` with its arguments checked and grouped: a
    :class:`~rnnfused._ops.LayerOptions`, the weight lists in the operators' order and the step
    flags (rnnfused.modules calls this); ``reference``: run the reference equations (the
    dispatch's choice where no verified fused kernel runs); ``masks``: the regularisers'
    :class:`~rnnfused.regularisers.Masks` of this call or None (weight drop multiplies W_hh
    before the fused kernels, which take the masks inside the steps; the reference equations
    take them where the kernels cannot: with zoneout in a normalized layer, and when exporting
    or tracing). Returns ``(y, h_n, c_n)`` (c_n an empty tensor unless LSTM)."""
    norm_weights, running_stats = list(norm_weights), list(running_stats)
    if masks is not None and masks.weight is not None:
        weights = [weights[0], weights[1] * masks.weight, *weights[2:]]
    steps_masks = dataclasses.replace(masks, weight=None) if masks is not None and masks.inside_steps else None
    if steps_masks is not None and not _fused_masks_run(options, steps_masks):
        reference = True
    if flags is not None and options.norm != Norm.NONE:
        raise ValueError("rnnfused: normalized layers do not take lengths or resets yet")
    if options.norm == Norm.BATCH and options.training and h0.size(0) == 1:  # as nn.BatchNorm1d: B = 0 runs
        raise ValueError("Expected more than 1 value per channel when training, got input size "
                         f"{torch.Size([h0.size(0), weights[0].size(0)])}")
    if torch._C._is_any_autocast_enabled():  # else _autocast changes nothing: skip its repacking
        x, h0, c0, *all_weights = _autocast((x, h0, c0, *weights, *norm_weights), x.device.type)
        weights, norm_weights = all_weights[:len(weights)], all_weights[len(weights):]
    tensors = (x, h0, c0, *weights, *norm_weights)
    steps = batch_sizes.numel() if batch_sizes is not None else x.size(0)
    step_statistics = _step_statistics(running_stats, steps, x.dtype) if options.norm == Norm.BATCH else []
    unverified = options.norm != Norm.NONE and not fused_norm_on(x.device)
    if unverified:
        warnings.warn("rnnfused: normalized layers on CUDA run the reference equations (exact, slower) until "
                      "their fused kernels have passed their GPU tests; RNNFUSED_CUDA_NORM=fused runs those")
    if reference or unverified or _needs_differentiable_equations(tensors):
        # The operators check every size; the equations would broadcast a wrong one.
        _ops.check_layer(options, x, batch_sizes, h0, c0, weights, norm_weights, step_statistics, flags)
        y, h_n, c_n, batch_stats = _reference_layer(options, x, batch_sizes, h0, c0, weights, norm_weights,
                                                    step_statistics, flags, steps_masks)
    else:
        op_masks = () if steps_masks is None else _operator_masks(steps_masks, x, h0, c0, steps)
        if _recording_for_backward(tensors):
            y, h_n, c_n, batch_stats = _ops.differentiable_layer_forward(options, x, batch_sizes, h0, c0, weights,
                                                                         norm_weights, step_statistics, flags,
                                                                         op_masks)
        else:
            y, h_n, c_n, _, batch_stats = _ops.layer_forward(options, x, batch_sizes, h0, c0, weights, norm_weights,
                                                             step_statistics, flags, op_masks,
                                                             save_for_backward=False)
    if options.norm == Norm.BATCH and options.training:
        counts = batch_sizes if batch_sizes is not None else torch.full((steps,), x.size(1))
        _update_running_stats(running_stats, batch_stats, counts, momentum)
    return y, h_n, c_n
