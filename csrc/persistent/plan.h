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
// and a grid-wide barrier, or (sm_90, Tiling::cluster) the CTAs of a batch tile form one
// thread-block cluster: each pushes its slice of the new state into every peer's shared memory
// (distributed shared memory), and each waits on its own mbarrier until the bytes it expects
// from its peers have landed.
//
// Shared memory of one CTA (regions 128-byte aligned; leading dimensions in elements):
//   forward   W    [gate_rows][ld_w]      S   row g*gate_stride + u: gate g of unit u0+u, K = H
//             h    [buffers][rows_pad][ld_w] S h_{t-1} of the CTA's rows (GRU_CHO also r*h_{t-1});
//                                             cluster: buffer s % 2 holds step s's h_{t-1}, which the
//                                             cluster's CTAs push in during step s - 1, and
//                                             GRU_CHO's buffer 2 r*h_{t-1} (operand_buffers)
//             acc  [gate_rows][ld_acc]    A   W h: gate row x batch row
//             part [split][gate_rows][ld_acc] A  partial sums when warps split K
//             state [rows][units]         A   LSTM: c
//             inputs [rows][gates][ld_in] A   x W_ihᵀ of the step's rows, the CTA's units (prefetched
//                                             a step ahead); ld_in = units rounded up to 4
//             bias [2][gates][units]      A   b_ih, b_hh of the CTA's units
//           The cell pass stages the step's saved activations for their stores after the
//           barrier's arrival in place: gate g's in gate g's acc entries, LSTM's c_t in state,
//           GRU's W_hn h + b_hn in its n gate's inputs entry.
//   backward W    [unit_rows][ld_w]      S   Wᵀ: column g*k_block + j is W_hh[g*H + j][u0+u]
//             dG   [buffers][rows_pad][ld_dg] S dG of the CTA's rows for chunk_gates gates at a time,
//                                             gate blocks of k_block columns as in W; cluster: all
//                                             gates, buffer s % 2 walk step s's, pushed in by the
//                                             cluster's CTAs as they compute it
//             acc  [unit_rows][ld_acc]    A   Wᵀ dGᵀ: unit x batch row
//             part [split][unit_rows][ld_acc] A
//             state [rows][units]         A   the gradient of h carried to the next step
//             state2 [rows][units]        A   LSTM: the gradient of c
//             inputs [rows][wide][ld_in]  A   (prefetch_bwd) the step's saved gates (and LSTM's c_t,
//                                             c_{t-1}), prefetched a step ahead
//             narrow [rows][narrow][ld_n] S   (prefetch_bwd) dy, and h_{t-1} (GRU) or h_t (RNN);
//                                             ld_n = units rounded up to 8
//   both     signals [2] mbarrier           (cluster) what the exchanges of even and odd phases
//                                             wait on (DeviceOps; the host simulation has none)
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
  // Plan by the stage-2 rule, the units of every plan spread over all the SMs, even where one
  // CTA could hold them all and close each step without a grid barrier
  // (RNNFUSED_PERSISTENT_SPREAD=1): to test and to compare the grid-barrier plans.
  bool spread_units = false;
  // A tiling instead of the planner's choice, to test or time one: batch rows and hidden
  // units per CTA (RNNFUSED_PERSISTENT_TILING=ROWSxUNITS); 0: the planner's.
  int64_t forced_rows = 0, forced_units = 0;
  // The most CTAs of a thread-block cluster the plans may use (sm_90: 16, beyond the portable
  // 8, which the launch allows the kernels; RNNFUSED_PERSISTENT_CLUSTERS=n caps it at n; 0: no
  // clusters, as before sm_90 or with RNNFUSED_PERSISTENT_CLUSTERS=0).
  int64_t max_cluster = 0;
  // Whether the plans may keep W in registers (Tiling::held_fwd; false with
  // RNNFUSED_PERSISTENT_HELD_W=0, to compare with W read from shared memory).
  bool hold_weights = true;
  // The recurrences the caller runs side by side on the device, this one included
  // (LayerOptions::side_by_side: a bidirectional layer's two directions on two streams). With
  // more than one, make_plan plans for an equal share of the SMs, so that the launches can run
  // at once, where that pays (make_plan).
  int64_t side_by_side = 1;
};

// One region of a CTA's shared memory layout, in bytes.
struct Layout {
  int64_t weights = 0, operand = 0, acc = 0, partials = 0, state = 0, state2 = 0, inputs = 0, bias = 0, narrow = 0,
          signals = 0, bytes = 0;
};

