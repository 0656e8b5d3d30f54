// One fused pointwise pass of one time step, as a functor over (row b, unit j).
//
// A backend runs `f(b, j)` for every b < rows and j < width (a CPU parallel loop or one
// CUDA thread per element); csrc/recurrence.h points the members at the rows of the
// current step. The math is in cells.h; this file only loads operands and stores results.
//
// S is the storage dtype, A the accumulation dtype (see params.h). Row widths are implicit:
// gate buffers have G (or the saved width) columns, state buffers H columns. Biases are
// always given (zeros for a layer without bias).
//
// In training, gx lives inside the saved gates buffer (row stride ld_gx): a step reads the
// pre-activations of (b, j) and overwrites them with the activations of (b, j) in the same
// call, so no separate [N, G] buffer is needed.
//
// The bodies are branch-free (options are template parameters: kSave = also write what
// backward needs) so that the CPU loop over j vectorises. kFlags: the layer has step flags
// (params.h: kStepReset, kStepInactive; `flags` points at the step's B bytes): a reset row
// reads its carried state and its product with W_hh as zeros; an inactive row keeps its state
// and writes it to its output row (bindings.cpp zeroes those rows of y after the layer, so the
// saved copy holds every row's state for the backward's gather). A value stored twice is converted
// twice: GCC does not vectorise a copy of a float16 / bfloat16 struct.
#pragma once

#include <cstdint>

#include "cells.h"
#include "params.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace rnnfused {

template <typename A, typename S>
RNNF_HD A load(S x) {
  return static_cast<A>(x);
}

template <typename S, typename A>
RNNF_HD S store(A x) {
  return static_cast<S>(x);
}

#if defined(__CUDACC__)
// torch builds CUDA code with implicit half/bfloat16 conversions disabled.
template <>
RNNF_HD float load<float, __half>(__half x) {
  return __half2float(x);
}
template <>
RNNF_HD float load<float, __nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}
template <>
RNNF_HD __half store<__half, float>(float x) {
  return __float2half_rn(x);
}
template <>
RNNF_HD __nv_bfloat16 store<__nv_bfloat16, float>(float x) {
  return __float2bfloat16_rn(x);
}
#endif

// Sum of the input and recurrent pre-activation of gate column k (both biases included);
// x_row and h_row point at the row of gx and gh. `reset`: the carried state is zero, and so
// is its product with W_hh.
template <typename A, typename S>
RNNF_HD A preact(const A* x_row, const A* h_row, const S* b_ih, const S* b_hh, int64_t k, bool reset = false) {
  return x_row[k] + (reset ? A(0) : h_row[k]) + load<A>(b_ih[k]) + load<A>(b_hh[k]);
}

// The step flags of row b: 0 (every row steps, nothing resets) for a layer without them.
template <bool kFlags>
RNNF_HD uint8_t row_flags(const uint8_t* flags, int64_t b) {
  if constexpr (kFlags)
    return flags ? flags[b] : uint8_t(0);
  else
    return 0;
}

RNNF_HD bool is_inactive(uint8_t flags) {
  return (flags & kStepInactive) != 0;
}

RNNF_HD bool is_reset(uint8_t flags) {
  return (flags & kStepReset) != 0;
}

// ---------------------------------------------------------------------------------------
// Forward steps

// kNormCell (normalized layers): h_t = o * tanh(N_c(c_t)) needs the statistics of c_t first,
// so the step stops at c_t and leaves o in o_out (norm.h's LstmNormOutputStep finishes).
// kFlags: an inactive row keeps c and writes its held h to h_out, or zeros when projecting
// (hold_output false: h_out is then o * tanh(c_t), and the projection's pass holds y).
template <typename S, typename A, bool kSave, bool kNormCell = false, bool kFlags = false>
struct LstmForwardStep {
  const A* gx;       // [rows, ld_gx] x W_ihᵀ (may be gates itself)
  const A* gh;       // [rows, 4H]
  const S* b_ih;     // [4H]
  const S* b_hh;     // [4H]
  A* c;              // [rows, H] in: c_{t-1}; out: c_t
  S* h_out;          // [rows, H] h_t (y rows), or o * tanh(c_t) when projecting
  S* h_state;        // [rows, H] second copy of h_t (h_out itself when projecting)
  A* gates;          // [rows, 4H] kSave: i, f, g, o
  A* cells;          // [rows, H] kSave: c_t
  int64_t H, ld_gx;
  A cell_clip;
  A* o_out = nullptr;  // [rows, 4H] kNormCell: o in column block 3 (may be gh itself)
  const uint8_t* flags = nullptr;  // [rows] kFlags
  bool hold_output = true;         // kFlags: an inactive row writes its held h to h_out (else zeros)

