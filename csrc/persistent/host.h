// The host simulation of the persistent recurrence: a CPU test harness that runs the CTA
// programs of program.h exactly as the GPU does, with the same tiling, shared-memory layout
// (one buffer per CTA), padding, masking and phase order. Within a phase the CTAs run one
// after the other in a shuffled order; the end of the phase is the grid barrier. Shared
// memory starts as NaN, and so do the outputs (bindings.cpp), so that a read of something
// no one wrote shows in the results.
//
// Each barrier comes in two halves, as on the GPU: every CTA's phase, the arrival, every
// CTA's after_arrival, the wait. A prefetch (ops.prefetch_rows) lands when its thread calls
// ops.prefetched(), not when it is issued; until then the copy may read its source and write
// its destination at any time, so the checker sees it read the source and write the
// destination both at the issue and at the landing, and flags any touch of its destination in
// between.
//
// It runs the CTA's threads one after the other, so a missing ops.sync or a plain load of
// another CTA's data would still give the right numbers here. The checker below sees those
// anyway. It gives every access the simulated thread that makes it on the GPU (the same
// thread -> element mapping as device.cuh: element i of ops.for_each and of ops.copy_rows by
// thread i % kThreads, a product tile by one warp as a whole) and flags:
//   - within a CTA, two threads touching the same bytes (shared or global memory) between
//     the same two CTA barriers, one of them writing: a read after write is a missing
//     ops.sync, a write after read a buffer reused before it was consumed;
//   - across CTAs, two CTAs touching the same global bytes, one of them writing, with no
//     grid barrier ordering the two (the same two kinds, and a write after write). A barrier
//     orders what one CTA did before its arrival before what another does after its wait:
//     a phase before the next phase, but an after_arrival before nothing until the phase
//     after next. In a cluster plan the exchange of a phase (each CTA's push, then its wait
//     for its peers') is its barrier, it orders only the CTAs of one cluster, and a phase that
//     pushes nothing has none; the operand tiles, which the peers push into (distributed
//     shared memory), are checked as global memory is (a plain read of them is what the GPU
//     does);
//   - in a cluster plan, a phase in which a CTA expects other than the bytes its peers push
//     into it (ops.push_rows), or expects none while they push;
//   - a product of a W tile held in registers (ops.hold) with other arguments than the hold's
//     (on the GPU the warps' registers would hold other fragments);
//   - a plain read (not load_coherent / ops.copy_rows, i.e. not ld.global.cg or cp.async.cg on
//     the GPU; a prefetch's too) of global memory another CTA wrote during the kernel;
//   - shared memory touched while a prefetch into it is in flight;
//   - shared memory outside the plan's layout.
// The GPU kernel has no grid barrier between begin() and the first phase, nor does the
// simulation: each CTA runs begin() just before its first phase.
//
// RNNFUSED_SIMULATE_DEFECT (test only; tests/test_persistent.py) plants a defect to show that
// the checker finds it:
//   - skip_sync=<begin|operand|fold|phase_end|staged> leaves out that CTA barrier of program.h;
//   - plain_copy makes ops.copy_rows read with plain loads;
//   - skip_barrier=<phase> leaves out the grid barrier (in a cluster, the exchange's wait) after
//     that phase of every step;
//   - early_arrive arrives at every grid barrier before the phase instead of after it (the
//     phase's stores then follow the arrival);
//   - skip_prefetch_wait leaves out ops.prefetched(), so that the asynchronous copies land at
//     the end of the phase;
//   - in a cluster plan: skip_barrier=begin leaves out the cluster barrier between begin() and
//     the first phase; one_buffer gives every step the same operand tile (ops.buffer), as if it
//     were not double-buffered; miscount makes every CTA expect 4 bytes fewer than its peers
//     push;
//   - in a plan with W in registers: misheld makes every CTA hold W for products split one way
//     more than its products are.
// (The one load_coherent of the program, GRU_CHO's h_{t-1} in cho_output, reads the CTA's own
// units, so a plain load there would be no defect, and the checker rightly says nothing.)
//
// Not a user-facing backend (RNNFUSED_KERNEL=simulate on the CPU runs it): slow, and its
// point is that the CPU tests execute the kernel's logic.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

#include "program.h"

namespace rnnfused {
namespace persistent {

constexpr int kWarps = kThreads / 32;

// The defects RNNFUSED_SIMULATE_DEFECT can plant (see the header comment).
struct Defects {
  bool skip_sync[5] = {false, false, false, false, false};  // indexed by Sync
  bool plain_copy = false;
  int skip_barrier = -1;  // the phase after which no grid barrier runs; -1: none
  bool early_arrive = false, skip_prefetch_wait = false, skip_begin_barrier = false, one_buffer = false;
  bool miscount = false, misheld = false;
  std::string text;

