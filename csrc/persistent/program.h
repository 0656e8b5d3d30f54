// The program of one CTA of the persistent recurrence, forward and backward, written once
// and run two ways: by the CUDA kernel (device.cuh: the CTAs of a cooperative launch, a
// grid-wide barrier after every phase, a CTA barrier where each CTA has every unit of its
// rows, or in a cluster the wait for the peers' pushes) and by the host simulation (host.h:
// the CTAs of a phase in shuffled order, the end of the phase as the barrier, every memory
// access checked). Both run exactly this code with the tiling and shared-memory layout of
// plan.h; only the Ops differ. Each CTA runs begin(), then for every walk step and phase k:
//   phase(s, k)          everything the other CTAs read after the barrier (h_t, dG, r * h)
//   (arrival at the barrier)
//   after_arrival(s, k)  what no CTA waits for: the saved activations' stores, the next
//                        step's input prefetch
//   (wait at the barrier)
// and end(). The Ops:
//
//   ops.for_each(rows, cols, f)   f(r, c) for r < rows, c < cols, by all threads of the CTA:
//                                 element i = r * cols + c by thread i % kThreads
//   ops.sync(point)               barrier of the CTA's threads (Sync names what it orders)
//   ops.copy_rows(dst, ld, rows, segments, dst_stride, src_stride, length, source)
//       for every r < rows with a source row (source(r) not null) and g < segments:
//       dst[r*ld + g*dst_stride + j] = load_coherent(source(r) + g*src_stride + j), j < length;
//       other rows and columns are left as they are. Not synchronised, and possibly
//       asynchronous (on the GPU: cp.async.cg): it lands by the issuing thread's next
//       ops.prefetched(), and until then its destination must not be touched.
//   ops.gemm(acc, ld_acc, partials, partial_stride, a, lda, b, ldb, m0, m1, n, k0, k1, split)
//       acc[m][c] = Σ_{k0 <= k < k1} a[m][k] ops.operand(b[c][k - k0]) for m0 <= m < m1,
//       c < n (all multiples of kTile; a is stored so rounded), accumulated in A; with
//       split > 1 the K steps are divided among warps whose partial sums go to
//       partials[part][m][c] (part stride partial_stride) before adding up.
//       Ends with the CTA synchronised.
//   ops.hold(a, lda, m0, m1, n, k0, k1, split)
//       every later ops.gemm with this a has these arguments (the planner's held_fragments
//       allows them): the GPU loads each warp's A fragments of them into registers now and
//       multiplies from those (the host simulation from a copy taken now), so a must not change
//       after; a CTA barrier must come between a's stores and this.
//   ops.prefetch_rows(dst, ld, rows, segments, dst_stride, src_stride, length, source)
//       copy_rows's copy of data no other CTA writes during the kernel, asynchronous
//       (cp.async; a lone 2-byte element synchronously): it lands by the
//       issuing thread's next ops.prefetched(), and until then neither its source may change
//       nor its destination be touched.
//   ops.prefetched()              this thread's prefetches have landed (an ops.sync must follow
//                                 before other threads read them)
//   ops.push_rows(tile, ld, rows, segments, stride, H, units, cluster, rank)
//       (a cluster) for every peer CTA of the cluster (rank q != rank, q < cluster), r < rows,
//       g < segments, j < pushed_units(H, units, rank): the peer's tile[r*ld + g*stride +
//       rank*units + j] (the same offset in its shared memory) = this CTA's; and this CTA
//       expects its peers' pushes of the phase, incoming_bytes(H, units, cluster, rank, rows,
//       segments) in all (plan.h). Not synchronised otherwise: the wait that ends the phase
//       returns once the pushes into this CTA have landed, which orders what each peer did
//       before its push (its reads of the tile being overwritten included) before what this
//       CTA does after. Every CTA of the cluster pushes in the same phases, the same rows.
//   ops.buffer(s)                 the operand buffer of walk step s in a cluster: s % 2
//   ops.stamp(phase)              charges the time since the previous stamp to `phase` (a GPU
//                                 build with RNNFUSED_PHASE_TIMING; free everywhere else)
//
//   ops.operand(x)                an operand as the products take it: on the GPU (and in its
//                                 host simulation) fp32 rounded to TF32; exact on the CPU.
// The W tiles are stored so rounded, once, at begin(); the products round the other operand
// (h, dG) as they load it, so that its tiles hold h_t and dG exactly.
//
// After a barrier a CTA may read what any CTA wrote before its arrival at that barrier
// (through load_coherent or ops.copy_rows: L2, never a stale L1 line). In a cluster the
// exchange is the barrier: after it a CTA reads, with plain loads, what its peers pushed into
// its shared memory in that phase. What a CTA writes
// after its arrival becomes readable to the others only after the next barrier; otherwise a
// CTA reads only what it wrote itself or what was there before the kernel started. The cell
// math is cells.h's.
//
// Every memory access of the program, global or shared, goes through read, write or
// load_coherent (below): on the GPU plain loads and stores (ld.global.cg for load_coherent);
// in the host simulation each also tells the checker which simulated thread touched which
// bytes. A raw dereference here would be invisible to it (tests/test_persistent_checker.py
// checks that program.h has none).
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../cells.h"
#include "../params.h"
#include "../steps.h"
#include "plan.h"
#include "timing.h"

namespace rnnfused {
namespace persistent {

#if !defined(__CUDA_ARCH__)
// What the host simulation's checker (host.h) is told of each access of the program.
enum class Access { Read, Write, Coherent };
struct AccessObserver {
  virtual void access(const void* p, int64_t bytes, Access kind) = 0;

