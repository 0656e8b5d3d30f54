"""The operators ``torch.ops.rnnfused.layer_forward`` and ``layer_backward`` (one layer, one
direction), defined in C++ (csrc/bindings.cpp) with CPU and CUDA kernels; their fake
(meta) kernels and autograd formula are registered here.

Shapes follow ``csrc/params.h``: T steps, B batch, N rows (T*B padded, or the packed rows),
I inputs, H hidden units, P = proj_size or H, G gate rows (4H LSTM, 3H GRU, H RNN).
``weights`` is ``[w_ih, w_hh]``, then ``b_ih, b_hh`` when ``has_biases``, then ``w_hr`` for
an LSTM with projection. Outputs that do not apply are empty tensors of shape [0].

Both operators take the tensors first (the weights and the normalization's as lists), then
the scalar options of :class:`LayerOptions` in its field order, then what is particular to
the operator (``save_for_backward``; ``need_dx``, ``need_weights``).

``masks`` are the regularisers inside the steps (:mod:`rnnfused.regularisers`): ``[]``, or
``[recurrent_mask, keep_h, keep_c]`` in the input's dtype, an absent one an empty tensor of
shape [0]:
recurrent_mask [B, P] multiplies h_{t-1} where it meets W_hh (recurrent dropout); keep_h
[T, B, P] and keep_c [T, B, H] (LSTM) are zoneout's weights of the previous state (0/1 in
training, p in eval), or each int64 [2] ``(seed, threshold)``: the kernels draw the 0/1
weights themselves (:func:`rnnfused.regularisers.drawn_keep` gives the same tensor). Packed
input indexes them as padded: row b of step t at [t, b].
"""

import dataclasses
import enum
import math

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


# Bits of ``step_flags`` (int32, one per row of padded input [T, B]), as csrc/params.h.
STEP_RESET = 1  # the state carried into the row's step is zero: a new segment starts there
STEP_INACTIVE = 2  # the row does not step: its state is held, its output is zero, no gradient flows


def to_device(tensor, device):
    """``tensor`` on ``device`` without waiting for the GPU: a CPU tensor bound for a CUDA
    device is copied from pinned memory, asynchronously (a copy from pageable memory first
    waits for the work queued on the stream). ``tensor.to(device)`` under torch.compile and
    in CUDA-graph capture, whose graph would go on reading the pinned block after it is freed."""
    device = torch.device(device)
    if (device.type == "cuda" and tensor.device.type == "cpu" and type(tensor) is torch.Tensor
            and not torch.compiler.is_compiling() and not torch.cuda.is_current_stream_capturing()):
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


@dataclasses.dataclass(frozen=True)
class LayerOptions:
    """The options of one layer direction: the scalar arguments of both operators, in this
    order (C++: ``LayerOptions`` in csrc/params.h).

    cell: the cell and form. has_biases: ``weights`` holds b_ih and b_hh. reverse: walk the
    steps from T-1 down to 0. cell_clip (LSTM): clamp c_t to [-cell_clip, cell_clip];
    grad_clip: clamp the gradient of every gate pre-activation; ``inf`` is off for both.
    norm: a normalized layer; training: batch norm normalizes with each step's own
    statistics (else the given running statistics); eps: added to every variance.
    side_by_side: the recurrences the caller runs at once on the device, this one included
    (a bidirectional layer whose directions run on two CUDA streams: 2); the GPU's persistent
    plans then take a share of the SMs where the planner's cost model says that pays. It
    changes no result beyond what another tiling changes.
    """

    cell: Cell
    has_biases: bool = True
    reverse: bool = False
    cell_clip: float = math.inf
    grad_clip: float = math.inf
    norm: Norm = Norm.NONE
    training: bool = True
    eps: float = 1e-5
    side_by_side: int = 1

    def op_args(self):
        return (int(self.cell), self.has_biases, self.reverse, self.cell_clip, self.grad_clip, int(self.norm),
                self.training, self.eps, self.side_by_side)

    @classmethod
    def from_op_args(cls, cell, has_biases, reverse, cell_clip, grad_clip, norm, training, eps, side_by_side):
        return cls(Cell(cell), has_biases, reverse, cell_clip, grad_clip, Norm(norm), training, eps, side_by_side)


NUM_OPTIONS = len(dataclasses.fields(LayerOptions))
_LAYER_FORWARD = torch.ops.rnnfused.layer_forward.default
_LAYER_BACKWARD = torch.ops.rnnfused.layer_backward.default


