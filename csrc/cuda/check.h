// Checked CUDA and cuBLAS calls: a failure throws with the call's place; "no kernel image"
// also names the architectures this build has device code for.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "rnn_cuda.h"

namespace rnnfused {
namespace cuda {

// "no kernel image" means the GPU's architecture was not compiled in: say what was.
inline std::string arch_hint(cudaError_t err) {
  if (err != cudaErrorNoKernelImageForDevice) return "";
  return std::string("; this build of rnnfused has device code for ") + compiled_archs() +
         " only: rebuild with RNNFUSED_CUDA_ARCHS naming your GPU's compute capability "
         "(e.g. \"90+PTX\" also runs on newer GPUs through the driver's JIT)";
}

}  // namespace cuda
}  // namespace rnnfused

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

