// CPU entry points: one layer, one direction (see params.h for the contract).
#pragma once

#include "../params.h"

namespace rnnfused {
namespace cpu {

void run(const ForwardParams& p, DType dtype);
void run(const BackwardParams& p, DType dtype);

// The instruction set the element loops run with on this CPU: "avx2+fma" or "baseline".
const char* element_loop_isa();

}  // namespace cpu
}  // namespace rnnfused
