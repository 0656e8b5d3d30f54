// CUDA entry points: one layer, one direction (see params.h for the contract).
// All work is enqueued on ctx.stream; matmuls use ctx.blas (torch's handle for that stream).
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "../params.h"

namespace rnnfused {
namespace cuda {

struct Context {
  cudaStream_t stream;
  cublasHandle_t blas;
};

void run(const ForwardParams& p, DType dtype, const Context& ctx);
void run(const BackwardParams& p, DType dtype, const Context& ctx);

// The compute capabilities this build has device code for, e.g. "8.0, 9.0".
const char* compiled_archs();

// Instantiated once per storage dtype in rnn_<dtype>.cu.
template <typename S>
void forward_typed(const ForwardParams& p, const Context& ctx);
template <typename S>
void backward_typed(const BackwardParams& p, const Context& ctx);

}  // namespace cuda
}  // namespace rnnfused