def layer_forward(options, x, batch_sizes, h0, c0, weights, norm_weights=(), running_stats=(), step_flags=None,
                  masks=(), *, save_for_backward):
    """Runs one layer in one direction.

    x is [T, B, I] (padded, ``batch_sizes`` None) or [N, I] (packed, ``batch_sizes`` the int64
    CPU tensor of a PackedSequence); h0 [B, P]; c0 [B, H] for LSTM, else None.
    Normalized layers: ``norm_weights`` is ``[gamma_x, gamma_h]`` [G] (+ LSTM ``[gamma_c,
    beta_c]`` [H]); batch norm takes ``running_stats``, the statistics of every step
    ``[mean_x, var_x, mean_h, var_h]`` [T, G] (+ LSTM ``[mean_c, var_c]`` [T, H]), used in eval
    and at training steps with a single active row. ``step_flags`` (padded input only): int32
    [T, B] of STEP_RESET / STEP_INACTIVE bits, or None. ``masks``: see the module docstring.

    Returns ``(y, h_n, c_n, saved, batch_stats)``: y in the layout of x with P features, h_n
    [B, P], c_n [B, H] (LSTM); ``saved``, what backward needs when ``save_for_backward`` (else
    empty): ``[hidden, gates, cells, proj_in, state_new, *norm_saved]``, a private copy of the
    hidden states [N, P], the activations [N, saved * H] (fp32, fp64 for fp64), LSTM cell states
    [N, H], the projection's input [N, H], with zoneout the state before it where backward
    needs it (LSTM with keep_c: c̃ [N, H] accumulation dtype; RNN with keep_h: h̃ [N, H]), and
    for normalized layers x̂ [N, width] and
    1/sqrt(var + eps) of each normalization; ``batch_stats``, batch norm in training: the mean
    and biased variance of every step, in the order of ``running_stats``, in the
    accumulation dtype.
    """
    args = (x, batch_sizes, h0, c0, _as_list(weights), _as_list(norm_weights), _as_list(running_stats), step_flags,
            _as_list(masks), *options.op_args(), save_for_backward)
    if not save_for_backward and not torch.compiler.is_compiling() and not torch.jit.is_tracing():
        # Nothing will be differentiated: skip the operator's autograd kernel (register_autograd's
        # Python wrapper, which would only redispatch; ~30 µs per call, python -m bench.overhead).
        with torch._C._AutoDispatchBelowAutograd():
            return _LAYER_FORWARD(*args)
    return _LAYER_FORWARD(*args)


def _as_list(tensors):
    return tensors if type(tensors) is list else list(tensors)


def layer_backward(options, x, batch_sizes, h0, c0, weights, norm_weights, step_flags, masks, saved, dy, dh_n, dc_n,
                   *, need_dx, need_weights):
    """Gradients of one layer in one direction; ``saved`` as :func:`layer_forward` returned it.
    Returns ``(dx, dh0, dc0, dweights, dnorm_weights)``: dx as x (empty unless ``need_dx``),
    dh0 [B, P], dc0 [B, H] (LSTM), dweights and dnorm_weights shaped as ``weights`` and
    ``norm_weights`` (empty unless ``need_weights``)."""
    args = (x, batch_sizes, h0, c0, _as_list(weights), _as_list(norm_weights), step_flags, _as_list(masks),
            _as_list(saved), dy, dh_n, dc_n, *options.op_args(), need_dx, need_weights)
    if not torch.compiler.is_compiling() and not torch.jit.is_tracing():
        # The gradients are not differentiated (create_graph runs the reference equations):
        # skip autograd's fallback kernel.
        with torch._C._AutoDispatchBelowAutograd():
            return _LAYER_BACKWARD(*args)
    return _LAYER_BACKWARD(*args)


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_devices(x, batch_sizes, named):
    """The device checks of the C++ kernels, for the fake kernels: with a meta tensor among
    the arguments the dispatcher runs the fake kernel even when others are on a real device,
    so every tensor is checked here too."""
    for name, tensor in named:
        if tensor is not None and tensor.device != x.device:
            raise RuntimeError(f"rnnfused: {name} is on {tensor.device} but the input is on {x.device}; "
                               "move both to the same device")
    if batch_sizes is not None and batch_sizes.device.type != "cpu":
        raise RuntimeError("rnnfused: batch_sizes must be a 1-D int64 CPU tensor")


