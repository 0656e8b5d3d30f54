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
// backward needs) so that the CPU loop over j vectorises. A value stored twice is converted
// twice: GCC does not vectorise a copy of a float16 / bfloat16 struct.
//
// kFlags: the layer has step flags (params.h; `flags` points at the step's B values). Such a
// pass is `step` for the rows that step and `hold` for the inactive ones (kHolds, held(b));
// the CPU's element loop picks one per row (cpu/kernels.h), so `step` stays the vectorised
// plain pass, and a GPU thread per element. An inactive row keeps its state and writes it to
// its output row (bindings.cpp zeroes those rows of y after the layer, so that the saved copy
// holds every row's state for the backward's gather). A reset needs nothing in these passes:
// StartSegments zeroes the row's carried state and its product with W_hh before the pass, and
// in the backward CutAtResets zeroes the gradient carried back across the reset.
//
// Zoneout (keep_h, keep_c: Keep, this step's rows of params.h's masks, empty where off) mixes
// the previous state into the new one after the cell (cells.h: zoneout), in the same pass; with
// a projection h's is ProjectedStateStep's. Only the passes instantiated for zoneout read them
// (kZoneout, ZoneoutForm below): a test of a Keep, with its Philox draw, inside the plain passes
// stopped GCC vectorising their loop, and the LSTM without zoneout ran 2.3x slower on the CPU.
// Within such a pass the tests of keep_h and keep_c are the same for every element: the CPU's
// loop is unswitched on them, the GPU's warps do not diverge.
#pragma once

#include <cstdint>

#include "cells.h"
#include "params.h"
#include "philox.h"

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

// How a layer's passes take zoneout, a template argument of theirs (kZoneout): not at all, from
// stored keep weights, or drawn from Philox; each form is its own loop (see the top).
enum class ZoneoutForm { kOff, kStored, kDrawn };

RNNF_HD constexpr bool zoned(ZoneoutForm form) {
  return form != ZoneoutForm::kOff;
}

// Zoneout's keep weight k of each element of a step (cells.h: zoneout), off when empty: given
// values [rows, width] (eval's p, or masks a caller drew), or drawn per element from the Philox
// stream of draw = {seed, threshold}, k = 1 with probability threshold / 2^32. `index` is the
// element's place in the layer's [T, B, width] mask, so that backward draws what forward did.
template <typename S, typename A>
struct Keep {
  const S* values = nullptr;
  const int64_t* draw = nullptr;  // the input's device memory: the seed drawn from torch's generator
  int64_t index = 0;

  RNNF_HD explicit operator bool() const { return values != nullptr || draw != nullptr; }

  // The keep weights of the elements from n on.
  RNNF_HD Keep operator+(int64_t n) const { return Keep{values ? values + n : nullptr, draw, index + n}; }

  template <ZoneoutForm kForm>
  RNNF_HD A at(int64_t e) const {
    if constexpr (kForm == ZoneoutForm::kDrawn) {
      const uint32_t bits = philox::bits(static_cast<uint64_t>(draw[0]), static_cast<uint64_t>(index + e));
      return static_cast<int64_t>(bits) < draw[1] ? A(1) : A(0);
    } else {
      return load<A>(values[e]);
    }
  }

  // For a pass that is not specialised on the form.
  RNNF_HD A at(int64_t e) const { return draw ? at<ZoneoutForm::kDrawn>(e) : at<ZoneoutForm::kStored>(e); }
};

// The form of a layer's zoneout masks (both drawn or both stored; either may be off).
template <typename S, typename A>
ZoneoutForm zoneout_form(const Keep<S, A>& keep_h, const Keep<S, A>& keep_c) {
  if (!keep_h && !keep_c) return ZoneoutForm::kOff;
  return keep_h.draw || keep_c.draw ? ZoneoutForm::kDrawn : ZoneoutForm::kStored;
}

