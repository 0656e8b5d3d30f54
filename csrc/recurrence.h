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

// gx = x W_ihᵀ for all N rows: one matmul, before the recurrence (stepwise or persistent).
template <typename S, typename A, typename Backend>
void forward_input_projection(Backend& be, const ForwardParams& p) {
  const InputProjection<A> gx = input_projection_buffer<A>(p);
  be.template gemm<S, A>(false, true, p.N, p.G, p.I, static_cast<const S*>(p.x), p.I, static_cast<const S*>(p.w_ih),
                         p.I, 0, gx.gx, gx.ld);
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
  const auto offsets = step_offsets(p);

  for (int64_t s = 0; s < p.T; ++s) {
    const int64_t t = p.reverse ? p.T - 1 - s : s;
    const int64_t rows = p.batch_sizes[t];
    const int64_t r0 = offsets[t];
    const A* gx_t = gx + r0 * ld_gx;
    A* gates_t = gates ? gates + r0 * saved_width : nullptr;
    switch (p.cell) {
      case Cell::LSTM: {
        be.template gemm<S, A>(false, true, rows, G, P, h, P, w_hh, P, 0, gh, G);
        // With a projection the step writes o * tanh(c_t) (the input of W_hr) and the state
        // is set after the projection matmul.
        S* m_t = w_hr ? proj_in + (gates ? r0 * H : 0) : y + r0 * H;
        A* cells_t = cells ? cells + r0 * H : nullptr;
        with_flag(gates != nullptr, [&](auto save) {
          be.for_each(rows, H,
                      LstmForwardStep<S, A, decltype(save)::value>{gx_t, gh, b_ih, b_hh, c, m_t, w_hr ? m_t : h,
                                                                   gates_t, cells_t, H, ld_gx, A(p.cell_clip)});
        });
        if (w_hr) {
          be.template gemm<S, S>(false, true, rows, P, H, m_t, H, w_hr, H, 0, y + r0 * P, P);
          be.copy(h, y + r0 * P, rows * P * static_cast<int64_t>(sizeof(S)));
        }
        break;
      }
      case Cell::GRU:
        be.template gemm<S, A>(false, true, rows, G, H, h, H, w_hh, H, 0, gh, G);
        with_flag(gates != nullptr, [&](auto save) {
          be.for_each(rows, H,
                      GruForwardStep<S, A, decltype(save)::value>{gx_t, gh, b_ih, b_hh, h, y + r0 * H, gates_t, H, ld_gx});
        });
        break;
      case Cell::GRU_CHO:
        be.template gemm<S, A>(false, true, rows, 2 * H, H, h, H, w_hh, H, 0, gh, G);
        with_flag(gates != nullptr, [&](auto save) {
          be.for_each(rows, H, GruChoResetStep<S, A, decltype(save)::value>{gx_t, gh, b_ih, b_hh, h, rh, gates_t, H, ld_gx});
        });
        be.template gemm<S, A>(false, true, rows, H, H, rh, H, w_hh + 2 * H * H, H, 0, gh + 2 * H, G);
        with_flag(gates != nullptr, [&](auto save) {
          be.for_each(rows, H,
                      GruChoOutputStep<S, A, decltype(save)::value>{gx_t, gh, b_ih, b_hh, h, y + r0 * H, gates_t, H, ld_gx});
        });
        break;
      case Cell::RNN_TANH:
      case Cell::RNN_RELU:
        be.template gemm<S, A>(false, true, rows, H, H, h, H, w_hh, H, 0, gh, H);
        if (p.cell == Cell::RNN_TANH)
          be.for_each(rows, H, RnnForwardStep<S, A, false>{gx_t, gh, b_ih, b_hh, h, y + r0 * H, H});
        else
          be.for_each(rows, H, RnnForwardStep<S, A, true>{gx_t, gh, b_ih, b_hh, h, y + r0 * H, H});
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
  const A cell_clip = A(p.cell_clip), grad_clip = A(p.grad_clip);
  const int64_t saved_width = saved_gates_per_unit(p.cell) * H;
  const auto offsets = step_offsets(p);

  // Steps in the opposite order of the forward walk.
  for (int64_t s = 0; s < p.T; ++s) {
    const int64_t t = p.reverse ? s : p.T - 1 - s;
    const int64_t rows = p.batch_sizes[t];
    const int64_t r0 = offsets[t];
    const A* gates_t = gates + r0 * saved_width;
    switch (p.cell) {
      case Cell::LSTM: {
        const S* dy_t = dy + r0 * P;
        const A* dh_t = dh;
        if (w_hr) {  // the cell's output m = o * tanh(c) reaches h through W_hr
          be.for_each(rows, P, AddStep<S, A>{dy_t, dh, dht + r0 * P, P});
          be.template gemm<S, A>(false, false, rows, H, P, dht + r0 * P, P, w_hr, H, 0, dm, H);
          dh_t = dm;
        }
        with_flag(w_hr != nullptr, [&](auto projected) {
          be.for_each(rows, H,
                      LstmBackwardStep<S, A, decltype(projected)::value>{
                          gates_t, cells + r0 * H, c_prev + r0 * H, dy_t, dh_t, dc, dgx + r0 * G, H, cell_clip,
                          grad_clip});
        });
        be.template gemm<S, A>(false, false, rows, P, G, dgx + r0 * G, G, w_hh, P, 0, dh, P);
        break;
      }
      case Cell::GRU:
        be.for_each(rows, H,
                    GruBackwardStep<S, A>{gates_t, h_prev + r0 * H, dy + r0 * H, dh, dgx + r0 * G,
                                          dgh + r0 * G, H, grad_clip});
        be.template gemm<S, A>(false, false, rows, H, G, dgh + r0 * G, G, w_hh, H, 1, dh, H);
        break;
      case Cell::GRU_CHO:
        be.for_each(rows, H,
                    GruChoBackwardNzStep<S, A>{gates_t, h_prev + r0 * H, dy + r0 * H, dh, dgx + r0 * G,
                                               H, grad_clip});
        be.template gemm<S, A>(false, false, rows, H, H, dgx + r0 * G + 2 * H, G, w_hh + 2 * H * H, H,
                               0, drh, H);
        be.for_each(rows, H,
                    GruChoBackwardRStep<S, A>{gates_t, h_prev + r0 * H, drh, dh, dgx + r0 * G,
                                              rh + r0 * H, H, grad_clip});
        be.template gemm<S, A>(false, false, rows, H, 2 * H, dgx + r0 * G, G, w_hh, H, 1, dh, H);
        break;
      case Cell::RNN_TANH:
      case Cell::RNN_RELU:
        if (p.cell == Cell::RNN_TANH)
          be.for_each(rows, H,
                      RnnBackwardStep<S, A, false>{hidden + r0 * H, dy + r0 * H, dh, dgx + r0 * G, H, grad_clip});
        else
          be.for_each(rows, H,
                      RnnBackwardStep<S, A, true>{hidden + r0 * H, dy + r0 * H, dh, dgx + r0 * G, H, grad_clip});
        be.template gemm<S, A>(false, false, rows, H, H, dgx + r0 * G, G, w_hh, H, 0, dh, H);
        break;
      default:
        invalid_cell(p.cell);
    }
  }

}

// After the backward recurrence: dx and the weight gradients as matmuls over all N rows.
template <typename S, typename A, typename Backend>
void backward_weight_gradients(Backend& be, const BackwardParams& p) {
  const int64_t H = p.H, P = p.P, G = p.G, N = p.N;
  const auto* x = static_cast<const S*>(p.x);
  const auto* w_ih = static_cast<const S*>(p.w_ih);
  const auto* dgx = static_cast<const S*>(p.dgx);
  const auto* dgh = static_cast<const S*>(p.dgh);
  const auto* h_prev = static_cast<const S*>(p.h_prev);
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
  const auto* ones = static_cast<const S*>(p.ones);
  if (p.db_ih) be.template gemm<S, S>(true, false, G, 1, N, dgx, G, ones, 1, 0, static_cast<S*>(p.db_ih), 1);
  if (p.db_hh) be.template gemm<S, S>(true, false, G, 1, N, dgh, G, ones, 1, 0, static_cast<S*>(p.db_hh), 1);
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
