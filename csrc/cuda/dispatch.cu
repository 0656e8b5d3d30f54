// Storage dtype -> the instantiation in rnn_<dtype>.cu.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "rnn_cuda.h"

namespace rnnfused {
namespace cuda {

void run(const ForwardParams& p, DType dtype, const Context& ctx) {
  switch (dtype) {
    case DType::Float32: return forward_typed<float>(p, ctx);
    case DType::Float64: return forward_typed<double>(p, ctx);
    case DType::Float16: return forward_typed<__half>(p, ctx);
    case DType::BFloat16: return forward_typed<__nv_bfloat16>(p, ctx);
  }
}

void run(const BackwardParams& p, DType dtype, const Context& ctx) {
  switch (dtype) {
    case DType::Float32: return backward_typed<float>(p, ctx);
    case DType::Float64: return backward_typed<double>(p, ctx);
    case DType::Float16: return backward_typed<__half>(p, ctx);
    case DType::BFloat16: return backward_typed<__nv_bfloat16>(p, ctx);
  }
}

}  // namespace cuda
}  // namespace rnnfused