  RNNF_HD void operator()(int64_t b, int64_t j) const {
    const int64_t row = b * 4 * H;
    const int64_t e = b * H + j;
    const uint8_t f = row_flags<kFlags>(flags, b);
    if (kFlags && is_inactive(f)) {  // saved: zero activations and the held cell
      h_out[e] = hold_output ? h_state[e] : store<S>(A(0));
      if constexpr (kSave) {
        for (int gate = 0; gate < 4; ++gate) gates[row + gate * H + j] = A(0);
        cells[e] = c[e];
      }
      return;
    }
    const bool reset = kFlags && is_reset(f);
    const A* x_row = gx + b * ld_gx;
    const A* h_row = gh + row;
    const auto a = cells::lstm_activate(preact(x_row, h_row, b_ih, b_hh, j, reset),
                                        preact(x_row, h_row, b_ih, b_hh, H + j, reset),
                                        preact(x_row, h_row, b_ih, b_hh, 2 * H + j, reset),
                                        preact(x_row, h_row, b_ih, b_hh, 3 * H + j, reset));
    const A c_t = cells::lstm_cell(a, reset ? A(0) : c[e], cell_clip);
    c[e] = c_t;
    if constexpr (kNormCell) {
      o_out[row + 3 * H + j] = a.o;
    } else {
      const A h = cells::lstm_hidden(a, c_t);
      h_out[e] = store<S>(h);
      h_state[e] = store<S>(h);
    }
    if constexpr (kSave) {
      gates[row + j] = a.i;
      gates[row + H + j] = a.f;
      gates[row + 2 * H + j] = a.g;
      gates[row + 3 * H + j] = a.o;
      cells[e] = c_t;
    }
  }
};

template <typename S, typename A, bool kSave, bool kFlags = false>
struct GruForwardStep {
  const A* gx;    // [rows, ld_gx] x W_ihᵀ (may be gates itself)
  const A* gh;    // [rows, 3H]
  const S* b_ih;  // [3H]
  const S* b_hh;  // [3H]
  S* h_state;     // [rows, H] in: h_{t-1}; out: h_t
  S* h_out;       // [rows, H] y rows
  A* gates;       // [rows, 4H] kSave: r, z, n, W_hn h + b_hn
  int64_t H, ld_gx;
  const uint8_t* flags = nullptr;  // [rows] kFlags

  RNNF_HD void operator()(int64_t b, int64_t j) const {
    const int64_t e = b * H + j;
    const uint8_t f = row_flags<kFlags>(flags, b);
    if (kFlags && is_inactive(f)) {
      h_out[e] = h_state[e];
      if constexpr (kSave)
        for (int gate = 0; gate < 4; ++gate) gates[b * 4 * H + gate * H + j] = A(0);
      return;
    }
    const bool reset = kFlags && is_reset(f);
    const A* x_row = gx + b * ld_gx;
    const A* h_row = gh + b * 3 * H;
    const A hn = (reset ? A(0) : h_row[2 * H + j]) + load<A>(b_hh[2 * H + j]);
    const A xn = x_row[2 * H + j] + load<A>(b_ih[2 * H + j]);
    const auto a = cells::gru_forward(preact(x_row, h_row, b_ih, b_hh, j, reset),
                                      preact(x_row, h_row, b_ih, b_hh, H + j, reset), xn, hn);
    const A h = cells::gru_hidden(a.z, a.n, reset ? A(0) : load<A>(h_state[e]));
    h_state[e] = store<S>(h);
    h_out[e] = store<S>(h);
    if constexpr (kSave) {
      const int64_t saved = b * 4 * H;
      gates[saved + j] = a.r;
      gates[saved + H + j] = a.z;
      gates[saved + 2 * H + j] = a.n;
      gates[saved + 3 * H + j] = a.hn;
    }
  }
};

