// The grid-wide barrier of the persistent kernels (device.cuh) and of the barrier
// microbenchmark (csrc/cuda/barrier_bench.cu), in place of cooperative groups' grid.sync(),
// which spins forever when a CTA faults or is never scheduled: this one traps with a message
// after RNNFUSED_BARRIER_TIMEOUT_S seconds (default 10; a step's phase takes microseconds,
// so only a hang waits that long).
//
// The grid must be co-resident (a cooperative launch guarantees it or refuses the launch),
// and every CTA must call it the same number of times.
//
// Counting: `arrivals` is zero when the launch starts (the launch clears it on the stream
// first). At its k-th barrier (k = 1, 2, ...) each of the n CTAs adds 1 and waits until the
// count is at least k * n. A CTA makes its (k+1)-th add only after it saw k * n, and until
// every CTA has made its k-th add the count stays below k * n (at most n - 1 CTAs with k adds
// and one with k - 1), so seeing k * n means that every CTA has arrived at barrier k. The
// count only grows (64 bits: no wrap), so a late poll of an earlier barrier still passes.
//
// Memory ordering (the PTX memory consistency model, sm_70 and later), giving what grid.sync()
// gives: every write of every CTA before the barrier is visible to every thread after it.
//  1. __syncthreads (bar.sync): the writes of all the CTA's threads before the barrier,
//     global and shared, are ordered before what thread 0 does next.
//  2. Thread 0: fence.acq_rel.gpu, then red.relaxed.gpu.add on the counter: together a
//     release pattern at GPU scope. The fence is cumulative: it orders the writes that
//     precede it in causality order, those of the other threads through 1 included.
//  3. Thread 0 polls with ld.acquire.gpu until it reads at least k * n. That value comes
//     from a chain of atomic adds on the counter that contains every CTA's k-th add, so each
//     CTA's release in 2 precedes this acquire in observation order and synchronizes with
//     it: the writes before every CTA's barrier happen before what follows the acquire.
//  4. __syncthreads: thread 0's acquire is ordered before every thread's later accesses.
// The readers still load other CTAs' data through L2 (load_coherent: ld.global.cg; copy_rows:
// cp.async.cg, a weak read in the generic proxy like a load) and never through the
// non-coherent path (ld.global.nc, const __restrict__), to which the memory model does not
// apply. What the fence in 2 costs (making the CTA's earlier stores
// visible at GPU scope before its arrival) is what the phase timer charges to "stores".
#pragma once

#include <cuda_runtime.h>

#include <cstdio>

#ifndef RNNFUSED_BARRIER_TIMEOUT_S
#define RNNFUSED_BARRIER_TIMEOUT_S 10
#endif
#define RNNF_STRINGIFY_(x) #x
#define RNNF_STRINGIFY(x) RNNF_STRINGIFY_(x)
// What a timed-out barrier prints; `kernel` is a string literal.
#define RNNF_BARRIER_TIMEOUT_MESSAGE(kernel)                                                                   \
  "rnnfused: a CTA of the " kernel " waited more than " RNNF_STRINGIFY(RNNFUSED_BARRIER_TIMEOUT_S) " s at a " \
  "grid barrier or exchange (another CTA faulted or never ran); trapping\n"

namespace rnnfused {
namespace persistent {

__device__ __forceinline__ unsigned long long global_nanoseconds() {
  unsigned long long ns;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(ns));
  return ns;
}

__device__ __forceinline__ unsigned long long load_acquire(const unsigned long long* p) {
  unsigned long long value;
  asm volatile("ld.acquire.gpu.global.u64 %0, [%1];" : "=l"(value) : "l"(p) : "memory");
  return value;
}

// The barrier in two halves, so that a CTA can do work no other CTA waits for (the saved
// activations' stores, the next step's prefetch) between its arrival and its wait:
// grid_arrive after everything the other CTAs will read, grid_wait before reading it. What a
// CTA writes between the two is ordered only before what the others do after their *next*
// wait (its next arrival's fence covers it), never before this barrier's.
//
// Arrival k: after_fence() runs in thread 0 between its fence and its add (the phase timer's stamp).
template <typename AfterFence>
__device__ __forceinline__ void grid_arrive(unsigned long long* arrivals, const AfterFence& after_fence) {
  __syncthreads();
  if (threadIdx.x == 0) {
    asm volatile("fence.acq_rel.gpu;" ::: "memory");
    after_fence();
    asm volatile("red.relaxed.gpu.global.add.u64 [%0], 1;" ::"l"(arrivals) : "memory");
  }
}

// Returns once all gridDim.x CTAs have made their k-th arrival, target = k * gridDim.x.
// `message` (a string literal) is printed before the trap if the wait times out; printf
// without arguments keeps the kernels free of local memory.
__device__ __forceinline__ void grid_wait(const unsigned long long* arrivals, unsigned long long target,
                                          const char* message) {
  if (threadIdx.x == 0 && load_acquire(arrivals) < target) {
    const unsigned long long start = global_nanoseconds();
    while (load_acquire(arrivals) < target) {
      if (global_nanoseconds() - start > RNNFUSED_BARRIER_TIMEOUT_S * 1000000000ull) {
        printf(message);
        __trap();
      }
    }
  }
  __syncthreads();
}

// The hardware barrier of a thread-block cluster (sm_90) in the same two halves: every thread
// of every CTA of the cluster arrives with release and waits with acquire semantics at cluster
// scope, which orders what a CTA wrote before its arrival (global memory, and its peers'
// shared memory) before what the others do after their wait. The CTA barriers around it order
// this CTA's threads' work between the halves, as grid_arrive's and grid_wait's do. (The
// persistent kernels use it once, after begin(); bench.barrier times it.)
__device__ __forceinline__ void cluster_arrive() {
  __syncthreads();
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory");
#else
  __trap();  // cluster plans are made only for sm_90 (the launch checks the kernel's binary)
#endif
}

__device__ __forceinline__ void cluster_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory");
#endif
  __syncthreads();
}