// The keep weights of a layer's [T, B, width] mask (params.h: values or draw, both null: off).
template <typename S, typename A>
Keep<S, A> keep_of(const void* values, const int64_t* draw) {
  return Keep<S, A>{static_cast<const S*>(values), draw, 0};
}

// Sum of the input and recurrent pre-activation of gate column k (both biases included);
// x_row and h_row point at the row of gx and gh.
template <typename A, typename S>
RNNF_HD A preact(const A* x_row, const A* h_row, const S* b_ih, const S* b_hh, int64_t k) {
  return x_row[k] + h_row[k] + load<A>(b_ih[k]) + load<A>(b_hh[k]);
}

// Whether row b holds its state at this step (`flags` are the step's).
RNNF_HD bool holds(const int32_t* flags, int64_t b) {
  return (flags[b] & kStepInactive) != 0;
}

// The members of a pass with kFlags: kHolds, held(b), and operator() choosing between its
// step(b, j) and hold(b, j).
#define RNNF_STEP_OR_HOLD(kFlags)                                                 \
  static constexpr bool kHolds = kFlags;                                          \
  RNNF_HD bool held(int64_t b) const {                                            \
    if constexpr (kFlags)                                                         \
      return holds(flags, b);                                                     \
    else                                                                          \
      return false;                                                               \
  }                                                                               \
  RNNF_HD void operator()(int64_t b, int64_t j) const {                           \
    if (held(b))                                                                  \
      hold(b, j);                                                                 \
    else                                                                          \
      step(b, j);                                                                 \
  }

RNNF_HD bool is_reset(int32_t flags) {
  return (flags & kStepReset) != 0;
}

// ---------------------------------------------------------------------------------------
// Forward steps

// kNormCell (normalized layers): h_t = o * tanh(N_c(c_t)) needs the statistics of c_t first,
// so the step stops at c_t and leaves o in o_out (norm.h's LstmNormOutputStep finishes).
// kFlags: an inactive row keeps c and writes its held h to h_out, or zeros when projecting
// (hold_output false: h_out and h_state are then o * tanh(c_t), and HoldProjectedStep holds y).
template <typename S, typename A, bool kSave, bool kNormCell = false, bool kFlags = false,
          ZoneoutForm kZoneout = ZoneoutForm::kOff>
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
  const int32_t* flags = nullptr;  // [rows] kFlags
  bool hold_output = true;         // kFlags: an inactive row writes its held h to h_out (else zeros)
  Keep<S, A> keep_h{};       // [rows, H] zoneout of h (not with kNormCell or a projection)
  Keep<S, A> keep_c{};       // [rows, H] zoneout of c (not with kNormCell)
  A* cells_new = nullptr;          // [rows, H] kSave and keep_c: c̃_t, the cell before zoneout

  RNNF_STEP_OR_HOLD(kFlags)

  RNNF_HD void step(int64_t b, int64_t j) const {
    const int64_t row = b * 4 * H;
    const A* x_row = gx + b * ld_gx;
    const A* h_row = gh + row;
    const auto a = cells::lstm_activate(preact(x_row, h_row, b_ih, b_hh, j),
                                        preact(x_row, h_row, b_ih, b_hh, H + j),
                                        preact(x_row, h_row, b_ih, b_hh, 2 * H + j),
                                        preact(x_row, h_row, b_ih, b_hh, 3 * H + j));
    const int64_t e = b * H + j;
    const A c_prev = c[e];
    const A c_new = cells::lstm_cell(a, c_prev, cell_clip);
    const A c_t = zoned(kZoneout) && keep_c ? cells::zoneout(keep_c.template at<kZoneout>(e), c_prev, c_new) : c_new;
    c[e] = c_t;
    if constexpr (kNormCell) {
      o_out[row + 3 * H + j] = a.o;
    } else {
      A h = cells::lstm_hidden(a, c_new);
      if (zoned(kZoneout) && keep_h) h = cells::zoneout(keep_h.template at<kZoneout>(e), load<A>(h_state[e]), h);
      h_out[e] = store<S>(h);
      h_state[e] = store<S>(h);
    }
    if constexpr (kSave) {
      gates[row + j] = a.i;
      gates[row + H + j] = a.f;
      gates[row + 2 * H + j] = a.g;
      gates[row + 3 * H + j] = a.o;
      cells[e] = c_t;
      if (zoned(kZoneout) && cells_new) cells_new[e] = c_new;
    }
  }

  // An inactive row: c and the state stay; saved, zero activations and the held cell.
  RNNF_HD void hold(int64_t b, int64_t j) const {
    const int64_t e = b * H + j;
    h_out[e] = hold_output ? h_state[e] : store<S>(A(0));
    if constexpr (kSave) {
      for (int64_t gate = 0; gate < 4; ++gate) gates[b * 4 * H + gate * H + j] = A(0);
      cells[e] = c[e];
      if (zoned(kZoneout) && cells_new) cells_new[e] = c[e];
    }
  }
};

