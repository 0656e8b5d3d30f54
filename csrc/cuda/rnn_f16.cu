// Instantiates the __half kernels; one file per dtype so nvcc builds them in parallel.
#include "backend.cuh"

namespace rnnfused {
namespace cuda {
template const char* forward_typed<__half>(const ForwardParams&, const Context&);
template const char* backward_typed<__half>(const BackwardParams&, const Context&);

template <>
KernelInfo persistent_kernel_info_typed<__half>(bool backward) {
  cudaFuncAttributes attributes{};
  RNNF_CUDA_CHECK(backward ? cudaFuncGetAttributes(&attributes, persistent::backward_kernel<__half>)
                           : cudaFuncGetAttributes(&attributes, persistent::forward_kernel<__half>));
  return {std::string(backward ? "backward_kernel<" : "forward_kernel<") + "__half>", attributes.numRegs,
          attributes.localSizeBytes, attributes.sharedSizeBytes};
}
}  // namespace cuda
}  // namespace rnnfused