MASK_NAMES = ("recurrent_mask", "keep_h", "keep_c")


def mask_given(mask):
    """Whether an entry of the operators' ``masks`` is given (an absent one has shape [0])."""
    return not (mask.dim() == 1 and mask.shape[0] == 0)


def _named_inputs(weights, has_biases, norm_weights, running_stats, h0, c0, step_flags, masks):
    weight_names = ["weight_ih", "weight_hh"] + (["bias_ih", "bias_hh"] if has_biases else []) + ["weight_hr"]
    return [*zip(weight_names, weights), ("h0", h0), ("c0", c0), ("step_flags", step_flags), *zip(MASK_NAMES, masks),
            *((f"norm_weights[{i}]", w) for i, w in enumerate(norm_weights)),
            *((f"running_stats[{i}]", r) for i, r in enumerate(running_stats))]


_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _check_shape(tensor, name, shape, dtype):
    """As bindings.cpp's prepare(): ``tensor`` has ``shape`` and ``dtype``. One check per
    dimension through torch._check, so that symbolic sizes (torch.compile) become guards or
    run-time assertions instead of errors."""
    def message():
        return f"rnnfused: {name} must have shape {list(shape)}, got {list(tensor.shape)}"
    torch._check(tensor.dim() == len(shape), message)
    for actual, expected in zip(tensor.shape, shape):
        torch._check(actual == expected, message)
    if tensor.dtype != dtype:
        raise RuntimeError(f"rnnfused: {name} has dtype {tensor.dtype} but must be {dtype}")


def checked_options(cell, has_biases, reverse, cell_clip, grad_clip, norm, training, eps, side_by_side):
    """The operators' scalar options as a LayerOptions, checked as bindings.cpp's
    layer_options() checks them (for the fake kernels)."""
    if not 0 <= cell < len(Cell):
        raise ValueError(f"rnnfused: cell must be one of 0..{len(Cell) - 1} (rnnfused.functional.Cell), got {cell}")
    if not cell_clip > 0:
        raise ValueError(f"rnnfused: cell_clip must be positive (infinity = off), got {cell_clip}")
    if not math.isinf(cell_clip) and cell != Cell.LSTM:
        raise ValueError("rnnfused: cell_clip is only supported for LSTM")
    if not grad_clip > 0:
        raise ValueError(f"rnnfused: grad_clip must be positive (infinity = off), got {grad_clip}")
    if norm not in (0, 1, 2):
        raise ValueError(f"rnnfused: norm must be 0 (none), 1 (batch) or 2 (layer), got {norm}")
    if not eps > 0:
        raise ValueError(f"rnnfused: eps must be positive, got {eps}")
    if not side_by_side >= 1:
        raise ValueError(f"rnnfused: side_by_side must be at least 1 (this recurrence), got {side_by_side}")
    return LayerOptions.from_op_args(cell, has_biases, reverse, cell_clip, grad_clip, norm, training, eps,
                                     side_by_side)