template <typename S, typename A, bool kSave, bool kFlags = false, ZoneoutForm kZoneout = ZoneoutForm::kOff>
struct GruForwardStep {
  const A* gx;    // [rows, ld_gx] x W_ihᵀ (may be gates itself)
  const A* gh;    // [rows, 3H]
  const S* b_ih;  // [3H]
  const S* b_hh;  // [3H]
  S* h_state;     // [rows, H] in: h_{t-1}; out: h_t
  S* h_out;       // [rows, H] y rows
  A* gates;       // [rows, 4H] kSave: r, z, n, W_hn h + b_hn
  int64_t H, ld_gx;
  const int32_t* flags = nullptr;  // [rows] kFlags
  Keep<S, A> keep_h{};       // [rows, H] zoneout

  RNNF_STEP_OR_HOLD(kFlags)

  RNNF_HD void step(int64_t b, int64_t j) const {
    const A* x_row = gx + b * ld_gx;
    const A* h_row = gh + b * 3 * H;
    const A hn = h_row[2 * H + j] + load<A>(b_hh[2 * H + j]);
    const A xn = x_row[2 * H + j] + load<A>(b_ih[2 * H + j]);
    const auto a = cells::gru_forward(preact(x_row, h_row, b_ih, b_hh, j),
                                      preact(x_row, h_row, b_ih, b_hh, H + j), xn, hn);
    const int64_t e = b * H + j;
    const A h_prev = load<A>(h_state[e]);
    A h = cells::gru_hidden(a.z, a.n, h_prev);
    if (zoned(kZoneout) && keep_h) h = cells::zoneout(keep_h.template at<kZoneout>(e), h_prev, h);
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

  RNNF_HD void hold(int64_t b, int64_t j) const {
    h_out[b * H + j] = h_state[b * H + j];
    if constexpr (kSave)
      for (int64_t gate = 0; gate < 4; ++gate) gates[b * 4 * H + gate * H + j] = A(0);
  }
};

// GRU_CHO phase 1: r and r * h_{t-1} (the input of the second matmul).
template <typename S, typename A, bool kSave>
struct GruChoResetStep {
  const A* gx;     // [rows, ld_gx] x W_ihᵀ (r columns used; may be gates itself)
  const A* gh;     // [rows, 3H] (r columns hold W_hr h)
  const S* b_ih;   // [3H]
  const S* b_hh;   // [3H]
  const S* h_state;  // [rows, H] h_{t-1} (recurrent dropout: m ⊙ h_{t-1})
  S* rh;           // [rows, H] out: r * h_{t-1}
  A* gates;        // [rows, 3H] kSave: r (column block 0)
  int64_t H, ld_gx;

