// Storage dtype -> the instantiation in rnn_<dtype>.cu.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <stdexcept>
#include <string>

#include "check.h"
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

const char* run(const ForwardParams& p, DType dtype, const Context& ctx) {
  switch (dtype) {
    case DType::Float32: return forward_typed<float>(p, ctx);
    case DType::Float64: return forward_typed<double>(p, ctx);
    case DType::Float16: return forward_typed<__half>(p, ctx);
    case DType::BFloat16: return forward_typed<__nv_bfloat16>(p, ctx);
  }
  throw std::invalid_argument("rnnfused: invalid dtype");
}

const char* run(const BackwardParams& p, DType dtype, const Context& ctx) {
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

namespace rnnfused {
namespace cuda {

// torch records whether fp32 matmuls may use TF32 (torch.backends.cuda.matmul, legacy
// allow_tf32 or the newer fp32_precision, and no NoTF32Guard active) as the math mode of
// the handle it gives out; reading it there follows torch's own matmuls exactly and never
// trips torch's check against mixing the two APIs.
bool tf32_allowed(cublasHandle_t handle) {
  cublasMath_t mode;
  RNNF_CUBLAS_CHECK(cublasGetMathMode(handle, &mode));
  return (static_cast<int>(mode) & 0xf) == CUBLAS_TF32_TENSOR_OP_MATH;
}

std::vector<KernelInfo> persistent_kernel_info() {
  std::vector<KernelInfo> info;
  for (const bool backward : {false, true}) {
    info.push_back(persistent_kernel_info_typed<__half>(backward));
    info.push_back(persistent_kernel_info_typed<__nv_bfloat16>(backward));
    info.push_back(persistent_kernel_info_typed<float>(backward));
  }
  return info;
}

}  // namespace cuda
}  // namespace rnnfused
