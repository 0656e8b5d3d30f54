// Normalization inside the recurrence: recurrent batch normalization (Cooijmans et al.,
// ICLR 2017) and layer normalization (Ba, Kiros and Hinton 2016), forward and backward, as
// passes over the buffers of one step (or of all steps, for the input side).
//
// Both normalize "lines" of values: batch norm a gate column over the rows active at one
// step, layer norm a row over a group of columns (all G gate columns; for GRU_CHO's hidden
// side the r,z columns and the n columns separately, since n's product needs r first; the
// H units of c). A line is normalized with its own statistics (training; layer norm always)
// or with given ones (batch norm in eval: the running statistics of the step):
//   x̂ = (x - mean) / sqrt(var + eps),   y = γ x̂ (+ β)
// and its backward, from dy:
//   dx̂ = γ dy;  own statistics: dx = rstd (dx̂ - mean(dx̂) - x̂ mean(dx̂ x̂));  given: dx = rstd dx̂.
// The gradients of γ and β are column sums taken after the loop (deterministic matmuls).
#pragma once

#include <cstdint>

#include "cells.h"
#include "params.h"
#include "steps.h"

namespace rnnfused {

// Where a pass finds its lines. Batch norm: the columns [col0, col0 + width) over rows
// [row0, row0 + rows), in blocks of kLineBlock neighbouring columns, rows outer and the
// block's columns inner (contiguous, so the CPU vectorises them); layer norm: the rows
// [row0, row0 + rows), each over the columns [col0, col0 + width). Buffers address element
// (row, column) as row * ld + column with their own ld. Per-line values (rstd, statistics)
// of line i (a column's index from col0, or a row's from row0) are at [i * stat_stride].
// A pass runs as for_each(1, column blocks) (batch norm) or for_each(rows, 1) (layer norm).
constexpr int64_t kLineBlock = 16;

struct Lines {
  bool batch;
  int64_t row0, rows;
  int64_t col0, width;
  int64_t stat_stride;
};

RNNF_HD int64_t column_blocks(int64_t width) {
  return (width + kLineBlock - 1) / kLineBlock;
}

// The columns of block b: the first line and how many.
struct ColumnBlock {
  int64_t first, count;
};

RNNF_HD ColumnBlock column_block(int64_t b, int64_t width) {
  const int64_t first = b * kLineBlock;
  return {first, width - first < kLineBlock ? width - first : kLineBlock};
}

// Forward: y = γ x̂ (+ β) into `out` (may be `in`), x̂ into `saved` (if not null),
// 1 / sqrt(var + eps) into rstd, and the mean and (biased) variance used into mean_out,
// var_out (if not null: batch norm in training, for the running statistics). γ and β are
// indexed by column.
template <typename S, typename A>
struct NormalizeLines {
  Lines l;
  const A* in;
  int64_t ld_in;
  A* out;
  int64_t ld_out;
  A* saved;  // x̂, or null
  int64_t ld_saved;
  const S* gamma;
  const S* beta;        // null: no shift
  A* rstd;
  A* mean_out;          // or null
  A* var_out;
  const S* given_mean;  // batch norm in eval: the running statistics of the lines; null: own
  const S* given_var;
  A eps;

  RNNF_HD void operator()(int64_t row, int64_t block) const {
    if (l.batch)
      columns(column_block(block, l.width));
    else
      one_row(row);
  }

  RNNF_HD void columns(ColumnBlock b) const {
    A mean[kLineBlock], scale[kLineBlock];
    if (given_mean) {
      for (int64_t c = 0; c < b.count; ++c) {
        mean[c] = load<A>(given_mean[(b.first + c) * l.stat_stride]);
        scale[c] = load<A>(given_var[(b.first + c) * l.stat_stride]);
      }
    } else {
      A sum[kLineBlock] = {}, squares[kLineBlock] = {};
      for (int64_t r = 0; r < l.rows; ++r) {
        const A* x = in + (l.row0 + r) * ld_in + l.col0 + b.first;
        for (int64_t c = 0; c < b.count; ++c) sum[c] += x[c];
      }
      for (int64_t c = 0; c < b.count; ++c) mean[c] = sum[c] / A(l.rows);
      for (int64_t r = 0; r < l.rows; ++r) {
        const A* x = in + (l.row0 + r) * ld_in + l.col0 + b.first;
        for (int64_t c = 0; c < b.count; ++c) {
          const A d = x[c] - mean[c];
          squares[c] += d * d;
        }
      }
      for (int64_t c = 0; c < b.count; ++c) scale[c] = squares[c] / A(l.rows);
    }
    for (int64_t c = 0; c < b.count; ++c) {  // scale: the variance, then rstd
      const int64_t i = (b.first + c) * l.stat_stride;
      if (mean_out) {
        mean_out[i] = mean[c];
        var_out[i] = scale[c];
      }
      scale[c] = A(1) / sqrt(scale[c] + eps);
      rstd[i] = scale[c];
    }
    const int64_t col0 = l.col0 + b.first;
    for (int64_t r = 0; r < l.rows; ++r) {
      const int64_t row = l.row0 + r;
      for (int64_t c = 0; c < b.count; ++c) {
        const A xhat = (in[row * ld_in + col0 + c] - mean[c]) * scale[c];
        if (saved) saved[row * ld_saved + col0 + c] = xhat;
        out[row * ld_out + col0 + c] = load<A>(gamma[col0 + c]) * xhat + (beta ? load<A>(beta[col0 + c]) : A(0));
      }
    }
  }

