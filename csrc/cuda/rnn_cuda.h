// CUDA entry points: one layer, one direction (see params.h for the contract).
// All work is enqueued on ctx.stream; matmuls use ctx.blas (torch's handle for that stream).
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <string>
#include <vector>

#include "../params.h"

namespace rnnfused {
namespace cuda {

struct Context {
  cudaStream_t stream;
  cublasHandle_t blas;
};

// Both return null, or why the persistent kernel asked for in p.tiling could not be
// launched (stage 1 then ran in its place).
const char* run(const ForwardParams& p, DType dtype, const Context& ctx);
const char* run(const BackwardParams& p, DType dtype, const Context& ctx);

// Whether torch allows TF32 for fp32 matmuls (the math mode torch put on its handle).
bool tf32_allowed(cublasHandle_t handle);

// Registers, local memory (spills) and shared memory of every persistent kernel.
struct KernelInfo {
  std::string name;
  int registers;
  size_t local_bytes, static_shared_bytes;
};
std::vector<KernelInfo> persistent_kernel_info();

// One launch of `ctas` blocks that pass `iterations` barriers of `kind` ("grid": the
// cooperative grid barrier; "cluster": the cluster barrier, clusters of `cluster` blocks,
// sm_90): microseconds per barrier, launch included.
double barrier_microseconds(const std::string& kind, int ctas, int cluster, int iterations, cudaStream_t stream);

// The compute capabilities this build has device code for, e.g. "8.0, 9.0".
const char* compiled_archs();

// Instantiated once per storage dtype in rnn_<dtype>.cu.
template <typename S>
const char* forward_typed(const ForwardParams& p, const Context& ctx);
template <typename S>
const char* backward_typed(const BackwardParams& p, const Context& ctx);
template <typename S>
KernelInfo persistent_kernel_info_typed(bool backward);

}  // namespace cuda
}  // namespace rnnfused