  RNNF_HD void operator()(int64_t b, int64_t j) const {
    const A r = cells::sigmoid(preact(gx + b * ld_gx, gh + b * 3 * H, b_ih, b_hh, j));
    const int64_t e = b * H + j;
    rh[e] = store<S>(r * load<A>(h_state[e]));
    if constexpr (kSave) gates[b * 3 * H + j] = r;
  }
};

// GRU_CHO phase 2: z, n and h_t; gh's n columns hold W_hn (r * h_{t-1}).
template <typename S, typename A, bool kSave, bool kFlags = false, ZoneoutForm kZoneout = ZoneoutForm::kOff>
struct GruChoOutputStep {
  const A* gx;    // [rows, ld_gx] x W_ihᵀ (may be gates itself)
  const A* gh;    // [rows, 3H]
  const S* b_ih;  // [3H]
  const S* b_hh;  // [3H]
  S* h_state;     // [rows, H] in: h_{t-1}; out: h_t
  S* h_out;       // [rows, H] y rows
  A* gates;       // [rows, 3H] kSave: z, n (column blocks 1, 2)
  int64_t H, ld_gx;
  const int32_t* flags = nullptr;  // [rows] kFlags
  Keep<S, A> keep_h{};       // [rows, H] zoneout

  RNNF_STEP_OR_HOLD(kFlags)

  RNNF_HD void step(int64_t b, int64_t j) const {
    const int64_t row = b * 3 * H;
    const A* x_row = gx + b * ld_gx;
    const A* h_row = gh + row;
    const A z = cells::sigmoid(preact(x_row, h_row, b_ih, b_hh, H + j));
    const A n = cells::gru_cho_candidate(x_row[2 * H + j] + load<A>(b_ih[2 * H + j]),
                                         h_row[2 * H + j] + load<A>(b_hh[2 * H + j]));
    const int64_t e = b * H + j;
    const A h_prev = load<A>(h_state[e]);
    A h = cells::gru_hidden(z, n, h_prev);
    if (zoned(kZoneout) && keep_h) h = cells::zoneout(keep_h.template at<kZoneout>(e), h_prev, h);
    h_state[e] = store<S>(h);
    h_out[e] = store<S>(h);
    if constexpr (kSave) {
      gates[row + H + j] = z;
      gates[row + 2 * H + j] = n;
    }
  }

  // Saved: zero activations, r (phase 1's) too.
  RNNF_HD void hold(int64_t b, int64_t j) const {
    h_out[b * H + j] = h_state[b * H + j];
    if constexpr (kSave)
      for (int64_t gate = 0; gate < 3; ++gate) gates[b * 3 * H + gate * H + j] = A(0);
  }
};

template <typename S, typename A, bool kRelu, bool kFlags = false, ZoneoutForm kZoneout = ZoneoutForm::kOff>
struct RnnForwardStep {
  const A* gx;    // [rows, H]
  const A* gh;    // [rows, H]
  const S* b_ih;  // [H]
  const S* b_hh;  // [H]
  S* h_state;     // [rows, H] out: h_t (in: h_{t-1}, read with keep_h)
  S* h_out;       // [rows, H] y rows
  int64_t H;
  const int32_t* flags = nullptr;  // [rows] kFlags
  Keep<S, A> keep_h{};       // [rows, H] zoneout
  S* hidden_new = nullptr;         // [rows, H] saved with keep_h: h̃_t, the state before zoneout

  RNNF_STEP_OR_HOLD(kFlags)

  RNNF_HD void step(int64_t b, int64_t j) const {
    const int64_t e = b * H + j;
    const A pre = preact(gx + b * H, gh + b * H, b_ih, b_hh, j);
    A h = kRelu ? cells::rnn_relu_forward(pre) : cells::rnn_tanh_forward(pre);
    if (zoned(kZoneout) && hidden_new) hidden_new[e] = store<S>(h);
    if (zoned(kZoneout) && keep_h) h = cells::zoneout(keep_h.template at<kZoneout>(e), load<A>(h_state[e]), h);
    h_state[e] = store<S>(h);
    h_out[e] = store<S>(h);
  }

