// Instantiates the double kernels; one file per dtype so nvcc builds them in parallel.
#include "backend.cuh"

namespace rnnfused {
namespace cuda {
template const char* forward_typed<double>(const ForwardParams&, const Context&);
template const char* backward_typed<double>(const BackwardParams&, const Context&);
}  // namespace cuda
}  // namespace rnnfused
