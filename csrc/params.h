// The contract between bindings.cpp and the backends: plain structs of sizes and raw
// pointers for ONE recurrent layer in ONE direction. No torch types.
//
// Notation
//   T  steps; batch_sizes[t] rows are active at step t (non-increasing; padded input has
//      batch_sizes[t] = B for every t).
//   B  batch_sizes[0], the rows of the state tensors.
//   N  Σ_t batch_sizes[t], the rows of every per-step tensor. Rows of step t are
//      [offset_t, offset_t + batch_sizes[t]) with offset_t = Σ_{s<t} batch_sizes[s]: the
//      packed layout of torch.nn.utils.rnn.PackedSequence; padded [T, B, *] is the special
//      case of all batch sizes equal.
//   I  input features, H hidden units, P = proj_size if projecting else H (width of h),
//   G  gate pre-activations per row: 4H (LSTM), 3H (GRU), H (RNN).
// Every tensor is dense row-major with the shape given. "S" is the storage dtype (the
// module's dtype), "A" the accumulation dtype: float for S in {fp16, bf16, fp32}, double
// for fp64. Sizes are 64-bit.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#include "hd.h"

namespace rnnfused {
namespace persistent {
struct Tiling;
}

enum class Cell : int {
  LSTM,
  GRU,       // PyTorch / cuDNN form: r applied to (W_hn h + b_hn)
  GRU_CHO,   // Cho et al. 2014 form: r applied to h before W_hn
  RNN_TANH,
  RNN_RELU,
};
constexpr int kNumCells = 5;

enum class DType : int { Float32, Float64, Float16, BFloat16 };

// Normalized layers (norm.h): recurrent batch normalization or layer normalization of the
// input side x W_ihᵀ, the hidden side h W_hhᵀ and (LSTM) the cell c_t:
//   pre = N_x(x W_ihᵀ; γ_x) + N_h(h W_hhᵀ; γ_h) + b_ih + b_hh,  LSTM h_t = o * tanh(N_c(c_t; γ_c, β_c)).
// Batch norm normalizes each column over the rows active at a step, layer norm each row over
// its G columns (GRU_CHO's hidden side: its r,z columns and its n columns apart) or H units.
enum class Norm : int { None = 0, Batch = 1, Layer = 2 };

struct NormParams {
  Norm kind = Norm::None;
  bool own_statistics = true;  // batch norm in training, layer norm; else batch norm's given statistics
  double eps = 1e-5;
  const void* gamma_x = nullptr;  // S [G]
  const void* gamma_h = nullptr;  // S [G]
  const void* gamma_c = nullptr;  // S [H] LSTM
  const void* beta_c = nullptr;   // S [H] LSTM
  // Batch norm in eval: the statistics of every step, S [T, G] (x, h) and [T, H] (c).
  const void* mean_x = nullptr;
  const void* var_x = nullptr;
  const void* mean_h = nullptr;
  const void* var_h = nullptr;
  const void* mean_c = nullptr;
  const void* var_c = nullptr;
};

// Columns normalized together on the hidden side by layer norm: all G, or GRU_CHO's r,z and n.
inline int64_t hidden_norm_groups(Cell cell) {
  return cell == Cell::GRU_CHO ? 2 : 1;
}

// Cells are checked where they enter (bindings.cpp); a switch over them still never falls
// through silently: an invalid cell throws on the host and traps on the GPU.
RNNF_HD void invalid_cell(Cell cell) {
#if defined(__CUDA_ARCH__)
  __trap();
#else
  throw std::invalid_argument("rnnfused: invalid cell " + std::to_string(static_cast<int>(cell)));
#endif
}

RNNF_HD int64_t gates_per_unit(Cell cell) {
  switch (cell) {
    case Cell::LSTM: return 4;
    case Cell::GRU:
    case Cell::GRU_CHO: return 3;
    case Cell::RNN_TANH:
    case Cell::RNN_RELU: return 1;
  }
  invalid_cell(cell);
  return 0;
}

// Width (in units of H) of the per-row activations that forward saves for backward.
//   LSTM i, f, g, o | GRU r, z, n, W_hn h + b_hn | GRU_CHO r, z, n | RNN: none (h is y)
RNNF_HD int64_t saved_gates_per_unit(Cell cell) {
  switch (cell) {
    case Cell::LSTM:
    case Cell::GRU: return 4;
    case Cell::GRU_CHO: return 3;
    case Cell::RNN_TANH:
    case Cell::RNN_RELU: return 0;
  }
  invalid_cell(cell);
  return 0;
}

// The options of one layer direction: the scalar arguments of both operators, in this order
// (Python: rnnfused._ops.LayerOptions). Checked where they enter (bindings.cpp).
struct LayerOptions {
  Cell cell = Cell::LSTM;
  bool has_biases = true;
  bool reverse = false;     // walk t from T-1 down to 0 (the reverse direction of a bidirectional layer)
  double cell_clip = 0;     // LSTM: clamp c_t to [-cell_clip, cell_clip]; +inf: off
  double grad_clip = 0;     // clamp the gradient of every gate pre-activation; +inf: off
  Norm norm = Norm::None;
  bool training = true;     // batch norm: each step's own statistics, else the given ones
  double eps = 1e-5;        // normalized layers: added to every variance
  // The recurrences the caller runs at once on the device, this one included (a bidirectional
  // layer's directions on two CUDA streams: 2): the GPU's persistent plans take a share of the SMs
  // where that pays (persistent::make_plan). Results do not depend on it beyond the tiling's.
  int64_t side_by_side = 1;
};

// Bits of LayerParams::step_flags, one int32 per row of padded input (Python: rnnfused._ops;
// int32 rather than bytes: a byte pointer may alias the float stores of a step, which keeps the
// compiler from hoisting the row's flags out of the vectorised loop).
//   kStepReset     the state carried into the row's step is zero (a new segment starts): its
//                  product with W_hh and the LSTM cell are read as zeros, and no gradient flows
//                  to the state before it.
//   kStepInactive  the row does not step: its state (h, c) is held, its output row is zero and
//                  it neither receives nor passes on gradient at this step, except that the
//                  gradient of the held state passes through unchanged.
constexpr int32_t kStepReset = 1;
constexpr int32_t kStepInactive = 2;

struct LayerParams {
  Cell cell = Cell::LSTM;
  bool reverse = false;  // walk t from T-1 down to 0 (the reverse direction of a bidirectional layer)
  int64_t T = 0, B = 0, N = 0, I = 0, H = 0, P = 0, G = 0;
  const int64_t* batch_sizes = nullptr;  // host memory, [T]
  double cell_clip = 0;  // LSTM only; +inf: off
  double grad_clip = 0;  // +inf: off
  // Padded input only (null otherwise, and then every row steps): int32 [T, B] of kStep* bits,
  // in the memory of the input's device.
  const int32_t* step_flags = nullptr;
  // The regularisers inside the steps (rnnfused/regularisers.py), S, null where off. Packed
  // input indexes them as padded input: row b of step t at [t, b].
  const void* recurrent_mask = nullptr;  // [B, P] recurrent dropout: h_{t-1} meets W_hh as m ⊙ h_{t-1}
                                         //   (the GRU's carry z ⊙ h_{t-1} keeps the unmasked state)
  const void* keep_h = nullptr;          // [T, B, P] zoneout of h (cells.h: zoneout)
  const void* keep_c = nullptr;          // [T, B, H] zoneout of the LSTM cell
  // Or, in training, zoneout drawn in the kernels (steps.h: Keep), int64 {seed, threshold} in
  // the memory of the input's device: what forward and backward save instead of [T, B, *].
  const int64_t* keep_h_draw = nullptr;
  const int64_t* keep_c_draw = nullptr;
  bool zoneout_h() const { return keep_h || keep_h_draw; }
  bool zoneout_c() const { return keep_c || keep_c_draw; }