// The exchange of a cluster plan (sm_90), in place of a barrier after each phase: a CTA's pushes
// into its peers' shared memory (st.async) each complete their bytes on the receiving CTA's
// mbarrier, which also waits for one arrival, that CTA's own, with the bytes it expects
// (arrive.expect_tx). So a CTA waits for its own data alone: no barrier round, no fence, and
// a push is not held up by the peers' arrivals.
//  - Two mbarriers per CTA ("signals"); the k-th exchange (k = 0, 1, ...) uses signal k % 2 in
//    its phase k / 2. A peer pushes exchange k + 2 only after its wait of exchange k + 1, which
//    needs this CTA's exchange k + 1 pushes, made after this CTA's wait of exchange k: so every
//    byte of exchange k + 2 meets signal k % 2 in its next phase. (An exchange without bytes
//    would break the chain: every phase pushes at least one row.)
//  - Ordering: st.async is a weak store whose complete-tx has release semantics at cluster
//    scope, and the wait acquires at cluster scope: what the pushing CTA did before its push
//    (after a CTA barrier, its other threads' work too) happens before what the waiting CTA
//    does after its wait, in particular its reads of the tile a later push overwrites.
//  - The bytes of a phase may land before their CTA's own arrival (the tx-count goes below
//    zero until then); the phase cannot complete without that arrival.
// Both halves of the once-per-launch setup (exchange_init before, the cluster barrier after:
// no peer pushes before a CTA's signals exist) are in device.cuh.
__device__ __forceinline__ unsigned shared_address(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// The address of `local` (this CTA's shared memory) in CTA `rank`'s shared memory window.
__device__ __forceinline__ unsigned peer_address(const void* local, unsigned rank) {
  unsigned address = 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(address) : "r"(shared_address(local)), "r"(rank));
#endif
  return address;
}

// Thread 0: both signals, one arrival a phase.
__device__ __forceinline__ void exchange_init(unsigned long long* signals) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  for (int i = 0; i < 2; ++i)
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(shared_address(signals + i)) : "memory");
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
#endif
}

// One thread: this CTA's arrival at `signal`, expecting `bytes` of its peers' pushes.
__device__ __forceinline__ void exchange_expect(unsigned long long* signal, unsigned bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.arrive.expect_tx.release.cta.shared::cta.b64 _, [%0], %1;" ::"r"(shared_address(signal)),
               "r"(bytes)
               : "memory");
#endif
}

// kBytes (16 or 4) at `local` to the peer address `to` (peer_address; aligned to kBytes),
// completing on the peer's mbarrier at `at` (peer_address of the signal).
template <int kBytes>
__device__ __forceinline__ void exchange_store(const void* local, unsigned to, unsigned at) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if constexpr (kBytes == 16) {
    const uint4 v = *static_cast<const uint4*>(local);
    asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.v4.b32 [%0], {%1, %2, %3, %4}, [%5];" ::"r"(to),
                 "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w), "r"(at)
                 : "memory");
  } else {
    static_assert(kBytes == 4, "st.async stores 4, 8 or 16 bytes; the pushes use 16 and 4");
    const unsigned v = *static_cast<const unsigned*>(local);
    asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.b32 [%0], %1, [%2];" ::"r"(to), "r"(v), "r"(at)
                 : "memory");
  }
#endif
}

// Every thread: returns once `signal` completed the phase of parity `parity` (its CTA arrived
// and every byte it expected landed), with acquire semantics at cluster scope. Thread 0 traps
// with `message` after RNNFUSED_BARRIER_TIMEOUT_S seconds (which ends every thread's wait).
__device__ __forceinline__ void exchange_wait(unsigned long long* signal, unsigned parity, const char* message) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  const unsigned address = shared_address(signal);
  auto done = [&] {
    unsigned complete;
    asm volatile(
        "{ .reg .pred p; mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
        : "=r"(complete)
        : "r"(address), "r"(parity)
        : "memory");
    return complete != 0;
  };
  if (done()) return;
  const unsigned long long start = global_nanoseconds();
  while (!done()) {
    if (threadIdx.x == 0 && global_nanoseconds() - start > RNNFUSED_BARRIER_TIMEOUT_S * 1000000000ull) {
      printf(message);
      __trap();
    }
  }
#endif
}

// Both halves at once: returns once all gridDim.x CTAs have made their k-th call.
template <typename AfterFence>
__device__ __forceinline__ void grid_barrier(unsigned long long* arrivals, unsigned long long target,
                                             const char* message, const AfterFence& after_fence) {
  grid_arrive(arrivals, after_fence);
  grid_wait(arrivals, target, message);
}

}  // namespace persistent
}  // namespace rnnfused
