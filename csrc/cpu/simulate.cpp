// The host simulation of the GPU's persistent kernel (persistent/host.h), instantiated for
// every storage dtype. A test harness, not a fast path, so it builds at -O1: the pragma comes
// before every include and covers all that this file defines. At -O3, inside typed.h, it was
// a third of each dtype's file (float: 129 s of a core, 90 s without it); here the four take
// about 25 s. On x86-64 the results are the same at either level: without fast-math GCC
// does not reassociate, and the baseline instruction set has no FMA to contract into.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("O1")
#endif

#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "../persistent/host.h"
#include "rnn_cpu.h"

namespace rnnfused {
namespace cpu {

template <typename S>
void simulate(const ForwardParams& p, const persistent::Tiling& tiling) {
  persistent::simulate_forward<S, at::opmath_type<S>>(p, tiling);
}

template <typename S>
void simulate(const BackwardParams& p, const persistent::Tiling& tiling) {
  persistent::simulate_backward<S, at::opmath_type<S>>(p, tiling);
}

#define RNNFUSED_SIMULATE(S)                                                  \
  template void simulate<S>(const ForwardParams&, const persistent::Tiling&); \
  template void simulate<S>(const BackwardParams&, const persistent::Tiling&);
RNNFUSED_SIMULATE(float)
RNNFUSED_SIMULATE(double)
RNNFUSED_SIMULATE(c10::Half)
RNNFUSED_SIMULATE(c10::BFloat16)
#undef RNNFUSED_SIMULATE

}  // namespace cpu
}  // namespace rnnfused