  RNNF_HD void hold(int64_t b, int64_t j) const {
    h_out[b * H + j] = h_state[b * H + j];
    if (zoned(kZoneout) && hidden_new) hidden_new[b * H + j] = store<S>(A(0));
  }
};

// ---------------------------------------------------------------------------------------
// Backward steps. `dh` holds the gradient of h_t that arrived from step t+1 (in the
// direction of the recurrence); `dy` the gradient of the layer output at step t.
//
// kFlags: `flags` are this step's. An inactive row passes the carried gradient on unchanged
// (dh, dc untouched) and has zero gate gradients. The products of LSTM and RNN then
// accumulate into dh (beta 1): the step leaves 0 in an active row's dh.
// Zoneout (keep_h, keep_c): the new state gets its gradient times 1 - keep, the previous one
// keeps it times keep: the step leaves that in dh (dc), and the products accumulate into dh.

// kProjected: h_t = W_hr (o * tanh(c_t)); dh then holds the whole gradient of o * tanh(c_t)
// (AddStep applied the flags to the state's gradient) and dy is not read.
template <typename S, typename A, bool kProjected, bool kFlags = false, ZoneoutForm kZoneout = ZoneoutForm::kOff>
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
  const int32_t* flags = nullptr;  // [rows] kFlags
  Keep<S, A> keep_h{};       // [rows, H] zoneout of h (not projecting: AddStep's then)
  Keep<S, A> keep_c{};       // [rows, H] zoneout of c; `cells` then holds c̃_t

  RNNF_STEP_OR_HOLD(kFlags)

  RNNF_HD void step(int64_t b, int64_t j) const {
    const int64_t row = b * 4 * H;
    const cells::LstmGates<A> a{gates[row + j], gates[row + H + j], gates[row + 2 * H + j],
                                gates[row + 3 * H + j]};
    const int64_t e = b * H + j;
    A dh_total = dh[e];
    if constexpr (!kProjected) {
      dh_total += load<A>(dy[e]);
      if (zoned(kZoneout) && keep_h) {
        A kept;
        dh_total = cells::zoneout_backward(keep_h.template at<kZoneout>(e), dh_total, kept);
        dh[e] = kept;
      } else if constexpr (kFlags) {
        dh[e] = A(0);
      }
    }
    A dc_new = dc[e], dc_kept = A(0);
    if (zoned(kZoneout) && keep_c) dc_new = cells::zoneout_backward(keep_c.template at<kZoneout>(e), dc_new, dc_kept);
    A dc_prev;
    const auto d = cells::lstm_backward(a, cells[e], c_prev[e], dh_total, dc_new, cell_clip, grad_clip, dc_prev);
    dc[e] = dc_prev + dc_kept;
    dg[row + j] = store<S>(d.i);
    dg[row + H + j] = store<S>(d.f);
    dg[row + 2 * H + j] = store<S>(d.g);
    dg[row + 3 * H + j] = store<S>(d.o);
  }

  RNNF_HD void hold(int64_t b, int64_t j) const {
    for (int64_t gate = 0; gate < 4; ++gate) dg[b * 4 * H + gate * H + j] = store<S>(A(0));
  }
};