  // Stage 2 (csrc/persistent/): run the recurrence as one persistent kernel with this tiling
  // (null: step by step). Packed input also needs its batch sizes and the first row of every
  // time step where the kernel reads them ([T] each: device memory for the GPU kernel, host
  // memory for the host simulation; null for padded input on the GPU).
  const persistent::Tiling* tiling = nullptr;
  const int64_t* kernel_batch_sizes = nullptr;
  const int64_t* kernel_offsets = nullptr;

  const NormParams* norm = nullptr;  // normalized layers (null: none)

  const void* w_ih = nullptr;  // S [G, I]
  const void* w_hh = nullptr;  // S [G, P]
  const void* b_ih = nullptr;  // S [G], zeros for a layer without bias
  const void* b_hh = nullptr;  // S [G], zeros for a layer without bias
  const void* w_hr = nullptr;  // S [P, H], LSTM with projection only, else null (never null with a
                               //   projection, also of P == 0 rows: the kernels test it)
};

struct ForwardParams : LayerParams {
  const void* x = nullptr;  // S [N, I]
  void* y = nullptr;        // S [N, P]
  void* h = nullptr;        // S [B, P]  in: h0; out: h_n (row b holds the state after its last step)
  const void* h0 = nullptr;  // S [B, P]  h0 again, never written: the persistent kernel reads it
                             //   while other CTAs write h_n into h
  void* c = nullptr;        // A [B, H]  LSTM only; in: c0; out: c_n

