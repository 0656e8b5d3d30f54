"""Backpropagation through time written out by hand: an oracle independent of autograd.

For one layer in one direction over padded input, float64 NumPy arrays, every cell of
rnnfused (LSTM with cell_clip, GRU in the PyTorch and the Cho et al. 2014 form, RNN tanh
and relu) with grad_clip. The forward pass keeps every step's activations; the backward
pass runs the gradient recurrences explicitly, element by element, from t = T-1 down to
0: no autograd, no matrix library, nothing shared with the kernels or the reference.
Loops are compiled with numba (a test dependency: `pip install numba`).

    outputs, grads = bptt.layer("LSTM", x, h0, c0, weights, dy, dh_n, dc_n, cell_clip=1.0)

x [T, B, I], h0 [B, H], c0 [B, H] (LSTM) or None, weights a dict of w_ih [G, I], w_hh [G, H],
b_ih [G], b_hh [G] (torch.nn's layout, gates i f g o / r z n). Returns
({y, h_n, c_n}, {x, h0, c0, w_ih, w_hh, b_ih, b_hh}) as float64 arrays.
"""

import math

import numpy as np

try:
    from numba import njit
except ImportError as error:  # pragma: no cover - numba is a test dependency
    raise ImportError("rnnfused.bptt needs numba: pip install numba") from error

OFF = math.inf  # clip value meaning "no clipping"


@njit(cache=True)
def _sigmoid(v):
    return 1.0 / (1.0 + math.exp(-v))


@njit(cache=True)
def _clamp(v, limit):
    if v > limit:
        return limit
    if v < -limit:
        return -limit
    return v


@njit(cache=True)
def _affine(out, x, w, bias):
    """out[g] = bias[g] + sum_k w[g, k] x[k]"""
    for g in range(w.shape[0]):
        total = bias[g]
        for k in range(w.shape[1]):
            total += w[g, k] * x[k]
        out[g] = total


# --- LSTM -----------------------------------------------------------------------------

@njit(cache=True)
def _lstm_forward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, cell_clip):
    T, B, _ = x.shape
    H = h0.shape[1]
    gates = np.zeros((T, B, 4 * H))  # activated i, f, g, o
    cells = np.zeros((T, B, H))
    y = np.zeros((T, B, H))
    h, c = h0.copy(), c0.copy()
    pre_x, pre_h = np.zeros(4 * H), np.zeros(4 * H)
    for t in range(T):
        for b in range(B):
            _affine(pre_x, x[t, b], w_ih, b_ih)
            _affine(pre_h, h[b], w_hh, b_hh)
            for j in range(H):
                i = _sigmoid(pre_x[j] + pre_h[j])
                f = _sigmoid(pre_x[H + j] + pre_h[H + j])
                g = math.tanh(pre_x[2 * H + j] + pre_h[2 * H + j])
                o = _sigmoid(pre_x[3 * H + j] + pre_h[3 * H + j])
                c_new = _clamp(f * c[b, j] + i * g, cell_clip)
                gates[t, b, j] = i
                gates[t, b, H + j] = f
                gates[t, b, 2 * H + j] = g
                gates[t, b, 3 * H + j] = o
                cells[t, b, j] = c_new
                y[t, b, j] = o * math.tanh(c_new)
            for j in range(H):
                c[b, j] = cells[t, b, j]
                h[b, j] = y[t, b, j]
    return y, h, c, gates, cells


