// Instantiates the c10::Half CPU recurrence; one file per dtype so that they build in parallel.
#include "typed.h"

namespace rnnfused {
namespace cpu {
template void run_typed<c10::Half>(const ForwardParams&);
template void run_typed<c10::Half>(const BackwardParams&);
}  // namespace cpu
}  // namespace rnnfused
