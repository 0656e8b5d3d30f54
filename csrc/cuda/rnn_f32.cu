// Instantiates the float kernels; one file per dtype so nvcc builds them in parallel.
#include "backend.cuh"

namespace rnnfused {
namespace cuda {
template const char* forward_typed<float>(const ForwardParams&, const Context&);
template const char* backward_typed<float>(const BackwardParams&, const Context&);

template <>
KernelInfo persistent_kernel_info_typed<float>(bool backward) {
  cudaFuncAttributes attributes{};
  RNNF_CUDA_CHECK(backward ? cudaFuncGetAttributes(&attributes, persistent::backward_kernel<float>)
                           : cudaFuncGetAttributes(&attributes, persistent::forward_kernel<float>));
  return {std::string(backward ? "backward_kernel<" : "forward_kernel<") + "float>", attributes.numRegs,
          attributes.localSizeBytes, attributes.sharedSizeBytes};
}
}  // namespace cuda
}  // namespace rnnfused