  static Defects from_environment() {
    Defects d;
    const char* value = std::getenv("RNNFUSED_SIMULATE_DEFECT");
    if (value == nullptr) return d;
    d.text = value;
    const char* syncs[] = {"begin", "operand", "fold", "phase_end", "staged"};
    size_t start = 0;
    while (start <= d.text.size()) {
      const size_t comma = std::min(d.text.find(',', start), d.text.size());
      const std::string item = d.text.substr(start, comma - start);
      start = comma + 1;
      if (item.empty()) continue;
      bool known = item == "plain_copy" || item == "early_arrive" || item == "skip_prefetch_wait" ||
                   item == "skip_barrier=begin" || item == "one_buffer" || item == "miscount" || item == "misheld";
      d.plain_copy |= item == "plain_copy";
      d.early_arrive |= item == "early_arrive";
      d.skip_prefetch_wait |= item == "skip_prefetch_wait";
      d.skip_begin_barrier |= item == "skip_barrier=begin";
      d.one_buffer |= item == "one_buffer";
      d.miscount |= item == "miscount";
      d.misheld |= item == "misheld";
      for (int i = 0; i < 5; ++i)
        if (item == std::string("skip_sync=") + syncs[i]) known = d.skip_sync[i] = true;
      if (item == "skip_barrier=0" || item == "skip_barrier=1") {
        d.skip_barrier = item.back() - '0';
        known = true;
      }
      if (!known)
        throw std::invalid_argument("rnnfused: RNNFUSED_SIMULATE_DEFECT: unknown defect '" + item +
                                    "' (skip_sync=begin|operand|fold|phase_end|staged, plain_copy, skip_barrier=0|1|begin, "
                                    "early_arrive, skip_prefetch_wait, one_buffer, miscount, misheld)");
    }
    return d;
  }
};

// The race checker of one simulated launch (see the header comment). Shadow state is kept per
// 2 bytes (the smallest element); a CTA barrier starts a new "epoch", each half of a grid
// barrier a new "interval" (and epoch): the phase before barrier k runs in interval 2k, its
// after_arrival in 2k + 1. Epochs are numbered across all CTAs, so one shadow of the shared
// memory serves every CTA in turn: entries a CTA left are stale for the next.
class Checker final : public AccessObserver {
 public:
  // Who touches memory: thread 0 .. kThreads-1; a warp as a whole (a tensor-core fragment:
  // kWarpBase + warp); or code outside ops.for_each, which every thread of the CTA runs.
  static constexpr int kWarpBase = kThreads;
  static constexpr int kEveryThread = -1;

  Checker(const Layout& layout, Defects defects, std::vector<std::pair<const char*, const void*>> buffers)
      : layout_(layout), defects_(std::move(defects)), buffers_(std::move(buffers)), shared_(layout.bytes / 2) {
    std::sort(buffers_.begin(), buffers_.end(),
              [](const auto& a, const auto& b) { return a.second < b.second; });
  }

  // A cluster plan: `size` CTAs a cluster, `bases` every CTA's shared memory.
  void clusters(int64_t size, std::vector<const char*> bases) {
    cluster_ = size;
    bases_ = std::move(bases);
    const int64_t after[] = {layout_.acc, layout_.partials, layout_.state, layout_.state2, layout_.inputs,
                             layout_.bias, layout_.narrow, layout_.bytes};
    operand_end_ = layout_.bytes;
    for (const int64_t offset : after)
      if (offset > layout_.operand) operand_end_ = std::min(operand_end_, offset);
  }

  // The CTA that runs from now on, its shared memory ([base, base + layout.bytes) in an
  // allocation [allocation, allocation_end)), and what it is doing (for the report).
  void enter(int64_t cta, const char* base, const char* allocation, const char* allocation_end, std::string where) {
    cta_ = static_cast<int>(cta);
    base_ = base;
    allocation_ = allocation;
    allocation_end_ = allocation_end;
    where_ = std::move(where);
    who_ = kEveryThread;
    ++epoch_;
  }

  // What the current CTA does from now on (for the report); not a barrier.
  void doing(std::string where) { where_ = std::move(where); }
  void thread(int who) { who_ = who; }
  void sync() { ++epoch_; }
  // The two halves of a grid barrier, once all CTAs have reached each.
  void arrive() {
    ++interval_;
    ++epoch_;
  }
  void wait() { arrive(); }

  bool skips(Sync point) const { return defects_.skip_sync[static_cast<int>(point)]; }
  bool skips_barrier_after(int phase) const { return defects_.skip_barrier == phase; }
  bool arrives_early() const { return defects_.early_arrive; }
  bool skips_prefetch_wait() const { return defects_.skip_prefetch_wait; }
  bool skips_begin_barrier() const { return defects_.skip_begin_barrier; }
  bool one_buffer() const { return defects_.one_buffer; }
  bool miscounts() const { return defects_.miscount; }
  bool misholds() const { return defects_.misheld; }
  // How ops.copy_rows reads its source rows (through L2 on the GPU, unless planted).
  Access copy_access() const { return defects_.plain_copy ? Access::Read : Access::Coherent; }

  // From program.h's read / write / load_coherent, made by the current thread.
  void access(const void* p, int64_t bytes, Access kind) override { touch(p, bytes, kind, who_); }

  // The current CTA issued a prefetch into [to, to + bytes); all its prefetches landed.
  void in_flight(const void* to, int64_t bytes) {
    auto& ranges = in_flight_[cta_];
    ranges.emplace_back(static_cast<const char*>(to), static_cast<const char*>(to) + bytes);
  }
  void landed() { in_flight_.erase(cta_); }

  // From the Ops, on behalf of `who`.
  void touch(const void* p, int64_t bytes, Access kind, int who) {
    const char* c = static_cast<const char*>(p);
    if (c >= base_ && c < base_ + layout_.bytes) {
      const auto flying = in_flight_.empty() ? in_flight_.end() : in_flight_.find(cta_);
      if (flying != in_flight_.end())
        for (const auto& [from, to] : flying->second)
          if (c < to && c + bytes > from) found(kInFlight, describe(who, kind, p));
      if (c + bytes > base_ + layout_.bytes) found(kOutsideLayout, describe(who, kind, p) + " runs past the layout");
      if (kind == Access::Coherent) found(kCoherentShared, describe(who, kind, p));
      if (exchanged(c - base_)) {
        check_global(p, bytes, kind, who, true);
        return;
      }
      for (int64_t i = (c - base_) / 2; i < std::min<int64_t>((c - base_ + bytes + 1) / 2, shared_.size()); ++i)
        check(shared_[i], false, kind, who, p);
      return;
    }
    if (c >= allocation_ && c < allocation_end_) {
      found(kOutsideLayout, describe(who, kind, p));
      return;
    }
    if (const char* peer = peer_base(c)) {
      if (!exchanged(c - peer) || c + bytes > peer + operand_end_)
        found(kPeerOutsideOperand, describe(who, kind, p));
      check_global(p, bytes, kind, who, true);
      return;
    }
    check_global(p, bytes, kind, who, false);
  }

