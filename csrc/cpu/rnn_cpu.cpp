// CPU entry points: the dtype dispatch to run_typed (typed.h, instantiated per dtype in
// rnn_cpu_<dtype>.cpp).
#include "rnn_cpu.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <stdexcept>

#include "kernels.h"

namespace rnnfused {
namespace cpu {
namespace {

template <typename Fn>
void dispatch(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::Float32: return fn(float{});
    case DType::Float64: return fn(double{});
    case DType::Float16: return fn(c10::Half{});
    case DType::BFloat16: return fn(c10::BFloat16{});
  }
  throw std::invalid_argument("rnnfused: invalid dtype");
}

}  // namespace

const char* element_loop_isa() {
  switch (cpu_isa()) {
    case Isa::Avx512: return "avx512";
    case Isa::Avx2: return "avx2+fma";
    case Isa::Baseline: return "baseline";
  }
  return "baseline";
}

void run(const ForwardParams& p, DType dtype) {
  dispatch(dtype, [&](auto tag) { run_typed<decltype(tag)>(p); });
}

void run(const BackwardParams& p, DType dtype) {
  dispatch(dtype, [&](auto tag) { run_typed<decltype(tag)>(p); });
}

}  // namespace cpu
}  // namespace rnnfused
