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

struct LayerParams {
  Cell cell = Cell::LSTM;
  bool reverse = false;  // walk t from T-1 down to 0 (the reverse direction of a bidirectional layer)
  int64_t T = 0, B = 0, N = 0, I = 0, H = 0, P = 0, G = 0;
  const int64_t* batch_sizes = nullptr;  // host memory, [T]
  double cell_clip = 0;  // LSTM only; +inf: off
  double grad_clip = 0;  // +inf: off

  // Stage 2 (csrc/persistent/): run the recurrence as one persistent kernel with this tiling
  // (null: step by step). Packed input also needs its batch sizes and the first row of every
  // time step where the kernel reads them ([T] each: device memory for the GPU kernel, host
  // memory for the host simulation; null for padded input on the GPU).
  const persistent::Tiling* tiling = nullptr;
  const int64_t* kernel_batch_sizes = nullptr;
  const int64_t* kernel_offsets = nullptr;

  const void* w_ih = nullptr;  // S [G, I]
  const void* w_hh = nullptr;  // S [G, P]
  const void* b_ih = nullptr;  // S [G], zeros for a layer without bias
  const void* b_hh = nullptr;  // S [G], zeros for a layer without bias
  const void* w_hr = nullptr;  // S [P, H], LSTM with projection only, else null
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
                           //   (d(W_hn h) = r * d(n pre-activation)); aliases dgx otherwise
  void* h_prev = nullptr;  // S [N, P] h_{t-1} of every row, gathered from h0 and y
  void* c_prev = nullptr;  // A [N, H] LSTM: c_{t-1} of every row, from c0 and cells
  void* dht = nullptr;     // S [N, P] LSTM with projection: total gradient of h_t
  void* dm = nullptr;      // A [B, H] LSTM with projection: gradient of o * tanh(c_t)
  void* rh = nullptr;      // S [N, H] GRU_CHO: r * h_{t-1} of every row
  void* drh = nullptr;     // A [B, H] GRU_CHO: gradient of r * h_{t-1}
  const void* ones = nullptr;  // S [N] all ones (bias gradients as matmuls: deterministic)
};

}  // namespace rnnfused