  // (A cluster plan) CTA `cta` expected `expected` bytes of pushes in a phase and got `received`.
  void exchange_mismatch(int64_t cta, int64_t expected, int64_t received) {
    found(kExchangeBytes, "CTA " + std::to_string(cta) + " (" + where_ + "): expected " + std::to_string(expected) +
                              " bytes, its peers pushed " + std::to_string(received));
  }

  // A product of the W tile the current CTA holds in registers, with other arguments.
  void held_mismatch(const std::string& what) {
    found(kHeldProduct, "CTA " + std::to_string(cta_) + " (" + where_ + "): " + what);
  }

  // Throws what was found, if anything.
  void report() const {
    int64_t kinds = 0;
    std::string text;
    for (int k = 0; k < kKinds; ++k) {
      if (count_[k] == 0) continue;
      ++kinds;
      text += std::string("\n  ") + kDescriptions[k] + ": " + std::to_string(count_[k]) + " accesses; first: " +
              first_[k];
    }
    if (kinds == 0) return;
    throw std::runtime_error("rnnfused: the host simulation's checker found " + std::to_string(kinds) +
                             " kind(s) of hazard in the persistent program" +
                             (defects_.text.empty() ? "" : " (RNNFUSED_SIMULATE_DEFECT=" + defects_.text + ")") +
                             ":" + text);
  }

 private:
  // The CTAs that read a granule in one interval: `cta`, or several.
  struct Reads {
    int32_t interval = -1, cta = -1;
    bool many = false;
  };
  struct Shadow {
    uint32_t write_epoch = 0, read_epoch = 0;  // 0: never in this launch
    int32_t write_interval = -1;
    int16_t writer = 0, reader = 0;            // who, in the epoch
    int32_t writer_cta = -1;                   // which CTA, in write_interval (global memory)
    bool many_readers = false;                 // another thread read it in read_epoch too
    // The last three intervals with reads, latest first: the most that can be unordered with
    // a later access (see ordered).
    Reads reads[3];
  };

  // Whether a barrier orders an access in interval `earlier` before one in `later` (the
  // simulation visits intervals in order): with a whole barrier between them (a wait after
  // the earlier access's arrival), i.e. two intervals apart, unless both are after_arrivals
  // (2k + 1 and 2k + 3: the second precedes the wait of the barrier the first arrives at).
  static bool ordered(int32_t earlier, int32_t later) {
    return earlier < 0 || later - earlier >= 3 || (later - earlier == 2 && earlier % 2 == 0);
  }

  // Whether what CTA `other` (-1: several) did in interval `earlier` is ordered before what
  // the current CTA does now: a cluster's exchange orders only its own CTAs.
  bool ordered_now(int32_t earlier, int32_t other) const {
    if (earlier < 0) return true;
    if (cluster_ > 0 && (other < 0 || other / cluster_ != cta_ / cluster_)) return false;
    return ordered(earlier, interval_);
  }

  // Whether an offset in a CTA's shared memory lies in a cluster plan's operand tiles, which
  // the peers push into.
  bool exchanged(int64_t offset) const {
    return cluster_ > 0 && offset >= layout_.operand && offset < operand_end_;
  }

  // The shared memory of the current CTA's cluster peer that `c` lies in, or null.
  const char* peer_base(const char* c) const {
    if (cluster_ == 0) return nullptr;
    for (int64_t i = cta_ / cluster_ * cluster_; i < (cta_ / cluster_ + 1) * cluster_; ++i)
      if (i != cta_ && c >= bases_[i] && c < bases_[i] + layout_.bytes) return bases_[i];
    return nullptr;
  }

  // Checks bytes as global memory: global memory itself, or (`pushed`) a cluster plan's operand
  // tiles, which a CTA reads with plain loads.
  void check_global(const void* p, int64_t bytes, Access kind, int who, bool pushed) {
    const uintptr_t address = reinterpret_cast<uintptr_t>(p);
    for (uintptr_t g = address / 2; g < (address + bytes + 1) / 2; ++g) check(global(g), true, kind, who, p, pushed);
  }

  enum Kind {
    kSharedReadAfterWrite,
    kSharedWriteAfterRead,
    kSharedWriteAfterWrite,
    kGlobalThreadRace,
    kCrossReadAfterWrite,
    kCrossWriteAfterRead,
    kCrossWriteAfterWrite,
    kPlainLoad,
    kEveryThreadWrites,
    kOutsideLayout,
    kCoherentShared,
    kInFlight,
    kPeerOutsideOperand,
    kExchangeBytes,
    kHeldProduct,
    kKinds
  };
  static constexpr const char* kDescriptions[kKinds] = {
      "shared memory read after another thread wrote it with no CTA barrier between (a missing ops.sync)",
      "shared memory reused before it was consumed: written after another thread read it with no CTA barrier "
      "between",
      "shared memory written by two threads with no CTA barrier between",
      "global memory or an operand tile of a cluster plan touched by two threads of one CTA, one writing, with no "
      "CTA barrier between",
      "global memory or a cluster's operand tile read by one CTA and written by another with no barrier ordering the "
      "two",
      "global buffer or operand tile reused before it was consumed: written by one CTA after another CTA read it, "
      "with no barrier ordering the two",
      "global memory or a cluster's operand tile written by two CTAs with no barrier ordering the two",
      "plain load of global memory another CTA wrote during the kernel (use load_coherent or ops.copy_rows: "
      "through L2 on the GPU)",
      "a write outside ops.for_each, which every thread of the CTA would make",
      "shared memory outside the plan's layout",
      "load_coherent of shared memory",
      "shared memory touched while a prefetch into it is in flight (before its thread's ops.prefetched())",
      "a peer's shared memory touched outside its operand tiles",
      "a CTA of a cluster expects other than what its peers push into it in a phase, or nothing (on the GPU its "
      "wait would never return, or return before the data has landed)",
      "a product of a W tile held in registers (ops.hold) with other arguments than the hold's (on the GPU the "
      "warps' registers would hold other fragments)",
  };

