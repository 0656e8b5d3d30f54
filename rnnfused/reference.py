"""The recurrent equations as a plain loop over time: the oracle for tests and benchmarks.

Every cell of rnnfused (LSTM with optional projection and cell clip, GRU in both forms,
RNN tanh / relu) with optional gradient clipping, in torch.nn's parameter layout, on any
dtype and device. Gradients come from autograd through the loop. Written for clarity,
not speed, and independent of the fused kernels and of :mod:`rnnfused.modules`.

:func:`forward` runs a whole module's configuration (torch.nn or rnnfused, any layers and
directions, padded, batch_first, unbatched or packed input) without dropout.
"""

import torch
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence


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


def cell_step(mode, x, h, c, weights, *, reset_after=True, cell_clip=None, grad_clip=None):
    """One step of one cell for a batch: x [B, I], h [B, P], c [B, H] (LSTM) or None.

    ``weights`` maps w_ih, w_hh, b_ih, b_hh, w_hr to tensors or None. Returns (h', c').
    """
    w_ih, w_hh, b_ih, b_hh = weights["w_ih"], weights["w_hh"], weights["b_ih"], weights["b_hh"]
    if mode == "LSTM":
        pre = clamp_grad(_linear(x, w_ih, b_ih) + _linear(h, w_hh, b_hh), grad_clip)
        i, f, g, o = pre.chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        if cell_clip is not None:
            c = c.clamp(-cell_clip, cell_clip)
        h = torch.sigmoid(o) * torch.tanh(c)
        if weights["w_hr"] is not None:
            h = _linear(h, weights["w_hr"])
        return h, c
    if mode == "GRU":
        x_r, x_z, x_n = _linear(x, w_ih, b_ih).chunk(3, dim=1)
        hidden = h.size(1)
        w_hr, w_hz, w_hn = w_hh.split(hidden, dim=0)
        b_hr, b_hz, b_hn = (None, None, None) if b_hh is None else b_hh.split(hidden)
        r = torch.sigmoid(clamp_grad(x_r + _linear(h, w_hr, b_hr), grad_clip))
        z = torch.sigmoid(clamp_grad(x_z + _linear(h, w_hz, b_hz), grad_clip))
        if reset_after:
            n_pre = x_n + r * _linear(h, w_hn, b_hn)
        else:
            n_pre = x_n + _linear(r * h, w_hn, b_hn)
        n = torch.tanh(clamp_grad(n_pre, grad_clip))
        return (1 - z) * n + z * h, None
    pre = clamp_grad(_linear(x, w_ih, b_ih) + _linear(h, w_hh, b_hh), grad_clip)
    if mode == "RNN_TANH":
        return torch.tanh(pre), None
    if mode == "RNN_RELU":
        return torch.relu(pre), None
    raise ValueError(f"unknown mode {mode!r}")


def layer(mode, x, h0, c0, weights, *, lengths=None, reverse=False, **options):
    """One layer in one direction over padded input.

    x [T, B, I]; lengths [B] (None: all T) marks the valid steps of each sequence. A
    sequence's state stays put outside its valid steps, so the forward direction ends on
    its last valid step and the reverse direction starts from h0 at it. Returns
    (y [T, B, P] with zeros at padding, h_n [B, P], c_n [B, H] or None).
    """
    steps = x.size(0)
    h, c = h0, c0
    outputs = [None] * steps
    order = range(steps - 1, -1, -1) if reverse else range(steps)
    for t in order:
        h_new, c_new = cell_step(mode, x[t], h, c, weights, **options)
        if lengths is None:
            h, c = h_new, c_new
            outputs[t] = h
        else:
            active = (t < lengths).to(x.device).unsqueeze(1)
            h = torch.where(active, h_new, h)
            if c is not None:
                c = torch.where(active, c_new, c)
            outputs[t] = torch.where(active, h_new, torch.zeros_like(h_new))
    return torch.stack(outputs), h, c


def _module_weights(module, layer_index, direction):
    suffix = f"_l{layer_index}" + ("_reverse" if direction == 1 else "")
    names = {"w_ih": "weight_ih", "w_hh": "weight_hh", "b_ih": "bias_ih", "b_hh": "bias_hh",
             "w_hr": "weight_hr"}
    return {key: getattr(module, name + suffix, None) for key, name in names.items()}


def forward(module, input, hx=None):
    """What ``module(input, hx)`` returns, computed by the time loop (no dropout).

    ``module`` is a torch.nn or rnnfused RNN / LSTM / GRU; its configuration and parameters
    are read, nothing else. Packed input gives a PackedSequence in the same layout.
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
        lengths = None
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
    for layer_index in range(module.num_layers):
        outputs = []
        for direction in range(directions):
            index = layer_index * directions + direction
            y, h, c = layer(mode, layer_input, h0[index], None if c0 is None else c0[index],
                            _module_weights(module, layer_index, direction), lengths=lengths,
                            reverse=direction == 1, **options)
            outputs.append(y)
            h_n.append(h)
            c_n.append(c)
        layer_input = torch.cat(outputs, dim=2)
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