 protected:
  ~AccessObserver() = default;
};
// The checker of the simulation that runs on this thread; null when none runs.
inline thread_local AccessObserver* access_observer = nullptr;
#endif

template <typename T>
struct NoDeduce {
  using type = T;
};

// A plain load: shared memory, data no other CTA writes during the kernel, or data this CTA
// wrote itself.
template <typename T>
RNNF_HD T read(const T* p) {
#if !defined(__CUDA_ARCH__)
  if (access_observer) access_observer->access(p, sizeof(T), Access::Read);
#endif
  return *p;
}

// A read of data another CTA wrote during this kernel (before the last grid barrier): from
// L2 on the GPU (ld.global.cg), never a line an earlier read left in this SM's L1.
template <typename T>
RNNF_HD T load_coherent(const T* p) {
#if defined(__CUDA_ARCH__)
  return __ldcg(p);
#else
  if (access_observer) access_observer->access(p, sizeof(T), Access::Coherent);
  return *p;
#endif
}

template <typename T>
RNNF_HD void write(T* p, typename NoDeduce<T>::type value) {
#if !defined(__CUDA_ARCH__)
  if (access_observer) access_observer->access(p, sizeof(T), Access::Write);
#endif
  *p = value;
}

// The CTA barriers of the program, named for what each orders (the host simulation can leave
// one out, RNNFUSED_SIMULATE_DEFECT in host.h, to show that its checker sees the race).
// Two of them are redundant in today's program, and the checker accordingly finds no race
// without them (tests/test_persistent_checker.py): PhaseEnd, because the arrival at the grid
// barrier after every phase starts with a CTA barrier of its own (but in a cluster, whose push
// reads what the pass wrote); and Fold, because the next
// chunk's copy and its Operand barrier come before its product overwrites acc. They keep each
// piece correct on its own should the program around them change. (The backward's Begin
// orders the first step's prefetched inputs before its pass, which folds nothing.)
enum class Sync {
  Begin,     // begin()'s writes of the tiles and state before the first phase copies and reads
  Operand,   // the operand tile copied in by all threads before the product's warps read it
  Fold,      // one dG chunk's product read before the next chunk's product overwrites acc
  PhaseEnd,  // the phase's reads of its tiles before the next phase writes them
  Staged,    // (GRU forms) a value staged in the inputs tile (forward: W_hn h + b_hn; backward, in
             // a cluster: GRU's dgx of n, GRU_CHO's r * h) read after the arrival before the
             // prefetch refills it
};

// The steps of one layer direction in the order the forward pass visits them ("walk step"
// s = 0 .. T-1), with the rows active at each: packed input reads the batch sizes and row
// offsets per time step from memory the kernel can read; padded input has B rows everywhere.
struct Walk {
  int64_t T = 0, B = 0;
  bool reverse = false;
  const int64_t* batch_sizes = nullptr;  // [T] per time step, or null when padded
  const int64_t* offsets = nullptr;      // [T] first row of each time step (packed)

  RNNF_HD int64_t time(int64_t s) const { return reverse ? T - 1 - s : s; }
  RNNF_HD int64_t rows(int64_t s) const {
    if (s < 0 || s >= T) return 0;
    return batch_sizes ? read(batch_sizes + time(s)) : B;
  }
  RNNF_HD int64_t offset(int64_t s) const { return batch_sizes ? read(offsets + time(s)) : time(s) * B; }
};

// Row r's segment, from column `first` on, of the [N, width] tensor `tensor` whose rows of
// interest start at row `offset`: a source of ops.prefetch_rows.
template <typename T>
struct RowSegments {
  const T* tensor;
  int64_t width, offset, first;
  RNNF_HD const T* operator()(int64_t r) const { return tensor + (offset + r) * width + first; }
};

// What the tensor cores multiply: fp32 rounded to TF32 (10 mantissa bits, to nearest, ties
// away from zero, as cvt.rna.tf32.f32); fp16, bf16 and (host simulation) fp64 as they are.
// The GPU's Ops and the host simulation take their operands so; the CPU's exactly.
template <typename S>
RNNF_HD S tensor_core_operand(S x) {
  if constexpr (std::is_same_v<S, float>) {
    uint32_t bits;
    memcpy(&bits, &x, sizeof(bits));
    if ((bits & 0x7f800000u) != 0x7f800000u) bits = (bits + 0x1000u) & 0xffffe000u;
    memcpy(&x, &bits, sizeof(bits));
  }
  return x;
}

template <typename T>
RNNF_HD T* region(char* smem, int64_t offset) {
  return reinterpret_cast<T*>(smem + offset);
}

// The CTA's place in the grid: hidden units [u0, u0 + units) and batch rows [r0, r0 + rows).
struct CtaSlice {
  int64_t u0, r0;
  RNNF_HD CtaSlice(const Tiling& t, int64_t cta) : u0(cta % t.unit_tiles * t.units), r0(cta / t.unit_tiles * t.rows) {}
};

// What a pointwise pass needs to know about its element (row R of the batch, hidden unit U).
struct Element {
  int64_t s;     // walk step
  int64_t row;   // row of the step in the [N, *] tensors
  int64_t R, U;  // batch row, hidden unit
  int64_t r, u;  // the CTA's local row and unit
  bool last;     // forward: the row's last step, so h_t is its h_n
};

// (A cluster) the rows of the tile a push at walk step s moves: the batch tile's rows active at
// s, but at least one, so that no phase of a cluster exchanges nothing (its wait would then
// return at once and let a CTA run ahead into its peers' next exchange). The rows past the
// active ones carry stale values into rows no product result is read from.
RNNF_HD int64_t pushed_rows(const Tiling& t, const Walk& walk, const CtaSlice& slice, int64_t s) {
  const int64_t active = walk.rows(s) - slice.r0;
  return active < 1 ? 1 : active < t.rows ? active : t.rows;
}

// Calls f(Element) for the CTA's elements active at walk step s.
template <typename Ops, typename F>
RNNF_HD void for_each_element(Ops& ops, const Tiling& t, const Walk& walk, const CtaSlice& slice, int64_t H,
                              int64_t s, const F& f) {
  const int64_t rows = walk.rows(s), next_rows = walk.rows(s + 1), offset = walk.offset(s);
  const int64_t r0 = slice.r0, u0 = slice.u0;
  ops.for_each(t.rows, t.units, [=](int64_t r, int64_t u) {
    const int64_t R = r0 + r, U = u0 + u;
    if (R < rows && U < H) f(Element{s, offset + R, R, U, r, u, R >= next_rows});
  });
}

// ---------------------------------------------------------------------------------------
// Forward: W tile [gate_rows][ld_w] and the biases resident; per walk step the h_{t-1} tile
// of the CTA's rows, acc = W h, then the cell for the CTA's (row, unit) elements, which
// stores h_t and stages the saved activations in shared memory (plan.h's staged_slots: each
// gate's over the acc entry it was computed from, which only its element reads; LSTM's c_t
// is its state; GRU's W_hn h + b_hn goes over its n gate's input); after the arrival the staged activations go out (stage 1's layout, steps.h)
// and the next step's input projection comes in. LSTM keeps c in shared memory. GRU_CHO takes
// two phases: r (and r * h_{t-1} of every unit, through p.rh) first, then n.
// In a cluster (t.cluster) the cell pass writes h_t (GRU_CHO's r * h_{t-1}) into its own
// operand buffer of the next step, pushes the CTA's slice of it into every peer's, and stores
// h_t to y from it after the push: nothing in the exchange goes through global memory.
template <typename S, typename A>
struct ForwardCta {
  const ForwardParams& p;
  const Tiling& t;
  const Walk& walk;
  const CtaSlice slice;
  S* const w;
  S* const h;
  A* const acc;
  A* const partials;
  A* const c;
  A* const inputs;
  A* const biases;

  RNNF_HD ForwardCta(const ForwardParams& params, const Tiling& tiling, const Walk& steps, int64_t cta, char* smem)
      : p(params),
        t(tiling),
        walk(steps),
        slice(tiling, cta),
        w(region<S>(smem, tiling.fwd.weights)),
        h(region<S>(smem, tiling.fwd.operand)),
        acc(region<A>(smem, tiling.fwd.acc)),
        partials(region<A>(smem, tiling.fwd.partials)),
        c(region<A>(smem, tiling.fwd.state)),
        inputs(region<A>(smem, tiling.fwd.inputs)),
        biases(region<A>(smem, tiling.fwd.bias)) {}