  Shadow& global(uintptr_t granule) {
    if (granule / kPage != last_page_) {  // most accesses fall in the page of the one before
      std::unique_ptr<Shadow[]>& page = pages_[granule / kPage];
      if (!page) page.reset(new Shadow[kPage]);
      last_page_ = granule / kPage;
      last_shadow_ = page.get();
    }
    return last_shadow_[granule % kPage];
  }

  void check(Shadow& s, bool global, Access kind, int who, const void* p, bool pushed = false) {
    const int32_t cta = cta_;
    const int16_t me = static_cast<int16_t>(who);
    if (kind != Access::Write) {
      if (s.write_epoch == epoch_ && s.writer != me)
        found(global ? kGlobalThreadRace : kSharedReadAfterWrite, describe(who, kind, p) + ", written by " + name(s.writer));
      if (global && s.writer_cta != cta && !ordered_now(s.write_interval, s.writer_cta))
        found(kCrossReadAfterWrite, describe(who, kind, p) + ", written by CTA " + std::to_string(s.writer_cta));
      if (global && !pushed && kind == Access::Read && s.writer_cta >= 0 && s.writer_cta != cta)
        found(kPlainLoad, describe(who, kind, p) + ", written by CTA " + std::to_string(s.writer_cta));
      if (s.read_epoch == epoch_) {
        s.many_readers |= s.reader != me;
      } else {
        s.read_epoch = epoch_;
        s.reader = me;
        s.many_readers = false;
      }
      if (global) {
        if (s.reads[0].interval == interval_) {
          s.reads[0].many |= s.reads[0].cta != cta;
        } else {
          s.reads[2] = s.reads[1];
          s.reads[1] = s.reads[0];
          s.reads[0] = Reads{interval_, cta, false};
        }
      }
      return;
    }
    if (who == kEveryThread) found(kEveryThreadWrites, describe(who, kind, p));
    if (s.write_epoch == epoch_ && s.writer != me)
      found(global ? kGlobalThreadRace : kSharedWriteAfterWrite, describe(who, kind, p) + ", written by " + name(s.writer));
    if (s.read_epoch == epoch_ && (s.many_readers || s.reader != me))
      found(global ? kGlobalThreadRace : kSharedWriteAfterRead,
            describe(who, kind, p) + ", read by " + (s.reader != me ? name(s.reader) : "other threads"));
    if (global && s.writer_cta != cta && !ordered_now(s.write_interval, s.writer_cta))
      found(kCrossWriteAfterWrite, describe(who, kind, p) + ", written by CTA " + std::to_string(s.writer_cta));
    for (const Reads& r : s.reads)
      if (global && (r.many || r.cta != cta) && !ordered_now(r.interval, r.many ? -1 : r.cta))
        found(kCrossWriteAfterRead, describe(who, kind, p) + ", read by " +
                                        (r.cta != cta ? "CTA " + std::to_string(r.cta) : std::string("other CTAs")));
    s.write_epoch = epoch_;
    s.writer = me;
    s.write_interval = interval_;
    s.writer_cta = cta;
  }

  void found(Kind kind, std::string what) {
    if (count_[kind]++ == 0) first_[kind] = std::move(what);
  }

  static std::string name(int who) {
    if (who == kEveryThread) return "every thread";
    if (who >= kWarpBase) return "warp " + std::to_string(who - kWarpBase);
    return "thread " + std::to_string(who);
  }

  // "CTA 3 (walk step 2, phase 0): thread 17 reads shared acc+64" and the like.
  std::string describe(int who, Access kind, const void* p) const {
    const char* verb = kind == Access::Write ? " writes " : kind == Access::Coherent ? " loads (coherent) " : " reads ";
    return "CTA " + std::to_string(cta_) + " (" + where_ + "): " + name(who) + verb + place(p);
  }

  std::string place(const void* p) const {
    const char* c = static_cast<const char*>(p);
    if (c >= base_ && c < base_ + layout_.bytes) {
      const std::pair<const char*, int64_t> regions[] = {
          {"weights", layout_.weights}, {"operand", layout_.operand}, {"acc", layout_.acc},
          {"partials", layout_.partials}, {"state", layout_.state}, {"state2", layout_.state2},
          {"inputs", layout_.inputs}, {"bias", layout_.bias}, {"narrow", layout_.narrow}};
      const auto* region = &regions[0];
      for (const auto& r : regions)  // the last that starts at or before c (unplaced regions are at 0)
        if (r.second <= c - base_ && r.second > 0) region = &r;
      return std::string("shared ") + region->first + "+" + std::to_string(c - base_ - region->second);
    }
    if (c >= allocation_ && c < allocation_end_) return "shared memory at byte " + std::to_string(c - base_);
    if (const char* peer = peer_base(c))
      return "a peer's shared memory at byte " + std::to_string(c - peer) + " (operand+" +
             std::to_string(c - peer - layout_.operand) + ")";
    const std::pair<const char*, const void*>* buffer = nullptr;
    for (const auto& b : buffers_)
      if (b.second != nullptr && b.second <= p) buffer = &b;
    if (buffer == nullptr) return "global memory";
    return std::string("global ") + buffer->first + "+" + std::to_string(c - static_cast<const char*>(buffer->second));
  }