template <typename S, typename A, bool kFlags = false, ZoneoutForm kZoneout = ZoneoutForm::kOff>
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
  const int32_t* flags = nullptr;  // [rows] kFlags
  Keep<S, A> keep_h{};       // [rows, H] zoneout

  RNNF_STEP_OR_HOLD(kFlags)

  RNNF_HD void step(int64_t b, int64_t j) const {
    const int64_t saved = b * 4 * H;
    const cells::GruGates<A> a{gates[saved + j], gates[saved + H + j], gates[saved + 2 * H + j],
                               gates[saved + 3 * H + j]};
    const int64_t e = b * H + j;
    A dh_new = dh[e] + load<A>(dy[e]), dh_kept = A(0);
    if (zoned(kZoneout) && keep_h) dh_new = cells::zoneout_backward(keep_h.template at<kZoneout>(e), dh_new, dh_kept);
    const auto d = cells::gru_backward(a, load<A>(h_prev[e]), dh_new, grad_clip);
    dh[e] = d.dh_prev_direct + dh_kept;
    const int64_t row = b * 3 * H;
    dgx[row + j] = store<S>(d.d_r);
    dgh[row + j] = store<S>(d.d_r);
    dgx[row + H + j] = store<S>(d.d_z);
    dgh[row + H + j] = store<S>(d.d_z);
    dgx[row + 2 * H + j] = store<S>(d.d_xn);
    dgh[row + 2 * H + j] = store<S>(d.d_hn);
  }

  RNNF_HD void hold(int64_t b, int64_t j) const {
    for (int64_t gate = 0; gate < 3; ++gate) {
      dgx[b * 3 * H + gate * H + j] = store<S>(A(0));
      dgh[b * 3 * H + gate * H + j] = store<S>(A(0));
    }
  }
};

// GRU_CHO phase 1: gradients of the z and n pre-activations (the n one feeds the matmul
// that gives d(r * h_{t-1})); dh becomes the direct part dh * z.
template <typename S, typename A, bool kFlags = false, ZoneoutForm kZoneout = ZoneoutForm::kOff>
struct GruChoBackwardNzStep {
  const A* gates;   // [rows, 3H] r, z, n
  const S* h_prev;  // [rows, H]
  const S* dy;      // [rows, H]
  A* dh;            // [rows, H] in: gradient from step t+1; out: dh * z
  S* dg;            // [rows, 3H] out: columns of z and n
  int64_t H;
  A grad_clip;
  const int32_t* flags = nullptr;  // [rows] kFlags
  Keep<S, A> keep_h{};       // [rows, H] zoneout

  RNNF_STEP_OR_HOLD(kFlags)

  RNNF_HD void step(int64_t b, int64_t j) const {
    const int64_t row = b * 3 * H;
    const int64_t e = b * H + j;
    A dh_new = dh[e] + load<A>(dy[e]), dh_kept = A(0);
    if (zoned(kZoneout) && keep_h) dh_new = cells::zoneout_backward(keep_h.template at<kZoneout>(e), dh_new, dh_kept);
    const auto d = cells::gru_cho_backward_nz(gates[row + H + j], gates[row + 2 * H + j],
                                              load<A>(h_prev[e]), dh_new, grad_clip);
    dh[e] = d.dh_prev_direct + dh_kept;
    dg[row + H + j] = store<S>(d.d_z);
    dg[row + 2 * H + j] = store<S>(d.d_xn);
  }

  RNNF_HD void hold(int64_t b, int64_t j) const {
    dg[b * 3 * H + H + j] = store<S>(A(0));
    dg[b * 3 * H + 2 * H + j] = store<S>(A(0));
  }
};

// GRU_CHO phase 2: gradient of the r pre-activation from d(r * h_{t-1}); also writes
// r * h_{t-1} of this step for the W_hn weight gradient. (An inactive row's d(r * h) is zero:
// its n gradient was.) With recurrent dropout h_{t-1} is m ⊙ h_{t-1} here, and its gradient
// reaches h_{t-1} times m.
template <typename S, typename A, bool kFlags = false>
struct GruChoBackwardRStep {
  const A* gates;   // [rows, 3H] r, z, n
  const S* h_prev;  // [rows, H] (recurrent dropout: m ⊙ h_{t-1})
  const A* drh;     // [rows, H] gradient of r * h_{t-1}
  A* dh;            // [rows, H] in/out: direct part of the gradient of h_{t-1}
  S* dg;            // [rows, 3H] out: column of r
  S* rh;            // [rows, H] out: r * h_{t-1}
  int64_t H;
  A grad_clip;
  const int32_t* flags = nullptr;  // [rows] kFlags
  const S* mask = nullptr;         // [rows, H] recurrent dropout's m