// The saved activations per element that the forward stages for their stores after the
// arrival: one per gate (in its acc entry), LSTM's c_t (in its state) and GRU's fourth,
// W_hn h + b_hn (in the element's input slot of the n gate, which it has read).
RNNF_HD int64_t staged_slots(Cell cell) {
  return saved_gates_per_unit(cell) == 0 ? 0 : gates_per_unit(cell) + (cell == Cell::GRU_CHO ? 0 : 1);
}

// Elements between the segments of a row of the inputs region (A) and of the backward's narrow
// region (S): 16-byte segments.
RNNF_HD int64_t inputs_ld(int64_t units) {
  return (units + 3) / 4 * 4;
}
RNNF_HD int64_t narrow_ld(int64_t units) {
  return (units + 7) / 8 * 8;
}

// The backward cell's inputs per element, which prefetch_bwd brings into shared memory a step
// ahead: in A, the saved gates (and LSTM's c_t, c_{t-1}); in S, dy (and GRU's h_{t-1}, RNN's h_t).
RNNF_HD int64_t backward_wide_inputs(Cell cell) {
  return saved_gates_per_unit(cell) + (cell == Cell::LSTM ? 2 : 0);
}
RNNF_HD int64_t backward_narrow_inputs(Cell cell) {
  return cell == Cell::LSTM ? 1 : 2;
}

// The operand tiles of the layout's operand region: one where the CTAs exchange through global
// memory (each step copies its operand in); in a cluster, two that alternate by step parity
// (peers push step s + 1's operand while this CTA still multiplies step s's), and for the
// GRU_CHO forward a third for r * h_{t-1}, which its second phase multiplies while h_{t-1} is
// still needed.
RNNF_HD int64_t operand_buffers(Cell cell, bool backward, bool cluster) {
  if (!cluster) return 1;
  return !backward && cell == Cell::GRU_CHO ? 3 : 2;
}

// (A cluster) the elements of the slice of CTA `rank` (of unit tiles of `units` over H) that its
// push moves into each peer, `elem` bytes each: its units, rounded up to whole 4-byte words,
// the smallest store that signals an mbarrier (st.async). The planner gives 2-byte elements an
// even slice, so only the last slice of an odd H rounds up: it takes the tile's padding column
// H along, which is zero in every CTA and no one else writes.
RNNF_HD int64_t pushed_units(int64_t H, int64_t units, int64_t rank, int64_t elem) {
  const int64_t length = H - rank * units < units ? H - rank * units : units, word = elem < 4 ? 4 / elem : 1;
  return (length + word - 1) / word * word;
}

// (A cluster) the bytes that one phase's pushes bring into CTA `rank`'s operand tiles: `rows`
// rows of `segments` row segments of every peer's slice.
RNNF_HD int64_t incoming_bytes(int64_t H, int64_t units, int64_t cluster, int64_t rank, int64_t rows,
                               int64_t segments, int64_t elem) {
  int64_t elements = 0;
  for (int64_t q = 0; q < cluster; ++q)
    if (q != rank) elements += pushed_units(H, units, q, elem);
  return rows * segments * elements * elem;
}

// The K depth of one tensor-core MMA (device.cuh's MmaShape): TF32 (fp32 storage) 8, fp16 and
// bf16 16 (fp64 runs only in the host simulation, taken as 16).
RNNF_HD constexpr int64_t mma_depth(int64_t elem) {
  return elem == 4 ? 8 : 16;
}

// W in registers: a pass whose every product is the whole W tile times the operand (not
// GRU_CHO, whose products take parts of it; a backward that folds all gates at once) may keep
// W as tensor-core A fragments in registers, each warp those of its jobs (DeviceOps::gemm: warp
// w takes jobs w, w + 8, ... of tiles x split, each one output tile over one of split equal
// parts of K), at most kHeldFragments (4 registers each) a warp. Returns how many warp 0 (the
// busiest) holds of an m x n x k product split `split` ways, of elements `elem` bytes wide,
// or 0 where the product cannot be held: K's parts unequal, or too many fragments.
constexpr int64_t kHeldFragments = 16;
RNNF_HD int64_t held_fragments(int64_t m, int64_t n, int64_t k, int64_t split, int64_t elem) {
  const int64_t steps = k / kTile, jobs = (m / kTile) * (n / kTile) * split, warps = kThreads / 32;
  if (steps % split != 0) return 0;
  const int64_t held = (jobs + warps - 1) / warps * (steps / split) * (kTile / mma_depth(elem));
  return held <= kHeldFragments ? held : 0;
}