def check_layer(options, x, batch_sizes, h0, c0, weights, norm_weights=(), running_stats=(), step_flags=None,
                masks=()):
    """Every count, size and dtype check of the C++ operators (csrc/bindings.cpp:
    prepare_layer, prepare_norm, attach_running_stats), with their messages and exception
    types, for what does not reach them: the fake kernels (meta tensors, torch.compile) and the
    reference equations, which would otherwise broadcast a wrong size into a wrong result.
    Returns the sizes ``(T, B, N, I, H, P, G)`` (params.h)."""
    cell = options.cell
    expected = 4 if options.has_biases else 2
    if len(weights) not in (expected, expected + 1):
        biases = ", b_ih, b_hh" if options.has_biases else ""
        raise RuntimeError(f"rnnfused: expected {expected} weights (w_ih, w_hh{biases}) or {expected + 1} with w_hr, "
                           f"got {len(weights)}")
    w_ih, w_hh = weights[0], weights[1]
    w_hr = weights[expected] if len(weights) > expected else None
    if h0.dim() != 2:
        raise RuntimeError(f"rnnfused: h0 must be 2-D [batch, hidden], got {h0.dim()}-D")
    if batch_sizes is not None:
        if x.dim() != 2:
            raise RuntimeError(f"rnnfused: packed input must be 2-D [rows, features], got {x.dim()}-D")
        if batch_sizes.dim() != 1 or batch_sizes.dtype != torch.int64 or batch_sizes.device.type != "cpu":
            raise RuntimeError("rnnfused: batch_sizes must be a 1-D int64 CPU tensor")
        torch._check(batch_sizes.shape[0] > 0, lambda: "Expected sequence length to be larger than 0 in RNN")
        steps, batch, rows = batch_sizes.shape[0], h0.shape[0], x.shape[0]
        if type(batch_sizes) is torch.Tensor:  # its values are known (not a FakeTensor of torch.compile)
            sizes = batch_sizes.tolist()
            if any(n < 0 for n in sizes) or any(b > a for a, b in zip(sizes, sizes[1:])):
                raise RuntimeError("rnnfused: batch_sizes must be non-negative and non-increasing")
            if sum(sizes) != rows:
                raise RuntimeError(f"rnnfused: batch_sizes sum to {sum(sizes)} but the input has {rows} rows")
            if sizes[0] != batch:
                raise RuntimeError(f"rnnfused: batch_sizes[0] is {sizes[0]} but h0 has {batch} rows")
    else:
        if x.dim() != 3:
            raise RuntimeError(f"rnnfused: input must be 3-D [seq, batch, features], got {x.dim()}-D")
        torch._check(x.shape[0] > 0, lambda: "Expected sequence length to be larger than 0 in RNN")
        steps, batch, rows = x.shape[0], x.shape[1], x.shape[0] * x.shape[1]
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"rnnfused: expected a float32, float64, float16 or bfloat16 input, got {x.dtype}")
    gates = GATES_PER_UNIT[cell]
    if w_ih.dim() != 2 or w_hh.dim() != 2:
        raise RuntimeError("rnnfused: weight_ih must be [gates * hidden, input], weight_hh [gates * hidden, hidden]")
    torch._check(w_ih.shape[0] % gates == 0,
                 lambda: "rnnfused: weight_ih must be [gates * hidden, input], weight_hh [gates * hidden, hidden]")
    gate_rows = w_ih.shape[0]
    hidden = gate_rows // gates
    inputs = x.shape[-1]
    if w_hr is not None and cell != Cell.LSTM:
        raise ValueError("rnnfused: projections exist only for LSTM")
    if w_hr is not None and w_hr.dim() != 2:
        raise RuntimeError(f"rnnfused: weight_hr must have shape [proj_size, {hidden}], got {list(w_hr.shape)}")
    width = w_hr.shape[0] if w_hr is not None else hidden
    _check_shape(w_ih, "weight_ih", (gate_rows, inputs), x.dtype)
    _check_shape(w_hh, "weight_hh", (gate_rows, width), x.dtype)
    if options.has_biases:
        _check_shape(weights[2], "bias_ih", (gate_rows,), x.dtype)
        _check_shape(weights[3], "bias_hh", (gate_rows,), x.dtype)
    if w_hr is not None:
        _check_shape(w_hr, "weight_hr", (width, hidden), x.dtype)
    if step_flags is not None:
        if batch_sizes is not None:
            raise ValueError("rnnfused: step_flags are for padded input; packed input has none")
        _check_shape(step_flags, "step_flags", (steps, batch), torch.int32)
    _check_shape(h0, "h0", (batch, width), x.dtype)
    if cell == Cell.LSTM:
        if c0 is None:
            raise ValueError("rnnfused: LSTM needs c0")
        _check_shape(c0, "c0", (batch, hidden), x.dtype)
    elif c0 is not None:
        raise ValueError("rnnfused: c0 is only for LSTM")
    lstm = cell == Cell.LSTM
    if masks:
        if len(masks) != 3:
            raise ValueError(f"rnnfused: masks are [recurrent_mask, keep_h, keep_c] (an absent one an empty tensor "
                             f"of shape [0]), got {len(masks)} tensors")
        if mask_given(masks[2]) and not lstm:
            raise ValueError("rnnfused: keep_c (zoneout of the cell) is only for LSTM")
        for i, (name, mask, shape) in enumerate(zip(MASK_NAMES, masks,
                                                    ((batch, width), (steps, batch, width), (steps, batch, hidden)))):
            if mask_given(mask):
                drawn = i > 0 and mask.dtype == torch.int64 and mask.shape == (2,)
                _check_shape(mask, name, (2,) if drawn else shape, torch.int64 if drawn else x.dtype)
        if options.norm != Norm.NONE and (mask_given(masks[1]) or mask_given(masks[2])):
            raise ValueError("rnnfused: normalized layers take no zoneout masks (keep_h, keep_c)")
    if options.norm == Norm.NONE:
        if norm_weights:
            raise ValueError("rnnfused: norm weights are only for norm=1 (batch) or 2 (layer)")
        if running_stats:
            raise ValueError("rnnfused: running statistics are only for batch norm (norm=1)")
    else:
        if len(norm_weights) != (4 if lstm else 2):
            raise ValueError(f"rnnfused: a normalized layer needs the norm weights [gamma_x, gamma_h"
                             f"{', gamma_c, beta_c' if lstm else ''}], got {len(norm_weights)} tensors")
        if step_flags is not None:
            raise ValueError("rnnfused: normalized layers take no step_flags (resets or lengths)")
        for i, (name, weight) in enumerate(zip(("gamma_x", "gamma_h", "gamma_c", "beta_c"), norm_weights)):
            _check_shape(weight, name, (gate_rows if i < 2 else hidden,), x.dtype)
    if running_stats is not None and options.norm == Norm.LAYER and running_stats:
        raise ValueError("rnnfused: running statistics are only for batch norm (norm=1)")
    if running_stats is not None and options.norm == Norm.BATCH:
        if options.training:
            torch._check_value(batch != 1, lambda: "Expected more than 1 value per channel when training, got input "
                                                   f"size torch.Size([{batch}, {gate_rows}])")
        if len(running_stats) != (6 if lstm else 4):
            raise ValueError(f"rnnfused: batch norm needs the running statistics of every step [mean_x, var_x, "
                             f"mean_h, var_h{', mean_c, var_c' if lstm else ''}], got {len(running_stats)} tensors")
        names = ("running mean_x", "running var_x", "running mean_h", "running var_h", "running mean_c",
                 "running var_c")
        for i, (name, stat) in enumerate(zip(names, running_stats)):
            _check_shape(stat, name, (steps, gate_rows if i < 4 else hidden), x.dtype)
    return steps, batch, rows, inputs, hidden, width, gate_rows