  void* gx = nullptr;  // A [N, G] scratch: x W_ihᵀ for all steps. Not used when `gates` is
                       //   given (training, not RNN): gx then lives in its first G columns.
  void* gh = nullptr;  // A [B, G] scratch: h W_hhᵀ of one step

  // Saved for backward; all null in inference.
  void* gates = nullptr;  // A [N, saved_gates_per_unit * H]; null for RNN
  void* cells = nullptr;  // A [N, H] LSTM: c_t
  // LSTM with projection: o * tanh(c_t), the input of W_hr. [N, H] when saving for
  // backward, else [B, H] reused by every step. Null without projection.
  void* proj_in = nullptr;  // S
  void* rh = nullptr;       // S [B, H] GRU_CHO scratch: r * h_{t-1}
  void* masked_h = nullptr; // S [B, P] recurrent dropout scratch: m ⊙ h_{t-1} of one step
  // Zoneout, saved for backward (null in inference): the new state before zoneout mixed in the
  // previous one, where backward cannot tell it from the state: LSTM with keep_c c̃_t (A), RNN
  // with keep_h h̃_t (S), [N, H]; null otherwise.
  void* cells_new = nullptr;
  void* hidden_new = nullptr;

  // Normalized layers. Saved for backward (null in inference): x̂ of each normalization, A.
  void* xhat_x = nullptr;  // [N, G]
  void* xhat_h = nullptr;  // [N, G]
  void* chat = nullptr;    // [N, H] LSTM
  // 1 / sqrt(var + eps) of each line, A (always: the passes need them): batch norm [T, G],
  // [T, G], [T, H]; layer norm [N], [N, groups], [N].
  void* rstd_x = nullptr;
  void* rstd_h = nullptr;
  void* rstd_c = nullptr;
  void* c_tilde = nullptr;  // A [B, H] LSTM scratch: the normalized cell of one step
  // Batch norm in training: the mean and biased variance of every step, A [T, G], [T, G], [T, H].
  void* batch_mean_x = nullptr;
  void* batch_var_x = nullptr;
  void* batch_mean_h = nullptr;
  void* batch_var_h = nullptr;
  void* batch_mean_c = nullptr;
  void* batch_var_c = nullptr;
};

struct BackwardParams : LayerParams {
  // What forward saw and saved (see ForwardParams).
  const void* x = nullptr;        // S [N, I]
  const void* h0 = nullptr;       // S [B, P]
  const void* c0 = nullptr;       // A [B, H] LSTM only
  const void* hidden = nullptr;   // S [N, P] h_t of every row (forward's y, saved as a private copy)
  const void* gates = nullptr;    // A [N, saved_gates_per_unit * H]
  const void* cells = nullptr;    // A [N, H] LSTM
  const void* proj_in = nullptr;  // S [N, H] LSTM with projection
  const void* cells_new = nullptr;   // A [N, H] LSTM with keep_c (see ForwardParams)
  const void* hidden_new = nullptr;  // S [N, H] RNN with keep_h

