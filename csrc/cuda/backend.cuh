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
#include "rnn_cuda.h"

#define RNNF_CUDA_CHECK(expr)                                                                  \
  do {                                                                                         \
    const cudaError_t rnnf_err = (expr);                                                       \
    if (rnnf_err != cudaSuccess)                                                               \
      throw std::runtime_error(std::string("rnnfused: CUDA error: ") +                         \
                               cudaGetErrorString(rnnf_err) + " (" __FILE__ ":" +              \
                               std::to_string(__LINE__) + ")" +                                \
                               ::rnnfused::cuda::arch_hint(rnnf_err));                         \
  } while (0)

#define RNNF_CUBLAS_CHECK(expr)                                                                \
  do {                                                                                         \
    const cublasStatus_t rnnf_status = (expr);                                                 \
    if (rnnf_status != CUBLAS_STATUS_SUCCESS)                                                  \
      throw std::runtime_error(std::string("rnnfused: cuBLAS error: ") +                       \
                               cublasGetStatusString(rnnf_status) + " (" __FILE__ ":" +        \
                               std::to_string(__LINE__) + ")");                                \
  } while (0)

namespace rnnfused {
namespace cuda {

// "no kernel image" means the GPU's architecture was not compiled in: say what was.
inline std::string arch_hint(cudaError_t err) {
  if (err != cudaErrorNoKernelImageForDevice) return "";
  return std::string("; this build of rnnfused has device code for ") + compiled_archs() +
         " only: rebuild with RNNFUSED_CUDA_ARCHS naming your GPU's compute capability "
         "(e.g. \"90+PTX\" also runs on newer GPUs through the driver's JIT)";
}

// torch records whether fp32 matmuls may use TF32 (torch.backends.cuda.matmul, legacy
// allow_tf32 or the newer fp32_precision, and no NoTF32Guard active) as the math mode of
// the handle it gives out; reading it there follows torch's own matmuls exactly and
// never trips torch's check against mixing the two APIs.
inline bool handle_allows_tf32(cublasHandle_t handle) {
  cublasMath_t mode;
  RNNF_CUBLAS_CHECK(cublasGetMathMode(handle, &mode));
  return (static_cast<int>(mode) & 0xf) == CUBLAS_TF32_TENSOR_OP_MATH;
}

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
template <typename S>
void forward_typed(const ForwardParams& p, const Context& ctx) {
  CudaBackend be{ctx, handle_allows_tf32(ctx.blas)};
  rnnfused::forward<S, typename Types<S>::Acc>(be, p);
}

template <typename S>
void backward_typed(const BackwardParams& p, const Context& ctx) {
  CudaBackend be{ctx, handle_allows_tf32(ctx.blas)};
  rnnfused::backward<S, typename Types<S>::Acc>(be, p);
}

}  // namespace cuda
}  // namespace rnnfused