  RNNF_HD int phases() const { return p.cell == Cell::GRU_CHO ? 2 : 1; }

  RNNF_HD bool clustered() const { return t.cluster > 0; }
  RNNF_HD S* operand_buffer(int64_t buffer) const { return h + buffer * t.rows_pad * t.ld_w_fwd; }
  // The operand tile of walk step s: h_{t-1}, and GRU_CHO's r * h_{t-1} (one tile, reloaded,
  // unless in a cluster).
  template <typename Ops>
  RNNF_HD S* state_tile(Ops& ops, int64_t s) const {
    return clustered() ? operand_buffer(ops.buffer(s)) : h;
  }
  RNNF_HD S* reset_tile() const { return clustered() ? operand_buffer(2) : h; }

  // The W tile, the biases and (LSTM) the c0 tile into shared memory; the operand tiles
  // zeroed once (their padding columns multiply W's and must be finite; rows are loaded or
  // pushed per step); the first step's inputs on their way.
  template <typename Ops>
  RNNF_HD void begin(Ops& ops) {
    const int64_t H = p.H, gates = gates_per_unit(p.cell), stride = t.gate_stride, ld = t.ld_w_fwd;
    const int64_t units = t.units, u0 = slice.u0, r0 = slice.r0, B = walk.B;
    const S* w_hh = static_cast<const S*>(p.w_hh);
    S* tile = w;
    ops.for_each(t.gate_rows, t.k_fwd, [=](int64_t m, int64_t k) {
      const int64_t gate = m / stride, u = m % stride;
      const bool valid = gate < gates && u < units && u0 + u < H && k < H;
      write(tile + m * ld + k, valid ? ops.operand(read(w_hh + (gate * H + u0 + u) * H + k)) : store<S>(A(0)));
    });
    S* operand_tile = h;
    ops.for_each(operand_buffers(p.cell, false, clustered()) * t.rows_pad, ld,
                 [=](int64_t r, int64_t k) { write(operand_tile + r * ld + k, store<S>(A(0))); });
    const S* b_ih = static_cast<const S*>(p.b_ih);
    const S* b_hh = static_cast<const S*>(p.b_hh);
    A* bias_tile = biases;
    ops.for_each(2 * gates, units, [=](int64_t m, int64_t u) {
      const S* b = m < gates ? b_ih : b_hh;
      write(bias_tile + m * units + u, u0 + u < H ? load<A>(read(b + m % gates * H + u0 + u)) : A(0));
    });
    prefetch_inputs(ops, 0);
    if (p.cell == Cell::LSTM) {
      const A* c0 = static_cast<const A*>(p.c);
      A* state = c;
      ops.for_each(t.rows, t.units, [=](int64_t r, int64_t u) {
        write(state + r * units + u, (r0 + r < B && u0 + u < H) ? read(c0 + (r0 + r) * H + u0 + u) : A(0));
      });
    }
    ops.sync(Sync::Begin);
    if (t.held_fwd > 0)
      ops.hold(static_cast<const S*>(w), t.ld_w_fwd, int64_t(0), t.gate_rows, t.rows_pad, int64_t(0), t.k_fwd,
               t.split_fwd);
    ops.stamp(Phase::Begin);
  }

  template <typename Ops>
  RNNF_HD void phase(Ops& ops, int64_t s, int k) {
    // h_{t-1}'s tile, and the tile h_t goes to: the next step's in a cluster, else none (y).
    S* const now = state_tile(ops, s);
    S* const next = clustered() ? state_tile(ops, s + 1) : nullptr;
    switch (p.cell) {
      case Cell::LSTM: step(ops, s, [this, next](const Element& e) { lstm(next, e); }); break;
      case Cell::GRU: step(ops, s, [this, now, next](const Element& e) { gru(now, next, e); }); break;
      case Cell::RNN_TANH:
      case Cell::RNN_RELU: step(ops, s, [this, next](const Element& e) { rnn(next, e); }); break;
      case Cell::GRU_CHO:
        if (k == 0) {
          load_operand(ops, s, false);
          multiply(ops, 0, 2 * t.gate_stride, now);
          for_each_element(ops, t, walk, slice, p.H, s, [this, now](const Element& e) { cho_reset(now, e); });
        } else {
          load_operand(ops, s, true);
          multiply(ops, 2 * t.gate_stride, t.gate_rows, reset_tile());
          for_each_element(ops, t, walk, slice, p.H, s,
                           [this, now, next](const Element& e) { cho_output(now, next, e); });
        }
        break;
      default: invalid_cell(p.cell);
    }
    ops.sync(Sync::PhaseEnd);
    ops.stamp(Phase::Cell);
    // (The last step's h_t is the peers' operand of no step.)
    const bool reset = p.cell == Cell::GRU_CHO && k == 0;
    if (clustered() && (reset || s + 1 < walk.T)) push(ops, s, reset ? reset_tile() : next);
  }

  // (A cluster) the CTA's slice of the operand it wrote in this phase into every peer's tile.
  template <typename Ops>
  RNNF_HD void push(Ops& ops, int64_t s, S* tile) {
    ops.push_rows(tile, t.ld_w_fwd, pushed_rows(t, walk, slice, s), int64_t(1), int64_t(0), p.H, t.units, t.cluster,
                  slice.u0 / t.units);
  }

  // After the arrival at the barrier that ends phase k of walk step s: the activations the
  // phase staged go out (GRU_CHO: r after phase 0, z and n after phase 1), in a cluster h_t
  // too, and after the step's last phase the next step's inputs are on their way.
  template <typename Ops>
  RNNF_HD void after_arrival(Ops& ops, int64_t s, int k) {
    if (p.gates) {
      const bool cho = p.cell == Cell::GRU_CHO;
      store_staged(ops, s, cho && k == 1 ? 1 : 0, cho && k == 0 ? 1 : staged_slots(p.cell));
    }
    if (k < phases() - 1) return;
    if (clustered()) store_outputs(ops, s);
    if (p.cell == Cell::GRU && p.gates) ops.sync(Sync::Staged);
    prefetch_inputs(ops, s + 1);
  }

  // (A cluster) h_t of walk step s, from the next step's operand tile, to y, and to h_n for
  // the rows whose last step it is.
  template <typename Ops>
  RNNF_HD void store_outputs(Ops& ops, int64_t s) {
    const int64_t H = p.H, r0 = slice.r0, u0 = slice.u0, ld = t.ld_w_fwd;
    const int64_t active = walk.rows(s), next_rows = walk.rows(s + 1), offset = walk.offset(s);
    const S* tile = state_tile(ops, s + 1);
    S* y = static_cast<S*>(p.y);
    S* h_n = static_cast<S*>(p.h);
    ops.for_each(t.rows, t.units, [=](int64_t r, int64_t u) {
      const int64_t R = r0 + r, U = u0 + u;
      if (R >= active || U >= H) return;
      const S value = read(tile + r * ld + U);
      write(y + (offset + R) * H + U, value);
      if (R >= next_rows) write(h_n + R * H + U, value);
    });
  }

