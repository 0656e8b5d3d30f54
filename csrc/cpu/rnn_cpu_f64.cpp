// Instantiates the double CPU recurrence; one file per dtype so that they build in parallel.
#include "typed.h"

namespace rnnfused {
namespace cpu {
template void run_typed<double>(const ForwardParams&);
template void run_typed<double>(const BackwardParams&);
}  // namespace cpu
}  // namespace rnnfused