@njit(cache=True)
def _lstm_backward(x, h0, c0, w_ih, w_hh, y, gates, cells, dy, dh_n, dc_n, cell_clip, grad_clip):
    T, B, I = x.shape
    H = h0.shape[1]
    dx = np.zeros_like(x)
    dw_ih, dw_hh = np.zeros_like(w_ih), np.zeros_like(w_hh)
    db = np.zeros(4 * H)
    dh_next, dc_next = dh_n.copy(), dc_n.copy()
    dpre = np.zeros(4 * H)
    for t in range(T - 1, -1, -1):
        for b in range(B):
            for j in range(H):
                i, f, g, o = gates[t, b, j], gates[t, b, H + j], gates[t, b, 2 * H + j], gates[t, b, 3 * H + j]
                c = cells[t, b, j]
                c_prev = cells[t - 1, b, j] if t > 0 else c0[b, j]
                dh = dy[t, b, j] + dh_next[b, j]
                tanh_c = math.tanh(c)
                dc = dc_next[b, j] + dh * o * (1.0 - tanh_c * tanh_c)
                if c >= cell_clip or c <= -cell_clip:  # clamped in forward: no gradient
                    dc = 0.0
                dpre[j] = _clamp(dc * g * i * (1.0 - i), grad_clip)
                dpre[H + j] = _clamp(dc * c_prev * f * (1.0 - f), grad_clip)
                dpre[2 * H + j] = _clamp(dc * i * (1.0 - g * g), grad_clip)
                dpre[3 * H + j] = _clamp(dh * tanh_c * o * (1.0 - o), grad_clip)
                dc_next[b, j] = dc * f
            for k in range(H):
                total = 0.0
                h_prev = y[t - 1, b, k] if t > 0 else h0[b, k]
                for gate in range(4 * H):
                    total += dpre[gate] * w_hh[gate, k]
                    dw_hh[gate, k] += dpre[gate] * h_prev
                dh_next[b, k] = total
            for k in range(I):
                total = 0.0
                for gate in range(4 * H):
                    total += dpre[gate] * w_ih[gate, k]
                    dw_ih[gate, k] += dpre[gate] * x[t, b, k]
                dx[t, b, k] = total
            for gate in range(4 * H):
                db[gate] += dpre[gate]
    return dx, dh_next, dc_next, dw_ih, dw_hh, db


# --- GRU (both forms) -----------------------------------------------------------------

@njit(cache=True)
def _gru_forward(x, h0, w_ih, w_hh, b_ih, b_hh, reset_after):
    T, B, _ = x.shape
    H = h0.shape[1]
    gates = np.zeros((T, B, 4 * H))  # r, z, n and the recurrent term of n (reset_after) or r*h
    y = np.zeros((T, B, H))
    h = h0.copy()
    pre_x, pre_h, rh = np.zeros(3 * H), np.zeros(3 * H), np.zeros(H)
    w_hn = w_hh[2 * H:]
    for t in range(T):
        for b in range(B):
            _affine(pre_x, x[t, b], w_ih, b_ih)
            _affine(pre_h, h[b], w_hh, b_hh)  # the n rows are recomputed below for reset_after=False
            for j in range(H):
                gates[t, b, j] = _sigmoid(pre_x[j] + pre_h[j])
                gates[t, b, H + j] = _sigmoid(pre_x[H + j] + pre_h[H + j])
                rh[j] = gates[t, b, j] * h[b, j]
            for j in range(H):
                if reset_after:
                    recurrent = pre_h[2 * H + j]
                    gates[t, b, 3 * H + j] = recurrent
                    n = math.tanh(pre_x[2 * H + j] + gates[t, b, j] * recurrent)
                else:
                    recurrent = b_hh[2 * H + j]
                    for k in range(H):
                        recurrent += w_hn[j, k] * rh[k]
                    gates[t, b, 3 * H + j] = rh[j]
                    n = math.tanh(pre_x[2 * H + j] + recurrent)
                gates[t, b, 2 * H + j] = n
                z = gates[t, b, H + j]
                y[t, b, j] = (1.0 - z) * n + z * h[b, j]
            for j in range(H):
                h[b, j] = y[t, b, j]
    return y, h, gates