  // x W_ihᵀ of the CTA's rows active at walk step s, gate by gate, into the inputs tile.
  template <typename Ops>
  RNNF_HD void prefetch_inputs(Ops& ops, int64_t s) {
    if (s >= walk.T) return;
    const int64_t r0 = slice.r0, u0 = slice.u0, active = walk.rows(s) - r0, offset = walk.offset(s);
    const int64_t ld = inputs_ld(t.units), length = p.H - u0 < t.units ? p.H - u0 : t.units;
    // x W_ihᵀ (gate g's units at g * H): in the first G columns of the saved gates when
    // training, else in gx.
    const RowSegments<A> rows = p.gates ? RowSegments<A>{static_cast<const A*>(p.gates),
                                                         saved_gates_per_unit(p.cell) * p.H, offset + r0, u0}
                                        : RowSegments<A>{static_cast<const A*>(p.gx), p.G, offset + r0, u0};
    ops.prefetch_rows(inputs, gates_per_unit(p.cell) * ld, active < t.rows ? active : t.rows,
                      gates_per_unit(p.cell), ld, p.H, length, rows);
  }

  // The staged activations [first, end) of walk step s (slot g < gates: saved gate g, from
  // its acc entries; LSTM's slot 4: c_t, from the state; GRU's slot 3: W_hn h + b_hn, from its
  // input slot of the n gate) to their rows of p.gates and p.cells.
  template <typename Ops>
  RNNF_HD void store_staged(Ops& ops, int64_t s, int64_t first, int64_t end) {
    const int64_t H = p.H, units = t.units, r0 = slice.r0, u0 = slice.u0, stride = t.gate_stride, ld = t.ld_acc_fwd;
    const int64_t active = walk.rows(s), offset = walk.offset(s), saved = saved_gates_per_unit(p.cell);
    const int64_t gates = gates_per_unit(p.cell);
    A* saved_gates = static_cast<A*>(p.gates);
    A* cells = static_cast<A*>(p.cells);
    const A* products = acc;
    const A* state = c;
    const A* staged_inputs = inputs;
    const int64_t ld_in = inputs_ld(units);
    const bool lstm = p.cell == Cell::LSTM;
    ops.for_each(t.rows, (end - first) * units, [=](int64_t r, int64_t j) {
      const int64_t slot = first + j / units, u = j % units, R = r0 + r, U = u0 + u;
      if (R >= active || U >= H) return;
      const int64_t row = offset + R;
      if (slot < gates)
        write(saved_gates + row * saved * H + slot * H + U, read(products + (slot * stride + u) * ld + r));
      else if (lstm)
        write(cells + row * H + U, read(state + r * units + u));
      else
        write(saved_gates + row * saved * H + slot * H + U, read(staged_inputs + (r * gates + 2) * ld_in + u));
    });
  }

  // (LSTM) c_n from shared memory.
  template <typename Ops>
  RNNF_HD void end(Ops& ops) {
    if (p.cell != Cell::LSTM) return;
    A* c_n = static_cast<A*>(p.c);
    const A* state = c;
    const int64_t H = p.H, units = t.units, u0 = slice.u0, r0 = slice.r0, B = walk.B;
    ops.for_each(t.rows, t.units, [=](int64_t r, int64_t u) {
      if (r0 + r < B && u0 + u < H) write(c_n + (r0 + r) * H + u0 + u, read(state + r * units + u));
    });
  }

  // One product over all gate rows, then the cell.
  template <typename Ops, typename F>
  RNNF_HD void step(Ops& ops, int64_t s, const F& cell) {
    load_operand(ops, s, false);
    multiply(ops, 0, t.gate_rows, state_tile(ops, s));
    for_each_element(ops, t, walk, slice, p.H, s, cell);
  }

  // The operand tile: h_{t-1} of the CTA's rows active at step s, or (GRU_CHO phase 2)
  // r * h_{t-1}. Inactive rows keep stale values: their products are never read. In a cluster
  // the peers pushed both in, but for the rows not active the step before, whose h_{t-1} is
  // h0 (s = 0; packed input in the reverse direction).
  template <typename Ops>
  RNNF_HD void load_operand(Ops& ops, int64_t s, bool reset_hidden) {
    const int64_t r0 = slice.r0, active = walk.rows(s) - r0, rows = active < t.rows ? active : t.rows;
    if (!clustered())
      ops.copy_rows(h, t.ld_w_fwd, rows, int64_t(1), int64_t(0), int64_t(0), p.H,
                    [this, s, r0, reset_hidden](int64_t r) {
                      const int64_t R = r0 + r;
                      return reset_hidden ? static_cast<const S*>(p.rh) + R * p.H : previous_state(s, R);
                    });
    else if (!reset_hidden)
      ops.copy_rows(state_tile(ops, s), t.ld_w_fwd, rows, int64_t(1), int64_t(0), int64_t(0), p.H,
                    [this, s, r0](int64_t r) -> const S* {
                      const int64_t R = r0 + r;
                      return R < walk.rows(s - 1) ? nullptr : static_cast<const S*>(p.h0) + R * p.H;
                    });
    ops.prefetched();  // the step's inputs: the Operand barrier orders them too
    ops.sync(Sync::Operand);
    ops.stamp(Phase::Exchange);
  }

  // acc rows [m0, m1) = W tile rows [m0, m1) times the operand tile.
  template <typename Ops>
  RNNF_HD void multiply(Ops& ops, int64_t m0, int64_t m1, const S* operand) {
    ops.gemm(acc, t.ld_acc_fwd, partials, t.gate_rows * t.ld_acc_fwd, static_cast<const S*>(w), t.ld_w_fwd, operand,
             t.ld_w_fwd, m0, m1, t.rows_pad, int64_t(0), t.k_fwd, t.split_fwd);
    ops.stamp(Phase::Mma);
  }

  // Row R's state before walk step s (R active at s): the output of the previous walk step,
  // or h0 for a row that was not active then (s = 0; packed input in the reverse direction).
  RNNF_HD const S* previous_state(int64_t s, int64_t R) const {
    if (R < walk.rows(s - 1)) return static_cast<const S*>(p.y) + (walk.offset(s - 1) + R) * p.H;
    return static_cast<const S*>(p.h0) + R * p.H;
  }

  RNNF_HD A gate_acc(int64_t gate, const Element& e) const {
    return read(acc + (gate * t.gate_stride + e.u) * t.ld_acc_fwd + e.r);
  }

  RNNF_HD A input(int64_t gate, const Element& e) const {
    return read(inputs + (e.r * gates_per_unit(p.cell) + gate) * inputs_ld(t.units) + e.u);
  }

  RNNF_HD A b_ih(int64_t gate, const Element& e) const { return read(biases + gate * t.units + e.u); }
  RNNF_HD A b_hh(int64_t gate, const Element& e) const {
    return read(biases + (gates_per_unit(p.cell) + gate) * t.units + e.u);
  }

