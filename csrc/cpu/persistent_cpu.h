// The persistent recurrence on CPU threads (make_cpu_plan): each thread owns a slice of the
// hidden units for the whole sequence and runs recurrence.h's own step loop with a backend
// restricted to that slice. Its products compute only the columns of its units (all their
// gates) from its slice of W_hh, packed once per call K-major into the vectors the
// small-batch product reads, so the slice stays in the thread's cache; its pointwise passes
// (steps.h's fused functors, vectorised) touch only its units. A barrier before every
// product exchanges the state (one more after it where the next pass overwrites what it
// read): the CPU image of the GPU's persistent kernel, with stage 1's arithmetic, layout and
// saved activations.
//
// Every dtype, any number of threads; every element is computed by one thread in the same
// order whatever the split, so the recurrence's results do not depend on the number of
// threads (the weight gradients after it are MKL's). float16 and bfloat16 multiply in
// float32: W_hh's slice is packed into float32 panels once per call, the rows of each
// product's left operand (h, dG, r * h) widened once per product.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <stdexcept>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "../persistent/plan.h"
#include "../recurrence.h"
#include "convert.h"
#include "kernels.h"

namespace rnnfused {
namespace cpu {
namespace persistent_cpu {

// A barrier for the threads of one parallel_for. A thread may own several slices (fewer
// threads than planned, or a nested call that runs inline): it arrives for all of them at
// once, so the barrier completes when every slice has arrived, however they are spread.
class StepBarrier {
 public:
  explicit StepBarrier(int64_t slices) : slices_(slices) {}

  void arrive_and_wait(int64_t count) {
    const int64_t generation = generation_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(count, std::memory_order_acq_rel) + count == slices_) {
      arrived_.store(0, std::memory_order_relaxed);
      generation_.fetch_add(1, std::memory_order_release);
      return;
    }
    for (int spins = 0; generation_.load(std::memory_order_acquire) == generation; ++spins)
      if (spins > 4000) std::this_thread::yield();  // oversubscribed: let the others run
  }

 private:
  const int64_t slices_;
  std::atomic<int64_t> arrived_{0};
  std::atomic<int64_t> generation_{0};
};

// One thread's slice of a weight matrix for the small-batch product: the columns of units
// [u0, u1) of each gate block of H columns, in panels of `lanes` columns, each K-major.
template <typename T>
struct PackedSlice {
  const void* source = nullptr;  // what was packed: the weights, transposed or not, and the shape
  bool transposed = false;
  int64_t n = 0, k = 0;
  int64_t vectors = 0;          // panels of `lanes` columns
  std::vector<T> w;             // [vectors][k][lanes]
  std::vector<int64_t> offset;  // [vectors] first output column of each vector
  std::vector<int> valid;       // [vectors] its columns that are real (the rest is zero padding)
};

// The backend of one thread for storage dtype S; its products run in T (float64 for double,
// else float32, the accumulation type of recurrence.h).
template <typename S>
class SliceBackend {
  using T = std::conditional_t<std::is_same_v<S, double>, double, float>;

 public:
  // Rows of [once_begin, once_end) are written by one pass and never again (a layer's output
  // rows y in the forward, the gate gradients dG in the backward).
  SliceBackend(int64_t H, int64_t u0, int64_t u1, StepBarrier& barrier, int64_t arrivals, const void* once_begin,
               const void* once_end)
      : H_(H), u0_(u0), u1_(u1), barrier_(barrier), arrivals_(arrivals), isa_(cpu_isa()),
        once_begin_(reinterpret_cast<std::uintptr_t>(once_begin)), once_end_(reinterpret_cast<std::uintptr_t>(once_end)) {}

  // The thread's columns of c[m][n] = a[m][k] op(b) (+ c): the columns of its units in each
  // block of H. The barrier before: every thread's writes of a's rows (h_{t-1}, dG, r * h)
  // are complete. The barrier after (nobody reads them any more) only where the next pass
  // may overwrite them (the state h, r * h): a step whose product reads rows written once,
  // the previous step's output or dG, has one barrier.
  template <typename In, typename Out>
  void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const In* a, int64_t lda, const In* b,
            int64_t ldb, double beta, Out* c, int64_t ldc) {
    static_assert(std::is_same_v<In, S>, "the threaded recurrence multiplies its storage dtype");
    if constexpr (std::is_same_v<Out, T>)
      product(trans_a, trans_b, m, n, k, a, lda, b, ldb, beta != 0, c, ldc);
    else  // a product into the storage dtype is the projection's, which the plan refuses
      throw std::logic_error("rnnfused: the threaded recurrence has no projection");
  }

  template <typename F>
  void for_each(int64_t rows, int64_t width, const F& f) {
    if (width != H_) throw std::logic_error("rnnfused: unexpected pass in the threaded recurrence");
    for_each_element(f, 0, rows, u0_, u1_);
  }