@njit(cache=True)
def _gru_backward(x, h0, w_ih, w_hh, y, gates, dy, dh_n, reset_after, grad_clip):
    T, B, I = x.shape
    H = h0.shape[1]
    dx = np.zeros_like(x)
    dw_ih, dw_hh = np.zeros_like(w_ih), np.zeros_like(w_hh)
    db_ih, db_hh = np.zeros(3 * H), np.zeros(3 * H)
    dh_next = dh_n.copy()
    d_x = np.zeros(3 * H)  # gradient of the input-side pre-activations
    d_h = np.zeros(3 * H)  # gradient of the recurrent-side terms (W_h* h + b_h*, or W_hn (r h) + b_hn)
    dh_prev = np.zeros(H)
    d_rh = np.zeros(H)
    for t in range(T - 1, -1, -1):
        for b in range(B):
            for j in range(H):
                r, z, n = gates[t, b, j], gates[t, b, H + j], gates[t, b, 2 * H + j]
                h_prev = y[t - 1, b, j] if t > 0 else h0[b, j]
                dh = dy[t, b, j] + dh_next[b, j]
                dh_prev[j] = dh * z
                dn_pre = _clamp(dh * (1.0 - z) * (1.0 - n * n), grad_clip)
                d_x[2 * H + j] = dn_pre
                d_x[H + j] = d_h[H + j] = _clamp(dh * (h_prev - n) * z * (1.0 - z), grad_clip)
                if reset_after:
                    d_h[2 * H + j] = dn_pre * r
                    d_x[j] = d_h[j] = _clamp(dn_pre * gates[t, b, 3 * H + j] * r * (1.0 - r), grad_clip)
                else:
                    d_h[2 * H + j] = dn_pre
            if not reset_after:  # r reaches n through W_hn (r h)
                for k in range(H):
                    total = 0.0
                    for j in range(H):
                        total += d_h[2 * H + j] * w_hh[2 * H + j, k]
                    d_rh[k] = total
                for k in range(H):
                    r = gates[t, b, k]
                    h_prev = y[t - 1, b, k] if t > 0 else h0[b, k]
                    d_x[k] = d_h[k] = _clamp(d_rh[k] * h_prev * r * (1.0 - r), grad_clip)
                    dh_prev[k] += d_rh[k] * r
            rows = 3 * H if reset_after else 2 * H  # W_hh rows that multiply h_{t-1} itself
            for k in range(H):
                h_prev = y[t - 1, b, k] if t > 0 else h0[b, k]
                total = dh_prev[k]
                for gate in range(rows):
                    total += d_h[gate] * w_hh[gate, k]
                    dw_hh[gate, k] += d_h[gate] * h_prev
                if not reset_after:
                    for j in range(H):
                        dw_hh[2 * H + j, k] += d_h[2 * H + j] * gates[t, b, 3 * H + k]
                dh_next[b, k] = total
            for k in range(I):
                total = 0.0
                for gate in range(3 * H):
                    total += d_x[gate] * w_ih[gate, k]
                    dw_ih[gate, k] += d_x[gate] * x[t, b, k]
                dx[t, b, k] = total
            for gate in range(3 * H):
                db_ih[gate] += d_x[gate]
                db_hh[gate] += d_h[gate]
    return dx, dh_next, dw_ih, dw_hh, db_ih, db_hh


# --- RNN ------------------------------------------------------------------------------

@njit(cache=True)
def _rnn_forward(x, h0, w_ih, w_hh, b_ih, b_hh, relu):
    T, B, _ = x.shape
    H = h0.shape[1]
    y = np.zeros((T, B, H))
    h = h0.copy()
    pre_x, pre_h = np.zeros(H), np.zeros(H)
    for t in range(T):
        for b in range(B):
            _affine(pre_x, x[t, b], w_ih, b_ih)
            _affine(pre_h, h[b], w_hh, b_hh)
            for j in range(H):
                pre = pre_x[j] + pre_h[j]
                y[t, b, j] = max(pre, 0.0) if relu else math.tanh(pre)
            for j in range(H):
                h[b, j] = y[t, b, j]
    return y, h