  // x W_ihᵀ + h W_hhᵀ + both biases of gate `gate` (the order of steps.h's preact).
  RNNF_HD A preact(int64_t gate, const Element& e) const {
    return input(gate, e) + gate_acc(gate, e) + b_ih(gate, e) + b_hh(gate, e);
  }

  // h_{t-1} of the element for the cell's own math (GRU's): from the operand tile `tile`, or
  // where that holds r * h_{t-1} (GRU_CHO's second phase without a cluster; tile null), from
  // y (or h0), where this CTA wrote it.
  RNNF_HD A h_prev(const S* tile, const Element& e) const {
    if (tile == nullptr) return load<A>(load_coherent(previous_state(e.s, e.R) + e.U));
    return load<A>(read(tile + e.r * t.ld_w_fwd + e.U));
  }

  // h_t: to y (and h_n at the row's last step), or in a cluster to the next step's operand
  // tile, from which store_outputs takes it on to y after the push.
  RNNF_HD void write_h(S* next, const Element& e, S value) const {
    if (next != nullptr) {
      write(next + e.r * t.ld_w_fwd + e.U, value);
      return;
    }
    write(static_cast<S*>(p.y) + e.row * p.H + e.U, value);
    if (e.last) write(static_cast<S*>(p.h) + e.R * p.H + e.U, value);
  }

  // Saved gate g of the element, staged until after the arrival (store_staged) over gate g's
  // acc entry of the element, which the element has read.
  RNNF_HD void stage(int64_t gate, const Element& e, A value) const {
    write(acc + (gate * t.gate_stride + e.u) * t.ld_acc_fwd + e.r, value);
  }

  RNNF_HD void lstm(S* next, const Element& e) const {
    const auto a = cells::lstm_activate(preact(0, e), preact(1, e), preact(2, e), preact(3, e));
    A* const c_state = c + e.r * t.units + e.u;
    const A c_t = cells::lstm_cell(a, read(c_state), A(p.cell_clip));
    write(c_state, c_t);
    write_h(next, e, store<S>(cells::lstm_hidden(a, c_t)));
    if (p.gates) {
      stage(0, e, a.i);
      stage(1, e, a.f);
      stage(2, e, a.g);
      stage(3, e, a.o);
    }
  }

  RNNF_HD void gru(const S* now, S* next, const Element& e) const {
    const A hn = gate_acc(2, e) + b_hh(2, e);
    const A xn = input(2, e) + b_ih(2, e);
    const auto a = cells::gru_forward(preact(0, e), preact(1, e), xn, hn);
    write_h(next, e, store<S>(cells::gru_hidden(a.z, a.n, h_prev(now, e))));
    if (p.gates) {
      stage(0, e, a.r);
      stage(1, e, a.z);
      stage(2, e, a.n);
      write(inputs + (e.r * gates_per_unit(p.cell) + 2) * inputs_ld(t.units) + e.u, a.hn);  // input(2, e) is read
    }
  }

  // GRU_CHO phase 1: r, and r * h_{t-1} into the exchange buffer p.rh [B, H] (a cluster: its
  // own reset tile, which it pushes).
  RNNF_HD void cho_reset(const S* now, const Element& e) const {
    const A r = cells::sigmoid(preact(0, e));
    const S value = store<S>(r * h_prev(now, e));
    if (clustered())
      write(reset_tile() + e.r * t.ld_w_fwd + e.U, value);
    else
      write(static_cast<S*>(p.rh) + e.R * p.H + e.U, value);
    if (p.gates) stage(0, e, r);
  }

  // GRU_CHO phase 2: z (its product is still in acc from phase 1), n and h_t. The operand
  // tile now holds r * h_{t-1}, so h_{t-1} is read again from where phase 1 loaded it (a
  // cluster keeps it in its own tile).
  RNNF_HD void cho_output(const S* now, S* next, const Element& e) const {
    const A z = cells::sigmoid(preact(1, e));
    const A n = cells::gru_cho_candidate(input(2, e) + b_ih(2, e), gate_acc(2, e) + b_hh(2, e));
    write_h(next, e, store<S>(cells::gru_hidden(z, n, h_prev(clustered() ? now : nullptr, e))));
    if (p.gates) {
      stage(1, e, z);
      stage(2, e, n);
    }
  }

  RNNF_HD void rnn(S* next, const Element& e) const {
    const A pre = preact(0, e);
    write_h(next, e, store<S>(p.cell == Cell::RNN_RELU ? cells::rnn_relu_forward(pre) : cells::rnn_tanh_forward(pre)));
  }
};

// ---------------------------------------------------------------------------------------
// Backward, in the reverse of the forward walk: Wᵀ tile [unit_rows][ld_w] resident (the
// W_hh columns of the CTA's units, gate blocks of k_block columns); the gradient of h for
// the CTA's (row, unit) elements carried in shared memory (LSTM: of c too). Per walk step:
// fold in the recurrent gradient of the step processed before (its dG, from every CTA,
// times Wᵀ), then the pointwise backward (gate gradients into dgx/dgh, stage 1's layout).
// GRU_CHO takes two phases: z and n first, then the r gradient needs d(r * h) = dG_n W_hn.
// With t.prefetch_bwd the pointwise pass reads its per-element inputs (plan.h's
// backward_wide_inputs, backward_narrow_inputs) from shared memory, prefetched a step ahead
// after the arrival; else from global memory.
// In a cluster the pass writes the gate gradients the recurrence needs (dgh's) into its own dG
// tile of the step (all gates; two tiles by step parity), pushes the CTA's slice into every
// peer's, and stores them to dgh (and GRU's dgx) after the push.
template <typename S, typename A>
struct BackwardCta {
  const BackwardParams& p;
  const Tiling& t;
  const Walk& walk;
  const CtaSlice slice;
  S* const w;
  S* const dg;
  A* const acc;
  A* const partials;
  A* const dh;
  A* const dc;
  A* const inputs;
  S* const narrow;

  RNNF_HD BackwardCta(const BackwardParams& params, const Tiling& tiling, const Walk& steps, int64_t cta, char* smem)
      : p(params),
        t(tiling),
        walk(steps),
        slice(tiling, cta),
        w(region<S>(smem, tiling.bwd.weights)),
        dg(region<S>(smem, tiling.bwd.operand)),
        acc(region<A>(smem, tiling.bwd.acc)),
        partials(region<A>(smem, tiling.bwd.partials)),
        dh(region<A>(smem, tiling.bwd.state)),
        dc(region<A>(smem, tiling.bwd.state2)),
        inputs(region<A>(smem, tiling.bwd.inputs)),
        narrow(region<S>(smem, tiling.bwd.narrow)) {}

  RNNF_HD int phases() const { return p.cell == Cell::GRU_CHO ? 2 : 1; }

