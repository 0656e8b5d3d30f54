// Instantiates the float CPU recurrence; one file per dtype so that they build in parallel.
#include "typed.h"

namespace rnnfused {
namespace cpu {
template void run_typed<float>(const ForwardParams&);
template void run_typed<float>(const BackwardParams&);
}  // namespace cpu
}  // namespace rnnfused