// GRU_CHO phase 1: r and r * h_{t-1} (the input of the second matmul).
template <typename S, typename A, bool kSave, bool kFlags = false>
struct GruChoResetStep {
  const A* gx;     // [rows, ld_gx] x W_ihᵀ (r columns used; may be gates itself)
  const A* gh;     // [rows, 3H] (r columns hold W_hr h)
  const S* b_ih;   // [3H]
  const S* b_hh;   // [3H]
  const S* h_state;  // [rows, H] h_{t-1}
  S* rh;           // [rows, H] out: r * h_{t-1}
  A* gates;        // [rows, 3H] kSave: r (column block 0)
  int64_t H, ld_gx;
  const uint8_t* flags = nullptr;  // [rows] kFlags

  RNNF_HD void operator()(int64_t b, int64_t j) const {
    const bool reset = kFlags && is_reset(row_flags<kFlags>(flags, b));
    const A r = cells::sigmoid(preact(gx + b * ld_gx, gh + b * 3 * H, b_ih, b_hh, j, reset));
    const int64_t e = b * H + j;
    rh[e] = store<S>(r * (reset ? A(0) : load<A>(h_state[e])));
    if constexpr (kSave) gates[b * 3 * H + j] = r;
  }
};

// GRU_CHO phase 2: z, n and h_t; gh's n columns hold W_hn (r * h_{t-1}).
template <typename S, typename A, bool kSave, bool kFlags = false>
struct GruChoOutputStep {
  const A* gx;    // [rows, ld_gx] x W_ihᵀ (may be gates itself)
  const A* gh;    // [rows, 3H]
  const S* b_ih;  // [3H]
  const S* b_hh;  // [3H]
  S* h_state;     // [rows, H] in: h_{t-1}; out: h_t
  S* h_out;       // [rows, H] y rows
  A* gates;       // [rows, 3H] kSave: z, n (column blocks 1, 2)
  int64_t H, ld_gx;
  const uint8_t* flags = nullptr;  // [rows] kFlags

  RNNF_HD void operator()(int64_t b, int64_t j) const {
    const int64_t e = b * H + j;
    const uint8_t f = row_flags<kFlags>(flags, b);
    const int64_t row = b * 3 * H;
    if (kFlags && is_inactive(f)) {
      h_out[e] = h_state[e];
      if constexpr (kSave)
        for (int gate = 0; gate < 3; ++gate) gates[row + gate * H + j] = A(0);
      return;
    }
    const bool reset = kFlags && is_reset(f);  // W_hn (r * 0) is zero already; W_hz h is not
    const A* x_row = gx + b * ld_gx;
    const A* h_row = gh + row;
    const A z = cells::sigmoid(preact(x_row, h_row, b_ih, b_hh, H + j, reset));
    const A n = cells::gru_cho_candidate(x_row[2 * H + j] + load<A>(b_ih[2 * H + j]),
                                         h_row[2 * H + j] + load<A>(b_hh[2 * H + j]));
    const A h = cells::gru_hidden(z, n, reset ? A(0) : load<A>(h_state[e]));
    h_state[e] = store<S>(h);
    h_out[e] = store<S>(h);
    if constexpr (kSave) {
      gates[row + H + j] = z;
      gates[row + 2 * H + j] = n;
    }
  }
};

template <typename S, typename A, bool kRelu, bool kFlags = false>
struct RnnForwardStep {
  const A* gx;    // [rows, H]
  const A* gh;    // [rows, H]
  const S* b_ih;  // [H]
  const S* b_hh;  // [H]
  S* h_state;     // [rows, H] out: h_t
  S* h_out;       // [rows, H] y rows
  int64_t H;
  const uint8_t* flags = nullptr;  // [rows] kFlags

  RNNF_HD void operator()(int64_t b, int64_t j) const {
    const uint8_t f = row_flags<kFlags>(flags, b);
    if (kFlags && is_inactive(f)) {
      h_out[b * H + j] = h_state[b * H + j];
      return;
    }
    const A pre = preact(gx + b * H, gh + b * H, b_ih, b_hh, j, kFlags && is_reset(f));
    const A h = kRelu ? cells::rnn_relu_forward(pre) : cells::rnn_tanh_forward(pre);
    h_state[b * H + j] = store<S>(h);
    h_out[b * H + j] = store<S>(h);
  }
};