  RNNF_HD bool clustered() const { return t.cluster > 0; }
  // The dG tile that walk step s's gradients are multiplied from: in a cluster the step's own
  // (pushed in while computed), else the one tile, reloaded per chunk.
  template <typename Ops>
  RNNF_HD S* dg_tile(Ops& ops, int64_t s) const {
    return clustered() ? dg + ops.buffer(s) * t.rows_pad * t.ld_dg : dg;
  }
  // (The GRU forms in a cluster whose inputs are prefetched) the one value phase k's
  // pass stores besides the exchanged dG: GRU's dgx of n (not dgh's), GRU_CHO's r * h_{t-1}
  // (phase 1). It is staged in the element's wide input slot 0 (its r, read) and stored after
  // the arrival with the dG.
  RNNF_HD bool stages(int k) const {
    const bool form = p.cell == Cell::GRU || (p.cell == Cell::GRU_CHO && k == 1);
    return form && clustered() && t.prefetch_bwd;
  }
  RNNF_HD A* staged_slot(const Element& e) const {
    return inputs + e.r * backward_wide_inputs(p.cell) * inputs_ld(t.units) + e.u;
  }
  // The gates each phase's pass computes dG of: GRU_CHO z and n, then r; the others all.
  RNNF_HD int64_t first_gate(int k) const { return p.cell == Cell::GRU_CHO ? (k == 0 ? 1 : 0) : 0; }
  RNNF_HD int64_t end_gate(int k) const {
    return p.cell == Cell::GRU_CHO ? (k == 0 ? 3 : 1) : gates_per_unit(p.cell);
  }

  // The Wᵀ tile and the gradients of h_n (and c_n) into shared memory; the first step's inputs
  // (they land before the Begin barrier: the first step folds nothing, so no operand barrier
  // comes before its pass).
  template <typename Ops>
  RNNF_HD void begin(Ops& ops) {
    const int64_t H = p.H, units = t.units, u0 = slice.u0, r0 = slice.r0, B = walk.B, ld = t.ld_w_bwd;
    const int64_t block = t.k_block, gates = gates_per_unit(p.cell);
    const S* w_hh = static_cast<const S*>(p.w_hh);
    S* tile = w;
    ops.for_each(t.unit_rows, t.k_bwd, [=](int64_t u, int64_t k) {
      const int64_t gate = k / block, j = k % block;
      const bool valid = u < units && u0 + u < H && gate < gates && j < H;
      write(tile + u * ld + k, valid ? ops.operand(read(w_hh + (gate * H + j) * H + u0 + u)) : store<S>(A(0)));
    });
    S* operand_tile = dg;
    const int64_t ld_dg = t.ld_dg;
    ops.for_each(operand_buffers(p.cell, true, clustered()) * t.rows_pad, ld_dg,
                 [=](int64_t r, int64_t k) { write(operand_tile + r * ld_dg + k, store<S>(A(0))); });
    const A* dh_n = static_cast<const A*>(p.dh);
    const A* dc_n = static_cast<const A*>(p.dc);
    A* dh_state = dh;
    A* dc_state = dc;
    const bool lstm = p.cell == Cell::LSTM;
    ops.for_each(t.rows, t.units, [=](int64_t r, int64_t u) {
      const bool valid = r0 + r < B && u0 + u < H;
      write(dh_state + r * units + u, valid ? read(dh_n + (r0 + r) * H + u0 + u) : A(0));
      if (lstm) write(dc_state + r * units + u, valid ? read(dc_n + (r0 + r) * H + u0 + u) : A(0));
    });
    prefetch_inputs(ops, walk.T - 1);
    ops.prefetched();
    ops.sync(Sync::Begin);
    if (t.held_bwd > 0)
      ops.hold(static_cast<const S*>(w), t.ld_w_bwd, int64_t(0), t.unit_rows, t.rows_pad, int64_t(0), t.k_bwd,
               t.split_bwd);
    ops.stamp(Phase::Begin);
  }

  // Walk steps are processed from s = T-1 down to 0: phase k of walk step s.
  template <typename Ops>
  RNNF_HD void phase(Ops& ops, int64_t s, int k) {
    const int64_t H = p.H;
    const bool first = s == walk.T - 1;
    S* const out = clustered() ? dg_tile(ops, s) : nullptr;  // the step's dG tile in a cluster
    switch (p.cell) {
      case Cell::LSTM:
        if (!first) fold(ops, s + 1, 0, gates_per_unit(p.cell), false);
        for_each_element(ops, t, walk, slice, H, s, [this, out](const Element& e) { lstm(out, e); });
        break;
      case Cell::GRU:
        if (!first) fold(ops, s + 1, 0, gates_per_unit(p.cell), true);
        for_each_element(ops, t, walk, slice, H, s, [this, out](const Element& e) { gru(out, e); });
        break;
      case Cell::RNN_TANH:
      case Cell::RNN_RELU:
        if (!first) fold(ops, s + 1, 0, gates_per_unit(p.cell), false);
        for_each_element(ops, t, walk, slice, H, s, [this, out](const Element& e) { rnn(out, e); });
        break;
      case Cell::GRU_CHO:
        if (k == 0) {
          if (!first) fold(ops, s + 1, 0, 2, true);
          for_each_element(ops, t, walk, slice, H, s, [this, out](const Element& e) { cho_nz(out, e); });
        } else {  // d(r * h_{t-1}) from the n gate alone: one chunk
          load_gradients(ops, s, 2, 3);
          multiply(ops, s, 2, 3);
          for_each_element(ops, t, walk, slice, H, s, [this, out](const Element& e) { cho_r(out, e); });
        }
        break;
      default: invalid_cell(p.cell);
    }
    ops.sync(Sync::PhaseEnd);
    ops.stamp(Phase::Cell);
    if (clustered())
      ops.push_rows(out + first_gate(k) * t.k_block, t.ld_dg, pushed_rows(t, walk, slice, s),
                    end_gate(k) - first_gate(k), t.k_block, H, t.units, t.cluster, slice.u0 / t.units);
  }

  // After the arrival at the barrier that ends walk step s: in a cluster the phase's dG (and
  // what it staged) to global memory, and the inputs of the step processed next (s - 1) on
  // their way. (Without a cluster the phases' stores are dG, which the other CTAs read after
  // the barrier, and GRU's dgx of n and GRU_CHO's r * h_{t-1} go with them.)
  template <typename Ops>
  RNNF_HD void after_arrival(Ops& ops, int64_t s, int k) {
    if (clustered()) store_gradients(ops, s, k);
    if (k < phases() - 1) return;
    if (stages(k)) ops.sync(Sync::Staged);
    prefetch_inputs(ops, s - 1);
  }