  RNNF_HD void one_row(int64_t i) const {
    const int64_t row = l.row0 + i;
    const A* x = in + row * ld_in + l.col0;
    A sum = 0, squares = 0;
    for (int64_t k = 0; k < l.width; ++k) sum += x[k];
    const A mean = sum / A(l.width);
    for (int64_t k = 0; k < l.width; ++k) squares += (x[k] - mean) * (x[k] - mean);
    const A r = A(1) / sqrt(squares / A(l.width) + eps);
    rstd[i * l.stat_stride] = r;
    for (int64_t k = 0; k < l.width; ++k) {
      const int64_t col = l.col0 + k;
      const A xhat = (x[k] - mean) * r;
      if (saved) saved[row * ld_saved + col] = xhat;
      out[row * ld_out + col] = load<A>(gamma[col]) * xhat + (beta ? load<A>(beta[col]) : A(0));
    }
  }
};

// Backward: dx from dy (may be the same buffer), x̂ and rstd; every buffer [*, ld].
template <typename S, typename A, typename DY, typename DX>
struct NormalizeLinesBackward {
  Lines l;
  const DY* dy;
  DX* dx;
  const A* saved;  // x̂
  int64_t ld;
  const S* gamma;
  const A* rstd;
  bool own_statistics;

  RNNF_HD void operator()(int64_t row, int64_t block) const {
    if (l.batch)
      columns(column_block(block, l.width));
    else
      one_row(row);
  }

  RNNF_HD void columns(ColumnBlock b) const {
    const int64_t col0 = l.col0 + b.first;
    A mean_dxhat[kLineBlock] = {}, mean_dxhat_xhat[kLineBlock] = {};
    if (own_statistics) {
      for (int64_t r = 0; r < l.rows; ++r) {
        const int64_t e = (l.row0 + r) * ld + col0;
        for (int64_t c = 0; c < b.count; ++c) {
          const A dxhat = load<A>(dy[e + c]) * load<A>(gamma[col0 + c]);
          mean_dxhat[c] += dxhat;
          mean_dxhat_xhat[c] += dxhat * saved[e + c];
        }
      }
      for (int64_t c = 0; c < b.count; ++c) {
        mean_dxhat[c] /= A(l.rows);
        mean_dxhat_xhat[c] /= A(l.rows);
      }
    }
    for (int64_t r = 0; r < l.rows; ++r) {
      const int64_t e = (l.row0 + r) * ld + col0;
      for (int64_t c = 0; c < b.count; ++c) {
        const A dxhat = load<A>(dy[e + c]) * load<A>(gamma[col0 + c]);
        dx[e + c] = store<DX>(rstd[(b.first + c) * l.stat_stride] *
                              (dxhat - mean_dxhat[c] - saved[e + c] * mean_dxhat_xhat[c]));
      }
    }
  }

  RNNF_HD void one_row(int64_t i) const {
    const int64_t e = (l.row0 + i) * ld + l.col0;
    const A r = rstd[i * l.stat_stride];
    A mean_dxhat = 0, mean_dxhat_xhat = 0;
    if (own_statistics) {  // layer norm: always
      for (int64_t k = 0; k < l.width; ++k) {
        const A dxhat = load<A>(dy[e + k]) * load<A>(gamma[l.col0 + k]);
        mean_dxhat += dxhat;
        mean_dxhat_xhat += dxhat * saved[e + k];
      }
      mean_dxhat /= A(l.width);
      mean_dxhat_xhat /= A(l.width);
    }
    for (int64_t k = 0; k < l.width; ++k) {
      const A dxhat = load<A>(dy[e + k]) * load<A>(gamma[l.col0 + k]);
      dx[e + k] = store<DX>(r * (dxhat - mean_dxhat - saved[e + k] * mean_dxhat_xhat));
    }
  }
};

// LSTM with a normalized cell: h_t = o * tanh(c̃), c̃ = γ_c ĉ + β_c, after the step wrote c_t
// and o (kept in the gh buffer's o column, which the step no longer needs).
template <typename S, typename A>
struct LstmNormOutputStep {
  const A* c_tilde;  // [rows, H]
  const A* o;        // [rows, 4H] (o in column block 3)
  S* h_out;          // [rows, H] h_t (y rows), or o * tanh(c̃) when projecting
  S* h_state;        // [rows, H] second copy (h_out itself when projecting)
  int64_t H;

