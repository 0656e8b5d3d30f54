// Instantiates the __nv_bfloat16 kernels; one file per dtype so nvcc builds them in parallel.
#include "backend.cuh"

namespace rnnfused {
namespace cuda {
template void forward_typed<__nv_bfloat16>(const ForwardParams&, const Context&);
template void backward_typed<__nv_bfloat16>(const BackwardParams&, const Context&);
}  // namespace cuda
}  // namespace rnnfused