  // (A cluster) the dG that phase k of walk step s computed, from its tile, to dgh (and GRU's
  // dgx of r and z, which dgh does not alias), and the value the phase staged.
  template <typename Ops>
  RNNF_HD void store_gradients(Ops& ops, int64_t s, int k) {
    const int64_t H = p.H, G = p.G, r0 = slice.r0, u0 = slice.u0, units = t.units, ld = t.ld_dg, block = t.k_block;
    const int64_t active = walk.rows(s), offset = walk.offset(s), g0 = first_gate(k), g1 = end_gate(k);
    const int64_t ld_in = inputs_ld(units), wide = backward_wide_inputs(p.cell);
    const bool gru = p.cell == Cell::GRU;
    const S* tile = dg_tile(ops, s);
    const A* staged = inputs;
    S* dgh = static_cast<S*>(p.dgh);
    S* dgx = static_cast<S*>(p.dgx);
    S* rh = static_cast<S*>(p.rh);
    ops.for_each(t.rows, (g1 - g0 + (stages(k) ? 1 : 0)) * units, [=](int64_t r, int64_t j) {
      const int64_t gate = g0 + j / units, u = j % units, R = r0 + r, U = u0 + u;
      if (R >= active || U >= H) return;
      if (gate == g1) {  // the staged value: GRU's dgx of n, GRU_CHO's r * h_{t-1}
        const S value = store<S>(read(staged + r * wide * ld_in + u));
        write(gru ? dgx + (offset + R) * G + 2 * H + U : rh + (offset + R) * H + U, value);
        return;
      }
      const S value = read(tile + r * ld + gate * block + U);
      write(dgh + (offset + R) * G + gate * H + U, value);
      if (gru && gate < 2) write(dgx + (offset + R) * G + gate * H + U, value);
    });
  }

  // The pointwise pass's inputs of the CTA's rows active at walk step s into the inputs tiles
  // (prefetch_bwd): wide slots 0.. the saved gates, then LSTM's c_t and c_{t-1}; narrow slot 0
  // dy, 1 GRU's h_{t-1} or RNN's h_t.
  template <typename Ops>
  RNNF_HD void prefetch_inputs(Ops& ops, int64_t s) {
    if (!t.prefetch_bwd || s < 0) return;
    const int64_t r0 = slice.r0, u0 = slice.u0, offset = walk.offset(s) + r0, H = p.H;
    const int64_t active = walk.rows(s) - r0 < t.rows ? walk.rows(s) - r0 : t.rows;
    const int64_t length = H - u0 < t.units ? H - u0 : t.units, saved = saved_gates_per_unit(p.cell);
    const int64_t ld = inputs_ld(t.units), wide = backward_wide_inputs(p.cell) * ld;
    const int64_t ld_n = narrow_ld(t.units), narrow_row = backward_narrow_inputs(p.cell) * ld_n;
    auto wide_rows = [&](const void* tensor, int64_t width) {
      return RowSegments<A>{static_cast<const A*>(tensor), width, offset, u0};
    };
    auto narrow_rows = [&](const void* tensor) { return RowSegments<S>{static_cast<const S*>(tensor), H, offset, u0}; };
    if (saved > 0) ops.prefetch_rows(inputs, wide, active, saved, ld, H, length, wide_rows(p.gates, saved * H));
    if (p.cell == Cell::LSTM) {
      ops.prefetch_rows(inputs + saved * ld, wide, active, int64_t(1), int64_t(0), int64_t(0), length,
                        wide_rows(p.cells, H));
      ops.prefetch_rows(inputs + (saved + 1) * ld, wide, active, int64_t(1), int64_t(0), int64_t(0), length,
                        wide_rows(p.c_prev, H));
    }
    ops.prefetch_rows(narrow, narrow_row, active, int64_t(1), int64_t(0), int64_t(0), length, narrow_rows(p.dy));
    if (p.cell != Cell::LSTM) {
      const bool rnn = p.cell == Cell::RNN_TANH || p.cell == Cell::RNN_RELU;
      ops.prefetch_rows(narrow + ld_n, narrow_row, active, int64_t(1), int64_t(0), int64_t(0), length,
                        narrow_rows(rnn ? p.hidden : p.h_prev));
    }
  }

  // The gradients of h0 (and c0): fold in walk step 0's recurrent gradient, write them out.
  template <typename Ops>
  RNNF_HD void end(Ops& ops) {
    const bool gru = p.cell == Cell::GRU || p.cell == Cell::GRU_CHO;
    fold(ops, 0, 0, p.cell == Cell::GRU_CHO ? 2 : gates_per_unit(p.cell), gru);
    A* dh0 = static_cast<A*>(p.dh);
    A* dc0 = static_cast<A*>(p.dc);
    const A* dh_state = dh;
    const A* dc_state = dc;
    const bool lstm = p.cell == Cell::LSTM;
    const int64_t H = p.H, units = t.units, u0 = slice.u0, r0 = slice.r0, B = walk.B;
    ops.for_each(t.rows, t.units, [=](int64_t r, int64_t u) {
      if (r0 + r >= B || u0 + u >= H) return;
      write(dh0 + (r0 + r) * H + u0 + u, read(dh_state + r * units + u));
      if (lstm) write(dc0 + (r0 + r) * H + u0 + u, read(dc_state + r * units + u));
    });
  }

  // The dG tile of walk step s for gates [g0, g1): gate g's column j in tile column
  // (g - g0) * k_block + j, from dgh (which dgx aliases except for GRU). Rows of the CTA
  // active at s; the others keep stale values, never read. (A cluster's peers pushed it in.)
  template <typename Ops>
  RNNF_HD void load_gradients(Ops& ops, int64_t s, int64_t g0, int64_t g1) {
    const int64_t r0 = slice.r0, active = walk.rows(s) - r0, offset = walk.offset(s), H = p.H, G = p.G;
    const S* source = static_cast<const S*>(p.dgh) + g0 * H;
    if (!clustered())
      ops.copy_rows(dg, t.ld_dg, active < t.rows ? active : t.rows, g1 - g0, t.k_block, H, H,
                    [=](int64_t r) { return source + (offset + r0 + r) * G; });
    ops.prefetched();  // the pass's inputs (prefetch_bwd): the Operand barrier orders them too
    ops.sync(Sync::Operand);
    ops.stamp(Phase::Exchange);
  }

  // acc = Wᵀ columns of gates [g0, g1) times walk step s's dG tile: (part of) d(h_{t-1}) of
  // the CTA's units, or for GRU_CHO's n gate d(r * h_{t-1}).
  template <typename Ops>
  RNNF_HD void multiply(Ops& ops, int64_t s, int64_t g0, int64_t g1) {
    const S* tile = clustered() ? dg_tile(ops, s) + g0 * t.k_block : dg;
    ops.gemm(acc, t.ld_acc_bwd, partials, t.unit_rows * t.ld_acc_bwd, static_cast<const S*>(w), t.ld_w_bwd, tile,
             t.ld_dg, int64_t(0), t.unit_rows, t.rows_pad, g0 * t.k_block, g1 * t.k_block, t.split_bwd);
    ops.stamp(Phase::Mma);
  }