def _state_new_dtype(cell, masks, dtype):
    """The dtype of the saved state before zoneout (``saved[4]``), None where there is none."""
    if cell == Cell.LSTM and masks and mask_given(masks[2]):
        return _acc_dtype(dtype)
    if cell in (Cell.RNN_TANH, Cell.RNN_RELU) and masks and mask_given(masks[1]):
        return dtype
    return None


def _check_saved(options, x, sizes, projected, masks, saved, dy, dh_n, dc_n):
    """layer_backward's checks of what forward saved and of the incoming gradients (as
    bindings.cpp's layer_backward)."""
    steps, batch, rows, _, hidden, width, gate_rows = sizes
    cell = options.cell
    lstm = cell == Cell.LSTM
    norm_saved = (6 if lstm else 4) if options.norm != Norm.NONE else 0
    if len(saved) != 5 + norm_saved:
        raise RuntimeError(f"rnnfused: backward needs the {5 + norm_saved} tensors forward saved (saved), got "
                           f"{len(saved)}")
    if lstm and dc_n is None:
        raise RuntimeError("rnnfused: LSTM backward needs c0 and the gradient of c_n")
    acc = _acc_dtype(x.dtype)
    y_shape = (rows, width) if x.dim() == 2 else (x.shape[0], x.shape[1], width)
    _check_shape(saved[0], "the saved hidden states", y_shape, x.dtype)
    _check_shape(dy, "grad of output", y_shape, x.dtype)
    if SAVED_PER_UNIT[cell]:
        _check_shape(saved[1], "the saved gates", (rows, SAVED_PER_UNIT[cell] * hidden), acc)
    if lstm:
        _check_shape(saved[2], "the saved cells", (rows, hidden), acc)
        _check_shape(dc_n, "grad of c_n", (batch, hidden), x.dtype)
    if projected:
        _check_shape(saved[3], "the saved projection input", (rows, hidden), x.dtype)
    state_new_dtype = _state_new_dtype(cell, masks, x.dtype)
    if state_new_dtype is not None:
        _check_shape(saved[4], "the saved state before zoneout", (rows, hidden), state_new_dtype)
    _check_shape(dh_n, "grad of h_n", (batch, width), x.dtype)
    widths = (gate_rows, gate_rows, hidden)
    for i in range(norm_saved // 2):
        if options.norm == Norm.BATCH:
            line_shape = (steps, widths[i])
        else:
            line_shape = (rows, 2 if cell == Cell.GRU_CHO else 1) if i == 1 else (rows,)
        name = "xhc"[i]
        _check_shape(saved[5 + 2 * i], f"the saved normalized {name}", (rows, widths[i]), acc)
        _check_shape(saved[6 + 2 * i], f"the saved rstd of {name}", line_shape, acc)


@torch.library.register_fake("rnnfused::layer_forward")
def _layer_forward_fake(x, batch_sizes, h0, c0, weights, norm_weights, running_stats, step_flags, masks, cell,
                        has_biases, reverse, cell_clip, grad_clip, norm, training, eps, side_by_side,
                        save_for_backward):
    options = checked_options(cell, has_biases, reverse, cell_clip, grad_clip, norm, training, eps, side_by_side)
    cell = options.cell
    _check_devices(x, batch_sizes, _named_inputs(weights, has_biases, norm_weights, running_stats, h0, c0, step_flags,
                                                 masks))
    steps, batch, rows, _, hidden_size, width, gate_rows = check_layer(options, x, batch_sizes, h0, c0, weights,
                                                                        norm_weights, running_stats, step_flags, masks)
    acc = _acc_dtype(x.dtype)
    saved_per_unit = SAVED_PER_UNIT[cell]
    projected = len(weights) > (4 if has_biases else 2)  # a given w_hr, whatever its rows (P == H, P == 0)

    def absent():
        return x.new_empty(0)

    y = x.new_empty((*x.shape[:-1], width))
    c_n = x.new_empty(batch, hidden_size) if cell == Cell.LSTM else absent()
    saved, batch_stats = [], []
    if save_for_backward:
        saved = [x.new_empty(y.shape),
                 x.new_empty(rows, saved_per_unit * hidden_size, dtype=acc) if saved_per_unit else absent(),
                 x.new_empty(rows, hidden_size, dtype=acc) if cell == Cell.LSTM else absent(),
                 x.new_empty(rows, hidden_size) if projected else absent()]
        state_new_dtype = _state_new_dtype(cell, masks, x.dtype)
        saved.append(absent() if state_new_dtype is None else x.new_empty(rows, hidden_size, dtype=state_new_dtype))
    if norm != Norm.NONE:
        widths = [gate_rows, gate_rows] + ([hidden_size] if cell == Cell.LSTM else [])
        for side, w in enumerate(widths):
            if norm == Norm.BATCH:
                line_shape = (steps, w)
            else:
                line_shape = (rows, 2 if cell == Cell.GRU_CHO else 1) if side == 1 else (rows,)
            if save_for_backward:
                saved += [x.new_empty(rows, w, dtype=acc), x.new_empty(line_shape, dtype=acc)]
            if norm == Norm.BATCH and training:
                batch_stats += [x.new_empty(steps, w, dtype=acc), x.new_empty(steps, w, dtype=acc)]
    return y, x.new_empty(batch, width), c_n, saved, batch_stats


@torch.library.register_fake("rnnfused::layer_backward")
def _layer_backward_fake(x, batch_sizes, h0, c0, weights, norm_weights, step_flags, masks, saved, dy, dh_n, dc_n,
                         cell, has_biases, reverse, cell_clip, grad_clip, norm, training, eps, side_by_side, need_dx,
                         need_weights):
    options = checked_options(cell, has_biases, reverse, cell_clip, grad_clip, norm, training, eps, side_by_side)
    cell = options.cell
    _check_devices(x, batch_sizes, _named_inputs(weights, has_biases, norm_weights, (), h0, c0, step_flags, masks)
                   + [(f"saved[{i}]", s) for i, s in enumerate(saved)] + [("dy", dy), ("dh_n", dh_n), ("dc_n", dc_n)])
    sizes = check_layer(options, x, batch_sizes, h0, c0, weights, norm_weights, None, step_flags, masks)
    _check_saved(options, x, sizes, len(weights) > (4 if has_biases else 2), masks, saved, dy, dh_n, dc_n)
    hidden_size = sizes[4]
    dx = x.new_empty(x.shape) if need_dx else x.new_empty(0)
    dc0 = x.new_empty(h0.shape[0], hidden_size) if cell == Cell.LSTM else x.new_empty(0)
    dweights = [w.new_empty(w.shape) for w in weights] if need_weights else []
    dnorm_weights = [w.new_empty(w.shape) for w in norm_weights] if need_weights else []
    return dx, x.new_empty(h0.shape), dc0, dweights, dnorm_weights


@torch.library.register_vmap("rnnfused::layer_backward")
def _layer_backward_vmap(info, in_dims, *args):
    """Batched backward (``torch.autograd.grad(..., is_grads_batched=True)``, ``jacobian(...,
    vectorize=True)``, gradcheck's batched check): one fused backward per batch entry, the
    results stacked along dimension 0. The kernels have no batch dimension of their own, and
    the batch cannot join the layer's rows: the weight gradients sum over all rows and batch
    norm couples them."""
    def entry(arg, dim, index):
        if dim is None:
            return arg
        if isinstance(arg, (list, tuple)):
            return [a if d is None else a.select(d, index) for a, d in zip(arg, dim)]
        return arg.select(dim, index)

    results = [torch.ops.rnnfused.layer_backward(*(entry(a, d, i) for a, d in zip(args, in_dims)))
               for i in range(info.batch_size)]
    dx, dh0, dc0, dweights, dnorm_weights = zip(*results)
    dweights = [torch.stack(grads) for grads in zip(*dweights)]
    dnorm_weights = [torch.stack(grads) for grads in zip(*dnorm_weights)]
    output = (torch.stack(dx), torch.stack(dh0), torch.stack(dc0), dweights, dnorm_weights)
    return output, (0, 0, 0, [0] * len(dweights), [0] * len(dnorm_weights))


# The autograd formula, in two wrappers: torch.library.register_autograd's for the operator
# (torch.compile, torch.export and direct calls), and _EagerLayer, the same formula with
# less Python per call (register_autograd's generic wrapper flattens the weight lists with
# pytree on every call: about 150 µs per layer's forward + backward, measured with
# `python -m bench.overhead`).

def _save(ctx, options, x, batch_sizes, h0, c0, weights, norm_weights, running_stats, step_flags, masks, saved,
          batch_stats):
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, batch_sizes, h0, c0, step_flags, *weights, *norm_weights, *running_stats, *masks, *saved)
    ctx.options = options
    ctx.counts = (len(weights), len(norm_weights), len(running_stats), len(masks))