  RNNF_STEP_OR_HOLD(kFlags)

  RNNF_HD void step(int64_t b, int64_t j) const {
    const int64_t row = b * 3 * H;
    const int64_t e = b * H + j;
    const A r = gates[row + j];
    const A h = load<A>(h_prev[e]);
    A through_r = A(0);
    dg[row + j] = store<S>(cells::gru_cho_backward_r(r, h, drh[e], grad_clip, through_r));
    dh[e] += mask ? load<A>(mask[e]) * through_r : through_r;
    rh[e] = store<S>(r * h);
  }

  RNNF_HD void hold(int64_t b, int64_t j) const {
    dg[b * 3 * H + j] = store<S>(A(0));
    rh[b * H + j] = store<S>(A(0));
  }
};

template <typename S, typename A, bool kRelu, bool kFlags = false, ZoneoutForm kZoneout = ZoneoutForm::kOff>
struct RnnBackwardStep {
  const S* h;   // [rows, H] h_t (y rows)
  const S* dy;  // [rows, H]
  A* dh;        // [rows, H] gradient from step t+1 (kFlags, keep_h: out as described above)
  S* dg;        // [rows, H] out: gradient of the pre-activation
  int64_t H;
  A grad_clip;
  const int32_t* flags = nullptr;  // [rows] kFlags
  Keep<S, A> keep_h{};       // [rows, H] zoneout; `h` then holds h̃_t

  RNNF_STEP_OR_HOLD(kFlags)

  RNNF_HD void step(int64_t b, int64_t j) const {
    const int64_t e = b * H + j;
    const A h_t = load<A>(h[e]);
    A grad = dh[e] + load<A>(dy[e]);
    if (zoned(kZoneout) && keep_h) {
      A kept;
      grad = cells::zoneout_backward(keep_h.template at<kZoneout>(e), grad, kept);
      dh[e] = kept;
    } else if constexpr (kFlags) {
      dh[e] = A(0);
    }
    dg[e] = store<S>(kRelu ? cells::rnn_relu_backward(h_t, grad, grad_clip)
                           : cells::rnn_tanh_backward(h_t, grad, grad_clip));
  }

  RNNF_HD void hold(int64_t b, int64_t j) const {
    dg[b * H + j] = store<S>(A(0));
  }
};

// out = a + b (storage dtype): the total gradient of a projected h_t, dy + dh. kFlags: b is
// the carried gradient of the state as in LstmBackwardStep (an inactive row's out is zero).
// Zoneout of h (keep): out is the gradient of the projection's h̃_t, (1 - keep) (a + b), and b
// keeps keep (a + b) for h_{t-1}.
template <typename S, typename A, bool kFlags = false, ZoneoutForm kZoneout = ZoneoutForm::kOff>
struct AddStep {
  const S* a;  // [rows, width]
  A* b;        // [rows, width]
  S* out;      // [rows, width]
  int64_t width;
  const int32_t* flags = nullptr;  // [rows] kFlags
  Keep<S, A> keep{};         // [rows, width] zoneout

  RNNF_STEP_OR_HOLD(kFlags)

  RNNF_HD void step(int64_t r, int64_t k) const {
    const int64_t e = r * width + k;
    const A total = load<A>(a[e]) + b[e];
    if (zoned(kZoneout) && keep) {
      A kept;
      out[e] = store<S>(cells::zoneout_backward(keep.template at<kZoneout>(e), total, kept));
      b[e] = kept;
    } else {
      out[e] = store<S>(total);
      if constexpr (kFlags) b[e] = A(0);
    }
  }

  RNNF_HD void hold(int64_t r, int64_t k) const {
    out[r * width + k] = store<S>(A(0));
  }
};

// ---------------------------------------------------------------------------------------
// Step flags outside the cell passes.

