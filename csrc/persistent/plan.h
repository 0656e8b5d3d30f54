// Stage 2: the planner of the persistent recurrence. Pure C++ (no CUDA, no torch): the
// CUDA launch, the host simulation and the tests all take their tiling and shared-memory
// layout from here.
//
// A persistent kernel runs all T steps of one layer direction in one launch. CTA (j, b)
// owns hidden units [j*units, (j+1)*units) with all their gates, and batch rows
// [b*rows, (b+1)*rows). Forward, it keeps the W_hh rows of its units' gates in shared
// memory for the whole sequence; backward, the W_hh columns of its units. Each step it
// multiplies the state of its rows by that slice on tensor cores (fp32 accumulation), applies
// the cell (cells.h) and exchanges the new state with the other CTAs through global memory
// and a grid-wide barrier.
//
// Shared memory of one CTA (regions 128-byte aligned; leading dimensions in elements):
//   forward   W    [gate_rows][ld_w]      S   row g*gate_stride + u: gate g of unit u0+u, K = H
//             h    [rows_pad][ld_w]       S   h_{t-1} of the CTA's rows (GRU_CHO also r*h_{t-1})
//             acc  [gate_rows][ld_acc]    A   W h: gate row x batch row
//             part [split][gate_rows][ld_acc] A  partial sums when warps split K
//             state [rows][units]         A   LSTM: c
//   backward W    [unit_rows][ld_w]      S   Wᵀ: column g*k_block + j is W_hh[g*H + j][u0+u]
//             dG   [rows_pad][ld_dg]      S   dG of the CTA's rows for chunk_gates gates at a time,
//                                             gate blocks of k_block columns as in W
//             acc  [unit_rows][ld_acc]    A   Wᵀ dGᵀ: unit x batch row
//             part [split][unit_rows][ld_acc] A
//             state [rows][units]         A   the gradient of h carried to the next step
//             state2 [rows][units]        A   LSTM: the gradient of c
// Padding (rows past the batch, units past H, columns past H) is zero and never stored.
#pragma once

#include <cstdint>
#include <string>

#include "../params.h"

namespace rnnfused {
namespace persistent {

// Matrix tiles are kTile x kTile (the tensor-core tile; K steps of kTile too).
constexpr int64_t kTile = 16;
constexpr int kThreads = 256;  // 8 warps per CTA

struct DeviceLimits {
  int64_t sm_count = 0;        // multiprocessors: at most one CTA each
  int64_t smem_per_block = 0;  // bytes of shared memory one block may use (the opt-in maximum)
  int compute_capability = 0;  // e.g. 90; tensor cores for bf16 and tf32 need 80
  bool cooperative_launch = false;
  // The host simulation (a CPU test harness) runs every dtype, fp64 and fp32 without TF32
  // included, with this device's tiling.
  bool host_simulation = false;
  // Spread the units of every plan over the SMs, even where one CTA could hold them all and
  // close each step without a grid barrier (RNNFUSED_PERSISTENT_SPREAD=1): to test and to
  // compare the grid-barrier plans.
  bool spread_units = false;
};

// One region of a CTA's shared memory layout, in bytes.
struct Layout {
  int64_t weights = 0, operand = 0, acc = 0, partials = 0, state = 0, state2 = 0, bytes = 0;
};

// The plain-old-data part of a plan: what the kernels read (passed by value to the GPU).
struct Tiling {
  int64_t units = 0;        // hidden units per CTA
  int64_t rows = 0;         // batch rows per CTA
  int64_t unit_tiles = 0;   // CTAs along the hidden units
  int64_t row_tiles = 0;    // CTAs along the batch; grid = unit_tiles * row_tiles
  int64_t rows_pad = 0;     // rows rounded up to kTile (N of both products)
  // Forward: M = gate_rows, K = k_fwd.
  int64_t gate_stride = 0;  // rows between the gate blocks of the W tile
  int64_t gate_rows = 0;    // gates * gate_stride rounded up to kTile
  int64_t k_fwd = 0;        // H rounded up to kTile
  int64_t ld_w_fwd = 0, ld_acc_fwd = 0, split_fwd = 1;
  // Backward: M = unit_rows, K = k_bwd = gates * k_block, multiplied chunk_gates gates at a
  // time (the dG tile of all gates can be too large: fp32 LSTM).
  int64_t unit_rows = 0;    // units rounded up to kTile
  int64_t k_block = 0;      // H rounded up to kTile: the column block of one gate
  int64_t k_bwd = 0;
  int64_t chunk_gates = 0;
  int64_t ld_w_bwd = 0, ld_dg = 0, ld_acc_bwd = 0, split_bwd = 1;
  Layout fwd, bwd;
  bool cpu_threads = false;  // make_cpu_plan's: run on CPU threads (else the GPU kernel or its simulation)

  int64_t ctas() const { return unit_tiles * row_tiles; }
};

struct Plan {
  bool persistent = false;
  std::string reason;  // why the layer runs stepwise, or what the persistent plan is
  Tiling tiling;
};

// The plan for one layer direction: cell, hidden size H, output width P (= H unless
// projecting), batch B, storage dtype, whether fp32 products may use TF32, and the device.
Plan make_plan(Cell cell, int64_t H, int64_t P, int64_t B, DType dtype, bool tf32, const DeviceLimits& limits);

// The plan of the CPU's persistent recurrence (csrc/cpu/persistent_cpu.h): one slice of the
// hidden units per thread (units, unit_tiles; the rest of the tiling is the GPU's), all
// batch rows, its W slice hot in its own cache for the whole sequence. Every dtype (float16
// and bfloat16 multiply in float32).
// Sequences shorter than kMinCpuSteps run stepwise: packing W_hh costs about what one step's
// product does, and the cells (T = 1) would pay it every step.
constexpr int64_t kMinCpuSteps = 8;
Plan make_cpu_plan(Cell cell, int64_t T, int64_t H, int64_t P, int64_t B, DType dtype, int64_t threads);

// The limits of an H100 SXM (132 SMs, 227 KB per block, compute capability 9.0): the
// device the host simulation plans for unless told otherwise.
DeviceLimits h100_limits();

}  // namespace persistent
}  // namespace rnnfused