  // The recurrent gradient that walk step s's gate gradients (of gates [g0, g1)) send to
  // h_{t-1}, for the rows active at s, in chunks of chunk_gates gates (what the dG tile
  // holds): set it (LSTM, RNN) or add it to the direct part the pointwise pass left (GRU:
  // dh * z; GRU_CHO: dh * z + d(r * h) * r).
  template <typename Ops>
  RNNF_HD void fold(Ops& ops, int64_t s, int64_t g0, int64_t g1, bool add) {
    const int64_t units = t.units, ld = t.ld_acc_bwd, r0 = slice.r0, u0 = slice.u0, H = p.H, active = walk.rows(s);
    A* dh_state = dh;
    const A* product = acc;
    for (int64_t chunk = g0; chunk < g1; chunk += t.chunk_gates) {
      const int64_t end = chunk + t.chunk_gates < g1 ? chunk + t.chunk_gates : g1;
      load_gradients(ops, s, chunk, end);
      multiply(ops, s, chunk, end);
      const bool keep = add || chunk > g0;
      ops.for_each(t.rows, t.units, [=](int64_t r, int64_t u) {
        if (r0 + r >= active || u0 + u >= H) return;
        A* const value = dh_state + r * units + u;
        write(value, (keep ? read(value) : A(0)) + read(product + u * ld + r));
      });
      ops.sync(Sync::Fold);
      ops.stamp(Phase::Mma);
    }
  }

  // Wide input `slot` of the element (prefetch_inputs's numbering): saved gate `slot`, then
  // LSTM's c_t and c_{t-1}.
  RNNF_HD A wide_input(int64_t slot, const Element& e) const {
    if (t.prefetch_bwd) return read(inputs + (e.r * backward_wide_inputs(p.cell) + slot) * inputs_ld(t.units) + e.u);
    const int64_t saved = saved_gates_per_unit(p.cell);
    if (slot < saved) return read(static_cast<const A*>(p.gates) + e.row * saved * p.H + slot * p.H + e.U);
    return read(static_cast<const A*>(slot == saved ? p.cells : p.c_prev) + e.row * p.H + e.U);
  }

  // Narrow input `slot`: dy, then GRU's h_{t-1} or RNN's h_t.
  RNNF_HD A narrow_input(int64_t slot, const Element& e) const {
    if (t.prefetch_bwd)
      return load<A>(read(narrow + (e.r * backward_narrow_inputs(p.cell) + slot) * narrow_ld(t.units) + e.u));
    const bool rnn = p.cell == Cell::RNN_TANH || p.cell == Cell::RNN_RELU;
    const void* tensor = slot == 0 ? p.dy : rnn ? p.hidden : p.h_prev;
    return load<A>(read(static_cast<const S*>(tensor) + e.row * p.H + e.U));
  }

  RNNF_HD A dh_total(const Element& e) const { return read(dh + e.r * t.units + e.u) + narrow_input(0, e); }

  RNNF_HD A h_prev(const Element& e) const { return narrow_input(1, e); }

  RNNF_HD void store_dg(S* out, int64_t gate, const Element& e, A value) const {
    write(out + e.row * p.G + gate * p.H + e.U, store<S>(value));
  }

  // A gate gradient the recurrence multiplies (dgh's): into the step's dG tile in a cluster
  // (`tile`), from which store_gradients takes it on after the push; else to dgh, and to dgx
  // where GRU's is separate (r and z).
  RNNF_HD void exchange_dg(S* tile, int64_t gate, const Element& e, A value) const {
    if (tile != nullptr) {
      write(tile + e.r * t.ld_dg + gate * t.k_block + e.U, store<S>(value));
      return;
    }
    store_dg(static_cast<S*>(p.dgh), gate, e, value);
    if (p.cell == Cell::GRU && gate < 2) store_dg(static_cast<S*>(p.dgx), gate, e, value);
  }

  RNNF_HD void lstm(S* tile, const Element& e) const {
    const cells::LstmGates<A> a{wide_input(0, e), wide_input(1, e), wide_input(2, e), wide_input(3, e)};
    A* const dc_state = dc + e.r * t.units + e.u;
    A dc_prev;
    const auto d = cells::lstm_backward(a, wide_input(4, e), wide_input(5, e), dh_total(e), read(dc_state),
                                        A(p.cell_clip), A(p.grad_clip), dc_prev);
    write(dc_state, dc_prev);
    exchange_dg(tile, 0, e, d.i);
    exchange_dg(tile, 1, e, d.f);
    exchange_dg(tile, 2, e, d.g);
    exchange_dg(tile, 3, e, d.o);
  }

  RNNF_HD void gru(S* tile, const Element& e) const {
    const cells::GruGates<A> a{wide_input(0, e), wide_input(1, e), wide_input(2, e), wide_input(3, e)};
    const auto d = cells::gru_backward(a, h_prev(e), dh_total(e), A(p.grad_clip));
    write(dh + e.r * t.units + e.u, d.dh_prev_direct);
    exchange_dg(tile, 0, e, d.d_r);
    exchange_dg(tile, 1, e, d.d_z);
    exchange_dg(tile, 2, e, d.d_hn);
    if (stages(0))
      write(staged_slot(e), d.d_xn);  // over wide_input(0, e), read
    else
      store_dg(static_cast<S*>(p.dgx), 2, e, d.d_xn);
  }

  RNNF_HD void rnn(S* tile, const Element& e) const {
    const A h_t = narrow_input(1, e);
    const A grad = dh_total(e), clip = A(p.grad_clip);
    exchange_dg(tile, 0, e,
                p.cell == Cell::RNN_RELU ? cells::rnn_relu_backward(h_t, grad, clip)
                                         : cells::rnn_tanh_backward(h_t, grad, clip));
  }

  // GRU_CHO phase 1: gradients of the z and n pre-activations; dh becomes dh * z.
  RNNF_HD void cho_nz(S* tile, const Element& e) const {
    const auto d = cells::gru_cho_backward_nz(wide_input(1, e), wide_input(2, e), h_prev(e), dh_total(e),
                                              A(p.grad_clip));
    write(dh + e.r * t.units + e.u, d.dh_prev_direct);
    exchange_dg(tile, 1, e, d.d_z);
    exchange_dg(tile, 2, e, d.d_xn);  // = the gradient of W_hn (r * h_{t-1}) + b_hn
  }

  // GRU_CHO phase 2: acc holds d(r * h_{t-1}); the gradient of the r pre-activation, the
  // part of dh through r * h_{t-1}, and r * h_{t-1} itself (for dW_hn).
  RNNF_HD void cho_r(S* tile, const Element& e) const {
    const A r = wide_input(0, e), h = h_prev(e);
    A* const direct = dh + e.r * t.units + e.u;
    A dh_direct = read(direct);
    const A d_r = cells::gru_cho_backward_r(r, h, read(acc + e.u * t.ld_acc_bwd + e.r), A(p.grad_clip), dh_direct);
    write(direct, dh_direct);
    exchange_dg(tile, 0, e, d_r);
    if (stages(1))
      write(staged_slot(e), r * h);  // over wide_input(0, e), read
    else
      write(static_cast<S*>(p.rh) + e.row * p.H + e.U, store<S>(r * h));
  }
};

}  // namespace persistent
}  // namespace rnnfused