def _gradients(ctx, dy, dh_n, dc_n, need_dx, need_dh0, need_dc0, need_dweights, need_dnorm_weights):
    """(dx, dh0, dc0, dweights + dnorm_weights) of the saved layer; None where not needed."""
    options = ctx.options
    x, batch_sizes, h0, c0, step_flags, *rest = ctx.saved_tensors
    n_weights, n_norm_weights, n_running, n_masks = ctx.counts
    weights = rest[:n_weights]
    norm_weights = rest[n_weights:n_weights + n_norm_weights]
    running_stats = rest[n_weights + n_norm_weights:n_weights + n_norm_weights + n_running]
    masks = rest[n_weights + n_norm_weights + n_running:n_weights + n_norm_weights + n_running + n_masks]
    saved = rest[n_weights + n_norm_weights + n_running + n_masks:]
    if not saved:
        raise RuntimeError("rnnfused: layer_forward ran with save_for_backward=False, so it cannot be "
                           "differentiated; call it with save_for_backward=True")
    dy = torch.zeros_like(saved[0]) if dy is None else dy
    dh_n = torch.zeros_like(h0) if dh_n is None else dh_n
    is_lstm = options.cell == Cell.LSTM
    if is_lstm and dc_n is None:
        dc_n = torch.zeros_like(c0)
    if torch.is_grad_enabled():
        # create_graph=True: the fused backward has no graph of its own, so the gradients are
        # recomputed through the differentiable equations (rnnfused.reference).
        from .functional import reference_layer_gradients
        return reference_layer_gradients(options, x, batch_sizes, h0, c0, weights, norm_weights, running_stats,
                                         step_flags, masks, dy, dh_n, dc_n, need_dx, need_dh0, need_dc0,
                                         need_dweights + need_dnorm_weights)
    need_weights = any(need_dweights) or any(need_dnorm_weights)
    dx, dh0, dc0, dweights, dnorm_weights = layer_backward(
        options, x, batch_sizes, h0, c0, weights, norm_weights, step_flags, masks, saved, dy, dh_n,
        dc_n if is_lstm else None, need_dx=need_dx, need_weights=need_weights)

    def wanted(grads, needs):
        return [g if need else None for g, need in zip(grads, needs)] if need_weights else [None] * len(needs)

    return (dx if need_dx else None, dh0 if need_dh0 else None, dc0 if is_lstm and need_dc0 else None,
            wanted(dweights, need_dweights) + wanted(dnorm_weights, need_dnorm_weights))