// ---------------------------------------------------------------------------------------
// Backward steps. `dh` holds the gradient of h_t that arrived from step t+1 (in the
// direction of the recurrence); `dy` the gradient of the layer output at step t.
//
// kFlags: `flags` are this step's, `next_flags` those of the step that consumed this step's
// state (the one visited before in the backward walk; null for the first). Where that step
// reset the row, the gradient carried back from it is zero. An inactive row passes the carried
// gradient on unchanged and has zero gate gradients. The products of LSTM and RNN then
// accumulate into dh (beta 1): the step leaves 0 in an active row's dh and the carried
// gradient in an inactive one's.

// Whether the gradient carried into row b from the step after it is cut by a reset there.
template <bool kFlags>
RNNF_HD bool carried_cut(const uint8_t* next_flags, int64_t b) {
  return kFlags && next_flags && is_reset(next_flags[b]);
}

// kProjected: h_t = W_hr (o * tanh(c_t)); dh then holds the whole gradient of o * tanh(c_t)
// (AddStep applied the flags to the state's gradient) and dy is not read.
template <typename S, typename A, bool kProjected, bool kFlags = false>
struct LstmBackwardStep {
  const A* gates;   // [rows, 4H] i, f, g, o
  const A* cells;   // [rows, H] c_t
  const A* c_prev;  // [rows, H] c_{t-1}
  const S* dy;      // [rows, H] (not read when projecting)
  A* dh;            // [rows, H] gradient of h_t from step t+1 (of o * tanh(c_t) when projecting);
                    //   kFlags and not projecting: out as described above
  A* dc;            // [rows, H] in: gradient of c_t from step t+1; out: gradient of c_{t-1}
  S* dg;            // [rows, 4H] out: gradients of the gate pre-activations
  int64_t H;
  A cell_clip, grad_clip;
  const uint8_t* flags = nullptr;       // [rows] kFlags
  const uint8_t* next_flags = nullptr;  // [rows] kFlags, may be null

  RNNF_HD void operator()(int64_t b, int64_t j) const {
    const int64_t row = b * 4 * H;
    const int64_t e = b * H + j;
    const bool cut = carried_cut<kFlags>(next_flags, b);
    const A dc_in = cut ? A(0) : dc[e];
    A dh_total = (cut && !kProjected) ? A(0) : dh[e];
    if (kFlags && is_inactive(row_flags<kFlags>(flags, b))) {
      dc[e] = dc_in;
      if constexpr (!kProjected) dh[e] = dh_total;
      for (int gate = 0; gate < 4; ++gate) dg[row + gate * H + j] = store<S>(A(0));
      return;
    }
    if constexpr (!kProjected) dh_total += load<A>(dy[e]);
    if constexpr (kFlags && !kProjected) dh[e] = A(0);
    const cells::LstmGates<A> a{gates[row + j], gates[row + H + j], gates[row + 2 * H + j],
                                gates[row + 3 * H + j]};
    A dc_prev;
    const auto d = cells::lstm_backward(a, cells[e], c_prev[e], dh_total, dc_in, cell_clip, grad_clip, dc_prev);
    dc[e] = dc_prev;
    dg[row + j] = store<S>(d.i);
    dg[row + H + j] = store<S>(d.f);
    dg[row + 2 * H + j] = store<S>(d.g);
    dg[row + 3 * H + j] = store<S>(d.o);
  }
};

template <typename S, typename A, bool kFlags = false>
struct GruBackwardStep {
  const A* gates;   // [rows, 4H] r, z, n, W_hn h + b_hn
  const S* h_prev;  // [rows, H]
  const S* dy;      // [rows, H]
  A* dh;            // [rows, H] in: gradient from step t+1; out: the part of the gradient
                    //   of h_{t-1} that bypasses W_hh (dh * z); the matmul adds the rest
  S* dgx;           // [rows, 3H] out: gradients of x_r, x_z, x_n
  S* dgh;           // [rows, 3H] out: gradients of h_r, h_z, h_n
  int64_t H;
  A grad_clip;
  const uint8_t* flags = nullptr;       // [rows] kFlags
  const uint8_t* next_flags = nullptr;  // [rows] kFlags, may be null