  void copy(void*, const void*, int64_t) {
    throw std::logic_error("rnnfused: the threaded recurrence has no projection");
  }

 private:
  void product(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const S* a, int64_t lda, const S* b,
               int64_t ldb, bool accumulate, T* c, int64_t ldc) {
    if (trans_a || n % H_ != 0) throw std::logic_error("rnnfused: unexpected product in the threaded recurrence");
    barrier_.arrive_and_wait(arrivals_);
    if (m > 0) {
      const PackedSlice<T>& w = packed(b, trans_b, n, k, ldb);
      const T* rows = widened(a, m, k, lda);
      small_batch_product(isa_, c, ldc, accumulate, rows, lda, w.w.data(), w.vectors, m, k, w.offset.data(),
                          w.valid.data());
    }
    const auto left = reinterpret_cast<std::uintptr_t>(a);
    if (left < once_begin_ || left >= once_end_) barrier_.arrive_and_wait(arrivals_);
  }

  // The rows of the left operand in T: a itself, or (float16 / bfloat16) its float32 copy,
  // whose leading dimension lda becomes.
  const T* widened(const S* a, int64_t m, int64_t k, int64_t& lda) {
    if constexpr (std::is_same_v<S, T>) {
      return a;
    } else {
      widened_.resize(m * k);
      for (int64_t r = 0; r < m; ++r)
        for (int64_t kk = 0; kk < k; ++kk) widened_[r * k + kk] = load<T>(a[r * lda + kk]);
      lda = k;
      return widened_.data();
    }
  }

  const PackedSlice<T>& packed(const S* b, bool trans_b, int64_t n, int64_t k, int64_t ldb) {
    for (const PackedSlice<T>& slice : slices_)
      if (slice.source == b && slice.transposed == trans_b && slice.n == n && slice.k == k) return slice;
    PackedSlice<T>& slice = slices_.emplace_back();
    slice.source = b;
    slice.transposed = trans_b;
    slice.n = n;
    slice.k = k;
    const int lanes = cpu::lanes<T>(isa_);
    const int64_t units = u1_ - u0_, per_block = (units + lanes - 1) / lanes, blocks = n / H_;
    slice.vectors = blocks * per_block;
    slice.w.assign(k * slice.vectors * lanes, T(0));
    for (int64_t v = 0; v < slice.vectors; ++v) {
      const int64_t block = v / per_block, first = (v % per_block) * lanes;
      slice.offset.push_back(block * H_ + u0_ + first);
      slice.valid.push_back(static_cast<int>(std::min<int64_t>(lanes, units - first)));
      for (int64_t kk = 0; kk < k; ++kk)
        for (int l = 0; l < slice.valid.back(); ++l) {
          const int64_t column = block * H_ + u0_ + first + l;
          slice.w[(v * k + kk) * lanes + l] = load<T>(trans_b ? b[column * ldb + kk] : b[kk * ldb + column]);
        }
    }
    return slice;
  }

  const int64_t H_, u0_, u1_;
  StepBarrier& barrier_;
  const int64_t arrivals_;
  const Isa isa_;
  const std::uintptr_t once_begin_, once_end_;
  std::vector<PackedSlice<T>> slices_;
  std::vector<T> widened_;  // float16 / bfloat16: the product's left operand in float32
};

// The rows a pass writes once, [begin, end): the output y [N, P] (forward), the gate
// gradients dG [N, G] (backward).
template <typename S>
std::pair<const S*, const S*> written_once(const ForwardParams& p) {
  const auto* y = static_cast<const S*>(p.y);
  return {y, y + p.N * p.P};
}
template <typename S>
std::pair<const S*, const S*> written_once(const BackwardParams& p) {
  const auto* dg = static_cast<const S*>(p.dgh);
  return {dg, dg + p.N * p.G};
}

// Runs recurrence.h's forward or backward step loop on the threads of one parallel_for,
// thread i owning the units of the plan's slices [first, last).
template <typename S, typename A, typename Params>
void run(const Params& p, const persistent::Tiling& t) {
  StepBarrier barrier(t.unit_tiles);
  const auto [once_begin, once_end] = written_once<S>(p);
  at::parallel_for(0, t.unit_tiles, 1, [&](int64_t first, int64_t last) {
    SliceBackend<S> be(p.H, first * t.units, std::min(p.H, last * t.units), barrier, last - first, once_begin,
                       once_end);
    if constexpr (std::is_same_v<Params, ForwardParams>)
      rnnfused::forward_steps<S, A>(be, p);
    else
      rnnfused::backward_steps<S, A>(be, p);
  });
}

}  // namespace persistent_cpu
}  // namespace cpu
}  // namespace rnnfused