# Positions of the operator's inputs (after x, batch_sizes, h0, c0, weights, norm_weights,
# running_stats, step_flags, masks come the options and save_for_backward).
_OPTIONS_AT = 9


def _setup_context(ctx, inputs, output):
    options = LayerOptions.from_op_args(*inputs[_OPTIONS_AT:_OPTIONS_AT + NUM_OPTIONS])
    _, _, _, saved, batch_stats = output
    ctx.mark_non_differentiable(*saved, *batch_stats)
    _save(ctx, options, *inputs[:_OPTIONS_AT], saved, batch_stats)


def _backward(ctx, dy, dh_n, dc_n, *unused):
    needs = ctx.needs_input_grad  # one per input; a list of bools for each list of tensors
    dx, dh0, dc0, dweights = _gradients(ctx, dy, dh_n, dc_n, needs[0], needs[2], needs[3], list(needs[4]),
                                        list(needs[5]))
    n_weights = ctx.counts[0]
    # Lists of inputs get lists of gradients (register_autograd checks the structure).
    return (dx, None, dh0, dc0, dweights[:n_weights], dweights[n_weights:], [None] * ctx.counts[2], None,
            [None] * ctx.counts[3], *[None] * (NUM_OPTIONS + 1))


torch.library.register_autograd("rnnfused::layer_forward", _backward, setup_context=_setup_context)


