"""The recurrent equations as a plain loop over time: the oracle for tests and benchmarks.

Every cell of rnnfused (LSTM with optional projection and cell clip, GRU in both forms,
RNN tanh / relu) with optional gradient clipping, in torch.nn's parameter layout, on any
dtype and device. Gradients come from autograd through the loop. Written for clarity,
not speed, and independent of the fused kernels and of :mod:`rnnfused.modules`.

:func:`forward` runs a whole module's configuration (torch.nn or rnnfused, any layers and
directions, padded, batch_first, unbatched or packed input; rnnfused's normalized layers)
without dropout, and without updating batch norm's running statistics; given the masks an
rnnfused call drew (rnnfused.regularisers), it replays that call's regularisers.
"""

import copy

import torch
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from . import regularisers as _regularisers


class _ClampGrad(torch.autograd.Function):
    """Identity forward; clamps the gradient to [-limit, limit] on the way back. Forward-mode
    AD passes tangents through unchanged (the forward is the identity)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, limit):
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.limit = inputs[1]

    @staticmethod
    def backward(ctx, grad):
        return grad.clamp(-ctx.limit, ctx.limit), None

    @staticmethod
    def jvp(ctx, x_tangent, limit_tangent):
        return x_tangent.view_as(x_tangent)


def clamp_grad(x, limit):
    return x if limit is None else _ClampGrad.apply(x, limit)


def _linear(x, weight, bias=None):
    out = x @ weight.t()
    return out if bias is None else out + bias


class Normalization:
    """A normalized layer's settings for :func:`layer` (the math: :mod:`rnnfused.modules`).

    ``kind`` is ``"batch"`` or ``"layer"``; gamma_x, gamma_h [G], gamma_c, beta_c [H] (LSTM).
    Batch norm normalizes each column over the rows active at a step, with their own
    statistics in training, with ``running`` (the statistics of every time step, ``[mean_x,
    var_x, mean_h, var_h]`` + LSTM ``[mean_c, var_c]``, each [T, *]) in eval and at steps with
    fewer than 2 active rows. After :func:`layer`, ``batch_stats`` holds the mean and biased
    variance each step used, in the order of ``running``, [T, *] (batch norm).
    """

    def __init__(self, kind, gamma_x, gamma_h, gamma_c=None, beta_c=None, *, eps=1e-5, training=True,
                 running=None):
        if kind not in ("batch", "layer"):
            raise ValueError(f"norm must be 'batch' or 'layer', got {kind!r}")
        self.kind, self.eps, self.training, self.running = kind, eps, training, running
        self.gamma = {"x": gamma_x, "h": gamma_h, "c": gamma_c}
        self.beta_c = beta_c
        self.batch_stats = None


class _StepNorm:
    """The normalizations of one step t: ``active`` [B] marks the rows in the step (None: all)."""

    def __init__(self, norm, t, active):
        self.norm, self.t, self.active = norm, t, active
        self.stats = {}

    def __call__(self, side, v, cols=None):
        """N(v) of side "x", "h" or "c" for the columns ``cols`` (a slice; layer norm's group)."""
        norm = self.norm
        cols = cols or slice(0, v.size(1))
        gamma = norm.gamma[side][cols]
        beta = norm.beta_c if side == "c" else None
        if norm.kind == "layer":
            mean = v.mean(1, keepdim=True)
            var = v.var(1, unbiased=False, keepdim=True)
        else:
            rows = v if self.active is None else v[self.active]
            index = {"x": 0, "h": 2, "c": 4}[side]
            if norm.training and rows.size(0) >= 2:
                mean, var = rows.mean(0), rows.var(0, unbiased=False)
            else:
                mean, var = (norm.running[index + k][self.t, cols].to(v.dtype) for k in (0, 1))
            self.stats.setdefault(side, []).append((mean, var))
        out = (v - mean) / torch.sqrt(var + norm.eps) * gamma
        return out if beta is None else out + beta


def _no_norm(side, v, cols=None):
    return v


def cell_step(mode, x, h, c, weights, *, reset_after=True, cell_clip=None, grad_clip=None, norm=None, h_mask=None):
    """One step of one cell for a batch: x [B, I], h [B, P], c [B, H] (LSTM) or None.

    ``weights`` maps w_ih, w_hh, b_ih, b_hh, w_hr to tensors or None. ``norm`` (normalized
    layers, see :class:`Normalization`) is called as ``norm(side, v, cols)``; the biases are
    added after it. ``h_mask`` [B, P] (recurrent dropout) multiplies h where it meets W_hh,
    not in the GRU's carry ``z ⊙ h``. Returns (h', c').
    """
    norm = norm or _no_norm
    w_ih, w_hh, b_ih, b_hh = weights["w_ih"], weights["w_hh"], weights["b_ih"], weights["b_hh"]
    h_in = h if h_mask is None else h * h_mask
    b_ih = 0 if b_ih is None else b_ih
    gx = norm("x", _linear(x, w_ih)) + b_ih
    if mode == "LSTM":
        pre = clamp_grad(gx + norm("h", _linear(h_in, w_hh)) + (0 if b_hh is None else b_hh), grad_clip)
        i, f, g, o = pre.chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        if cell_clip is not None:
            c = c.clamp(-cell_clip, cell_clip)
        h = torch.sigmoid(o) * torch.tanh(norm("c", c))
        if weights["w_hr"] is not None:
            h = _linear(h, weights["w_hr"])
        return h, c
    if mode == "GRU":
        x_r, x_z, x_n = gx.chunk(3, dim=1)
        hidden = h.size(1)
        b_hh = torch.zeros_like(w_hh[:, 0]) if b_hh is None else b_hh
        if reset_after:
            h_r, h_z, h_n = (norm("h", _linear(h_in, w_hh)) + b_hh).chunk(3, dim=1)
        else:  # Cho et al.: W_hn multiplies r * h, normalized apart from the r, z columns
            h_r, h_z = (norm("h", _linear(h_in, w_hh[:2 * hidden]), slice(0, 2 * hidden)) + b_hh[:2 * hidden]).chunk(2, 1)
        r = torch.sigmoid(clamp_grad(x_r + h_r, grad_clip))
        z = torch.sigmoid(clamp_grad(x_z + h_z, grad_clip))
        if reset_after:
            n_pre = x_n + r * h_n
        else:
            n_pre = x_n + norm("h", _linear(r * h_in, w_hh[2 * hidden:]), slice(2 * hidden, 3 * hidden)) \
                + b_hh[2 * hidden:]
        n = torch.tanh(clamp_grad(n_pre, grad_clip))
        return (1 - z) * n + z * h, None
    pre = clamp_grad(gx + norm("h", _linear(h_in, w_hh)) + (0 if b_hh is None else b_hh), grad_clip)
    if mode == "RNN_TANH":
        return torch.tanh(pre), None
    if mode == "RNN_RELU":
        return torch.relu(pre), None
    raise ValueError(f"unknown mode {mode!r}")


# Bits of the operators' step flags (rnnfused._ops.STEP_RESET, STEP_INACTIVE), restated here
# so that the oracle imports nothing of the fast path.
_STEP_RESET, _STEP_INACTIVE = 1, 2


def _step_masks(steps, lengths, resets, reverse, step_flags):
    """(zero_before, active), each [T, B] bool or None: whether the state carried into step t
    is replaced by zeros, and whether the row steps at t at all."""
    if step_flags is not None:
        return (step_flags & _STEP_RESET) != 0, (step_flags & _STEP_INACTIVE) == 0
    active = None
    if lengths is not None:
        active = torch.arange(steps, device=lengths.device).unsqueeze(1) < lengths.unsqueeze(0)
    zero_before = None
    if resets is not None:
        starts = resets.bool() if active is None else resets.bool() & active.to(resets.device)
        if reverse:  # a segment's reverse walk starts at its last step, before the next segment's start
            zero_before = torch.cat([starts[1:], torch.zeros_like(starts[:1])])
        else:
            zero_before = starts
    return zero_before, active


def _zoneout(keep, t, previous, new):
    """Zoneout's ``k ⊙ previous + (1 - k) ⊙ new`` at step t (k: [T, B, *] 0/1, or a number)."""
    if keep is None:
        return new
    k = keep[t] if isinstance(keep, torch.Tensor) else keep
    return k * previous + (1 - k) * new


def layer(mode, x, h0, c0, weights, *, lengths=None, resets=None, step_flags=None, reverse=False, norm=None,
          masks=None, **options):
    """One layer in one direction over padded input.

    x [T, B, I]; lengths [B] (None: all T) marks the valid steps of each sequence. A
    sequence's state stays put outside its valid steps, so the forward direction ends on
    its last valid step and the reverse direction starts from h0 at it. resets [T, B] bool
    (None: none) starts a new segment at every step t where it is True: the forward
    direction runs the segment from zero states, the reverse direction starts its walk
    through the segment from zero states at the segment's last step, exactly as if each
    segment were a sequence of its own (resets past a sequence's length are ignored).
    step_flags [T, B] int32 is the operators' form of the same (rnnfused._ops.STEP_RESET:
    zero states carried into the step; STEP_INACTIVE: the row does not step), in place of
    lengths and resets. ``norm``: a :class:`Normalization` for a normalized layer. ``masks``
    (an rnnfused.regularisers.Masks, None: none): the regularisers' masks of this layer
    direction, in the padded layout. Returns (y [T, B, P] with zeros at padding, h_n [B, P],
    c_n [B, H] or None).
    """
    steps = x.size(0)
    h, c = h0, c0
    outputs = [None] * steps
    step_stats = [None] * steps
    zero_before, active_steps = _step_masks(steps, lengths, resets, reverse, step_flags)
    order = range(steps - 1, -1, -1) if reverse else range(steps)
    h_mask = keep_h = keep_c = None
    if masks is not None:
        if masks.weight is not None:
            weights = dict(weights, w_hh=weights["w_hh"] * masks.weight)
        h_mask = masks.hidden
        keep_h, keep_c = (_regularisers.keep_weights(keep, (steps, *state.shape), x.dtype)
                          for keep, state in ((masks.keep_h, h0), (masks.keep_c, h0 if c0 is None else c0)))
    for t in order:
        active = None if active_steps is None else active_steps[t].to(x.device)
        if zero_before is not None:
            zero = zero_before[t].to(x.device).unsqueeze(1)
            if active is not None:
                zero = zero & active.unsqueeze(1)
            h = torch.where(zero, torch.zeros_like(h), h)
            c = None if c is None else torch.where(zero, torch.zeros_like(c), c)
        step_norm = None if norm is None else _StepNorm(norm, t, active)
        h_new, c_new = cell_step(mode, x[t], h, c, weights, norm=step_norm, h_mask=h_mask, **options)
        h_new, c_new = _zoneout(keep_h, t, h, h_new), (None if c is None else _zoneout(keep_c, t, c, c_new))
        if step_norm is not None:
            step_stats[t] = step_norm.stats
        if active is None:
            h, c = h_new, c_new
            outputs[t] = h
        else:
            h = torch.where(active.unsqueeze(1), h_new, h)
            if c is not None:
                c = torch.where(active.unsqueeze(1), c_new, c)
            outputs[t] = torch.where(active.unsqueeze(1), h_new, torch.zeros_like(h_new))
    if norm is not None and norm.kind == "batch":
        norm.batch_stats = [torch.stack([torch.cat([part[k] for part in stats[side]]) for stats in step_stats])
                            for side in ("x", "h", "c") if side in step_stats[0] for k in (0, 1)]
    return torch.stack(outputs), h, c


def _module_weights(module, layer_index, direction):
    suffix = f"_l{layer_index}" + ("_reverse" if direction == 1 else "")
    names = {"w_ih": "weight_ih", "w_hh": "weight_hh", "b_ih": "bias_ih", "b_hh": "bias_hh",
             "w_hr": "weight_hr"}
    return {key: getattr(module, name + suffix, None) for key, name in names.items()}


def _module_norm(module, index, steps):
    """The Normalization of a normalized rnnfused layer direction (None without norm); the
    running statistics of steps beyond max_steps are those of the last step kept."""
    if getattr(module, "norm", None) is None:
        return None
    running = [getattr(module, name) for name in module._running_stats_names[index]]
    running = [r[torch.arange(steps).clamp(max=r.size(0) - 1)] for r in running]
    return Normalization(module.norm, *(getattr(module, name) for name in module._norm_weights_names[index]),
                         eps=module.eps, training=module.training, running=running or None)


def _in_original_order(tensor, batch_dim, order):
    """A mask of the packed (sorted) batch order in the original order (``order``: the
    PackedSequence's unsorted_indices; None: the same)."""
    if order is None or not isinstance(tensor, torch.Tensor):
        return tensor
    return tensor.index_select(batch_dim, order)


def forward(module, input, hx=None, *, lengths=None, resets=None, masks=None):
    """What ``module(input, hx, lengths=lengths, resets=resets)`` returns, computed by the time
    loop (no dropout, unless ``masks`` gives it).

    ``module`` is a torch.nn or rnnfused RNN / LSTM / GRU; its configuration and parameters
    are read, nothing else. Packed input gives a PackedSequence in the same layout. lengths
    [B] and resets ([T, B], [B, T] with batch_first, [T] unbatched) as for :func:`layer`.
    ``masks``: the rnnfused.regularisers.CallMasks of a call of an rnnfused module (recorded
    with ``rnnfused.regularisers.captured_masks``): its regularisers' masks and variational
    between-layer dropout are applied as that call drew them.
    """
    mode = module.mode
    is_lstm = mode == "LSTM"
    options = {"reset_after": getattr(module, "reset_after", True),
               "cell_clip": getattr(module, "cell_clip", None),
               "grad_clip": getattr(module, "grad_clip", None)}
    directions = 2 if module.bidirectional else 1
    hidden = module.hidden_size
    out_width = module.proj_size if getattr(module, "proj_size", 0) > 0 else hidden

    packed = input if isinstance(input, PackedSequence) else None
    unbatched = packed is None and input.dim() == 2
    if packed is not None:
        x, lengths = pad_packed_sequence(packed)  # original batch order
    else:
        x = input.unsqueeze(1) if unbatched else input
        if module.batch_first and not unbatched:
            x = x.transpose(0, 1)
        if resets is not None:
            resets = resets.unsqueeze(1) if unbatched else resets.t() if module.batch_first else resets
        if lengths is not None:
            lengths = torch.as_tensor(lengths)
    batch = x.size(1)
    if hx is None:
        shape = (module.num_layers * directions, batch)
        h0 = x.new_zeros(*shape, out_width)
        c0 = x.new_zeros(*shape, hidden) if is_lstm else None
    else:
        h0, c0 = hx if is_lstm else (hx, None)
        if unbatched:
            h0 = h0.unsqueeze(1)
            c0 = c0.unsqueeze(1) if c0 is not None else None

    h_n, c_n = [], []
    layer_input = x
    order = None if masks is None else masks.batch_order
    for layer_index in range(module.num_layers):
        outputs = []
        for direction in range(directions):
            index = layer_index * directions + direction
            layer_masks = None
            if masks is not None:
                layer_masks = copy.copy(masks.layers[index])
                for name, width in (("keep_h", out_width), ("keep_c", hidden)):  # drawn: in the layer's row order
                    setattr(layer_masks, name, _regularisers.keep_weights(getattr(layer_masks, name),
                                                                          (x.size(0), batch, width), x.dtype))
                for name, batch_dim in (("hidden", 0), ("keep_h", 1), ("keep_c", 1)):
                    setattr(layer_masks, name, _in_original_order(getattr(layer_masks, name), batch_dim, order))
            y, h, c = layer(mode, layer_input, h0[index], None if c0 is None else c0[index],
                            _module_weights(module, layer_index, direction), lengths=lengths, resets=resets,
                            reverse=direction == 1, norm=_module_norm(module, index, x.size(0)), masks=layer_masks,
                            **options)
            outputs.append(y)
            h_n.append(h)
            c_n.append(c)
        layer_input = torch.cat(outputs, dim=2)
        if masks is not None and layer_index < module.num_layers - 1 and masks.between[layer_index] is not None:
            layer_input = layer_input * _in_original_order(masks.between[layer_index], 0, order)
    output, h_n = layer_input, torch.stack(h_n)
    c_n = torch.stack(c_n) if is_lstm else None

    if packed is not None:
        order = packed.sorted_indices
        sorted_output = output if order is None else output.index_select(1, order)
        rows = [sorted_output[t, :n] for t, n in enumerate(packed.batch_sizes.tolist())]
        output = PackedSequence(torch.cat(rows), packed.batch_sizes, packed.sorted_indices,
                                packed.unsorted_indices)
    else:
        if module.batch_first and not unbatched:
            output = output.transpose(0, 1)
        if unbatched:
            output = output.squeeze(1)
            h_n = h_n.squeeze(1)
            c_n = c_n.squeeze(1) if c_n is not None else None
    return output, ((h_n, c_n) if is_lstm else h_n)
