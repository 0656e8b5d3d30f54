// One storage dtype's layer direction on the CPU (rnn_cpu.h's run_typed), included by
// rnn_cpu_<dtype>.cpp, which instantiate it: one file per dtype, so that they compile in
// parallel (the four together took five minutes of one core). The backend: ATen matmuls (MKL
// / oneDNN underneath) on views of the raw buffers, and at::parallel_for for the fused
// pointwise passes.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <type_traits>

#include "convert.h"  // first: its load / store are used by every pass below
#include "../recurrence.h"
#include "kernels.h"
#include "persistent_cpu.h"
#include "rnn_cpu.h"

namespace rnnfused {
namespace cpu {
namespace typed {

// The rows x cols matrix stored at data with leading dimension ld, or (transposed) its
// transpose, cols x rows: the strides say so, rather than Tensor::t(), whose trip through the
// dispatcher costs as much as a small step's product.
template <typename T>
at::Tensor matrix(const T* data, int64_t rows, int64_t cols, int64_t ld, bool transposed = false) {
  const auto dtype = c10::CppTypeToScalarType<T>::value;
  if (transposed)
    return at::from_blob(const_cast<T*>(data), {cols, rows}, {1, ld}, at::TensorOptions().dtype(dtype));
  return at::from_blob(const_cast<T*>(data), {rows, cols}, {ld, 1}, at::TensorOptions().dtype(dtype));
}

// A pointwise element costs a few exp/tanh, so threads pay off for far fewer elements
// than ATen's default grain (32768 cheap elements).
constexpr int64_t kGrainElements = 2048;

struct CpuBackend {
  template <typename In, typename Out>
  void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const In* a, int64_t lda,
            const In* b, int64_t ldb, double beta, Out* c, int64_t ldc) {
    if (m == 0 || n == 0) return;
    at::Tensor out = matrix(c, m, n, ldc);
    if (k == 0) {
      if (beta == 0) out.zero_();
      return;
    }
    const at::Tensor lhs = trans_a ? matrix(a, k, m, lda, true) : matrix(a, m, k, lda);
    const at::Tensor rhs = trans_b ? matrix(b, n, k, ldb, true) : matrix(b, k, n, ldb);
    if constexpr (std::is_same_v<In, Out>) {
      if (beta == 0)
        at::mm_out(out, lhs, rhs);
      else
        out.addmm_(lhs, rhs);
    } else {
      // ATen has no mixed-dtype CPU matmul: fp16/bf16 products are formed in the storage
      // dtype (fp32 accumulation inside) and widened.
      const at::Tensor product = at::mm(lhs, rhs);
      if (beta == 0)
        out.copy_(product);
      else
        out.add_(product);
    }
  }

  template <typename F>
  void for_each(int64_t rows, int64_t width, const F& f) {
    if (rows == 0 || width == 0) return;
    const int64_t grain = std::max<int64_t>(1, kGrainElements / width);
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) { for_each_element(f, begin, end, 0, width); });
  }

  void copy(void* dst, const void* src, int64_t bytes) {
    if (bytes > 0) std::memcpy(dst, src, static_cast<size_t>(bytes));
  }
};

}  // namespace typed

// With p.tiling the recurrence runs as the persistent program: on CPU threads (a CPU plan)
// or, for a GPU plan, through its host simulation (simulate.cpp).
template <typename S>
void run_typed(const ForwardParams& p) {
  using A = at::opmath_type<S>;
  typed::CpuBackend be;
  rnnfused::forward_input_projection<S, A>(be, p);
  if (!p.tiling)
    rnnfused::forward_steps<S, A>(be, p);
  else if (p.tiling->cpu_threads)
    persistent_cpu::run<S, A>(p, *p.tiling);
  else
    simulate<S>(p, *p.tiling);
}

template <typename S>
void run_typed(const BackwardParams& p) {
  using A = at::opmath_type<S>;
  typed::CpuBackend be;
  rnnfused::backward_gather<S, A>(be, p);
  if (!p.tiling)
    rnnfused::backward_steps<S, A>(be, p);
  else if (p.tiling->cpu_threads)
    persistent_cpu::run<S, A>(p, *p.tiling);
  else
    simulate<S>(p, *p.tiling);
  rnnfused::backward_weight_gradients<S, A>(be, p);
}

}  // namespace cpu
}  // namespace rnnfused