  static constexpr uintptr_t kPage = 2048;  // granules of 2 bytes per page of the global shadow

  const Layout layout_;
  const Defects defects_;
  std::vector<std::pair<const char*, const void*>> buffers_;  // the launch's buffers, by address (for the report)
  std::vector<Shadow> shared_;
  std::unordered_map<uintptr_t, std::unique_ptr<Shadow[]>> pages_;
  uintptr_t last_page_ = ~uintptr_t(0);
  Shadow* last_shadow_ = nullptr;
  uint32_t epoch_ = 1;
  int32_t interval_ = 0;
  int cta_ = 0, who_ = kEveryThread;
  const char *base_ = nullptr, *allocation_ = nullptr, *allocation_end_ = nullptr;
  std::string where_;
  std::unordered_map<int, std::vector<std::pair<const char*, const char*>>> in_flight_;  // per CTA
  int64_t cluster_ = 0;                 // CTAs a cluster (0: not a cluster plan)
  int64_t operand_end_ = 0;             // where a cluster plan's operand tiles end (the next region)
  std::vector<const char*> bases_;      // every CTA's shared memory (a cluster plan)
  int64_t count_[kKinds] = {};
  std::string first_[kKinds];
};

// The Ops of program.h on the CPU, mapping every element to the thread (or warp) that handles
// it on the GPU (device.cuh's DeviceOps) and telling the checker.
struct HostOps {
  Checker* check;
  int64_t cta = 0;  // the CTA that runs (the simulation sets it)
  std::vector<char*> bases;  // every CTA's shared memory (a cluster's peers push into theirs)

  // Asynchronous copies issued and not yet landed, per CTA: `bytes` from `from` to `to` by
  // thread `who`, reading their source as `read` does (a prefetch's: plain; copy_rows's:
  // coherent).
  struct Copy {
    const void* from;
    void* to;
    int64_t bytes;
    int who;
    Access read = Access::Read;
  };
  std::vector<std::vector<Copy>> pending;
  // (A cluster) the bytes each CTA expects its peers to push in the current phase, and those
  // they pushed; whether any CTA pushed.
  std::vector<int64_t> expected, received;
  bool exchanged = false;
  // (ops.hold) per CTA: the W tile held in registers, its products' arguments, and the copy of
  // its rows [m0, m1) taken at the hold, which they multiply (the GPU's registers).
  struct Held {
    const void* a = nullptr;
    int64_t lda = 0, m0 = 0, m1 = 0, n = 0, k0 = 0, k1 = 0, split = 0;
    std::vector<char> rows;
  };
  std::vector<Held> held;

  HostOps(Checker* checker, int64_t ctas)
      : check(checker), pending(ctas), expected(ctas), received(ctas), held(ctas) {}

  template <typename S>
  S operand(S x) const {
    return tensor_core_operand(x);
  }

  template <typename F>
  void for_each(int64_t rows, int64_t cols, const F& f) {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) {
        check->thread(static_cast<int>((r * cols + c) % kThreads));
        f(r, c);
      }
    check->thread(Checker::kEveryThread);
  }

  // (skip_prefetch_wait: the prefetches land at the end of the phase instead.)
  void sync(Sync point) {
    if (point == Sync::PhaseEnd) land();
    if (!check->skips(point)) check->sync();
  }

  // DeviceOps::prefetch_rows's chunks: 16 bytes of a row segment (the last shorter), chunk i
  // by thread i % kThreads. Each lands (is read and written, and told to the checker) by its
  // thread's next prefetched().
  template <typename T, typename Source>
  void prefetch_rows(T* dst, int64_t ld, int64_t rows, int64_t segments, int64_t dst_stride, int64_t src_stride,
                     int64_t length, const Source& source) {
    if (rows <= 0) return;
    constexpr int64_t kVector = 16 / sizeof(T);
    const int64_t chunks = (length + kVector - 1) / kVector, per_row = segments * chunks;
    for (int64_t index = 0; index < rows * per_row; ++index) {
      const int64_t r = index / per_row, g = index % per_row / chunks, j = index % chunks * kVector;
      const T* row = source(r);
      if (row == nullptr) continue;
      const Copy copy{row + g * src_stride + j, dst + r * ld + g * dst_stride + j,
                      static_cast<int64_t>(std::min(kVector, length - j) * sizeof(T)),
                      static_cast<int>(index % kThreads)};
      issue(copy);
    }
  }

  // An asynchronous copy: it may write as soon as it is issued (what other threads read there
  // must be ordered before the issue) and lands by its thread's next prefetched().
  void issue(const Copy& copy) {
    check->touch(copy.from, copy.bytes, copy.read, copy.who);
    check->touch(copy.to, copy.bytes, Access::Write, copy.who);
    check->in_flight(copy.to, copy.bytes);
    pending[cta].push_back(copy);
  }

  void prefetched() {
    if (!check->skips_prefetch_wait()) land();
  }

  // The CTA's pending prefetches land. (Every thread's at once: on the GPU each thread waits
  // for its own, and the ops.sync after prefetched() orders them for the others.)
  void land() {
    check->landed();
    for (const Copy& copy : pending[cta]) {
      check->touch(copy.from, copy.bytes, copy.read, copy.who);
      check->touch(copy.to, copy.bytes, Access::Write, copy.who);
      std::memcpy(copy.to, copy.from, static_cast<size_t>(copy.bytes));
    }
    pending[cta].clear();
  }

  void stamp(Phase) {}

  int64_t buffer(int64_t s) const { return check->one_buffer() ? 0 : s % 2; }

