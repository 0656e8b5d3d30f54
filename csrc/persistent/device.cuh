// The GPU side of the persistent recurrence: the Ops of program.h on tensor cores (WMMA:
// fp16 and bf16 16x16x16, fp32 as TF32 16x16x8, fp32 accumulation), one cooperative
// launch per layer direction with a grid-wide barrier after every phase, and the launch
// that says when the GPU refuses it (the caller then runs stage 1). Included by
// csrc/cuda/backend.cuh; instantiated per dtype in rnn_<dtype>.cu.
#pragma once

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <type_traits>

#include "../cuda/check.h"
#include "program.h"

namespace rnnfused {
namespace persistent {

template <typename S>
struct MmaShape;
template <>
struct MmaShape<__half> {
  using Element = __half;
  static constexpr int kK = 16;
};
template <>
struct MmaShape<__nv_bfloat16> {
  using Element = __nv_bfloat16;
  static constexpr int kK = 16;
};
template <>
struct MmaShape<float> {
  using Element = nvcuda::wmma::precision::tf32;
  static constexpr int kK = 8;
};

struct DeviceOps {
  template <typename F>
  __device__ __forceinline__ void for_each(int64_t rows, int64_t cols, const F& f) {
    const int64_t total = rows * cols;
    for (int64_t i = threadIdx.x; i < total; i += blockDim.x) f(i / cols, i % cols);
  }

  __device__ __forceinline__ void sync() { __syncthreads(); }