  RNNF_HD void operator()(int64_t b, int64_t j) const {
    const int64_t e = b * H + j;
    const A h = o[b * 4 * H + 3 * H + j] * cells::tanh_(c_tilde[e]);
    h_out[e] = store<S>(h);
    h_state[e] = store<S>(h);
  }
};

// Its backward in two passes around the normalization's backward: first the o gradient and
// dc̃ (kept for the γ_c, β_c gradients and the normalization's backward), then, with the
// gradient of c_t complete, the i, f, g gradients and that of c_{t-1}.
template <typename S, typename A, bool kProjected>
struct LstmNormBackwardOutputStep {
  const A* gates;    // [rows, 4H] i, f, g, o
  const A* c_hat;    // [rows, H] ĉ
  const S* gamma_c;  // [H]
  const S* beta_c;   // [H]
  const S* dy;       // [rows, H] (not read when projecting)
  const A* dh;       // [rows, H] gradient of h_t from step t+1 (of o * tanh(c̃) when projecting)
  A* dc_tilde;       // [rows, H] out
  S* dg;             // [rows, 4H] out: column block of o
  int64_t H;
  A grad_clip;

  RNNF_HD void operator()(int64_t b, int64_t j) const {
    const int64_t e = b * H + j;
    A dh_total = dh[e];
    if constexpr (!kProjected) dh_total += load<A>(dy[e]);
    const A c_tilde = load<A>(gamma_c[j]) * c_hat[e] + load<A>(beta_c[j]);
    const auto out = cells::lstm_backward_output(gates[b * 4 * H + 3 * H + j], c_tilde, dh_total, grad_clip);
    dc_tilde[e] = out.dc_tilde;
    dg[b * 4 * H + 3 * H + j] = store<S>(out.d_o);
  }
};

template <typename S, typename A>
struct LstmNormBackwardCellStep {
  const A* gates;    // [rows, 4H] i, f, g, o
  const A* cells;    // [rows, H] c_t
  const A* c_prev;   // [rows, H] c_{t-1}
  const A* dc_norm;  // [rows, H] the gradient of c_t through the normalization
  A* dc;             // [rows, H] in: gradient of c_t from step t+1; out: gradient of c_{t-1}
  S* dg;             // [rows, 4H] out: column blocks of i, f, g
  int64_t H;
  A cell_clip, grad_clip;

  RNNF_HD void operator()(int64_t b, int64_t j) const {
    const int64_t row = b * 4 * H, e = b * H + j;
    const cells::LstmGates<A> a{gates[row + j], gates[row + H + j], gates[row + 2 * H + j], gates[row + 3 * H + j]};
    cells::LstmGates<A> d;
    dc[e] = cells::lstm_backward_cell(a, cells[e], c_prev[e], dc_norm[e] + dc[e], cell_clip, grad_clip, d);
    dg[row + j] = store<S>(d.i);
    dg[row + H + j] = store<S>(d.f);
    dg[row + 2 * H + j] = store<S>(d.g);
  }
};

// out[k] = Σ_r a[r][k] * b[r][k] (b null: Σ_r a[r][k]) over `rows` rows, in row order
// (deterministic), kLineBlock columns per call: for_each(1, column blocks of `columns`). The
// gradients of γ and β.
template <typename S, typename A, typename X>
struct ColumnSums {
  const X* a;
  int64_t ld_a;
  const A* b;  // or null
  int64_t ld_b;
  S* out;
  int64_t rows, columns;

  RNNF_HD void operator()(int64_t, int64_t block) const {
    const ColumnBlock cb = column_block(block, columns);
    A sum[kLineBlock] = {};
    for (int64_t r = 0; r < rows; ++r) {
      const X* ar = a + r * ld_a + cb.first;
      if (b) {
        const A* br = b + r * ld_b + cb.first;
        for (int64_t c = 0; c < cb.count; ++c) sum[c] += load<A>(ar[c]) * br[c];
      } else {
        for (int64_t c = 0; c < cb.count; ++c) sum[c] += load<A>(ar[c]);
      }
    }
    for (int64_t c = 0; c < cb.count; ++c) out[cb.first + c] = store<S>(sum[c]);
  }
};

}  // namespace rnnfused
