// CPU entry points: one layer, one direction (see params.h for the contract).
#pragma once

#include "../params.h"

namespace rnnfused {
namespace cpu {

void run(const ForwardParams& p, DType dtype);
void run(const BackwardParams& p, DType dtype);

// The same for storage dtype S (float, double, c10::Half, c10::BFloat16): typed.h,
// instantiated in rnn_cpu_<dtype>.cpp.
template <typename S>
void run_typed(const ForwardParams& p);
template <typename S>
void run_typed(const BackwardParams& p);

// A GPU plan's persistent program on the CPU through its host simulation (persistent/host.h:
// a test harness for the GPU kernel's logic, not a fast path), instantiated in simulate.cpp.
template <typename S>
void simulate(const ForwardParams& p, const persistent::Tiling& tiling);
template <typename S>
void simulate(const BackwardParams& p, const persistent::Tiling& tiling);

// The instruction set the element loops run with on this CPU: "avx2+fma" or "baseline".
const char* element_loop_isa();

}  // namespace cpu
}  // namespace rnnfused