@njit(cache=True)
def _rnn_backward(x, h0, w_ih, w_hh, y, dy, dh_n, relu, grad_clip):
    T, B, I = x.shape
    H = h0.shape[1]
    dx = np.zeros_like(x)
    dw_ih, dw_hh = np.zeros_like(w_ih), np.zeros_like(w_hh)
    db = np.zeros(H)
    dh_next = dh_n.copy()
    dpre = np.zeros(H)
    for t in range(T - 1, -1, -1):
        for b in range(B):
            for j in range(H):
                dh = dy[t, b, j] + dh_next[b, j]
                h = y[t, b, j]
                slope = (1.0 if h > 0 else 0.0) if relu else 1.0 - h * h
                dpre[j] = _clamp(dh * slope, grad_clip)
            for k in range(H):
                h_prev = y[t - 1, b, k] if t > 0 else h0[b, k]
                total = 0.0
                for j in range(H):
                    total += dpre[j] * w_hh[j, k]
                    dw_hh[j, k] += dpre[j] * h_prev
                dh_next[b, k] = total
            for k in range(I):
                total = 0.0
                for j in range(H):
                    total += dpre[j] * w_ih[j, k]
                    dw_ih[j, k] += dpre[j] * x[t, b, k]
                dx[t, b, k] = total
            for j in range(H):
                db[j] += dpre[j]
    return dx, dh_next, dw_ih, dw_hh, db


def layer(mode, x, h0, c0, weights, dy, dh_n, dc_n=None, *, reverse=False, reset_after=True,
          cell_clip=None, grad_clip=None):
    """Forward and hand-written backward of one layer; see the module docstring."""
    def arr(a):
        return np.ascontiguousarray(np.asarray(a, dtype=np.float64))

    x, h0, dy, dh_n = arr(x), arr(h0), arr(dy), arr(dh_n)
    w = {k: arr(v) for k, v in weights.items() if v is not None}
    gates = {"LSTM": 4, "GRU": 3}.get(mode, 1) * h0.shape[1]
    b_ih = w.get("b_ih", np.zeros(gates))  # a layer without bias has zero biases
    b_hh = w.get("b_hh", np.zeros(gates))
    if reverse:  # the reverse direction is the forward one on the time-reversed sequence
        x, dy = x[::-1].copy(), dy[::-1].copy()
    cell_clip = OFF if cell_clip is None else float(cell_clip)
    grad_clip = OFF if grad_clip is None else float(grad_clip)
    outputs, grads = {}, {}
    if mode == "LSTM":
        c0, dc_n = arr(c0), arr(dc_n)
        y, h_n, c_n, act, cells = _lstm_forward(x, h0, c0, w["w_ih"], w["w_hh"], b_ih, b_hh, cell_clip)
        dx, dh0, dc0, dw_ih, dw_hh, db = _lstm_backward(x, h0, c0, w["w_ih"], w["w_hh"], y, act, cells, dy, dh_n,
                                                        dc_n, cell_clip, grad_clip)
        outputs["c_n"], grads["c0"] = c_n, dc0
        db_ih = db_hh = db
    elif mode == "GRU":
        y, h_n, act = _gru_forward(x, h0, w["w_ih"], w["w_hh"], b_ih, b_hh, reset_after)
        dx, dh0, dw_ih, dw_hh, db_ih, db_hh = _gru_backward(x, h0, w["w_ih"], w["w_hh"], y, act, dy, dh_n,
                                                            reset_after, grad_clip)
    elif mode in ("RNN_TANH", "RNN_RELU"):
        relu = mode == "RNN_RELU"
        y, h_n = _rnn_forward(x, h0, w["w_ih"], w["w_hh"], b_ih, b_hh, relu)
        dx, dh0, dw_ih, dw_hh, db = _rnn_backward(x, h0, w["w_ih"], w["w_hh"], y, dy, dh_n, relu, grad_clip)
        db_ih = db_hh = db
    else:
        raise ValueError(f"unknown mode {mode!r}")
    if reverse:
        y, dx = y[::-1].copy(), dx[::-1].copy()
    outputs.update(y=y, h_n=h_n)
    grads.update(x=dx, h0=dh0, w_ih=dw_ih, w_hh=dw_hh, b_ih=db_ih, b_hh=db_hh)
    return outputs, grads