  RNNF_HD void operator()(int64_t b, int64_t j) const {
    const int64_t e = b * H + j;
    const int64_t row = b * 3 * H;
    const A dh_in = carried_cut<kFlags>(next_flags, b) ? A(0) : dh[e];
    if (kFlags && is_inactive(row_flags<kFlags>(flags, b))) {
      dh[e] = dh_in;
      for (int gate = 0; gate < 3; ++gate) {
        dgx[row + gate * H + j] = store<S>(A(0));
        dgh[row + gate * H + j] = store<S>(A(0));
      }
      return;
    }
    const int64_t saved = b * 4 * H;
    const cells::GruGates<A> a{gates[saved + j], gates[saved + H + j], gates[saved + 2 * H + j],
                               gates[saved + 3 * H + j]};
    const auto d = cells::gru_backward(a, load<A>(h_prev[e]), dh_in + load<A>(dy[e]), grad_clip);
    dh[e] = d.dh_prev_direct;
    dgx[row + j] = store<S>(d.d_r);
    dgh[row + j] = store<S>(d.d_r);
    dgx[row + H + j] = store<S>(d.d_z);
    dgh[row + H + j] = store<S>(d.d_z);
    dgx[row + 2 * H + j] = store<S>(d.d_xn);
    dgh[row + 2 * H + j] = store<S>(d.d_hn);
  }
};

// GRU_CHO phase 1: gradients of the z and n pre-activations (the n one feeds the matmul
// that gives d(r * h_{t-1})); dh becomes the direct part dh * z.
template <typename S, typename A, bool kFlags = false>
struct GruChoBackwardNzStep {
  const A* gates;   // [rows, 3H] r, z, n
  const S* h_prev;  // [rows, H]
  const S* dy;      // [rows, H]
  A* dh;            // [rows, H] in: gradient from step t+1; out: dh * z
  S* dg;            // [rows, 3H] out: columns of z and n
  int64_t H;
  A grad_clip;
  const uint8_t* flags = nullptr;       // [rows] kFlags
  const uint8_t* next_flags = nullptr;  // [rows] kFlags, may be null

  RNNF_HD void operator()(int64_t b, int64_t j) const {
    const int64_t row = b * 3 * H;
    const int64_t e = b * H + j;
    const A dh_in = carried_cut<kFlags>(next_flags, b) ? A(0) : dh[e];
    if (kFlags && is_inactive(row_flags<kFlags>(flags, b))) {
      dh[e] = dh_in;
      dg[row + H + j] = store<S>(A(0));
      dg[row + 2 * H + j] = store<S>(A(0));
      return;
    }
    const auto d = cells::gru_cho_backward_nz(gates[row + H + j], gates[row + 2 * H + j],
                                              load<A>(h_prev[e]), dh_in + load<A>(dy[e]),
                                              grad_clip);
    dh[e] = d.dh_prev_direct;
    dg[row + H + j] = store<S>(d.d_z);
    dg[row + 2 * H + j] = store<S>(d.d_xn);
  }
};

// GRU_CHO phase 2: gradient of the r pre-activation from d(r * h_{t-1}); also writes
// r * h_{t-1} of this step for the W_hn weight gradient. (An inactive row's d(r * h) is zero:
// its n gradient was.)
template <typename S, typename A, bool kFlags = false>
struct GruChoBackwardRStep {
  const A* gates;   // [rows, 3H] r, z, n
  const S* h_prev;  // [rows, H]
  const A* drh;     // [rows, H] gradient of r * h_{t-1}
  A* dh;            // [rows, H] in/out: direct part of the gradient of h_{t-1}
  S* dg;            // [rows, 3H] out: column of r
  S* rh;            // [rows, H] out: r * h_{t-1}
  int64_t H;
  A grad_clip;
  const uint8_t* flags = nullptr;  // [rows] kFlags

  RNNF_HD void operator()(int64_t b, int64_t j) const {
    const int64_t row = b * 3 * H;
    const int64_t e = b * H + j;
    if (kFlags && is_inactive(row_flags<kFlags>(flags, b))) {
      dg[row + j] = store<S>(A(0));
      rh[e] = store<S>(A(0));
      return;
    }
    const A r = gates[row + j];
    const A h = load<A>(h_prev[e]);
    A direct = dh[e];
    dg[row + j] = store<S>(cells::gru_cho_backward_r(r, h, drh[e], grad_clip, direct));
    dh[e] = direct;
    rh[e] = store<S>(r * h);
  }
};

