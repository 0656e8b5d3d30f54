// Instantiates the float kernels; one file per dtype so nvcc builds them in parallel.
#include "backend.cuh"

namespace rnnfused {
namespace cuda {
template void forward_typed<float>(const ForwardParams&, const Context&);
template void backward_typed<float>(const BackwardParams&, const Context&);
}  // namespace cuda
}  // namespace rnnfused
