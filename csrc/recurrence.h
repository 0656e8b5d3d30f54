// The algorithm of one recurrent layer in one direction, written once for every backend.
//
// Forward:  gx = x W_ihᵀ for all steps (one matmul); then per step t
//           gh = h W_hhᵀ (one matmul) and one fused pointwise pass (steps.h) that adds
//           the biases, applies the cell and writes h_t, c_t and what backward needs.
// Backward: per step in reverse order, one fused pointwise pass for the gate gradients
//           and one matmul for the gradient of h_{t-1}; then the weight gradients as
//           matmuls over all N rows, bias gradients as matmuls with a ones vector.
//           No atomics: results are bitwise reproducible.
//
// A Backend provides
//   gemm<In, Out>(trans_a, trans_b, m, n, k, a, lda, b, ldb, beta, c, ldc)
//       row-major C[m, n] = op(A)[m, k] op(B)[k, n] + beta * C, beta in {0, 1};
//       op(A) = Aᵀ when trans_a (A is then stored [k, m]).
//   for_each(rows, width, functor)   functor(b, j) for every b < rows, j < width
//   copy(dst, src, bytes)            dst and src in the backend's memory
// Packed (variable length) input needs no special case: step t touches the first
// batch_sizes[t] rows of the state, so a finished sequence keeps its final state in
// place (forward direction) or a sequence starts from its h0 row when it first becomes
// active (reverse direction).
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "norm.h"
#include "params.h"
#include "steps.h"