  // Warp `job % warps`: output tile `job % tiles`, K part `job / tiles` (program.h's contract;
  // host.h's HostOps::gemm takes the same parts and adds them up in the same order).
  template <typename S>
  __device__ void gemm(float* acc, int64_t ld_acc, float* partials, int64_t partial_stride, const S* a, int64_t lda,
                       const S* b, int64_t ldb, int64_t m0, int64_t m1, int64_t n, int64_t k0, int64_t k1,
                       int64_t split) {
    namespace wmma = nvcuda::wmma;
    using Element = typename MmaShape<S>::Element;
    constexpr int kK = MmaShape<S>::kK;
    const int64_t warp = threadIdx.x / 32, warps = blockDim.x / 32;
    const int64_t n_tiles = n / kTile, tiles = (m1 - m0) / kTile * n_tiles, steps = (k1 - k0) / kTile;
    for (int64_t job = warp; job < tiles * split; job += warps) {
      const int64_t tile = job % tiles, part = job / tiles;
      const int64_t m = m0 + tile / n_tiles * kTile, c = tile % n_tiles * kTile;
      const int64_t begin = k0 + part * steps / split * kTile, end = k0 + (part + 1) * steps / split * kTile;
      wmma::fragment<wmma::accumulator, 16, 16, kK, float> sum;
      wmma::fill_fragment(sum, 0.f);
      for (int64_t k = begin; k < end; k += kK) {
        wmma::fragment<wmma::matrix_a, 16, 16, kK, Element, wmma::row_major> fa;
        wmma::fragment<wmma::matrix_b, 16, 16, kK, Element, wmma::col_major> fb;
        wmma::load_matrix_sync(fa, a + m * lda + k, static_cast<unsigned>(lda));
        wmma::load_matrix_sync(fb, b + c * ldb + k, static_cast<unsigned>(ldb));
        if constexpr (std::is_same_v<S, float>) {
          for (int i = 0; i < fa.num_elements; ++i) fa.x[i] = wmma::__float_to_tf32(fa.x[i]);
          for (int i = 0; i < fb.num_elements; ++i) fb.x[i] = wmma::__float_to_tf32(fb.x[i]);
        }
        wmma::mma_sync(sum, fa, fb, sum);
      }
      float* out = split > 1 ? partials + part * partial_stride : acc;
      wmma::store_matrix_sync(out + m * ld_acc + c, sum, static_cast<unsigned>(ld_acc), wmma::mem_row_major);
    }
    __syncthreads();
    if (split > 1) {
      const int64_t rows = m1 - m0;
      for (int64_t i = threadIdx.x; i < rows * n; i += blockDim.x) {
        const int64_t m = m0 + i / n, c = i % n;
        float total = 0.f;
        for (int64_t part = 0; part < split; ++part) total += partials[part * partial_stride + m * ld_acc + c];
        acc[m * ld_acc + c] = total;
      }
      __syncthreads();
    }
  }
};

// Every CTA runs begin, the phases of every walk step, end; the grid barrier separates the
// phases. All CTAs reach every barrier: the trip counts depend only on T and the cell.
template <typename S>
__global__ void __launch_bounds__(kThreads, 1)
    forward_kernel(const __grid_constant__ ForwardParams p, const __grid_constant__ Tiling t,
                   const __grid_constant__ Walk walk) {
  extern __shared__ __align__(128) char smem[];
  DeviceOps ops;
  ForwardCta<S, float> cta(p, t, walk, blockIdx.x, smem);
  cooperative_groups::grid_group grid = cooperative_groups::this_grid();
  cta.begin(ops);
  for (int64_t s = 0; s < walk.T; ++s)
    for (int k = 0; k < cta.phases(); ++k) {
      cta.phase(ops, s, k);
      grid.sync();
    }
  cta.end(ops);
}

template <typename S>
__global__ void __launch_bounds__(kThreads, 1)
    backward_kernel(const __grid_constant__ BackwardParams p, const __grid_constant__ Tiling t,
                    const __grid_constant__ Walk walk) {
  extern __shared__ __align__(128) char smem[];
  DeviceOps ops;
  BackwardCta<S, float> cta(p, t, walk, blockIdx.x, smem);
  cooperative_groups::grid_group grid = cooperative_groups::this_grid();
  cta.begin(ops);
  for (int64_t s = walk.T - 1; s >= 0; --s)
    for (int k = 0; k < cta.phases(); ++k) {
      cta.phase(ops, s, k);
      grid.sync();
    }
  cta.end(ops);
}

// Launches `kernel` cooperatively with `bytes` of shared memory per CTA. Returns the reason
// when the GPU cannot run the grid at once (not enough co-resident CTAs, a refused
// cooperative launch under MPS, MIG or green contexts): nothing was launched and the caller
// runs stage 1. Any other error throws.
template <typename Kernel, typename Params>
const char* launch_cooperative(Kernel kernel, const Params& p, const Tiling& t, int64_t bytes, cudaStream_t stream) {
  const Walk walk{p.T, p.B, p.reverse, p.kernel_batch_sizes, p.kernel_offsets};
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)) !=
      cudaSuccess) {
    cudaGetLastError();
    return "the GPU refused the persistent kernel's shared memory";
  }
  int device = 0, sms = 0, per_sm = 0;
  RNNF_CUDA_CHECK(cudaGetDevice(&device));
  RNNF_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  RNNF_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, static_cast<size_t>(bytes)));
  if (static_cast<int64_t>(per_sm) * sms < t.ctas()) return "fewer co-resident CTAs than the plan needs";
  void* args[] = {const_cast<Params*>(&p), const_cast<Tiling*>(&t), const_cast<Walk*>(&walk)};
  const cudaError_t err = cudaLaunchCooperativeKernel(reinterpret_cast<void*>(kernel), dim3(static_cast<unsigned>(t.ctas())),
                                                      dim3(kThreads), args, static_cast<size_t>(bytes), stream);
  if (err == cudaErrorCooperativeLaunchTooLarge || err == cudaErrorNotSupported || err == cudaErrorNotPermitted) {
    cudaGetLastError();
    return "the GPU refused the cooperative launch";
  }
  RNNF_CUDA_CHECK(err);
  return nullptr;
}

template <typename S>
const char* launch_forward(const ForwardParams& p, cudaStream_t stream) {
  return launch_cooperative(forward_kernel<S>, p, *p.tiling, p.tiling->fwd.bytes, stream);
}

template <typename S>
const char* launch_backward(const BackwardParams& p, cudaStream_t stream) {
  return launch_cooperative(backward_kernel<S>, p, *p.tiling, p.tiling->bwd.bytes, stream);
}

}  // namespace persistent
}  // namespace rnnfused
