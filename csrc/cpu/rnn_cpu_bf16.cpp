// Instantiates the c10::BFloat16 CPU recurrence; one file per dtype so that they build in parallel.
#include "typed.h"

namespace rnnfused {
namespace cpu {
template void run_typed<c10::BFloat16>(const ForwardParams&);
template void run_typed<c10::BFloat16>(const BackwardParams&);
}  // namespace cpu
}  // namespace rnnfused
