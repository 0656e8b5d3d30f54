// CPU entry points: one layer, one direction (see params.h for the contract).
#pragma once

#include "../params.h"

namespace rnnfused {
namespace cpu {

void run(const ForwardParams& p, DType dtype);
void run(const BackwardParams& p, DType dtype);

}  // namespace cpu
}  // namespace rnnfused