  // DeviceOps::push_rows's stores: 16 bytes of a row segment (the last shorter) to one peer,
  // store i by thread i % kThreads, peers in rank order. Each peer counts the bytes it receives,
  // this CTA the bytes it expects (the simulation compares the two at the phase's end).
  template <typename T>
  void push_rows(T* tile, int64_t ld, int64_t rows, int64_t segments, int64_t stride, int64_t H, int64_t units,
                 int64_t cluster, int64_t rank) {
    constexpr int64_t kVector = 16 / sizeof(T), kElement = sizeof(T);
    const int64_t length = pushed_units(H, units, rank, kElement), first = rank * units;
    const int64_t chunks = (length + kVector - 1) / kVector, per_peer = rows * segments * chunks;
    const char* own = bases[cta];
    for (int64_t index = 0; index < (cluster - 1) * per_peer; ++index) {
      const int64_t q = index / per_peer, peer = q < rank ? q : q + 1, i = index % per_peer;
      const int64_t r = i / (segments * chunks), g = i / chunks % segments, j = i % chunks * kVector;
      const T* from = tile + r * ld + g * stride + first + j;
      T* to = reinterpret_cast<T*>(bases[cta - rank + peer] + (reinterpret_cast<const char*>(from) - own));
      const int64_t bytes = std::min(kVector, length - j) * kElement;
      const int who = static_cast<int>(index % kThreads);
      check->touch(from, bytes, Access::Read, who);
      check->touch(to, bytes, Access::Write, who);
      std::memcpy(to, from, static_cast<size_t>(bytes));
      received[cta - rank + peer] += bytes;
    }
    expected[cta] = incoming_bytes(H, units, cluster, rank, rows, segments, kElement) - (check->miscounts() ? 4 : 0);
    exchanged = true;
  }

  // The end of a phase of a cluster plan: whether it exchanged, and what each CTA got against what
  // it expected (told to the checker).
  bool exchange_done() {
    for (size_t i = 0; i < expected.size(); ++i)
      if (expected[i] != received[i] || (exchanged && expected[i] <= 0))
        check->exchange_mismatch(static_cast<int64_t>(i), expected[i], received[i]);
    std::fill(expected.begin(), expected.end(), 0);
    std::fill(received.begin(), received.end(), 0);
    return std::exchange(exchanged, false);
  }

  // DeviceOps::copy_rows's paths: whole 16-byte vectors, one per thread and chunk index,
  // where every row segment is made of them (asynchronous, landing by prefetched(), unless its
  // source or destination starts off 16 bytes); element by element (element i by thread i)
  // otherwise.
  template <typename S, typename Source>
  void copy_rows(S* dst, int64_t ld, int64_t rows, int64_t segments, int64_t dst_stride, int64_t src_stride,
                 int64_t length, const Source& source) {
    if (rows <= 0) return;
    constexpr int64_t kVector = 16 / sizeof(S);
    const int64_t width = length % kVector != 0 || src_stride % kVector != 0 ? 1 : kVector;
    const int64_t chunks = length / width, per_row = segments * chunks;
    const Access load = check->copy_access();
    for (int64_t index = 0; index < rows * per_row; ++index) {
      const int who = static_cast<int>(index % kThreads);
      check->thread(who);
      const int64_t r = index / per_row, g = index % per_row / chunks, j0 = index % chunks * width;
      const S* row = source(r);
      if (row == nullptr) continue;
      const S* from = row + g * src_stride + j0;
      S* to = dst + r * ld + g * dst_stride + j0;
      const bool aligned = reinterpret_cast<uintptr_t>(from) % 16 == 0 && reinterpret_cast<uintptr_t>(to) % 16 == 0;
      if (width == kVector && aligned) {
        issue(Copy{from, to, kVector * static_cast<int64_t>(sizeof(S)), who, load});
        continue;
      }
      for (int64_t j = 0; j < width; ++j) {
        check->touch(from + j, sizeof(S), load, who);
        check->touch(to + j, sizeof(S), Access::Write, who);
        to[j] = from[j];
      }
    }
    check->thread(Checker::kEveryThread);
  }

  // gemm's jobs: f(job, part, m, c, begin, end) for job < tiles * split: output tile job % tiles
  // (rows from m, columns from c) over K part job / tiles, its steps [begin, end) from k0.
  template <typename F>
  static void for_each_job(int64_t m0, int64_t m1, int64_t n, int64_t k0, int64_t k1, int64_t split, F&& f) {
    const int64_t steps = (k1 - k0) / kTile, n_tiles = n / kTile, tiles = (m1 - m0) / kTile * n_tiles;
    for (int64_t job = 0; job < tiles * split; ++job) {
      const int64_t tile = job % tiles, part = job / tiles;
      f(job, part, m0 + tile / n_tiles * kTile, tile % n_tiles * kTile, part * steps / split * kTile,
        (part + 1) * steps / split * kTile);
    }
  }

