// Instantiates the __half kernels; one file per dtype so nvcc builds them in parallel.
#include "backend.cuh"

namespace rnnfused {
namespace cuda {
template void forward_typed<__half>(const ForwardParams&, const Context&);
template void backward_typed<__half>(const BackwardParams&, const Context&);
}  // namespace cuda
}  // namespace rnnfused