// The plain-old-data part of a plan: what the kernels read (passed by value to the GPU).
struct Tiling {
  int64_t units = 0;        // hidden units per CTA
  int64_t rows = 0;         // batch rows per CTA
  int64_t unit_tiles = 0;   // CTAs along the hidden units
  int64_t row_tiles = 0;    // CTAs along the batch; grid = unit_tiles * row_tiles
  // Where > 0 (= unit_tiles, at most DeviceLimits::max_cluster): the unit_tiles CTAs of a batch
  // tile are one thread-block cluster; they exchange h_t / dG through distributed shared memory
  // (each CTA waiting for the bytes its peers push), and the backward takes all gates at once.
  // Slices of 2-byte elements are then even (pushed_units).
  // 0: global memory and the grid barrier (none where unit_tiles is 1).
  int64_t cluster = 0;
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
  // The backward cell's inputs prefetched into shared memory behind the barrier, where they fit
  // without taking the dG tile fewer gates at a time; else read from global memory in the pass.
  bool prefetch_bwd = false;
  // W in registers (held_fragments): the A fragments of W each warp of the forward / backward
  // loads once, at begin, and multiplies from then on instead of re-reading W from shared
  // memory; 0: every product reads its W fragments from shared memory.
  int64_t held_fwd = 0, held_bwd = 0;
  Layout fwd, bwd;
  bool cpu_threads = false;  // make_cpu_plan's: run on CPU threads (else the GPU kernel or its simulation)

  int64_t ctas() const { return unit_tiles * row_tiles; }
};

// The planner's cost model: what the phases of one step (timing.h's, which bench.phases
// measures) cost the slowest CTA of a tiling, in nanoseconds, on an H100. Only the barriers
// are measured (empty kernels, 2026-11-26: the grid barrier 1.1 us at 132 CTAs); the rest
// are estimates from the latency review of the stage-2 kernel (shared/STAGE3.md section 4),
// for python -m bench.phases, which prints them beside what it measures, to replace.
struct CostModel {
  double grid_barrier_ns = 700;     // the grid barrier's fixed part (with the arrivals: 1.1 us at 132 CTAs)
  double arrival_ns = 3;            // per CTA at the grid barrier: its atomic add and the skew of arrivals
  double cta_barrier_ns = 25;       // __syncthreads of 8 warps
  double fence_ns = 400;            // the grid barrier's fence, waiting for the step's global stores
  double copy_round_ns = 600;       // one round of copy_rows element by element (rows not made of 16-byte vectors)
  double load_latency_ns = 300;     // one global load that hits L2, from issue to use
  double sm_l2_bytes_per_ns = 110;  // one SM's L2 read bandwidth (64 B/clock)
  double l2_bytes_per_ns = 5500;    // the whole GPU's L2 read bandwidth
  double smem_bytes_per_ns = 225;   // one SM's shared-memory bandwidth (128 B/clock)
  double mma_flops_per_ns = 3500;   // one SM's dense fp16/bf16 tensor-core rate; TF32 half of it
  double k_step_ns = 20;            // one dependent 16x16x16 WMMA step of a warp (fragment loads and mma)
  double element_ns = 40;           // one thread's cell math for one element, its loads aside
  double issue_ns = 4;              // one thread issuing a store or an asynchronous copy it does not wait for
  double dsmem_ns = 300;            // a cluster's exchange: the last push's flight into a peer's shared memory,
                                    // its mbarrier's completion and the peers' skew (shared/STAGE3.md's 0.3 us)
  double dsmem_bytes_per_ns = 25;   // what one SM pushes into its peers' shared memory: a lead, about 3.3 TB/s
                                    // over an H100's SMs (Luo et al. 2024, arXiv 2402.13499), not measured here
  double launch_ns = 8000;          // a persistent launch's fixed part: the host's launch, the CTAs' start and W's
                                    // load, the stream's wait for its input; a guess, to measure (plan_pipeline)
};

// One step's estimate, per phase (timing.h's step phases), in nanoseconds.
struct StepCost {
  double exchange = 0, mma = 0, cell = 0, stores = 0, window = 0, barrier = 0;
  double total() const { return exchange + mma + cell + stores + window + barrier; }
};