  // DeviceOps::gemm's jobs: warp job % kWarps computes output tile job % tiles over K part
  // job / tiles (K steps [part * steps / split, (part + 1) * steps / split)) into acc, or into
  // its partials slot when split > 1; a CTA barrier; then the partial sums added up in part
  // order, element i by thread i; a CTA barrier. B as the tensor cores take it (fp32 rounded
  // to TF32, as DeviceOps::gemm rounds its fragments); A from the copy a hold took, if a is
  // held (no shared-memory reads then). (The GPU adds a job's products in two chains, and in
  // the tensor cores' order: equal to these sums within fp32 rounding, not bit for bit.)
  template <typename S, typename Acc>
  void gemm(Acc* acc, int64_t ld_acc, Acc* partials, int64_t partial_stride, const S* a, int64_t lda, const S* b,
            int64_t ldb, int64_t m0, int64_t m1, int64_t n, int64_t k0, int64_t k1, int64_t split) {
    const Held& h = held[cta];
    const bool from_registers = h.a == a;
    const bool as_held = from_registers && h.lda == lda && h.m0 == m0 && h.m1 == m1 && h.n == n && h.k0 == k0 &&
                         h.k1 == k1 && h.split == split;
    if (from_registers && !as_held)
      check->held_mismatch("rows [" + std::to_string(m0) + ", " + std::to_string(m1) + ") x K [" +
                           std::to_string(k0) + ", " + std::to_string(k1) + ") split " + std::to_string(split) +
                           ", held as rows [" + std::to_string(h.m0) + ", " + std::to_string(h.m1) + ") x K [" +
                           std::to_string(h.k0) + ", " + std::to_string(h.k1) + ") split " + std::to_string(h.split));
    // W's rows from m0 on: a held W's from the copy its hold took (a mismatched product, reported
    // above, reads a itself).
    const S* w = as_held ? reinterpret_cast<const S*>(h.rows.data()) : a + m0 * lda;
    for_each_job(m0, m1, n, k0, k1, split, [&](int64_t job, int64_t part, int64_t m, int64_t c, int64_t begin,
                                               int64_t end) {
      const int warp = Checker::kWarpBase + static_cast<int>(job % kWarps);
      for (int64_t i = 0; i < kTile; ++i) {
        if (!from_registers)
          check->touch(a + (m + i) * lda + k0 + begin, (end - begin) * sizeof(S), Access::Read, warp);
        check->touch(b + (c + i) * ldb + begin, (end - begin) * sizeof(S), Access::Read, warp);
      }
      Acc* out = split > 1 ? partials + part * partial_stride : acc;
      for (int64_t i = 0; i < kTile; ++i) {
        for (int64_t j = 0; j < kTile; ++j) {
          Acc sum = 0;
          for (int64_t k = begin; k < end; ++k)
            sum += static_cast<Acc>(w[(m - m0 + i) * lda + k0 + k]) *
                   static_cast<Acc>(tensor_core_operand(b[(c + j) * ldb + k]));
          out[(m + i) * ld_acc + c + j] = sum;
        }
        check->touch(out + (m + i) * ld_acc + c, kTile * sizeof(Acc), Access::Write, warp);
      }
    });
    check->sync();
    if (split > 1) {
      const int64_t width = n;
      for (int64_t i = 0; i < (m1 - m0) * width; ++i) {
        const int who = static_cast<int>(i % kThreads);
        const int64_t m = m0 + i / width, c = i % width;
        Acc sum = 0;
        for (int64_t part = 0; part < split; ++part) {
          const Acc* slot = partials + part * partial_stride + m * ld_acc + c;
          check->touch(slot, sizeof(Acc), Access::Read, who);
          sum += *slot;
        }
        check->touch(acc + m * ld_acc + c, sizeof(Acc), Access::Write, who);
        acc[m * ld_acc + c] = sum;
      }
      check->sync();
    }
  }

  // DeviceOps::hold: each warp reads the A fragments of its jobs of gemm's (the same mapping) once;
  // the products multiply a copy of a's rows [m0, m1) taken now. (misheld: held as split one way
  // more.)
  template <typename S>
  void hold(const S* a, int64_t lda, int64_t m0, int64_t m1, int64_t n, int64_t k0, int64_t k1, int64_t split) {
    const int64_t tiles = (m1 - m0) / kTile * (n / kTile);
    // Where DeviceOps::hold would trap: the busiest warp's fragments beyond kHeldFragments, or
    // K's parts unequal (counted here as the device counts them, not by the planner's rule).
    const int64_t busiest = (tiles * split + kWarps - 1) / kWarps * ((k1 - k0) / split / mma_depth(sizeof(S)));
    if (busiest > kHeldFragments || (k1 - k0) % (split * kTile) != 0)
      throw std::logic_error("rnnfused: the host simulation's ops.hold of " + std::to_string(busiest) +
                             " fragments a warp, K " + std::to_string(k1 - k0) + " split " + std::to_string(split) +
                             ": the GPU kernel would trap (the planner allowed a hold it cannot make)");
    for_each_job(m0, m1, n, k0, k1, split, [&](int64_t job, int64_t, int64_t m, int64_t, int64_t begin, int64_t end) {
      for (int64_t i = 0; i < kTile; ++i)
        check->touch(a + (m + i) * lda + k0 + begin, (end - begin) * sizeof(S), Access::Read,
                     Checker::kWarpBase + static_cast<int>(job % kWarps));
    });
    Held& h = held[cta];
    h = Held{a, lda, m0, m1, n, k0, k1, split + (check->misholds() ? 1 : 0), {}};
    const char* first = reinterpret_cast<const char*>(a + m0 * lda);
    h.rows.assign(first, first + (m1 - m0) * lda * sizeof(S));
  }
};

// The walk of p in host memory (offsets of packed steps computed here).
struct HostWalk {
  std::vector<int64_t> offsets;
  Walk walk;