namespace rnnfused {

// Calls fn(std::true_type{}) or fn(std::false_type{}): a run-time flag becomes a template
// argument of a step (decltype(flag)::value), so the step body has no branch on it.
template <typename Fn>
void with_flag(bool flag, Fn&& fn) {
  if (flag)
    fn(std::true_type{});
  else
    fn(std::false_type{});
}

// fn(flag, form) with the step flags' bool and the zoneout form as template arguments
// (decltype(flag)::value, decltype(form)::value).
template <typename Fn>
void with_flags_and_zoneout(bool flags, ZoneoutForm zoneout, Fn&& fn) {
  with_flag(flags, [&](auto flagged) {
    switch (zoneout) {
      case ZoneoutForm::kOff: return fn(flagged, std::integral_constant<ZoneoutForm, ZoneoutForm::kOff>{});
      case ZoneoutForm::kStored: return fn(flagged, std::integral_constant<ZoneoutForm, ZoneoutForm::kStored>{});
      case ZoneoutForm::kDrawn: return fn(flagged, std::integral_constant<ZoneoutForm, ZoneoutForm::kDrawn>{});
    }
  });
}

inline std::vector<int64_t> step_offsets(const LayerParams& p) {
  std::vector<int64_t> offsets(p.T + 1, 0);
  for (int64_t t = 0; t < p.T; ++t) offsets[t + 1] = offsets[t] + p.batch_sizes[t];
  return offsets;
}

// Fills dst [N, width] so that the row of (step t, batch row b) holds the state step t
// started from: the output row of the previous step in the walk, or init[b] when the row
// was not active in that step. Runs of consecutive rows are copied in one piece (padded
// input: two copies in all).
template <typename T, typename Backend>
void gather_previous_states(Backend& be, const LayerParams& p, const std::vector<int64_t>& offsets,
                            T* dst, const T* out, const T* init, int64_t width) {
  struct Run {
    int64_t dst_row, count;
    const T* src;
  };
  std::vector<Run> runs;
  auto add = [&](int64_t dst_row, const T* src, int64_t count) {
    if (count == 0) return;
    if (!runs.empty()) {
      Run& last = runs.back();
      if (last.dst_row + last.count == dst_row && last.src + last.count * width == src) {
        last.count += count;
        return;
      }
    }
    runs.push_back({dst_row, count, src});
  };
  for (int64_t t = 0; t < p.T; ++t) {
    const int64_t rows = p.batch_sizes[t];
    const int64_t prev = p.reverse ? t + 1 : t - 1;  // the step visited before t
    const int64_t carried = (prev < 0 || prev >= p.T) ? 0 : std::min(rows, p.batch_sizes[prev]);
    if (carried > 0) add(offsets[t], out + offsets[prev] * width, carried);
    add(offsets[t] + carried, init + carried * width, rows - carried);
  }
  for (const Run& run : runs)
    be.copy(dst + run.dst_row * width, run.src, run.count * width * static_cast<int64_t>(sizeof(T)));
}

// Where forward keeps x W_ihᵀ of every row: in training in the first G columns of the saved
// gates (steps.h overwrites them with the activations), else in its own [N, G] buffer.
template <typename A>
struct InputProjection {
  A* gx;
  int64_t ld;
};

template <typename A>
InputProjection<A> input_projection_buffer(const ForwardParams& p) {
  if (p.gates) return {static_cast<A*>(p.gates), saved_gates_per_unit(p.cell) * p.H};
  return {static_cast<A*>(p.gx), p.G};
}

// ---------------------------------------------------------------------------------------
// Normalized layers (norm.h): the passes the recurrence calls where a layer normalizes.

// Lines of a pass: the columns [col0, col0 + width) of `rows` rows from row0 (batch norm), or
// those rows (layer norm); per-line values at stat_stride.
inline Lines norm_lines(const NormParams& n, int64_t row0, int64_t rows, int64_t col0, int64_t width,
                        int64_t stat_stride) {
  return {n.kind == Norm::Batch, row0, rows, col0, width, stat_stride};
}

// Whether batch norm at a step uses the given (running) statistics: in eval, and in training
// at a step with a single active row (packed input), whose own variance would be zero.
inline bool given_statistics(const NormParams& n, int64_t rows) {
  return n.kind == Norm::Batch && (!n.own_statistics || rows < 2);
}

// One normalization of the columns [col0, col0 + width) of the `rows` rows of step t, whose
// first row is r0 (every buffer given from that row): batch norm per column with step t's
// statistics at stats + t * stat_width + col0, layer norm per row with its statistics at
// stats + (r0 + row) * groups + group.
template <typename S, typename A, typename Backend>
void normalize_step(Backend& be, const NormParams& n, int64_t t, int64_t r0, int64_t rows, int64_t col0,
                    int64_t width, int64_t stat_width, int64_t group, int64_t groups, const A* in, int64_t ld_in,
                    A* out, int64_t ld_out, A* saved, int64_t ld_saved, const void* gamma, const void* beta,
                    A* rstd, A* batch_mean, A* batch_var, const void* given_mean, const void* given_var) {
  if (rows == 0) return;
  const bool batch = n.kind == Norm::Batch;
  const int64_t stat = batch ? t * stat_width + col0 : r0 * groups + group;
  auto at = [&](const void* base) { return base ? static_cast<const S*>(base) + stat : nullptr; };
  const NormalizeLines<S, A> pass{norm_lines(n, 0, rows, col0, width, batch ? 1 : groups),
                                  in, ld_in, out, ld_out, saved, ld_saved,
                                  static_cast<const S*>(gamma), static_cast<const S*>(beta), rstd + stat,
                                  batch && batch_mean ? batch_mean + stat : nullptr,
                                  batch && batch_var ? batch_var + stat : nullptr,
                                  given_statistics(n, rows) ? at(given_mean) : nullptr,
                                  given_statistics(n, rows) ? at(given_var) : nullptr, A(n.eps)};
  be.for_each(batch ? 1 : rows, batch ? column_blocks(width) : 1, pass);
}

// The backward of normalize_step: dx (the gradient of the normalization's input) from dy,
// every buffer [*, ld] given from the step's first row.
template <typename S, typename A, typename Backend, typename DY, typename DX>
void normalize_step_backward(Backend& be, const NormParams& n, int64_t t, int64_t r0, int64_t rows, int64_t col0,
                             int64_t width, int64_t stat_width, int64_t group, int64_t groups, const DY* dy, DX* dx,
                             const A* saved, int64_t ld, const void* gamma, const A* rstd) {
  if (rows == 0) return;
  const bool batch = n.kind == Norm::Batch;
  const int64_t stat = batch ? t * stat_width + col0 : r0 * groups + group;
  const NormalizeLinesBackward<S, A, DY, DX> pass{norm_lines(n, 0, rows, col0, width, batch ? 1 : groups),
                                                  dy, dx, saved, ld,
                                                  static_cast<const S*>(gamma), rstd + stat,
                                                  !given_statistics(n, rows)};
  be.for_each(batch ? 1 : rows, batch ? column_blocks(width) : 1, pass);
}

// gx = x W_ihᵀ for all N rows: one matmul, before the recurrence (stepwise or persistent).
// Normalized layers then normalize it: batch norm step by step (each step's rows), layer norm
// all rows at once.
template <typename S, typename A, typename Backend>
void forward_input_projection(Backend& be, const ForwardParams& p) {
  const InputProjection<A> gx = input_projection_buffer<A>(p);
  be.template gemm<S, A>(false, true, p.N, p.G, p.I, static_cast<const S*>(p.x), p.I, static_cast<const S*>(p.w_ih),
                         p.I, 0, gx.gx, gx.ld);
  if (!p.norm) return;
  const NormParams& n = *p.norm;
  auto* xhat = static_cast<A*>(p.xhat_x);
  auto normalize = [&](int64_t t, int64_t r0, int64_t rows) {
    normalize_step<S, A>(be, n, t, r0, rows, 0, p.G, p.G, 0, 1, gx.gx + r0 * gx.ld, gx.ld, gx.gx + r0 * gx.ld, gx.ld,
                         xhat ? xhat + r0 * p.G : nullptr, p.G, n.gamma_x, nullptr, static_cast<A*>(p.rstd_x),
                         static_cast<A*>(p.batch_mean_x), static_cast<A*>(p.batch_var_x), n.mean_x, n.var_x);
  };
  if (n.kind == Norm::Layer) return normalize(0, 0, p.N);
  const auto offsets = step_offsets(p);
  for (int64_t t = 0; t < p.T; ++t) normalize(t, offsets[t], p.batch_sizes[t]);
}

// The recurrence one step at a time: per step one matmul (two for GRU_CHO, plus the
// projection's) and one fused pointwise pass.
template <typename S, typename A, typename Backend>
void forward_steps(Backend& be, const ForwardParams& p) {
  const int64_t H = p.H, P = p.P, G = p.G;
  const auto* w_hh = static_cast<const S*>(p.w_hh);
  const auto* w_hr = static_cast<const S*>(p.w_hr);
  const auto* b_ih = static_cast<const S*>(p.b_ih);
  const auto* b_hh = static_cast<const S*>(p.b_hh);
  auto* y = static_cast<S*>(p.y);
  auto* h = static_cast<S*>(p.h);
  auto* c = static_cast<A*>(p.c);
  auto* gates = static_cast<A*>(p.gates);
  const int64_t saved_width = saved_gates_per_unit(p.cell) * H;
  const InputProjection<A> projection = input_projection_buffer<A>(p);
  A* gx = projection.gx;
  const int64_t ld_gx = projection.ld;
  auto* gh = static_cast<A*>(p.gh);
  auto* cells = static_cast<A*>(p.cells);
  auto* proj_in = static_cast<S*>(p.proj_in);
  auto* rh = static_cast<S*>(p.rh);
  const auto* recurrent_mask = static_cast<const S*>(p.recurrent_mask);
  const auto keep_h = keep_of<S, A>(p.keep_h, p.keep_h_draw);
  const auto keep_c = keep_of<S, A>(p.keep_c, p.keep_c_draw);
  const ZoneoutForm zoneout = zoneout_form(keep_h, keep_c);  // a template argument of the passes
  auto* masked_h = static_cast<S*>(p.masked_h);
  auto* cells_new = static_cast<A*>(p.cells_new);
  auto* hidden_new = static_cast<S*>(p.hidden_new);
  const auto offsets = step_offsets(p);
  const NormParams* norm = p.norm;
  auto* xhat_h = static_cast<A*>(p.xhat_h);
  auto* chat = static_cast<A*>(p.chat);
  // Normalized layers: the hidden side gh of step t, columns [col0, col0 + width) (layer norm's
  // group `group`), in place.
  auto normalize_hidden = [&](int64_t t, int64_t r0, int64_t rows, int64_t col0, int64_t width, int64_t group) {
    if (!norm) return;
    normalize_step<S, A>(be, *norm, t, r0, rows, col0, width, G, group, hidden_norm_groups(p.cell), gh, G, gh, G,
                         xhat_h ? xhat_h + r0 * G : nullptr, G, norm->gamma_h, nullptr, static_cast<A*>(p.rstd_h),
                         static_cast<A*>(p.batch_mean_h), static_cast<A*>(p.batch_var_h), norm->mean_h,
                         norm->var_h);
  };

  for (int64_t s = 0; s < p.T; ++s) {
    const int64_t t = p.reverse ? p.T - 1 - s : s;
    const int64_t rows = p.batch_sizes[t];
    const int64_t r0 = offsets[t];
    const A* gx_t = gx + r0 * ld_gx;
    A* gates_t = gates ? gates + r0 * saved_width : nullptr;
    // h_{t-1} for the product: the previous step's output rows when every row of this step
    // was active there, else the state h. Output rows are written once: this step's pass may
    // start while other threads still read them (persistent_cpu.h: one barrier per step).
    const int64_t prev = p.reverse ? t + 1 : t - 1;
    // With step flags, y holds every row's state too (an inactive row's held one) until
    // bindings.cpp zeroes the inactive rows after the layer.
    const S* h_in = s > 0 && p.batch_sizes[prev] >= rows ? y + offsets[prev] * P : h;
    const int32_t* flags_t = p.step_flags ? p.step_flags + r0 : nullptr;  // padded: r0 = t * B
    if (recurrent_mask) {
      be.for_each(rows, P, MaskState<S, A>{h_in, recurrent_mask, masked_h, P, flags_t});
      h_in = masked_h;
    }
    const auto keep_h_t = keep_h + t * p.B * P;  // [T, B, *]: packed too
    const auto keep_c_t = keep_c + t * p.B * H;
    // Zoneout reads the state carried in, zero after a reset.
    S* h_reset = keep_h_t && !w_hr ? h : nullptr;
    switch (p.cell) {
      case Cell::LSTM: {
        be.template gemm<S, A>(false, true, rows, G, P, h_in, P, w_hh, P, 0, gh, G);
        normalize_hidden(t, r0, rows, 0, G, 0);
        if (flags_t) be.for_each(rows, H, StartSegments<S, A>{gh, G, 4, c, h_reset, H, flags_t});
        // With a projection the step writes o * tanh(c_t) (the input of W_hr) and the state
        // is set after the projection matmul.
        S* m_t = w_hr ? proj_in + (gates ? r0 * H : 0) : y + r0 * H;
        A* cells_t = cells ? cells + r0 * H : nullptr;
        with_flag(gates != nullptr, [&](auto save) {
          with_flag(norm != nullptr, [&](auto norm_cell) {
            with_flags_and_zoneout(flags_t != nullptr, zoneout, [&](auto flagged, auto zoned) {
              be.for_each(rows, H,
                          LstmForwardStep<S, A, decltype(save)::value, decltype(norm_cell)::value,
                                          decltype(flagged)::value, decltype(zoned)::value>{
                              gx_t, gh, b_ih, b_hh, c, m_t, w_hr ? m_t : h, gates_t, cells_t, H, ld_gx,
                              A(p.cell_clip), gh, flags_t, w_hr == nullptr, w_hr ? Keep<S, A>{} : keep_h_t, keep_c_t,
                              cells_new ? cells_new + r0 * H : nullptr});
            });
          });
        });
        if (norm) {  // h_t = o * tanh(N_c(c_t)), o left in gh by the step
          auto* c_tilde = static_cast<A*>(p.c_tilde);
          normalize_step<S, A>(be, *norm, t, r0, rows, 0, H, H, 0, 1, c, H, c_tilde, H, chat ? chat + r0 * H : nullptr,
                               H, norm->gamma_c, norm->beta_c, static_cast<A*>(p.rstd_c),
                               static_cast<A*>(p.batch_mean_c), static_cast<A*>(p.batch_var_c), norm->mean_c,
                               norm->var_c);
          be.for_each(rows, H, LstmNormOutputStep<S, A>{c_tilde, gh, m_t, w_hr ? m_t : h, H});
        }
        if (w_hr) {
          be.template gemm<S, S>(false, true, rows, P, H, m_t, H, w_hr, H, 0, y + r0 * P, P);
          if (flags_t || keep_h_t)
            be.for_each(rows, P, ProjectedStateStep<S, A>{y + r0 * P, h, P, flags_t, keep_h_t});
          else
            be.copy(h, y + r0 * P, rows * P * static_cast<int64_t>(sizeof(S)));
        }
        break;
      }
      case Cell::GRU:
        be.template gemm<S, A>(false, true, rows, G, H, h_in, H, w_hh, H, 0, gh, G);
        normalize_hidden(t, r0, rows, 0, G, 0);
        if (flags_t) be.for_each(rows, H, StartSegments<S, A>{gh, G, 3, nullptr, h, H, flags_t});
        with_flag(gates != nullptr, [&](auto save) {
          with_flags_and_zoneout(flags_t != nullptr, zoneout, [&](auto flagged, auto zoned) {
            be.for_each(rows, H,
                        GruForwardStep<S, A, decltype(save)::value, decltype(flagged)::value, decltype(zoned)::value>{
                            gx_t, gh, b_ih, b_hh, h, y + r0 * H, gates_t, H, ld_gx, flags_t, keep_h_t});
          });
        });
        break;
      case Cell::GRU_CHO:
        be.template gemm<S, A>(false, true, rows, 2 * H, H, h_in, H, w_hh, H, 0, gh, G);
        normalize_hidden(t, r0, rows, 0, 2 * H, 0);
        if (flags_t) be.for_each(rows, H, StartSegments<S, A>{gh, G, 2, nullptr, h, H, flags_t});
        with_flag(gates != nullptr, [&](auto save) {
          be.for_each(rows, H,
                      GruChoResetStep<S, A, decltype(save)::value>{gx_t, gh, b_ih, b_hh, recurrent_mask ? masked_h : h,
                                                                   rh, gates_t, H, ld_gx});
        });
        be.template gemm<S, A>(false, true, rows, H, H, rh, H, w_hh + 2 * H * H, H, 0, gh + 2 * H, G);
        normalize_hidden(t, r0, rows, 2 * H, H, 1);
        with_flag(gates != nullptr, [&](auto save) {
          with_flags_and_zoneout(flags_t != nullptr, zoneout, [&](auto flagged, auto zoned) {
            be.for_each(rows, H,
                        GruChoOutputStep<S, A, decltype(save)::value, decltype(flagged)::value,
                                         decltype(zoned)::value>{
                            gx_t, gh, b_ih, b_hh, h, y + r0 * H, gates_t, H, ld_gx, flags_t, keep_h_t});
          });
        });
        break;
      case Cell::RNN_TANH:
      case Cell::RNN_RELU:
        be.template gemm<S, A>(false, true, rows, H, H, h_in, H, w_hh, H, 0, gh, H);
        normalize_hidden(t, r0, rows, 0, H, 0);
        if (flags_t) be.for_each(rows, H, StartSegments<S, A>{gh, H, 1, nullptr, h_reset, H, flags_t});
        with_flags_and_zoneout(flags_t != nullptr, zoneout, [&](auto flagged, auto zoned) {
          constexpr bool kFlags = decltype(flagged)::value;
          constexpr ZoneoutForm kZoneout = decltype(zoned)::value;
          S* hidden_new_t = hidden_new ? hidden_new + r0 * H : nullptr;
          if (p.cell == Cell::RNN_TANH)
            be.for_each(rows, H,
                        RnnForwardStep<S, A, false, kFlags, kZoneout>{gx_t, gh, b_ih, b_hh, h, y + r0 * H, H, flags_t,
                                                                      keep_h_t, hidden_new_t});
          else
            be.for_each(rows, H,
                        RnnForwardStep<S, A, true, kFlags, kZoneout>{gx_t, gh, b_ih, b_hh, h, y + r0 * H, H, flags_t,
                                                                     keep_h_t, hidden_new_t});
        });
        break;
      default:
        invalid_cell(p.cell);
    }
  }
}

template <typename S, typename A, typename Backend>
void forward(Backend& be, const ForwardParams& p) {
  forward_input_projection<S, A>(be, p);
  forward_steps<S, A>(be, p);
}

// Before the backward recurrence (stepwise or persistent): h_{t-1} (and c_{t-1}) of every
// row, gathered from h0 and the saved hidden states, for the pointwise passes and dW_hh.
template <typename S, typename A, typename Backend>
void backward_gather(Backend& be, const BackwardParams& p) {
  if (p.step_flags) {  // padded input: per element, reading the flags where they are
    be.for_each(p.N, p.P, GatherStatesWithFlags<S>{static_cast<S*>(p.h_prev), static_cast<const S*>(p.hidden),
                                                   static_cast<const S*>(p.h0), p.step_flags, p.T, p.B, p.P,
                                                   p.reverse});
    if (p.cell == Cell::LSTM)
      be.for_each(p.N, p.H, GatherStatesWithFlags<A>{static_cast<A*>(p.c_prev), static_cast<const A*>(p.cells),
                                                     static_cast<const A*>(p.c0), p.step_flags, p.T, p.B, p.H,
                                                     p.reverse});
    return;
  }
  const auto offsets = step_offsets(p);
  gather_previous_states<S>(be, p, offsets, static_cast<S*>(p.h_prev), static_cast<const S*>(p.hidden),
                            static_cast<const S*>(p.h0), p.P);
  if (p.cell == Cell::LSTM)
    gather_previous_states<A>(be, p, offsets, static_cast<A*>(p.c_prev), static_cast<const A*>(p.cells),
                              static_cast<const A*>(p.c0), p.H);
}

// The backward recurrence one step at a time: the gate gradients of every row (dgx, dgh;
// GRU_CHO also rh) and the gradients of h0 and c0.
template <typename S, typename A, typename Backend>
void backward_steps(Backend& be, const BackwardParams& p) {
  const int64_t H = p.H, P = p.P, G = p.G;
  const auto* w_hh = static_cast<const S*>(p.w_hh);
  const auto* w_hr = static_cast<const S*>(p.w_hr);
  const auto* hidden = static_cast<const S*>(p.hidden);
  const auto* gates = static_cast<const A*>(p.gates);
  const auto* cells = static_cast<const A*>(p.cells);
  const auto* dy = static_cast<const S*>(p.dy);
  auto* dh = static_cast<A*>(p.dh);
  auto* dc = static_cast<A*>(p.dc);
  auto* dgx = static_cast<S*>(p.dgx);
  auto* dgh = static_cast<S*>(p.dgh);
  auto* h_prev = static_cast<S*>(p.h_prev);
  auto* c_prev = static_cast<A*>(p.c_prev);
  auto* dht = static_cast<S*>(p.dht);
  auto* dm = static_cast<A*>(p.dm);
  auto* rh = static_cast<S*>(p.rh);
  auto* drh = static_cast<A*>(p.drh);
  const auto* recurrent_mask = static_cast<const S*>(p.recurrent_mask);
  const auto keep_h = keep_of<S, A>(p.keep_h, p.keep_h_draw);
  const auto keep_c = keep_of<S, A>(p.keep_c, p.keep_c_draw);
  const ZoneoutForm zoneout = zoneout_form(keep_h, keep_c);  // a template argument of the passes
  auto* masked_h_prev = static_cast<S*>(p.masked_h_prev);
  auto* dh_product = static_cast<A*>(p.dh_product);
  // The state the cells computed from, before zoneout mixed in the previous one.
  const auto* cells_new = p.cells_new ? static_cast<const A*>(p.cells_new) : cells;
  const auto* hidden_new = p.hidden_new ? static_cast<const S*>(p.hidden_new) : hidden;
  const A cell_clip = A(p.cell_clip), grad_clip = A(p.grad_clip);
  const int64_t saved_width = saved_gates_per_unit(p.cell) * H;
  const auto offsets = step_offsets(p);
  // The steps' passes write the gradients of the pre-activations to dpre; the matmuls read
  // dgh. Without normalization they are the same buffers.
  const NormParams* norm = p.norm;
  S* dpre_x = norm ? static_cast<S*>(p.dpre_x) : dgx;
  S* dpre_h = norm ? static_cast<S*>(p.dpre_h) : dgh;
  const auto* xhat_h = static_cast<const A*>(p.xhat_h);
  const auto* chat = static_cast<const A*>(p.chat);
  auto normalize_hidden_backward = [&](int64_t t, int64_t r0, int64_t rows, int64_t col0, int64_t width,
                                       int64_t group) {
    if (!norm) return;
    normalize_step_backward<S, A>(be, *norm, t, r0, rows, col0, width, G, group, hidden_norm_groups(p.cell),
                                  dpre_h + r0 * G, dgh + r0 * G, xhat_h + r0 * G, G, norm->gamma_h,
                                  static_cast<const A*>(p.rstd_h));
  };

  // Steps in the opposite order of the forward walk. With step flags or zoneout the products of
  // LSTM and RNN accumulate into dh (steps.h: the pass leaves what they must add to).
  const double dh_beta = p.step_flags || keep_h ? 1 : 0;
  for (int64_t s = 0; s < p.T; ++s) {
    const int64_t t = p.reverse ? s : p.T - 1 - s;
    const int64_t rows = p.batch_sizes[t];
    const int64_t r0 = offsets[t];
    const A* gates_t = gates + r0 * saved_width;
    const int32_t* flags_t = p.step_flags ? p.step_flags + r0 : nullptr;  // padded: r0 = t * B
    const auto keep_h_t = keep_h + t * p.B * P;
    const auto keep_c_t = keep_c + t * p.B * H;
    // The product of the step's gate gradients dgh (its first `width` columns) with W_hh adds
    // (beta 1) or writes the gradient of h_{t-1}; with recurrent dropout that of m ⊙ h_{t-1},
    // which reaches h_{t-1} times m.
    auto add_product = [&](int64_t width, double beta) {
      if (!recurrent_mask)
        return be.template gemm<S, A>(false, false, rows, P, width, dgh + r0 * G, G, w_hh, P, beta, dh, P);
      be.template gemm<S, A>(false, false, rows, P, width, dgh + r0 * G, G, w_hh, P, 0, dh_product, P);
      be.for_each(rows, P, AddMaskedProduct<S, A>{dh, dh_product, recurrent_mask, P, beta != 0});
    };
    const S* h_in = h_prev + r0 * P;  // the left operand of forward's products
    if (recurrent_mask) {
      be.for_each(rows, P, MaskState<S, A>{h_in, recurrent_mask, masked_h_prev + r0 * P, P, nullptr});
      h_in = masked_h_prev + r0 * P;
    }
    if (flags_t && s > 0) {  // the step after t (in the forward walk) may have reset the row
      const int32_t* next_flags = p.step_flags + (p.reverse ? t - 1 : t + 1) * p.B;
      be.for_each(rows, P, CutAtResets<A>{dh, P, next_flags});
      if (p.cell == Cell::LSTM) be.for_each(rows, H, CutAtResets<A>{dc, H, next_flags});
    }
    with_flags_and_zoneout(flags_t != nullptr, zoneout, [&](auto flagged, auto zoned) {
      constexpr bool kFlags = decltype(flagged)::value;
      constexpr ZoneoutForm kZoneout = decltype(zoned)::value;
      switch (p.cell) {
        case Cell::LSTM: {
          const S* dy_t = dy + r0 * P;
          A* dh_t = dh;
          if (w_hr) {  // the cell's output m = o * tanh(c) reaches h through W_hr
            be.for_each(rows, P, AddStep<S, A, kFlags, kZoneout>{dy_t, dh, dht + r0 * P, P, flags_t, keep_h_t});
            be.template gemm<S, A>(false, false, rows, H, P, dht + r0 * P, P, w_hr, H, 0, dm, H);
            dh_t = dm;
          }
          if (norm) {  // around N_c: the o gradient and dc̃, N_c's backward, then the rest
            A* dc_tilde_t = static_cast<A*>(p.dc_tilde) + r0 * H;
            auto* dc_norm = static_cast<A*>(p.dc_norm);
            with_flag(w_hr != nullptr, [&](auto projected) {
              be.for_each(rows, H,
                          LstmNormBackwardOutputStep<S, A, decltype(projected)::value>{
                              gates_t, chat + r0 * H, static_cast<const S*>(norm->gamma_c),
                              static_cast<const S*>(norm->beta_c), dy_t, dh_t, dc_tilde_t, dpre_x + r0 * G, H,
                              grad_clip});
            });
            normalize_step_backward<S, A>(be, *norm, t, r0, rows, 0, H, H, 0, 1, dc_tilde_t, dc_norm, chat + r0 * H,
                                          H, norm->gamma_c, static_cast<const A*>(p.rstd_c));
            be.for_each(rows, H,
                        LstmNormBackwardCellStep<S, A>{gates_t, cells + r0 * H, c_prev + r0 * H, dc_norm, dc,
                                                       dpre_x + r0 * G, H, cell_clip, grad_clip});
          } else {
            with_flag(w_hr != nullptr, [&](auto projected) {
              be.for_each(rows, H,
                          LstmBackwardStep<S, A, decltype(projected)::value, kFlags, kZoneout>{
                              gates_t, cells_new + r0 * H, c_prev + r0 * H, dy_t, dh_t, dc, dpre_x + r0 * G, H,
                              cell_clip, grad_clip, flags_t, w_hr ? Keep<S, A>{} : keep_h_t, keep_c_t});
            });
          }
          normalize_hidden_backward(t, r0, rows, 0, G, 0);
          add_product(G, dh_beta);
          break;
        }
        case Cell::GRU:
          be.for_each(rows, H,
                      GruBackwardStep<S, A, kFlags, kZoneout>{gates_t, h_prev + r0 * H, dy + r0 * H, dh,
                                                              dpre_x + r0 * G, dpre_h + r0 * G, H, grad_clip, flags_t,
                                                              keep_h_t});
          normalize_hidden_backward(t, r0, rows, 0, G, 0);
          add_product(G, 1);
          break;
        case Cell::GRU_CHO:
          be.for_each(rows, H,
                      GruChoBackwardNzStep<S, A, kFlags, kZoneout>{gates_t, h_prev + r0 * H, dy + r0 * H, dh,
                                                                   dpre_x + r0 * G, H, grad_clip, flags_t, keep_h_t});
          normalize_hidden_backward(t, r0, rows, 2 * H, H, 1);
          be.template gemm<S, A>(false, false, rows, H, H, dgh + r0 * G + 2 * H, G, w_hh + 2 * H * H, H,
                                 0, drh, H);
          be.for_each(rows, H,
                      GruChoBackwardRStep<S, A, kFlags>{gates_t, h_in, drh, dh, dpre_x + r0 * G, rh + r0 * H, H,
                                                        grad_clip, flags_t, recurrent_mask});
          normalize_hidden_backward(t, r0, rows, 0, 2 * H, 0);
          add_product(2 * H, 1);
          break;
        case Cell::RNN_TANH:
        case Cell::RNN_RELU:
          if (p.cell == Cell::RNN_TANH)
            be.for_each(rows, H,
                        RnnBackwardStep<S, A, false, kFlags, kZoneout>{hidden_new + r0 * H, dy + r0 * H, dh,
                                                                       dpre_x + r0 * G, H, grad_clip, flags_t,
                                                                       keep_h_t});
          else
            be.for_each(rows, H,
                        RnnBackwardStep<S, A, true, kFlags, kZoneout>{hidden_new + r0 * H, dy + r0 * H, dh,
                                                                      dpre_x + r0 * G, H, grad_clip, flags_t,
                                                                      keep_h_t});
          normalize_hidden_backward(t, r0, rows, 0, H, 0);
          add_product(H, dh_beta);
          break;
        default:
          invalid_cell(p.cell);
      }
    });
  }
  if (p.step_flags) {  // the step the walk ended on started from h0 (c0) unless it reset
    const int32_t* first = p.step_flags + (p.reverse ? p.T - 1 : 0) * p.B;
    be.for_each(p.B, P, CutAtResets<A>{dh, P, first});
    if (p.cell == Cell::LSTM) be.for_each(p.B, H, CutAtResets<A>{dc, H, first});
  }
}

// Normalized layers after the backward recurrence: dgx from dpre_x through the input side's
// normalization (batch norm step by step, layer norm all rows at once), and the gradients of
// γ and β as column sums.
template <typename S, typename A, typename Backend>
void backward_normalization(Backend& be, const BackwardParams& p) {
  const NormParams& n = *p.norm;
  const int64_t G = p.G, H = p.H, N = p.N;
  const auto* dpre_x = static_cast<const S*>(p.dpre_x);
  const auto* dpre_h = static_cast<const S*>(p.dpre_h);
  const auto* xhat_x = static_cast<const A*>(p.xhat_x);
  const auto* xhat_h = static_cast<const A*>(p.xhat_h);
  const auto* chat = static_cast<const A*>(p.chat);
  const auto* dc_tilde = static_cast<const A*>(p.dc_tilde);
  auto* dgx = static_cast<S*>(p.dgx);
  auto input_side = [&](int64_t t, int64_t r0, int64_t rows) {
    normalize_step_backward<S, A>(be, n, t, r0, rows, 0, G, G, 0, 1, dpre_x + r0 * G, dgx + r0 * G, xhat_x + r0 * G,
                                  G, n.gamma_x, static_cast<const A*>(p.rstd_x));
  };
  if (n.kind == Norm::Layer) {
    input_side(0, 0, N);
  } else {
    const auto offsets = step_offsets(p);
    for (int64_t t = 0; t < p.T; ++t) input_side(t, offsets[t], p.batch_sizes[t]);
  }
  if (p.dgamma_x) be.for_each(1, column_blocks(G), ColumnSums<S, A, S>{dpre_x, G, xhat_x, G, static_cast<S*>(p.dgamma_x), N, G});
  if (p.dgamma_h) be.for_each(1, column_blocks(G), ColumnSums<S, A, S>{dpre_h, G, xhat_h, G, static_cast<S*>(p.dgamma_h), N, G});
  if (p.dgamma_c) be.for_each(1, column_blocks(H), ColumnSums<S, A, A>{dc_tilde, H, chat, H, static_cast<S*>(p.dgamma_c), N, H});
  if (p.dbeta_c) be.for_each(1, column_blocks(H), ColumnSums<S, A, A>{dc_tilde, H, nullptr, 0, static_cast<S*>(p.dbeta_c), N, H});
}

// After the backward recurrence: dx and the weight gradients as matmuls over all N rows.
template <typename S, typename A, typename Backend>
void backward_weight_gradients(Backend& be, const BackwardParams& p) {
  if (p.norm) backward_normalization<S, A>(be, p);
  const int64_t H = p.H, P = p.P, G = p.G, N = p.N;
  const auto* x = static_cast<const S*>(p.x);
  const auto* w_ih = static_cast<const S*>(p.w_ih);
  const auto* dgx = static_cast<const S*>(p.dgx);
  const auto* dgh = static_cast<const S*>(p.dgh);
  // dW_hh: the left operand of forward's products, m ⊙ h_{t-1} with recurrent dropout.
  const auto* h_prev = static_cast<const S*>(p.masked_h_prev ? p.masked_h_prev : p.h_prev);
  const auto* rh = static_cast<const S*>(p.rh);
  const auto* dht = static_cast<const S*>(p.dht);
  // A null result pointer means "not needed".
  if (p.dx) be.template gemm<S, S>(false, false, N, p.I, G, dgx, G, w_ih, p.I, 0, static_cast<S*>(p.dx), p.I);
  if (p.dw_ih) be.template gemm<S, S>(true, false, G, p.I, N, dgx, G, x, p.I, 0, static_cast<S*>(p.dw_ih), p.I);
  if (auto* dw_hh = static_cast<S*>(p.dw_hh)) {
    if (p.cell == Cell::GRU_CHO) {  // W_hn multiplies r * h_{t-1}, not h_{t-1}
      be.template gemm<S, S>(true, false, 2 * H, H, N, dgh, G, h_prev, H, 0, dw_hh, H);
      be.template gemm<S, S>(true, false, H, H, N, dgh + 2 * H, G, rh, H, 0, dw_hh + 2 * H * H, H);
    } else {
      be.template gemm<S, S>(true, false, G, P, N, dgh, G, h_prev, P, 0, dw_hh, P);
    }
  }
  // The biases are added after the normalizations: their gradients are those of the pre-activations.
  const auto* dbias_x = static_cast<const S*>(p.norm ? p.dpre_x : p.dgx);
  const auto* dbias_h = static_cast<const S*>(p.norm ? p.dpre_h : p.dgh);
  const auto* ones = static_cast<const S*>(p.ones);
  if (p.db_ih) be.template gemm<S, S>(true, false, G, 1, N, dbias_x, G, ones, 1, 0, static_cast<S*>(p.db_ih), 1);
  if (p.db_hh) be.template gemm<S, S>(true, false, G, 1, N, dbias_h, G, ones, 1, 0, static_cast<S*>(p.db_hh), 1);
  if (p.dw_hr)
    be.template gemm<S, S>(true, false, P, H, N, dht, P, static_cast<const S*>(p.proj_in), H, 0,
                           static_cast<S*>(p.dw_hr), H);
}

template <typename S, typename A, typename Backend>
void backward(Backend& be, const BackwardParams& p) {
  backward_gather<S, A>(be, p);
  backward_steps<S, A>(be, p);
  backward_weight_gradients<S, A>(be, p);
}

}  // namespace rnnfused