// The cost model's estimate for one forward or backward step of tiling t: the slowest CTA's,
// one with a full slice. t must fit (its backward folds chunk_gates >= 1 gates at a time).
StepCost estimate_step(Cell cell, int64_t H, DType dtype, const Tiling& t, bool backward,
                       const CostModel& model = CostModel());

// What a plan is for: a training run, whose forward and backward launches take the same tiling
// (the cheapest sum of their steps, both passes fitting), or inference, the forward alone (the
// cheapest forward step, whether or not the tiling's backward fits).
enum class PlanFor { Training, Inference };

struct Plan {
  bool persistent = false;
  std::string reason;  // why the layer runs stepwise, or what the persistent plan is
  Tiling tiling;
  StepCost forward, backward;  // the cost model's estimates for the tiling (not measurements; inference: no backward)
  int64_t candidates = 0;      // the fitting tilings the planner compared
};

// The tiling of `rows` batch rows and `units` hidden units per CTA (the backward's dG tile
// takes the most gates at a time that fit in smem_per_block), its CTAs of a batch tile one
// cluster if `cluster` (and more than one), W in registers where held_fragments allows and
// `hold_weights`, and whether the passes of `use` fit.
Tiling tile_for(Cell cell, int64_t H, int64_t B, DType dtype, int64_t rows, int64_t units, int64_t smem_per_block,
                bool cluster = false, bool hold_weights = true);
bool fits(const Tiling& t, int64_t smem_per_block, PlanFor use = PlanFor::Training);

// The plan for one layer direction: cell, hidden size H, output width P (= H unless
// projecting), batch B, storage dtype, whether fp32 products may use TF32, the device, and what
// the plan is for (its cost: the forward plus the backward step, or the forward alone).
// Of the tilings that fit (every batch tile of 16 x 2^k rows or all B, every unit slice from
// all of H, one CTA per batch tile with no grid barrier, to one unit tile per SM; where the
// unit tiles fit a cluster, also as a cluster), the one whose step (training: forward plus
// backward) the cost model estimates cheapest; ties go to fewer CTAs, then to the grid barrier. With
// limits.spread_units, the stage-2 rule instead: the smallest batch tile that fits, its units
// spread over every SM. With limits.side_by_side = n > 1: the plan for all the SMs where it
// takes no more than sm_count / n of them; else the plan for sm_count / n SMs where one fits
// and the model estimates its step below n steps of the plan for all the SMs (what running the
// n recurrences one after another would cost); else the plan for all the SMs, whose launches
// then wait for each other's SMs.
Plan make_plan(Cell cell, int64_t H, int64_t P, int64_t B, DType dtype, bool tf32, const DeviceLimits& limits,
               PlanFor use = PlanFor::Training);

// A unidirectional stack of `layers` layers as a layer pipeline (rnnfused.modules' _run_wavefront):
// the T steps in `chunks` slices, each layer on a CUDA stream of its own, layer l on slice k beside
// layer l+1 on slice k-1, so min(layers, chunks) recurrences share the SMs (make_plan's
// side_by_side). Every layer's recurrence has the same plan (H, P, B and dtype; only the input
// projections, which this leaves aside, differ). The cost model's estimate of a pass (training:
// forward and backward, each its own pipeline) layer after layer is layers x (launch + T steps of
// the plan for the whole device), and over n equal slices (n + layers - 1) x (launch + ceil(T / n)
// steps of the plan for the recurrences side by side): the first slice's way down the layers, then
// one round per further slice. Only slice counts whose side-by-side plans fit the SMs together
// are compared: launches that do not would wait for each other.
struct PipelinePlan {
  int64_t chunks = 0;       // the cheapest number of slices, 2 to max_chunks; 0: layer after layer
  double layered_ns = 0;    // the estimate layer after layer (0 where the layers run stepwise: no estimate)
  double pipelined_ns = 0;  // the cheapest pipeline's estimate (0 where none was estimated)
  std::string reason;
};
constexpr int64_t kMaxPipelineChunks = 32;
PipelinePlan plan_pipeline(Cell cell, int64_t T, int64_t layers, int64_t H, int64_t P, int64_t B, DType dtype,
                           bool tf32, const DeviceLimits& limits, PlanFor use = PlanFor::Training,
                           int64_t max_chunks = kMaxPipelineChunks);

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
