// The cell equations: forward and backward of ONE element (batch row b, hidden unit j).
//
// This is the only place where the math of a cell is written. The CPU loops and the CUDA
// kernels (csrc/steps.h) load their operands, call these functions and store the results,
// so both backends compute exactly the same expressions.
//
// Everything here works on the accumulation type T (float for fp16/bf16/fp32 storage,
// double for fp64). Gate order follows torch.nn: LSTM (i, f, g, o), GRU (r, z, n).
//
// Two optional clips from the seed document:
//   cell_clip  (LSTM) c_t = clamp(f*c_{t-1} + i*g, -cell_clip, cell_clip); the gradient is
//              zero where the clamp was active. +inf means off.
//   grad_clip  every gradient with respect to a gate pre-activation (the value fed into
//              sigmoid/tanh/relu) is clamped to [-grad_clip, grad_clip] before it flows to
//              h_{t-1}, the weights and the input. +inf means off.
// Clamps are written with comparisons (not fmin/fmax) so that NaN propagates, as torch.clamp.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "hd.h"

namespace rnnfused {
namespace cells {

// exp and tanh for the activations. On the GPU: CUDA's expf / tanhf. On the host, float
// uses branch-free formulas instead of libm calls so that the CPU element loops vectorise
// (a libm call is opaque to the vectoriser, and glibc's tanhf alone costs ~18 ns):
//   exp_  Cody-Waite reduction + degree-7 polynomial, <= 2 ulp where the result is normal;
//         2^n is applied as two factors so that results underflow gradually to 0 and
//         overflow to infinity as expf's do (sigmoid(-inf) must be exactly 0: 0 * inf is
//         NaN in a GRU, as in torch.nn). NaN stays NaN.
//   tanh_ odd polynomial for |x| < 0.125 (no cancellation), 1 - 2 / (e^2|x| + 1) above;
//         <= 11 ulp (1e-7 absolute).
// Double always uses libm: fp64 is the accuracy reference.
RNNF_HD float exp_(float x) {
#if defined(__CUDA_ARCH__)
  return ::expf(x);
#else
  // Outside [-104, 89] e^x rounds to 0 or overflows in float; the clamp keeps n in [-150, 128].
  const float clamped = x > 89.f ? 89.f : (x < -104.f ? -104.f : x);
  const float n = (clamped * 1.44269504f + 12582912.f) - 12582912.f;  // round(x / ln 2)
  const float r = (clamped - n * 0.693359375f) - n * -2.12194440e-4f;  // x - n ln 2, two parts
  const float p =
      1.f + r * (1.f + r * (0.5f + r * (1.f / 6 + r * (1.f / 24 + r * (1.f / 120 + r * (1.f / 720 + r * (1.f / 5040)))))));
  const int32_t n_low = static_cast<int32_t>(n) / 2;  // 2^n = 2^n_low 2^n_high, both normal
  const int32_t n_high = static_cast<int32_t>(n) - n_low;
  const int32_t low_bits = (n_low + 127) << 23, high_bits = (n_high + 127) << 23;
  float scale_low, scale_high;
  memcpy(&scale_low, &low_bits, sizeof(float));
  memcpy(&scale_high, &high_bits, sizeof(float));
  return x != x ? x : (p * scale_low) * scale_high;
#endif
}
RNNF_HD double exp_(double x) { return ::exp(x); }

RNNF_HD float tanh_(float x) {
#if defined(__CUDA_ARCH__)
  return ::tanhf(x);
#else
  const float x2 = x * x;
  const float small = x + x * x2 * (-1.f / 3 + x2 * (2.f / 15 + x2 * (-17.f / 315)));
  const float ax = ::fabsf(x);
  const float large = ::copysignf(1.f - 2.f / (exp_(2.f * ax) + 1.f), x);
  return ax < 0.125f ? small : large;
#endif
}
RNNF_HD double tanh_(double x) { return ::tanh(x); }

template <typename T>
RNNF_HD T sigmoid(T x) {
  return T(1) / (T(1) + exp_(-x));
}

// Two plain selects (not a nested one, not fmin/fmax) so that the CPU loops if-convert
// and vectorise, and NaN propagates: every comparison with NaN is false.
template <typename T>
RNNF_HD T clamp(T x, T limit) {
  const T above_low = x < -limit ? -limit : x;
  return above_low > limit ? limit : above_low;
}

// ---------------------------------------------------------------------------------------
// LSTM: i = σ(pre_i), f = σ(pre_f), g = tanh(pre_g), o = σ(pre_o)
//       c = clip(f * c_prev + i * g),  h = o * tanh(c)
template <typename T>
struct LstmGates {
  T i, f, g, o;
};

template <typename T>
RNNF_HD LstmGates<T> lstm_activate(T pre_i, T pre_f, T pre_g, T pre_o) {
  return {sigmoid(pre_i), sigmoid(pre_f), tanh_(pre_g), sigmoid(pre_o)};
}

template <typename T>
RNNF_HD T lstm_cell(const LstmGates<T>& a, T c_prev, T cell_clip) {
  return clamp(a.f * c_prev + a.i * a.g, cell_clip);
}

template <typename T>
RNNF_HD T lstm_hidden(const LstmGates<T>& a, T c) {
  return a.o * tanh_(c);
}

// The backward of an LSTM element in two parts, around h_t = o * tanh(c̃) where c̃ is c_t
// itself or (normalized layers) its normalization.
// Output part: from dh (gradient w.r.t. h_t), the gradient of the o pre-activation, and of
// c̃ through tanh.
template <typename T>
struct LstmOutputGrads {
  T d_o, dc_tilde;
};

template <typename T>
RNNF_HD LstmOutputGrads<T> lstm_backward_output(T o, T c_tilde, T dh, T grad_clip) {
  const T tanh_c = tanh_(c_tilde);
  return {clamp(dh * tanh_c * o * (T(1) - o), grad_clip), dh * o * (T(1) - tanh_c * tanh_c)};
}

// Cell part: from dc_total (all of the gradient w.r.t. c_t) the gradients of the i, f, g
// pre-activations (written to d.i, d.f, d.g) and of c_{t-1} (returned). A saved c with
// |c| >= cell_clip is treated as clamped (pre-clip value unknown; the boundary case
// c_pre == ±cell_clip exactly has measure zero); with the clip off (infinity) nothing is
// clamped, not even an infinite c.
template <typename T>
RNNF_HD T lstm_backward_cell(const LstmGates<T>& a, T c, T c_prev, T dc_total, T cell_clip, T grad_clip,
                             LstmGates<T>& d) {
  const bool clamped = ((c >= cell_clip) | (c <= -cell_clip)) & (cell_clip < T(INFINITY));
  dc_total = clamped ? T(0) : dc_total;
  d.i = clamp(dc_total * a.g * a.i * (T(1) - a.i), grad_clip);
  d.f = clamp(dc_total * c_prev * a.f * (T(1) - a.f), grad_clip);
  d.g = clamp(dc_total * a.i * (T(1) - a.g * a.g), grad_clip);
  return dc_total * a.f;
}

// dh: gradient w.r.t. h_t (all consumers); dc: gradient w.r.t. c_t from step t+1.
// Returns the pre-activation gradients; writes the gradient w.r.t. c_{t-1} to dc_prev.
template <typename T>
RNNF_HD LstmGates<T> lstm_backward(const LstmGates<T>& a, T c, T c_prev, T dh, T dc, T cell_clip, T grad_clip,
                                   T& dc_prev) {
  const LstmOutputGrads<T> out = lstm_backward_output(a.o, c, dh, grad_clip);
  LstmGates<T> d;
  d.o = out.d_o;
  dc_prev = lstm_backward_cell(a, c, c_prev, dc + out.dc_tilde, cell_clip, grad_clip, d);
  return d;
}

// ---------------------------------------------------------------------------------------
// GRU, PyTorch / cuDNN form (reset gate applied after the recurrent matmul):
//   r = σ(x_r + h_r), z = σ(x_z + h_z), n = tanh(x_n + r * h_n), h = (1 - z) * n + z * h_prev
// where x_* include b_i*, h_* = W_h* h_prev + b_h*. h_n is kept for the backward pass.
template <typename T>
struct GruGates {
  T r, z, n, hn;
};

template <typename T>
RNNF_HD GruGates<T> gru_forward(T pre_r, T pre_z, T xn, T hn) {
  const T r = sigmoid(pre_r);
  return {r, sigmoid(pre_z), tanh_(xn + r * hn), hn};
}

template <typename T>
RNNF_HD T gru_hidden(T z, T n, T h_prev) {
  return (T(1) - z) * n + z * h_prev;
}

// Gradients of one GRU element. d_xn is the gradient of x_n (= of the n pre-activation),
// d_hn the gradient of h_n (= d_xn * r); dh_prev_direct = dh * z is the part of dh_prev
// that does not go through W_hh.
template <typename T>
struct GruGrads {
  T d_r, d_z, d_xn, d_hn, dh_prev_direct;
};

template <typename T>
RNNF_HD GruGrads<T> gru_backward(const GruGates<T>& a, T h_prev, T dh, T grad_clip) {
  GruGrads<T> d;
  d.d_xn = clamp(dh * (T(1) - a.z) * (T(1) - a.n * a.n), grad_clip);
  d.d_hn = d.d_xn * a.r;
  d.d_r = clamp(d.d_xn * a.hn * a.r * (T(1) - a.r), grad_clip);
  d.d_z = clamp(dh * (h_prev - a.n) * a.z * (T(1) - a.z), grad_clip);
  d.dh_prev_direct = dh * a.z;
  return d;
}

// ---------------------------------------------------------------------------------------
// GRU, Cho et al. 2014 form (reset gate applied before the recurrent matmul):
//   r = σ(x_r + h_r), z = σ(x_z + h_z), n = tanh(x_n + W_hn (r ⊙ h_prev) + b_hn),
//   h = (1 - z) * n + z * h_prev
// A step is two phases around the second matmul: first r, z and r*h_prev, then n and h.
template <typename T>
RNNF_HD T gru_cho_candidate(T xn, T hn) {
  return tanh_(xn + hn);
}

// Phase 1 of the backward step (before d(r*h) is known): gradients of the n and z
// pre-activations and the direct part of dh_prev.
template <typename T>
RNNF_HD GruGrads<T> gru_cho_backward_nz(T z, T n, T h_prev, T dh, T grad_clip) {
  GruGrads<T> d;
  d.d_xn = clamp(dh * (T(1) - z) * (T(1) - n * n), grad_clip);
  d.d_hn = d.d_xn;
  d.d_r = T(0);
  d.d_z = clamp(dh * (h_prev - n) * z * (T(1) - z), grad_clip);
  d.dh_prev_direct = dh * z;
  return d;
}

// Phase 2: d_rh = gradient w.r.t. r*h_prev (from the W_hn matmul). Returns the gradient of
// the r pre-activation; adds the part of dh_prev that flows through r*h_prev.
template <typename T>
RNNF_HD T gru_cho_backward_r(T r, T h_prev, T d_rh, T grad_clip, T& dh_prev_direct) {
  dh_prev_direct += d_rh * r;
  return clamp(d_rh * h_prev * r * (T(1) - r), grad_clip);
}

// ---------------------------------------------------------------------------------------
// Zoneout (Krueger et al. 2017), after any cell: a unit keeps its previous value with weight
// `keep` (0 or 1 in training, the probability p in eval): keep * prev + (1 - keep) * next. Its
// gradient reaches prev times keep and next times 1 - keep.
template <typename T>
RNNF_HD T zoneout(T keep, T prev, T next) {
  return keep * prev + (T(1) - keep) * next;
}

// The backward of zoneout: the gradient of next, from that of the result; prev's is `kept`.
template <typename T>
RNNF_HD T zoneout_backward(T keep, T grad, T& kept) {
  kept = keep * grad;
  return (T(1) - keep) * grad;
}

// ---------------------------------------------------------------------------------------
// Elman RNN: h = tanh(pre) or relu(pre). The backward needs only h.
template <typename T>
RNNF_HD T rnn_tanh_forward(T pre) {
  return tanh_(pre);
}

template <typename T>
RNNF_HD T rnn_tanh_backward(T h, T dh, T grad_clip) {
  return clamp(dh * (T(1) - h * h), grad_clip);
}

template <typename T>
RNNF_HD T rnn_relu_forward(T pre) {
  return pre < T(0) ? T(0) : pre;  // NaN propagates, as torch.relu
}

// As torch's relu backward (threshold_backward of the result): the gradient is cut only where
// h <= 0, so it passes where h is NaN and a diverged run shows NaN gradients, as torch.nn's.
template <typename T>
RNNF_HD T rnn_relu_backward(T h, T dh, T grad_clip) {
  return clamp(h <= T(0) ? T(0) : dh, grad_clip);
}

}  // namespace cells
}  // namespace rnnfused
