// The host simulation of the persistent recurrence: a CPU test harness that runs the CTA
// programs of program.h exactly as the GPU does, with the same tiling, shared-memory layout
// (one buffer per CTA), padding, masking and phase order. Within a phase the CTAs run one
// after the other in a shuffled order; the end of the phase is the grid barrier. A program
// that read in one phase what another CTA writes in the same phase would see some writes
// and miss others, and differ from the reference.
//
// Not a user-facing backend (RNNFUSED_KERNEL=simulate on the CPU runs it): slow, and its
// point is that the CPU tests execute the kernel's logic.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <numeric>
#include <random>
#include <type_traits>
#include <vector>

#include "program.h"

namespace rnnfused {
namespace persistent {

struct HostOps {
  template <typename S>
  S operand(S x) const {
    return tensor_core_operand(x);
  }

  template <typename F>
  void for_each(int64_t rows, int64_t cols, const F& f) {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) f(r, c);
  }

  void sync() {}

  template <typename S, typename Source>
  void copy_rows(S* dst, int64_t ld, int64_t rows, int64_t segments, int64_t dst_stride, int64_t src_stride,
                 int64_t length, const Source& source) {
    for (int64_t r = 0; r < rows; ++r) {
      const S* row = source(r);
      if (row == nullptr) continue;
      for (int64_t g = 0; g < segments; ++g)
        for (int64_t j = 0; j < length; ++j) dst[r * ld + g * dst_stride + j] = tensor_core_operand(row[g * src_stride + j]);
    }
  }

  // The partial sums go through the same slots as on the GPU (warp part p takes K steps
  // [p * steps / split, (p + 1) * steps / split)), then add up in the same order.
  template <typename S, typename Acc>
  void gemm(Acc* acc, int64_t ld_acc, Acc* partials, int64_t partial_stride, const S* a, int64_t lda, const S* b,
            int64_t ldb, int64_t m0, int64_t m1, int64_t n, int64_t k0, int64_t k1, int64_t split) {
    const int64_t steps = (k1 - k0) / kTile;
    for (int64_t part = 0; part < split; ++part) {
      Acc* out = split > 1 ? partials + part * partial_stride : acc;
      const int64_t begin = k0 + part * steps / split * kTile, end = k0 + (part + 1) * steps / split * kTile;
      for (int64_t m = m0; m < m1; ++m)
        for (int64_t c = 0; c < n; ++c) {
          Acc sum = 0;
          for (int64_t k = begin; k < end; ++k)
            sum += static_cast<Acc>(a[m * lda + k]) * static_cast<Acc>(b[c * ldb + k - k0]);
          out[m * ld_acc + c] = sum;
        }
    }
    if (split > 1)
      for (int64_t m = m0; m < m1; ++m)
        for (int64_t c = 0; c < n; ++c) {
          Acc sum = 0;
          for (int64_t part = 0; part < split; ++part) sum += partials[part * partial_stride + m * ld_acc + c];
          acc[m * ld_acc + c] = sum;
        }
  }
};

// The walk of p in host memory (offsets of packed steps computed here).
struct HostWalk {
  std::vector<int64_t> offsets;
  Walk walk;

  // Padded input (every step B rows) takes the GPU's arithmetic branch, packed input the
  // table of batch sizes and offsets.
  explicit HostWalk(const LayerParams& p) {
    walk.T = p.T;
    walk.B = p.B;
    walk.reverse = p.reverse;
    if (std::all_of(p.batch_sizes, p.batch_sizes + p.T, [&](int64_t rows) { return rows == p.B; })) return;
    walk.batch_sizes = p.batch_sizes;
    offsets.assign(p.T, 0);
    for (int64_t t = 1; t < p.T; ++t) offsets[t] = offsets[t - 1] + p.batch_sizes[t - 1];
    walk.offsets = offsets.data();
  }
};

// Runs a CTA program (ForwardCta or BackwardCta) for every CTA of the tiling: begin, the
// phases of every walk step (forward: s = 0 .. T-1; backward: T-1 .. 0), end.
template <typename Cta, typename Params>
void simulate(const Params& p, const Tiling& t, bool backward) {
  const HostWalk steps(p);
  const Layout& layout = backward ? t.bwd : t.fwd;
  const int64_t n = t.ctas();
  // Shared memory of every CTA; filled with NaN-ish garbage so that a read of memory no
  // phase wrote shows up in the results.
  std::vector<std::unique_ptr<char[]>> smem;
  std::vector<Cta> ctas;
  ctas.reserve(n);
  for (int64_t i = 0; i < n; ++i) {
    smem.emplace_back(new char[layout.bytes + 128]);
    std::memset(smem.back().get(), 0xff, layout.bytes + 128);
    char* base = smem.back().get() + (128 - reinterpret_cast<uintptr_t>(smem.back().get()) % 128) % 128;
    ctas.emplace_back(p, t, steps.walk, i, base);
  }
  HostOps ops;
  for (Cta& cta : ctas) cta.begin(ops);
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::mt19937 shuffle(12345);
  for (int64_t i = 0; i < p.T; ++i) {
    const int64_t s = backward ? p.T - 1 - i : i;
    for (int phase = 0; phase < ctas.front().phases(); ++phase) {
      std::shuffle(order.begin(), order.end(), shuffle);
      for (const int64_t cta : order) ctas[cta].phase(ops, s, phase);
    }
  }
  for (Cta& cta : ctas) cta.end(ops);
}

template <typename S, typename A>
void simulate_forward(const ForwardParams& p, const Tiling& t) {
  simulate<ForwardCta<S, A>>(p, t, false);
}

template <typename S, typename A>
void simulate_backward(const BackwardParams& p, const Tiling& t) {
  simulate<BackwardCta<S, A>>(p, t, true);
}

}  // namespace persistent
}  // namespace rnnfused
