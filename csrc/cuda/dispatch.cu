// Storage dtype -> the instantiation in rnn_<dtype>.cu.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <stdexcept>
#include <string>

#include "rnn_cuda.h"

namespace rnnfused {
namespace cuda {

// nvcc defines __CUDA_ARCH_LIST__ (e.g. 800,900) in every pass, host included.
const char* compiled_archs() {
  static const std::string names = [] {
    const int archs[] = {__CUDA_ARCH_LIST__};  // sorted; an arch built as SASS and PTX may repeat
    std::string out;
    int previous = 0;
    for (const int arch : archs) {
      if (arch == previous) continue;
      out += (out.empty() ? "" : ", ") + std::to_string(arch / 100) + "." + std::to_string(arch / 10 % 10);
      previous = arch;
    }
    return out;
  }();
  return names.c_str();
}

void run(const ForwardParams& p, DType dtype, const Context& ctx) {
  switch (dtype) {
    case DType::Float32: return forward_typed<float>(p, ctx);
    case DType::Float64: return forward_typed<double>(p, ctx);
    case DType::Float16: return forward_typed<__half>(p, ctx);
    case DType::BFloat16: return forward_typed<__nv_bfloat16>(p, ctx);
  }
  throw std::invalid_argument("rnnfused: invalid dtype");
}

void run(const BackwardParams& p, DType dtype, const Context& ctx) {
  switch (dtype) {
    case DType::Float32: return backward_typed<float>(p, ctx);
    case DType::Float64: return backward_typed<double>(p, ctx);
    case DType::Float16: return backward_typed<__half>(p, ctx);
    case DType::BFloat16: return backward_typed<__nv_bfloat16>(p, ctx);
  }
  throw std::invalid_argument("rnnfused: invalid dtype");
}

}  // namespace cuda
}  // namespace rnnfused