  const void* dy = nullptr;  // S [N, P] gradient of y
  void* dh = nullptr;        // A [B, P] in: gradient of h_n; out: gradient of h0
  void* dc = nullptr;        // A [B, H] LSTM; in: gradient of c_n; out: gradient of c0

  // Results; null when not needed (db_* always null without bias, dw_hr without projection).
  void* dx = nullptr;     // S [N, I]
  void* dw_ih = nullptr;  // S [G, I]
  void* dw_hh = nullptr;  // S [G, P]
  void* db_ih = nullptr;  // S [G]
  void* db_hh = nullptr;  // S [G]
  void* dw_hr = nullptr;  // S [P, H]

  // Scratch.
  void* dgx = nullptr;     // S [N, G] gradient of the gate pre-activations (input side)
  void* dgh = nullptr;     // S [N, G] the same on the W_hh side; differs only for GRU
                           //   (d(W_hn h) = r * d(n pre-activation)) and normalized layers;
                           //   aliases dgx otherwise
  void* h_prev = nullptr;  // S [N, P] h_{t-1} of every row, gathered from h0 and y
  void* c_prev = nullptr;  // A [N, H] LSTM: c_{t-1} of every row, from c0 and cells
  void* dht = nullptr;     // S [N, P] LSTM with projection: total gradient of h_t
  void* dm = nullptr;      // A [B, H] LSTM with projection: gradient of o * tanh(c_t)
  void* rh = nullptr;      // S [N, H] GRU_CHO: r * h_{t-1} of every row
  void* drh = nullptr;     // A [B, H] GRU_CHO: gradient of r * h_{t-1}
  void* masked_h_prev = nullptr;  // S [N, P] recurrent dropout: m ⊙ h_{t-1} of every row (the
                                  //   left operand forward's products saw)
  void* dh_product = nullptr;     // A [B, P] recurrent dropout: a step's dG W_hh before its mask
  const void* ones = nullptr;  // S [N] all ones (bias gradients as matmuls: deterministic)

  // Normalized layers: what forward saved (see ForwardParams), A.
  const void* xhat_x = nullptr;
  const void* xhat_h = nullptr;
  const void* chat = nullptr;
  const void* rstd_x = nullptr;
  const void* rstd_h = nullptr;
  const void* rstd_c = nullptr;
  // Results, null when not needed: the gradients of γ_x, γ_h [G], γ_c, β_c [H] (LSTM), S.
  void* dgamma_x = nullptr;
  void* dgamma_h = nullptr;
  void* dgamma_c = nullptr;
  void* dbeta_c = nullptr;
  // Scratch. dpre: the gradient of the normalized projections (the pre-activations); dgx, dgh
  // are then the gradients of the projections before their normalization.
  void* dpre_x = nullptr;    // S [N, G]
  void* dpre_h = nullptr;    // S [N, G] differs only for GRU; aliases dpre_x otherwise
  void* dc_tilde = nullptr;  // A [N, H] LSTM: gradient of N_c(c_t)
  void* dc_norm = nullptr;   // A [B, H] LSTM: gradient of c_t through N_c
};

}  // namespace rnnfused