template <typename S, typename A, bool kRelu, bool kFlags = false>
struct RnnBackwardStep {
  const S* h;   // [rows, H] h_t (y rows)
  const S* dy;  // [rows, H]
  A* dh;        // [rows, H] gradient from step t+1 (kFlags: out as described above)
  S* dg;        // [rows, H] out: gradient of the pre-activation
  int64_t H;
  A grad_clip;
  const uint8_t* flags = nullptr;       // [rows] kFlags
  const uint8_t* next_flags = nullptr;  // [rows] kFlags, may be null

  RNNF_HD void operator()(int64_t b, int64_t j) const {
    const int64_t e = b * H + j;
    const A dh_in = carried_cut<kFlags>(next_flags, b) ? A(0) : dh[e];
    if (kFlags && is_inactive(row_flags<kFlags>(flags, b))) {
      dh[e] = dh_in;
      dg[e] = store<S>(A(0));
      return;
    }
    if constexpr (kFlags) dh[e] = A(0);
    const A h_t = load<A>(h[e]);
    const A grad = dh_in + load<A>(dy[e]);
    dg[e] = store<S>(kRelu ? cells::rnn_relu_backward(h_t, grad, grad_clip)
                           : cells::rnn_tanh_backward(h_t, grad, grad_clip));
  }
};

// out = a + b (storage dtype): the total gradient of a projected h_t, dy + dh. kFlags: b is
// the carried gradient of the state as in LstmBackwardStep (an inactive row's out is zero).
template <typename S, typename A, bool kFlags = false>
struct AddStep {
  const S* a;  // [rows, width]
  A* b;        // [rows, width]
  S* out;      // [rows, width]
  int64_t width;
  const uint8_t* flags = nullptr;       // [rows] kFlags
  const uint8_t* next_flags = nullptr;  // [rows] kFlags, may be null

  RNNF_HD void operator()(int64_t r, int64_t k) const {
    const int64_t e = r * width + k;
    const A carried = carried_cut<kFlags>(next_flags, r) ? A(0) : b[e];
    if (kFlags && is_inactive(row_flags<kFlags>(flags, r))) {
      out[e] = store<S>(A(0));
      b[e] = carried;
      return;
    }
    out[e] = store<S>(load<A>(a[e]) + carried);
    if constexpr (kFlags) b[e] = A(0);
  }
};

// ---------------------------------------------------------------------------------------
// Step flags outside the cell passes.

// Forward, LSTM with projection, after the projection's product wrote y: an active row's new
// state is its y row; an inactive row keeps its state and writes it to y (as the cell passes do).
template <typename S>
struct HoldProjectedStep {
  S* y;      // [rows, P]
  S* h;      // [rows, P] the state
  int64_t P;
  const uint8_t* flags;  // [rows]

  RNNF_HD void operator()(int64_t b, int64_t k) const {
    const int64_t e = b * P + k;
    if (is_inactive(flags[b]))
      y[e] = h[e];
    else
      h[e] = y[e];
  }
};

// Backward, before the recurrence: the state every row of padded input [T, B] started its
// step from, from the states the forward saved (`out`, every row's state after its step,
// inactive rows included) and `init` (h0 or c0): zeros after a reset.
template <typename T>
struct GatherStatesWithFlags {
  T* dst;           // [T * B, width]
  const T* out;     // [T * B, width]
  const T* init;    // [B, width]
  const uint8_t* flags;  // [T * B]
  int64_t T_steps, B, width;
  bool reverse;

  RNNF_HD void operator()(int64_t r, int64_t k) const {
    const int64_t t = r / B, b = r % B;
    const int64_t prev = reverse ? t + 1 : t - 1;
    const int64_t e = r * width + k;
    if (is_reset(flags[r]))
      dst[e] = store<T>(0.0f);
    else if (prev < 0 || prev >= T_steps)
      dst[e] = init[b * width + k];
    else
      dst[e] = out[(prev * B + b) * width + k];
  }
};

// Backward, after the recurrence: no gradient reaches h0 or c0 in a row whose first step
// (in the forward walk) reset its state.
template <typename A>
struct CutAtResets {
  A* grad;  // [rows, width]
  int64_t width;
  const uint8_t* flags;  // [rows]

  RNNF_HD void operator()(int64_t b, int64_t k) const {
    if (is_reset(flags[b])) grad[b * width + k] = A(0);
  }
};

}  // namespace rnnfused