// Forward, LSTM with projection, after the projection's product wrote h̃_t to y: an active
// row's new state is its y row, after zoneout (keep) mixed in its previous state (zero after a
// reset); an inactive row keeps its state and writes it to y (as the cell passes do).
template <typename S, typename A>
struct ProjectedStateStep {
  S* y;      // [rows, P]
  S* h;      // [rows, P] the state
  int64_t P;
  const int32_t* flags;  // [rows] or null
  Keep<S, A> keep;       // [rows, P] or off

  RNNF_HD void operator()(int64_t b, int64_t k) const {
    const int64_t e = b * P + k;
    if (flags && holds(flags, b)) {
      y[e] = h[e];
      return;
    }
    if (keep) {
      const A previous = flags && is_reset(flags[b]) ? A(0) : load<A>(h[e]);
      y[e] = store<S>(cells::zoneout(keep.at(e), previous, load<A>(y[e])));
    }
    h[e] = y[e];
  }
};

// Recurrent dropout, forward: the left operand of a step's product with W_hh, m ⊙ h_{t-1}, and
// zero in the rows that start a segment (flags; their carried state is zero); backward the
// same over every row, for dW_hh and GRU_CHO's r * h_{t-1}.
template <typename S, typename A>
struct MaskState {
  const S* h;     // [rows, P] h_{t-1}
  const S* mask;  // [rows, P]
  S* out;         // [rows, P]
  int64_t P;
  const int32_t* flags;  // [rows] or null

  RNNF_HD void operator()(int64_t b, int64_t k) const {
    const int64_t e = b * P + k;
    out[e] = flags && is_reset(flags[b]) ? store<S>(A(0)) : store<S>(load<A>(h[e]) * load<A>(mask[e]));
  }
};

// Recurrent dropout, backward: a step's product dG W_hh is the gradient of m ⊙ h_{t-1}; it
// reaches h_{t-1} times m, added to dh (accumulate) or in its place.
template <typename S, typename A>
struct AddMaskedProduct {
  A* dh;             // [rows, P]
  const A* product;  // [rows, P]
  const S* mask;     // [rows, P]
  int64_t P;
  bool accumulate;

  RNNF_HD void operator()(int64_t b, int64_t k) const {
    const int64_t e = b * P + k;
    const A through = load<A>(mask[e]) * product[e];
    dh[e] = accumulate ? dh[e] + through : through;
  }
};

// Forward, after a step's product with W_hh and before its cell pass: a row that starts a new
// segment (kStepReset) starts from zero states, so its product (just computed from the carried
// state) and the carried state the pass reads (LSTM c, GRU h) are zeroed, in the columns of unit
// j of every block of gh that the step has computed so far.
template <typename S, typename A>
struct StartSegments {
  A* gh;        // [rows, ld_gh]
  int64_t ld_gh, blocks;
  A* c;         // [rows, H] LSTM, else null
  S* h;         // [rows, H] the GRU forms (their pass reads h_{t-1}), else null
  int64_t H;
  const int32_t* flags;  // [rows]

  RNNF_HD void operator()(int64_t b, int64_t j) const {
    if (!is_reset(flags[b])) return;
    for (int64_t block = 0; block < blocks; ++block) gh[b * ld_gh + block * H + j] = A(0);
    if (c) c[b * H + j] = A(0);
    if (h) h[b * H + j] = store<S>(A(0));
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
  const int32_t* flags;  // [T * B]
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

// Backward: no gradient crosses a reset. Before a step, in the rows where the step after it (in
// the forward walk; visited before in the backward walk) reset its state, the gradient carried
// back from there; after the recurrence, that of h0 or c0 in a row whose first step reset.
template <typename A>
struct CutAtResets {
  A* grad;  // [rows, width]
  int64_t width;
  const int32_t* flags;  // [rows]

  RNNF_HD void operator()(int64_t b, int64_t k) const {
    if (is_reset(flags[b])) grad[b * width + k] = A(0);
  }
};

}  // namespace rnnfused