class _EagerLayer(torch.autograd.Function):
    """layer_forward with save_for_backward=True and the operator's autograd formula, for
    eager mode; the weights and then the norm weights come last, one argument each. Returns
    (y, h_n, c_n, *batch_stats). What backward reads is saved as intermediates, not returned:
    every output of a Function costs autograd some work in the forward and the backward."""

    @staticmethod
    def forward(ctx, options, x, batch_sizes, h0, c0, running_stats, step_flags, masks, n_weights, *all_weights):
        weights, norm_weights = all_weights[:n_weights], all_weights[n_weights:]
        # This Function is the autograd formula: skip the operator's own (a Python wrapper that
        # would only redispatch here, where grad mode is off).
        with torch._C._AutoDispatchBelowAutograd():
            y, h_n, c_n, saved, batch_stats = layer_forward(options, x, batch_sizes, h0, c0, weights, norm_weights,
                                                            running_stats, step_flags, masks, save_for_backward=True)
        _save(ctx, options, x, batch_sizes, h0, c0, weights, norm_weights, running_stats, step_flags, masks, saved,
              batch_stats)
        ctx.mark_non_differentiable(*batch_stats)
        return (y, h_n, c_n, *batch_stats)

    @staticmethod
    def backward(ctx, dy, dh_n, dc_n, *unused):
        needs = ctx.needs_input_grad
        n_weights = ctx.counts[0]
        dx, dh0, dc0, dweights = _gradients(ctx, dy, dh_n, dc_n, needs[1], needs[3], needs[4],
                                            list(needs[9:9 + n_weights]), list(needs[9 + n_weights:]))
        return (None, dx, None, dh0, dc0, None, None, None, None, *dweights)


def differentiable_layer_forward(options, x, batch_sizes, h0, c0, weights, norm_weights=(), running_stats=(),
                                 step_flags=None, masks=()):
    """layer_forward with save_for_backward=True, differentiable: through _EagerLayer in
    eager mode, through the operator's registered autograd when compiling, exporting or
    tracing (torch.jit.trace records operators, not Python autograd Functions).
    Returns ``(y, h_n, c_n, batch_stats)``."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        y, h_n, c_n, _, batch_stats = layer_forward(options, x, batch_sizes, h0, c0, weights, norm_weights,
                                                    running_stats, step_flags, masks, save_for_backward=True)
        return y, h_n, c_n, batch_stats
    output = _EagerLayer.apply(options, x, batch_sizes, h0, c0, running_stats, step_flags, list(masks), len(weights),
                               *weights, *norm_weights)
    return (*output[:3], list(output[3:]))
