// CUDA backend for recurrence.h: cuBLAS matmuls and one elementwise kernel template,
// all on the caller's stream. Included only by the per-dtype instantiation files.
#pragma once

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>
#include <type_traits>

#include "../recurrence.h"
#include "check.h"
#include "rnn_cuda.h"
#include "../persistent/device.cuh"

namespace rnnfused {
namespace cuda {

template <typename T>
struct Types;
template <>
struct Types<float> {
  using Acc = float;
  static constexpr cudaDataType_t kData = CUDA_R_32F;
};
template <>
struct Types<double> {
  using Acc = double;
  static constexpr cudaDataType_t kData = CUDA_R_64F;
};
template <>
struct Types<__half> {
  using Acc = float;
  static constexpr cudaDataType_t kData = CUDA_R_16F;
};
template <>
struct Types<__nv_bfloat16> {
  using Acc = float;
  static constexpr cudaDataType_t kData = CUDA_R_16BF;
};

template <typename F>
__global__ void for_each_kernel(F f, int64_t rows, int64_t width) {
  const int64_t total = rows * width;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride)
    f(i / width, i % width);
}

struct CudaBackend {
  Context ctx;
  bool allow_tf32;  // fp32 matmuls may use TF32

  // Row-major C = op(A) op(B) is column-major Cᵀ = op(B)ᵀ op(A)ᵀ: swap the operands.
  // fp16/bf16 matmuls accumulate in fp32; fp32 ones use TF32 only when torch allows it.
  template <typename In, typename Out>
  void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const In* a, int64_t lda,
            const In* b, int64_t ldb, double beta, Out* c, int64_t ldc) {
    if (m == 0 || n == 0) return;
    if (k == 0) {
      if (beta == 0)
        RNNF_CUDA_CHECK(cudaMemset2DAsync(c, ldc * sizeof(Out), 0, n * sizeof(Out), m, ctx.stream));
      return;
    }
    using Scale = std::conditional_t<std::is_same_v<In, double>, double, float>;
    const Scale alpha_s = 1, beta_s = static_cast<Scale>(beta);
    cublasComputeType_t compute = CUBLAS_COMPUTE_32F;
    if (std::is_same_v<In, double>) compute = CUBLAS_COMPUTE_64F;
    if (std::is_same_v<In, float> && allow_tf32) compute = CUBLAS_COMPUTE_32F_FAST_TF32;
    RNNF_CUBLAS_CHECK(cublasGemmEx_64(ctx.blas, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N,
                                      trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, n, m, k, &alpha_s, b,
                                      Types<In>::kData, ldb, a, Types<In>::kData, lda, &beta_s, c,
                                      Types<Out>::kData, ldc, compute, CUBLAS_GEMM_DEFAULT));
  }

  // One thread per element, grid-stride so any size fits one launch. 256 threads per
  // block keeps every SM busy for the B*H sizes of one step; the block cap only bounds the
  // grid for huge steps (each thread then takes several elements).
  template <typename F>
  void for_each(int64_t rows, int64_t width, const F& f) {
    const int64_t total = rows * width;
    if (total == 0) return;
    constexpr int kThreads = 256;
    constexpr int64_t kMaxBlocks = 65535;
    const int64_t blocks = std::min<int64_t>((total + kThreads - 1) / kThreads, kMaxBlocks);
    for_each_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, ctx.stream>>>(f, rows, width);
    RNNF_CUDA_CHECK(cudaGetLastError());
  }

  void copy(void* dst, const void* src, int64_t bytes) {
    if (bytes > 0) RNNF_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, ctx.stream));
  }
};

// ctx.blas is torch's handle for the current stream: torch has already set its stream and
// the workspace from torch's caching allocator. Setting the stream again would drop that
// workspace (cuBLAS would then allocate its own, outside the allocator and CUDA graphs).
//
// With p.tiling the recurrence runs as one persistent kernel (persistent/device.cuh; fp16,
// bf16 and fp32 as TF32). When the GPU refuses its launch, stage 1 runs instead and the
// reason is returned (null otherwise): the results are the same either way.
template <typename S>
const char* forward_typed(const ForwardParams& p, const Context& ctx) {
  using A = typename Types<S>::Acc;
  CudaBackend be{ctx, tf32_allowed(ctx.blas)};
  rnnfused::forward_input_projection<S, A>(be, p);
  if constexpr (!std::is_same_v<S, double>) {
    if (p.tiling) {
      const char* refused = persistent::launch_forward<S>(p, ctx.stream);
      if (!refused) return nullptr;
      rnnfused::forward_steps<S, A>(be, p);
      return refused;
    }
  }
  rnnfused::forward_steps<S, A>(be, p);
  return nullptr;
}

template <typename S>
const char* backward_typed(const BackwardParams& p, const Context& ctx) {
  using A = typename Types<S>::Acc;
  CudaBackend be{ctx, tf32_allowed(ctx.blas)};
  rnnfused::backward_gather<S, A>(be, p);
  const char* refused = nullptr;
  if constexpr (!std::is_same_v<S, double>) {
    if (p.tiling) refused = persistent::launch_backward<S>(p, ctx.stream);
  }
  if (!p.tiling || refused) rnnfused::backward_steps<S, A>(be, p);
  rnnfused::backward_weight_gradients<S, A>(be, p);
  return refused;
}

}  // namespace cuda
}  // namespace rnnfused
