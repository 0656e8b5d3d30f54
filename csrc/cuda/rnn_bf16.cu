// Instantiates the __nv_bfloat16 kernels; one file per dtype so nvcc builds them in parallel.
#include "backend.cuh"

namespace rnnfused {
namespace cuda {
template const char* forward_typed<__nv_bfloat16>(const ForwardParams&, const Context&);
template const char* backward_typed<__nv_bfloat16>(const BackwardParams&, const Context&);

template <>
KernelInfo persistent_kernel_info_typed<__nv_bfloat16>(bool backward) {
  cudaFuncAttributes attributes{};
  RNNF_CUDA_CHECK(backward ? cudaFuncGetAttributes(&attributes, persistent::backward_kernel<__nv_bfloat16>)
                           : cudaFuncGetAttributes(&attributes, persistent::forward_kernel<__nv_bfloat16>));
  return {std::string(backward ? "backward_kernel<" : "forward_kernel<") + "__nv_bfloat16>", attributes.numRegs,
          attributes.localSizeBytes, attributes.sharedSizeBytes};
}
}  // namespace cuda
}  // namespace rnnfused
