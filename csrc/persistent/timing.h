// Per-phase timing of the persistent kernel: compiled in only when the extension is built
// with RNNFUSED_PHASE_TIMING=1 (setup.py; python -m bench.phases reads it). Plain C++: the
// CTA program (program.h) stamps its phases through ops.stamp, the GPU's Ops time them, the
// host simulation's ignore them, and bindings.cpp returns what a launch recorded.
#pragma once

#include <cstdint>

namespace rnnfused {
namespace persistent {

// Where a stamp charges the time since the previous one (thread 0 of each CTA, mostly after
// a CTA barrier, so that a phase ends when its slowest thread does): begin(); the copy of h /
// dG from the other CTAs ("exchange"); the tensor-core product and its epilogue; the pointwise
// cell pass; the fence of the grid barrier's arrival, which orders this CTA's earlier stores
// before it ("stores": what it costs to make them visible at GPU scope); what the CTA does
// between its arrival and its wait ("window": the saved activations' stores, the next step's
// input prefetch; thread 0's share, the rest of the CTA's shows in "barrier"); the wait for
// the other CTAs; end().
enum class Phase : int { Begin, Exchange, Mma, Cell, Stores, Window, Barrier, End, Count };
constexpr int kPhases = static_cast<int>(Phase::Count);
constexpr const char* kPhaseNames[kPhases] = {"begin", "exchange", "mma", "cell", "stores", "window", "barrier", "end"};

// What thread 0 of one CTA writes at the end of a timed launch: clock64 cycles charged to
// each phase, and clock64 and %globaltimer (ns) when the CTA started and ended, from which
// the cycles convert to time without trusting a nominal clock rate.
struct PhaseRecord {
  unsigned long long cycles[kPhases];
  unsigned long long clock_begin, clock_end, ns_begin, ns_end;
};

}  // namespace persistent
}  // namespace rnnfused
