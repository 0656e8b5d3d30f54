// The planner of the persistent recurrence (see plan.h).
#include "plan.h"

#include <algorithm>
#include <initializer_list>
#include <optional>
#include <utility>
#include <string>
#include <vector>

namespace rnnfused {
namespace persistent {
namespace {

// Plain to_string rather than iostreams: an extension linked by a toolchain that puts part
// of libstdc++ into the .so (seen on the GPU machine: /opt/gcc) crashed formatting a number
// into a stream whose locale came from the system libstdc++.
std::string num(int64_t value) {
  return std::to_string(value);
}

int64_t round_up(int64_t x, int64_t multiple) {
  return (x + multiple - 1) / multiple * multiple;
}

int64_t ceil_div(int64_t x, int64_t y) {
  return (x + y - 1) / y;
}

int64_t storage_bytes(DType dtype) {
  switch (dtype) {
    case DType::Float64: return 8;
    case DType::Float32: return 4;
    case DType::Float16:
    case DType::BFloat16: return 2;
  }
  return 8;
}

// Rows of 16-bit elements padded by 16 bytes, of 32-bit ones by 16 bytes too: row starts stay
// 16-byte aligned and consecutive rows do not start in the same shared-memory bank.
int64_t padded_ld(int64_t k, int64_t elem) {
  return k + 16 / std::min<int64_t>(elem, 16);
}

// Regions in order (the others stay empty), each 128-byte aligned.
void place(Layout& layout, std::initializer_list<std::pair<int64_t Layout::*, int64_t>> regions) {
  int64_t offset = 0;
  for (const auto& [where, bytes] : regions) {
    layout.*where = offset;
    offset = round_up(offset + bytes, 128);
  }
  layout.bytes = offset;
}

// An sm_90 GPC offers a cluster at least this many SMs (an H100's hold 16 to 18): with one CTA
// per SM, clusters of c CTAs are co-resident floor(16 / c) to a GPC. A cluster plan with more
// batch tiles than that over all the GPCs would run its last clusters after the first.
constexpr int64_t kGpcSms = 16;
int64_t resident_clusters(int64_t sm_count, int64_t cluster) {
  return sm_count / kGpcSms * (kGpcSms / cluster);
}

// A cluster plan's two mbarriers (8 bytes each).
constexpr int64_t kSignalBytes = 16;

// Warps split K when there are fewer output tiles than warps (e.g. the backward product of
// a small unit slice), at most so that every warp keeps at least two K steps.
int64_t k_split(int64_t m, int64_t n, int64_t k) {
  const int64_t tiles = (m / kTile) * (n / kTile);
  const int64_t warps = kThreads / 32;
  return std::max<int64_t>(1, std::min(warps / std::max<int64_t>(tiles, 1), k / kTile / 2));
}

// The tiling and layouts for `rows` batch rows and `units` hidden units per CTA; the backward
// dG tile takes the most gates at a time that fit in `smem` bytes.
Tiling tile(Cell cell, int64_t H, int64_t B, int64_t rows, int64_t units, int64_t elem, int64_t acc_elem,
            int64_t smem, bool cluster, bool hold) {
  const int64_t gates = gates_per_unit(cell);
  Tiling t;
  t.units = units;
  t.rows = rows;
  t.unit_tiles = ceil_div(H, units);
  t.row_tiles = ceil_div(B, rows);
  // (2-byte elements: an even slice, whole 4-byte words, pushed_units)
  t.cluster = cluster && t.unit_tiles > 1 && units * elem % 4 == 0 ? t.unit_tiles : 0;
  const bool clustered = t.cluster > 0;
  t.rows_pad = round_up(rows, kTile);
  // GRU_CHO multiplies its r/z rows and its n rows in two products: each starts a tile.
  t.gate_stride = cell == Cell::GRU_CHO ? round_up(units, kTile) : units;
  t.gate_rows = round_up(gates * t.gate_stride, kTile);
  t.k_fwd = round_up(H, kTile);
  t.ld_w_fwd = padded_ld(t.k_fwd, elem);
  t.ld_acc_fwd = t.rows_pad + 4;
  t.split_fwd = k_split(t.gate_rows, t.rows_pad, t.k_fwd);
  const int64_t state = rows * units * acc_elem;
  place(t.fwd, {{&Layout::weights, t.gate_rows * t.ld_w_fwd * elem},
                {&Layout::operand, operand_buffers(cell, false, clustered) * t.rows_pad * t.ld_w_fwd * elem},
                {&Layout::acc, t.gate_rows * t.ld_acc_fwd * acc_elem},
                {&Layout::partials, t.split_fwd > 1 ? t.split_fwd * t.gate_rows * t.ld_acc_fwd * acc_elem : 0},
                {&Layout::state, cell == Cell::LSTM ? state : 0},
                {&Layout::inputs, rows * gates * inputs_ld(units) * acc_elem},
                {&Layout::bias, 2 * gates * units * acc_elem},
                {&Layout::signals, clustered ? kSignalBytes : 0}});

  t.unit_rows = round_up(units, kTile);
  t.k_block = round_up(H, kTile);
  t.k_bwd = gates * t.k_block;
  t.ld_w_bwd = padded_ld(t.k_bwd, elem);
  t.ld_acc_bwd = t.rows_pad + 4;
  auto place_backward = [&] {
    const bool prefetch = t.prefetch_bwd;
    place(t.bwd, {{&Layout::weights, t.unit_rows * t.ld_w_bwd * elem},
                  {&Layout::operand, operand_buffers(cell, true, clustered) * t.rows_pad * t.ld_dg * elem},
                  {&Layout::acc, t.unit_rows * t.ld_acc_bwd * acc_elem},
                  {&Layout::partials, t.split_bwd > 1 ? t.split_bwd * t.unit_rows * t.ld_acc_bwd * acc_elem : 0},
                  {&Layout::state, state},
                  {&Layout::state2, cell == Cell::LSTM ? state : 0},
                  {&Layout::inputs, prefetch ? rows * backward_wide_inputs(cell) * inputs_ld(units) * acc_elem : 0},
                  {&Layout::narrow, prefetch ? rows * backward_narrow_inputs(cell) * narrow_ld(units) * elem : 0},
                  {&Layout::signals, clustered ? kSignalBytes : 0}});
  };
  // A cluster's peers push every gate's dG as they compute it: its tile takes all the gates.
  for (t.chunk_gates = gates; t.chunk_gates >= (clustered ? gates : 1); --t.chunk_gates) {
    t.ld_dg = padded_ld(t.chunk_gates * t.k_block, elem);
    t.split_bwd = k_split(t.unit_rows, t.rows_pad, t.chunk_gates * t.k_block);
    place_backward();
    if (t.bwd.bytes <= smem) break;
  }
  if (clustered && t.chunk_gates < gates) t.chunk_gates = 0;
  if (t.chunk_gates >= 1) {
    t.prefetch_bwd = true;
    place_backward();
    if (t.bwd.bytes > smem) {
      t.prefetch_bwd = false;
      place_backward();
    }
  }
  if (hold && cell != Cell::GRU_CHO) {
    t.held_fwd = held_fragments(t.gate_rows, t.rows_pad, t.k_fwd, t.split_fwd, elem);
    if (t.chunk_gates == gates) t.held_bwd = held_fragments(t.unit_rows, t.rows_pad, t.k_bwd, t.split_bwd, elem);
  }
  return t;
}

std::string describe(const Tiling& t, PlanFor use) {
  const bool inference = use == PlanFor::Inference;
  const int64_t held_bwd = inference ? 0 : t.held_bwd;  // an inference plan runs no backward
  return "persistent: " + num(t.ctas()) + " CTAs = " + num(t.unit_tiles) + " x " + num(t.units) + " units, " +
         num(t.row_tiles) + " x " + num(t.rows) + " rows; shared memory " + num(t.fwd.bytes / 1024) + " KB forward" +
         (inference ? " (inference: the forward alone)"
                    : ", " + num(t.bwd.bytes / 1024) + " KB backward (dG " + num(t.chunk_gates) + " gate" +
                          (t.chunk_gates > 1 ? "s" : "") + " at a time)") +
         (t.unit_tiles == 1 ? "; each CTA has all the units of its rows: no grid barrier" : "") +
         (t.cluster > 0 ? "; clusters of " + num(t.cluster) + " CTAs exchanging through distributed shared memory" : "") +
         (t.held_fwd > 0 || held_bwd > 0
              ? std::string("; W in registers ") +
                    (held_bwd == 0 ? "forward" : t.held_fwd == 0 ? "backward" : "both ways")
              : "");
}

// Below: the cost model's pieces, one per phase of a step (timing.h), each what device.cuh
// and program.h do for one CTA with a full slice.

// copy_rows: `rows` rows of `elements` elements from L2 into shared memory, then the Operand
// barrier: where rows are 16-byte multiples, every 16-byte cp.async issued at once, one load
// latency; else element by element, in rounds of one element a thread. Every CTA pulls its
// copy at once, so the whole GPU's L2 bandwidth can bind.
double exchange_ns(int64_t rows, int64_t elements, int64_t elem, int64_t ctas, const CostModel& m) {
  const int64_t bytes = rows * elements * elem;
  const bool vector = elements % (16 / std::min<int64_t>(elem, 16)) == 0;
  const double bandwidth_ns = std::max(bytes / m.sm_l2_bytes_per_ns, ctas * bytes / m.l2_bytes_per_ns);
  if (!vector) return ceil_div(bytes, kThreads * elem) * m.copy_round_ns + bandwidth_ns + m.cta_barrier_ns;
  return static_cast<double>(ceil_div(bytes, kThreads * 16)) * m.issue_ns + m.load_latency_ns + bandwidth_ns +
         m.cta_barrier_ns;
}

// gemm: an M x N output over K; warp w takes jobs w, w + 8, ... (a job: one 16 x 16 output tile
// over one of `split` parts of K), whose MMAs alternate between two accumulators: each job is
// two dependent chains of half its MMAs, a warp's jobs one after another. Shared memory feeds
// both fragments of every MMA, or only B's where the warps hold W in registers (`held`), and the
// SM's tensor cores bound the whole; then a barrier, and with a split the sum of the partials
// and another.
double mma_ns(int64_t M, int64_t N, int64_t K, int64_t split, int64_t elem, bool held, const CostModel& m) {
  const int64_t warps = kThreads / 32, tiles = (M / kTile) * (N / kTile), steps = K / kTile;
  const int64_t slower = elem > 2 ? 2 : 1;  // TF32 (fp32 operands): 16 x 16 x 8 MMAs, half the rate
  const double chain = ceil_div(tiles * split, warps) * ceil_div(ceil_div(steps, split) * slower, 2) * m.k_step_ns;
  const double fragments =
      static_cast<double>(tiles) * steps * (held ? 1 : 2) * kTile * kTile * elem / m.smem_bytes_per_ns;
  const double flops = 2.0 * M * N * K / m.mma_flops_per_ns * slower;
  double ns = std::max({chain, fragments, flops}) + m.cta_barrier_ns;
  if (split > 1) ns += static_cast<double>(split) * M * N * 4 / m.smem_bytes_per_ns + m.cta_barrier_ns;
  return ns;
}

// A pass over the CTA's (row, unit) elements, each thread's in turn. Where the backward cell
// reads its inputs from global memory (the saved gates, dy; not prefetch_bwd), each element
// waits a load latency: the stores of the element before may alias them, so the compiler
// cannot hoist them. Otherwise the cells read shared memory (inputs prefetched a step ahead,
// biases loaded at begin), and so do the fold's elements.
double elements_ns(const Tiling& t, bool global_loads, const CostModel& m) {
  const double per_element = m.element_ns + (global_loads ? m.load_latency_ns : 0);
  return ceil_div(t.rows * t.units, kThreads) * per_element + m.cta_barrier_ns;
}

// Issuing a prefetch (DeviceOps::prefetch_rows) of `segments` row segments of the slice's
// units, `elem` bytes each, into every row of the tile: 16-byte chunks, each one copy where H
// and the slice are made of 16-byte vectors, else pieces of 4 bytes (pairs of 2-byte elements,
// where both are even) or single elements; a 2-byte element alone is a load the thread waits for.
double prefetch_ns(const Tiling& t, int64_t H, int64_t segments, int64_t elem, const CostModel& m) {
  const int64_t vector = 16 / elem, chunks = t.rows * segments * ceil_div(t.units, vector);
  const bool whole = t.units % vector == 0 && H % vector == 0, pairs = elem == 2 && t.units % 2 == 0 && H % 2 == 0;
  const int64_t pieces = whole ? 1 : pairs ? vector / 2 : vector;
  const double piece_ns = !whole && !pairs && elem == 2 ? m.load_latency_ns : m.issue_ns;
  return static_cast<double>(ceil_div(chunks, kThreads) * pieces) * piece_ns;
}

// The end of a phase: the grid barrier (its fence waits for the phase's stores; every CTA
// arrives), a CTA barrier where each CTA has all the units of its rows, or in a cluster the
// push of `segments` row segments of the slice's units into each peer's shared memory (16-byte
// stores where the slices are made of them, else 4-byte words) and the wait for the peers'
// pushes, which the SM-to-SM network's bandwidth bounds too; with `global_stores` (a phase
// that still stores to global memory before its push) the fence too, as each push's
// completion releases what its CTA wrote before it.
void close_phase(StepCost& cost, const Tiling& t, int64_t elem, int64_t segments, bool global_stores,
                 const CostModel& m) {
  if (t.unit_tiles == 1) {
    cost.barrier += m.cta_barrier_ns;
    return;
  }
  if (t.cluster == 0) {
    cost.stores += m.fence_ns;
    cost.barrier += m.grid_barrier_ns + m.arrival_ns * t.ctas();
    return;
  }
  const int64_t vector = 16 / elem, pieces = t.units % vector == 0 ? 1 : ceil_div(16, std::max<int64_t>(elem, 4));
  const int64_t stores = (t.cluster - 1) * t.rows * segments * ceil_div(t.units, vector) * pieces;
  const double pushed_bytes = static_cast<double>(t.cluster - 1) * t.rows * segments * t.units * elem;
  cost.stores += ceil_div(stores, kThreads) * m.issue_ns + (global_stores ? m.fence_ns : 0);
  cost.barrier += m.dsmem_ns + pushed_bytes / m.dsmem_bytes_per_ns + 2 * m.cta_barrier_ns;
}

}  // namespace

bool fits(const Tiling& t, int64_t smem_per_block, PlanFor use) {
  return t.fwd.bytes <= smem_per_block &&
         (use == PlanFor::Inference || (t.chunk_gates >= 1 && t.bwd.bytes <= smem_per_block));
}

Tiling tile_for(Cell cell, int64_t H, int64_t B, DType dtype, int64_t rows, int64_t units, int64_t smem_per_block,
                bool cluster, bool hold_weights) {
  return tile(cell, H, B, rows, units, storage_bytes(dtype), dtype == DType::Float64 ? 8 : 4, smem_per_block, cluster,
              hold_weights);
}

StepCost estimate_step(Cell cell, int64_t H, DType dtype, const Tiling& t, bool backward, const CostModel& m) {
  const int64_t elem = storage_bytes(dtype), acc_elem = dtype == DType::Float64 ? 8 : 4;
  const int64_t gates = gates_per_unit(cell), ctas = t.ctas();
  const bool cluster = t.cluster > 0;
  // In a cluster the step's operand is already in shared memory (pushed by the peers): the
  // exchange is the Operand barrier alone.
  auto exchange = [&](int64_t elements) {
    return cluster ? m.cta_barrier_ns : exchange_ns(t.rows, elements, elem, ctas, m);
  };
  // What a cluster stores to global memory after its push instead of in the cell pass: h_t
  // (forward), dG (backward), from the tile it was pushed from.
  const int64_t exchanged = cluster ? t.rows * t.units * (backward ? gates : 1) : 0;
  StepCost cost;
  if (!backward) {
    // GRU_CHO: the r/z rows, then (with r * h_{t-1} exchanged) the n rows.
    const int64_t first_rows = cell == Cell::GRU_CHO ? 2 * t.gate_stride : t.gate_rows;
    for (const int64_t rows : {first_rows, t.gate_rows - first_rows}) {
      if (rows == 0) continue;
      cost.exchange += exchange(H);
      cost.mma += mma_ns(rows, t.rows_pad, t.k_fwd, t.split_fwd, elem, t.held_fwd > 0, m);
      // GRU_CHO's second phase without a cluster reads h_{t-1} for its own math from global
      // memory (its operand tile holds r * h_{t-1}).
      cost.cell += elements_ns(t, cell == Cell::GRU_CHO && !cluster && rows != first_rows, m);
      close_phase(cost, t, elem, 1, false, m);
    }
    // Between the arrival and the wait: the saved activations' stores (training: the plan is
    // the same for inference, which stores none) and the next step's input prefetch (16-byte
    // copies where the rows are made of them, else element by element), issued, not waited
    // for, after a CTA barrier where GRU staged a value in the inputs tile. The prefetch lands
    // behind the barrier and the next step's exchange, which the model takes to be longer than
    // one load.
    cost.window = ceil_div(t.rows * t.units * staged_slots(cell) + exchanged, kThreads) * m.issue_ns +
                  prefetch_ns(t, H, gates, acc_elem, m) + (cell == Cell::GRU ? m.cta_barrier_ns : 0);
    return cost;
  }
  // The fold of the recurrent gradient gate chunk by gate chunk (GRU_CHO: z and n, then n
  // again for r), each chunk adding its product into the carried gradient; then the cell.
  auto fold = [&](int64_t g0, int64_t g1) {
    for (int64_t chunk = g0; chunk < g1; chunk += t.chunk_gates) {
      const int64_t width = std::min(t.chunk_gates, g1 - chunk);
      cost.exchange += exchange(width * H);
      cost.mma += mma_ns(t.unit_rows, t.rows_pad, width * t.k_block, t.split_bwd, elem, t.held_bwd > 0, m) +
                  elements_ns(t, false, m);
    }
  };
  // The cell's inputs: prefetched behind the barrier (issued in the window, as the forward's),
  // or each element's from global memory in the pass.
  const bool loads = !t.prefetch_bwd;
  // The gradients each phase pushes (GRU_CHO: z and n, then r); what stays a global store
  // before the push: GRU's dgx of the n gate and GRU_CHO's r * h_{t-1} (but in a cluster that
  // prefetches its inputs, where these are staged in them and stored after the push, behind a
  // CTA barrier).
  const bool gru = cell == Cell::GRU || cell == Cell::GRU_CHO;
  const bool stages = gru && cluster && t.prefetch_bwd;
  if (cell == Cell::GRU_CHO) {
    fold(0, 2);
    cost.cell += elements_ns(t, loads, m);
    close_phase(cost, t, elem, 2, false, m);
    fold(2, 3);
    cost.cell += elements_ns(t, loads, m);
    close_phase(cost, t, elem, 1, !stages, m);
  } else {
    fold(0, gates);
    cost.cell += elements_ns(t, loads, m);
    close_phase(cost, t, elem, gates, cell == Cell::GRU && !stages, m);
  }
  cost.window = ceil_div(exchanged + (stages ? t.rows * t.units : 0), kThreads) * m.issue_ns +
                (stages ? m.cta_barrier_ns : 0);
  if (t.prefetch_bwd)
    cost.window += prefetch_ns(t, H, backward_wide_inputs(cell), acc_elem, m) +
                   prefetch_ns(t, H, backward_narrow_inputs(cell), elem, m);
  return cost;
}

Plan make_cpu_plan(Cell cell, int64_t T, int64_t H, int64_t P, int64_t B, DType dtype, int64_t threads) {
  Plan plan;
  if (T < kMinCpuSteps) {
    plan.reason = "stepwise: fewer than " + std::to_string(kMinCpuSteps) + " steps (packing W_hh would not pay)";
    return plan;
  }
  if (P != H) {
    plan.reason = "stepwise: LSTM with projection";
    return plan;
  }
  Tiling& t = plan.tiling;
  t.units = ceil_div(H, std::max<int64_t>(1, std::min(threads, H)));
  t.unit_tiles = ceil_div(H, t.units);
  t.rows = B;
  t.row_tiles = 1;
  t.cpu_threads = true;
  plan.persistent = true;
  // float16 / bfloat16 weights are packed into float32 panels.
  const int64_t panel_bytes = dtype == DType::Float64 ? 8 : 4;
  plan.reason = "persistent on " + num(t.unit_tiles) + " CPU thread" + (t.unit_tiles > 1 ? "s" : "") + ", " +
                num(t.units) + " units and W_hh " + num(gates_per_unit(cell) * t.units * H * panel_bytes / 1024) +
                " KB each" + (panel_bytes == 4 && dtype != DType::Float32 ? " (float32 panels)" : "");
  return plan;
}

DeviceLimits h100_limits() {
  DeviceLimits limits;
  limits.sm_count = 132;
  limits.smem_per_block = 227 * 1024;
  limits.compute_capability = 90;
  limits.cooperative_launch = true;
  limits.max_cluster = 16;
  return limits;
}

Plan make_plan(Cell cell, int64_t H, int64_t P, int64_t B, DType dtype, bool tf32, const DeviceLimits& limits,
               PlanFor use) {
  if (limits.side_by_side > 1) {
    DeviceLimits alone = limits, shared = limits;
    alone.side_by_side = shared.side_by_side = 1;
    shared.sm_count = limits.sm_count / limits.side_by_side;
    Plan whole = make_plan(cell, H, P, B, dtype, tf32, alone, use);
    if (whole.persistent && whole.tiling.ctas() <= shared.sm_count) return whole;  // it fits its share already
    Plan part = make_plan(cell, H, P, B, dtype, tf32, shared, use);
    const std::string share = num(shared.sm_count) + " of the " + num(limits.sm_count) + " SMs (" +
                              num(limits.side_by_side) + " recurrences side by side)";
    auto step = [](const Plan& p) { return p.forward.total() + p.backward.total(); };
    if (part.persistent && (!whole.persistent || step(part) < limits.side_by_side * step(whole))) {
      part.reason += "; planned for " + share;
      return part;
    }
    if (whole.persistent) whole.reason += "; for all the SMs: no plan for " + share + " pays";
    return whole;
  }
  Plan plan;
  auto stepwise = [&](std::string why) {
    plan.reason = "stepwise: " + std::move(why);
    return plan;
  };
  if (P != H) return stepwise("LSTM with projection");
  if (B <= 0 || H <= 0) return stepwise("empty batch or hidden size");
  if (!limits.host_simulation) {
    if (dtype == DType::Float64) return stepwise("float64 (the persistent kernel multiplies on tensor cores)");
    if (dtype == DType::Float32 && !tf32)
      return stepwise("float32 with TF32 off (the persistent kernel multiplies float32 in TF32; allow it with "
                      "torch.backends.cuda.matmul.fp32_precision = 'tf32')");
    if (limits.compute_capability < 80) return stepwise("needs compute capability 8.0 or newer");
  }
  // The grid barrier needs every CTA resident at once: a cooperative launch. Plans whose CTAs
  // never wait for each other (unit_tiles 1) or wait only within their cluster launch without
  // one (MPS, MIG).
  const bool cooperative = limits.host_simulation || limits.cooperative_launch;
  if (limits.sm_count <= 0) return stepwise("no multiprocessors");

  const int64_t elem = storage_bytes(dtype);
  std::vector<int64_t> row_choices;
  for (int64_t rows = kTile; rows < B; rows *= 2) row_choices.push_back(rows);
  row_choices.push_back(B);
  auto chosen = [&](const Tiling& t, std::string why) {
    plan.persistent = true;
    plan.tiling = t;
    plan.forward = estimate_step(cell, H, dtype, t, false);
    if (use == PlanFor::Training) plan.backward = estimate_step(cell, H, dtype, t, true);
    plan.reason = describe(t, use) + std::move(why);
    return plan;
  };
  const int64_t smem = limits.smem_per_block;
  if (limits.forced_rows > 0 && limits.forced_units > 0) {
    const std::string forced = "RNNFUSED_PERSISTENT_TILING=" + num(limits.forced_rows) + "x" + num(limits.forced_units);
    // As a cluster where the device has them and it fits, else with the grid barrier.
    const int64_t rows = std::min(limits.forced_rows, B), units = std::min(limits.forced_units, H);
    const bool cluster = ceil_div(H, units) <= limits.max_cluster &&
                         ceil_div(B, rows) <= resident_clusters(limits.sm_count, ceil_div(H, units));
    Tiling t = tile_for(cell, H, B, dtype, rows, units, smem, cluster, limits.hold_weights);
    if (!fits(t, smem, use)) t = tile_for(cell, H, B, dtype, rows, units, smem, false, limits.hold_weights);
    if (t.ctas() > limits.sm_count) return stepwise(forced + " needs " + num(t.ctas()) + " CTAs, more than the SMs");
    if (!fits(t, smem, use)) return stepwise(forced + " does not fit in " + num(smem / 1024) + " KB of shared memory");
    if (!cooperative && t.unit_tiles > 1 && t.cluster == 0)
      return stepwise(forced + " needs a grid barrier: a cooperative launch");
    return chosen(t, "; forced by " + forced);
  }
  if (limits.spread_units) {
    // Stage 2's rule: the smallest batch tile whose weight slices fit, the units spread over
    // every SM.
    for (const int64_t rows : row_choices) {
      const int64_t row_tiles = ceil_div(B, rows);
      if (row_tiles > limits.sm_count) continue;
      const Tiling t =
          tile_for(cell, H, B, dtype, rows, ceil_div(H, limits.sm_count / row_tiles), smem, false, limits.hold_weights);
      if (fits(t, smem, use) && (cooperative || t.unit_tiles == 1)) return chosen(t, "; units spread over the SMs");
    }
  } else {
    // Every batch tile, and for each every unit slice from all of H (one CTA per batch tile,
    // no grid barrier) down to one unit tile per SM. Fewer unit tiles need more shared memory;
    // the model charges more CTAs their grid barrier and exchange, larger slices their longer
    // products and cell passes.
    Tiling best;
    double best_ns = 0;
    for (const int64_t rows : row_choices) {
      const int64_t row_tiles = ceil_div(B, rows);
      if (row_tiles > limits.sm_count) continue;
      int64_t previous_units = 0;
      for (int64_t n = 1; n <= std::min(H, limits.sm_count / row_tiles); ++n) {
        const int64_t smallest = ceil_div(H, n), aligned = round_up(smallest, 16 / elem);
        if (smallest == previous_units) continue;
        previous_units = smallest;
        // The smallest slice of this many unit tiles, and the smallest made of 16-byte vectors
        // (whole 16-byte copies and pushes) where that is as many.
        const int64_t slices[] = {smallest, aligned};
        for (int i = 0; i < (aligned != smallest && ceil_div(H, aligned) == ceil_div(H, smallest) ? 2 : 1); ++i) {
          const int64_t units = slices[i];
          for (const bool cluster : {false, true}) {
            const int64_t unit_tiles = ceil_div(H, units);
            const bool resident = row_tiles <= resident_clusters(limits.sm_count, unit_tiles);
            if (cluster && (unit_tiles > limits.max_cluster || !resident)) continue;
            const Tiling t = tile_for(cell, H, B, dtype, rows, units, smem, cluster, limits.hold_weights);
            // (tile() makes no cluster of one unit tile, nor of slices that are not whole 4-byte words.)
            if (cluster && t.cluster == 0) continue;
            if (!fits(t, smem, use) || (!cooperative && t.unit_tiles > 1 && !cluster)) continue;
            ++plan.candidates;
            const double ns = estimate_step(cell, H, dtype, t, false).total() +
                              (use == PlanFor::Training ? estimate_step(cell, H, dtype, t, true).total() : 0);
            if (plan.candidates == 1 || ns < best_ns) {
              best = t;
              best_ns = ns;
            }
          }
        }
      }
    }
    if (plan.candidates > 0)
      return chosen(best, "; the cost model's cheapest of " + num(plan.candidates) + " tiling" +
                              (plan.candidates > 1 ? "s" : ""));
  }
  if (!cooperative)
    return stepwise("the device does not support cooperative launch, which the grid barrier needs where W_hh (" +
                    num(gates_per_unit(cell) * H * H * elem / 1024) + " KB) does not fit one CTA" +
                    (limits.max_cluster > 1 ? " or one cluster" : ""));
  return stepwise("W_hh (" + num(gates_per_unit(cell) * H * H * elem / 1024) + " KB) and the state of " + num(B) +
                  " rows do not fit in the shared memory of " + num(limits.sm_count) + " multiprocessors (" +
                  num(limits.smem_per_block / 1024) + " KB each) at any batch tile");
}

PipelinePlan plan_pipeline(Cell cell, int64_t T, int64_t layers, int64_t H, int64_t P, int64_t B, DType dtype,
                           bool tf32, const DeviceLimits& limits, PlanFor use, int64_t max_chunks) {
  PipelinePlan pipeline;
  if (layers < 2 || T < 2) {
    pipeline.reason = "layer after layer: a pipeline needs two layers and two steps";
    return pipeline;
  }
  DeviceLimits alone = limits;
  alone.side_by_side = 1;
  const Plan whole = make_plan(cell, H, P, B, dtype, tf32, alone, use);
  if (!whole.persistent) {
    pipeline.reason = "layer after layer: " + whole.reason;  // the model does not estimate the stepwise kernels
    return pipeline;
  }
  const CostModel model;
  const double launches = use == PlanFor::Training ? 2 * model.launch_ns : model.launch_ns;
  auto step = [](const Plan& p) { return p.forward.total() + p.backward.total(); };
  pipeline.layered_ns = layers * (launches + T * step(whole));
  // The plan for each number of recurrences side by side (min(layers, n)), made once.
  std::vector<std::optional<Plan>> shared(layers + 1);
  for (int64_t n = 2; n <= std::min(T, max_chunks); ++n) {
    const int64_t side_by_side = std::min(layers, n);
    if (!shared[side_by_side]) {
      DeviceLimits share = limits;
      share.side_by_side = side_by_side;
      shared[side_by_side] = make_plan(cell, H, P, B, dtype, tf32, share, use);
    }
    const Plan& plan = *shared[side_by_side];
    // Launches that cannot all hold their SMs at once wait for each other: no overlap to gain.
    if (!plan.persistent || plan.tiling.ctas() * side_by_side > limits.sm_count) continue;
    const double ns = (n + layers - 1) * (launches + ceil_div(T, n) * step(plan));
    if (pipeline.chunks == 0 || ns < pipeline.pipelined_ns) {
      pipeline.chunks = n;
      pipeline.pipelined_ns = ns;
    }
  }
  auto us = [](double ns) { return std::to_string(static_cast<int64_t>(ns / 1000 + 0.5)) + " us"; };
  if (pipeline.chunks == 0) {
    pipeline.reason = "layer after layer: no pipeline of 2 to " + num(std::min(T, max_chunks)) +
                      " slices has plans whose launches fit the SMs together";
  } else if (pipeline.pipelined_ns >= pipeline.layered_ns) {
    pipeline.reason = "layer after layer: an estimated " + us(pipeline.layered_ns) + ", against " +
                      us(pipeline.pipelined_ns) + " for the cheapest pipeline (" + num(pipeline.chunks) + " slices)";
    pipeline.chunks = 0;
  } else {
    pipeline.reason = "the layers pipelined over " + num(pipeline.chunks) + " slices of the steps: an estimated " +
                      us(pipeline.pipelined_ns) + " against " + us(pipeline.layered_ns) + " layer after layer";
  }
  return pipeline;
}

}  // namespace persistent
}  // namespace rnnfused