  // Padded input (every step B rows) takes the GPU's arithmetic branch, packed input the
  // table of batch sizes and offsets.
  explicit HostWalk(const LayerParams& p) {
    walk.T = p.T;
    walk.B = p.B;
    walk.reverse = p.reverse;
    if (std::all_of(p.batch_sizes, p.batch_sizes + p.T, [&](int64_t rows) { return rows == p.B; })) return;
    walk.batch_sizes = p.batch_sizes;
    offsets.assign(p.T, 0);
    for (int64_t t = 1; t < p.T; ++t) offsets[t] = offsets[t - 1] + p.batch_sizes[t - 1];
    walk.offsets = offsets.data();
  }
};

// The buffers of a launch, named for the checker's report.
inline std::vector<std::pair<const char*, const void*>> buffers(const ForwardParams& p) {
  return {{"w_hh", p.w_hh}, {"b_ih", p.b_ih}, {"b_hh", p.b_hh}, {"h0", p.h0}, {"y", p.y},
          {"h_n", p.h},     {"c", p.c},       {"gx", p.gx},     {"gates", p.gates}, {"cells", p.cells},
          {"rh", p.rh},     {"batch_sizes", p.batch_sizes}};
}

inline std::vector<std::pair<const char*, const void*>> buffers(const BackwardParams& p) {
  return {{"w_hh", p.w_hh},     {"h_prev", p.h_prev}, {"hidden", p.hidden}, {"gates", p.gates},
          {"cells", p.cells},   {"c_prev", p.c_prev}, {"dy", p.dy},         {"dh", p.dh},
          {"dc", p.dc},         {"dgx", p.dgx},       {"dgh", p.dgh},       {"rh", p.rh},
          {"batch_sizes", p.batch_sizes}};
}

// Sets the thread's access observer for a scope.
class Observing {
 public:
  explicit Observing(AccessObserver* observer) : previous_(access_observer) { access_observer = observer; }
  ~Observing() { access_observer = previous_; }
  Observing(const Observing&) = delete;
  Observing& operator=(const Observing&) = delete;

 private:
  AccessObserver* previous_;
};

// Runs a CTA program (ForwardCta or BackwardCta) for every CTA of the tiling as the GPU kernel
// does (device.cuh): begin, the phases of every walk step (forward: s = 0 .. T-1; backward:
// T-1 .. 0) with a grid barrier after each, end. Throws what the checker found.
template <typename Cta, typename Params>
void simulate(const Params& p, const Tiling& t, bool backward) {
  const HostWalk steps(p);
  const Layout& layout = backward ? t.bwd : t.fwd;
  const int64_t n = t.ctas();
  // Shared memory of every CTA; filled with NaN-ish garbage so that a read of memory no
  // phase wrote shows up in the results.
  std::vector<std::unique_ptr<char[]>> smem;
  std::vector<char*> bases;
  std::vector<Cta> ctas;
  ctas.reserve(n);
  for (int64_t i = 0; i < n; ++i) {
    smem.emplace_back(new char[layout.bytes + 128]);
    std::memset(smem.back().get(), 0xff, layout.bytes + 128);
    bases.push_back(smem.back().get() + (128 - reinterpret_cast<uintptr_t>(smem.back().get()) % 128) % 128);
    ctas.emplace_back(p, t, steps.walk, i, bases.back());
  }
  Checker check(layout, Defects::from_environment(), buffers(p));
  if (t.cluster > 0) check.clusters(t.cluster, std::vector<const char*>(bases.begin(), bases.end()));
  const Observing observing(&check);
  HostOps ops(&check, n);
  ops.bases = bases;
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::mt19937 shuffle(12345);
  auto enter = [&](int64_t cta, std::string where) {
    ops.cta = cta;
    check.enter(cta, bases[cta], smem[cta].get(), smem[cta].get() + layout.bytes + 128, std::move(where));
  };
  bool begun = false;
  if (t.cluster > 0) {
    // A CTA pushes into its peers' shared memory only once they have all begun (and zeroed
    // their operand tiles): a cluster barrier, the GPU's too.
    std::shuffle(order.begin(), order.end(), shuffle);
    for (const int64_t cta : order) {
      enter(cta, "begin");
      ctas[cta].begin(ops);
    }
    begun = true;
    if (!check.skips_begin_barrier()) {
      check.arrive();
      check.wait();
    }
  }
  for (int64_t i = 0; i < p.T; ++i) {
    const int64_t s = backward ? p.T - 1 - i : i;
    for (int phase = 0; phase < ctas.front().phases(); ++phase) {
      const std::string where = "walk step " + std::to_string(s) + ", phase " + std::to_string(phase);
      // No grid barrier where each CTA has all the units of its rows (the GPU then has a CTA
      // barrier, which entering a CTA stands for here): a CTA that read another's data would
      // then be caught within the one long interval. In a cluster the exchange is the
      // barrier: none in a phase that pushes nothing (the forward's last step).
      const bool grid = t.unit_tiles > 1 && t.cluster == 0 && !check.skips_barrier_after(phase);
      if (grid && check.arrives_early()) check.arrive();
      std::shuffle(order.begin(), order.end(), shuffle);
      for (const int64_t cta : order) {
        enter(cta, "begin");
        if (!begun) ctas[cta].begin(ops);
        check.doing(where);
        ctas[cta].phase(ops, s, phase);
      }
      begun = true;
      const bool exchange = t.cluster > 0 && ops.exchange_done() && !check.skips_barrier_after(phase);
      if (exchange || (grid && !check.arrives_early())) check.arrive();
      std::shuffle(order.begin(), order.end(), shuffle);
      for (const int64_t cta : order) {
        enter(cta, where + ", after the arrival");
        ctas[cta].after_arrival(ops, s, phase);
      }
      if (grid || exchange) check.wait();
    }
  }
  std::shuffle(order.begin(), order.end(), shuffle);
  for (const int64_t cta : order) {
    enter(cta, "begin");
    if (!begun) ctas[cta].begin(ops);
    check.doing("end");
    ctas[cta].end(ops);
  }
  check.report();
}

template <typename S, typename A>
void simulate_forward(const ForwardParams& p, const Tiling& t) {
  simulate<ForwardCta<S, A>>(p, t, false);
}

template <typename S, typename A>
void simulate_backward(const BackwardParams& p, const Tiling& t) {
  simulate<BackwardCta<S, A>>(p, t, true);
}

}  // namespace persistent
}  // namespace rnnfused
