// The GPU side of the persistent recurrence: the Ops of program.h on tensor cores (WMMA:
// fp16 and bf16 16x16x16, fp32 as TF32 16x16x8, fp32 accumulation), tiles copied in with
// 16-byte cp.async through L2, one cooperative launch per layer direction with a grid-wide
// barrier after every phase (grid_barrier.cuh: bounded, it traps instead of hanging; a CTA
// barrier where each CTA has every unit of its rows), or a launch of thread-block clusters
// (sm_90) whose CTAs push their slices into each other's shared memory, each waiting for the
// bytes it expects (grid_barrier.cuh's exchange), and the launch that says when the GPU
// refuses it (the caller then runs stage 1). Included by
// csrc/cuda/backend.cuh; instantiated per dtype in rnn_<dtype>.cu.
//
// Built with RNNFUSED_PHASE_TIMING (setup.py), thread 0 of every CTA also times the phases of
// the program (ops.stamp, timing.h) and writes them out at the end (python -m bench.phases);
// otherwise ops.stamp is empty and the kernels are as without it.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <map>
#include <mutex>
#include <type_traits>
#include <utility>

#include "../cuda/check.h"
#include "../cuda/rnn_cuda.h"
#include "grid_barrier.cuh"
#include "program.h"

namespace rnnfused {
namespace persistent {

template <typename S>
struct MmaShape;
template <>
struct MmaShape<__half> {
  using Element = __half;
  static constexpr int kK = 16;
};
template <>
struct MmaShape<__nv_bfloat16> {
  using Element = __nv_bfloat16;
  static constexpr int kK = 16;
};
template <>
struct MmaShape<float> {
  using Element = nvcuda::wmma::precision::tf32;
  static constexpr int kK = 8;
};

// Storage: the kernel's element type (S of program.h), the type of the W fragments it holds.
template <typename Storage>
struct DeviceOps {
  using Element = typename MmaShape<Storage>::Element;
  static constexpr int kK = MmaShape<Storage>::kK;
  static_assert(kK == mma_depth(sizeof(Storage)), "the planner's held_fragments counts MMAs of this depth");
  using FragmentA = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, kK, Element, nvcuda::wmma::row_major>;
  using FragmentB = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, kK, Element, nvcuda::wmma::col_major>;
  using Accumulator = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, kK, float>;

  // (A cluster plan) the CTA's two mbarriers (Layout::signals), the exchanges it has waited
  // for, and whether the current phase pushed (so that its wait waits for the peers' pushes).
  unsigned long long* signals;
  unsigned exchanges = 0;
  bool pushed = false;
  // (program.h's hold) the W tile whose products this warp multiplies from registers, and its
  // fragments: fragment f is MMA f % held_per_job of the warp's job f / held_per_job (gemm's
  // jobs). Indexed only by unrolled loops, so that the array stays in registers.
  const Storage* held = nullptr;
  int held_count = 0, held_per_job = 1;
  FragmentA fragments[kHeldFragments];
#if defined(RNNFUSED_PHASE_TIMING)
  PhaseRecord* record;  // this CTA's
  long long last = 0, clock_begin = 0;
  unsigned long long ns_begin = 0;
  unsigned long long cycles[kPhases] = {};

  __device__ DeviceOps(PhaseRecord* records, char* smem, const Layout& layout)
      : signals(region<unsigned long long>(smem, layout.signals)), record(records + blockIdx.x) {
    if (threadIdx.x == 0) {
      ns_begin = global_nanoseconds();
      last = clock_begin = clock64();
    }
  }

  // Thread 0 charges the cycles since the previous stamp; the program stamps right after a
  // CTA barrier, so a phase ends when its slowest thread does.
  __device__ __forceinline__ void stamp(Phase phase) {
    if (threadIdx.x != 0) return;
    const long long now = clock64();
    cycles[static_cast<int>(phase)] += static_cast<unsigned long long>(now - last);
    last = now;
  }

  // After end(): this CTA's record.
  __device__ __forceinline__ void finish() {
    __syncthreads();
    stamp(Phase::End);
    if (threadIdx.x != 0) return;
    for (int i = 0; i < kPhases; ++i) record->cycles[i] = cycles[i];
    record->clock_begin = static_cast<unsigned long long>(clock_begin);
    record->clock_end = static_cast<unsigned long long>(last);
    record->ns_begin = ns_begin;
    record->ns_end = global_nanoseconds();
  }
#else
  __device__ DeviceOps(PhaseRecord*, char* smem, const Layout& layout)
      : signals(region<unsigned long long>(smem, layout.signals)) {}
  __device__ __forceinline__ void stamp(Phase) {}
  __device__ __forceinline__ void finish() {}
#endif

  // The barrier after every phase, in two halves (program.h): the grid barrier's
  // (grid_barrier.cuh; target = k * CTAs at the k-th); in a cluster plan a CTA barrier (the
  // push, made in the phase, is the arrival) and the wait for the peers' pushes where the
  // phase pushed; where each CTA owns all the units of its rows (unit_tiles 1) a CTA barrier
  // for each half: what a phase writes, only its own CTA reads, and a CTA barrier orders its
  // threads' global as well as shared memory.
  __device__ __forceinline__ void arrive(const Tiling& t, unsigned long long* arrivals, unsigned long long& target) {
    if (t.unit_tiles == 1) {
      __syncthreads();
      return;
    }
    if (t.cluster > 0) {
      __syncthreads();
      stamp(Phase::Stores);
      return;
    }
    target += gridDim.x;
    grid_arrive(arrivals, [this] { stamp(Phase::Stores); });
  }

  __device__ __forceinline__ void wait(const Tiling& t, const unsigned long long* arrivals, unsigned long long target,
                                       const char* message) {
    stamp(Phase::Window);
    if (t.cluster > 0 && pushed) {
      exchange_wait(signals + exchanges % 2, exchanges / 2 % 2, message);
      ++exchanges;
      pushed = false;
    }
    if (t.unit_tiles == 1 || t.cluster > 0)
      __syncthreads();
    else
      grid_wait(arrivals, target, message);
    stamp(Phase::Barrier);
  }

  // A cluster's CTAs may push into each other's shared memory once all have begun (zeroed
  // their operand tiles, made their signals): a cluster barrier between begin() and the first
  // phase.
  __device__ __forceinline__ void begun(const Tiling& t) {
    if (t.cluster == 0) return;
    if (threadIdx.x == 0) exchange_init(signals);
    cluster_arrive();
    cluster_wait();
  }

  __device__ __forceinline__ int64_t buffer(int64_t s) const { return s & 1; }

  // program.h's push: st.async into the peer's shared memory (the same offset in its window),
  // completing on the peer's signal of this exchange: 16 bytes where a chunk is whole and
  // 16-byte aligned at both ends, else 4-byte words (pushed_units makes every slice whole
  // words; the planner, every slice start a word); store i by thread i, peers in rank order.
  // Thread 0 first arrives at this CTA's signal, expecting the peers' bytes.
  template <typename T>
  __device__ void push_rows(T* tile, int64_t ld, int64_t rows, int64_t segments, int64_t stride, int64_t H,
                            int64_t units, int64_t cluster, int64_t rank) {
    static_assert(sizeof(T) <= 4, "a push is made of 4-byte words (the kernels store fp32, fp16 and bf16)");
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    unsigned long long* signal = signals + exchanges % 2;
    if (threadIdx.x == 0) {
      const int64_t incoming = incoming_bytes(H, units, cluster, rank, rows, segments, sizeof(T));
      exchange_expect(signal, static_cast<unsigned>(incoming));
    }
    pushed = true;
    constexpr int kVector = 16 / sizeof(T), kWord = sizeof(T) < 4 ? 4 / sizeof(T) : 1;
    const int length = static_cast<int>(pushed_units(H, units, rank, sizeof(T)));
    const int first = static_cast<int>(rank * units);
    const int chunks = (length + kVector - 1) / kVector, width = static_cast<int>(segments) * chunks;
    const int per_peer = static_cast<int>(rows) * width, total = static_cast<int>(cluster - 1) * per_peer;
    for (int index = threadIdx.x; index < total; index += blockDim.x) {
      const int q = index / per_peer, i = index % per_peer;
      const unsigned peer = static_cast<unsigned>(q < rank ? q : q + 1);
      const int r = i / width, g = i % width / chunks, j = i % chunks * kVector;
      const T* from = tile + r * ld + g * stride + first + j;
      const unsigned to = peer_address(from, peer), at = peer_address(signal, peer);
      const int count = length - j < kVector ? length - j : kVector;
      if (count == kVector && reinterpret_cast<uintptr_t>(from) % 16 == 0 && to % 16 == 0) {
        exchange_store<16>(from, to, at);
      } else {
        for (int e = 0; e < count; e += kWord) exchange_store<4>(from + e, to + e * sizeof(T), at);
      }
    }
#else
    __trap();
#endif
  }

  // Asynchronous copies (cp.async, sm_80) of rows no other CTA writes during the kernel into
  // shared memory, in chunks of 16 bytes (the last of a row segment shorter), chunk i by
  // thread i: one 16-byte cp.async.cg (through L2) where source and destination are 16-byte
  // aligned; else 4-byte cp.async.ca pieces where both are 4-byte aligned (pairs of 2-byte
  // elements); else element by element (a 2-byte element alone, which cp.async cannot copy,
  // with a load and a store). They land by prefetched().
  template <typename T, typename Source>
  __device__ void prefetch_rows(T* dst, int64_t ld, int64_t rows, int64_t segments, int64_t dst_stride,
                                int64_t src_stride, int64_t length, const Source& source) {
    if (rows <= 0) return;
    constexpr int kVector = 16 / sizeof(T), kWord = sizeof(T) < 4 ? 4 / sizeof(T) : 1;
    const int chunks = (static_cast<int>(length) + kVector - 1) / kVector, per_row = static_cast<int>(segments) * chunks;
    const int total = static_cast<int>(rows) * per_row;
    auto aligned = [](const void* p, int bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; };
    for (int i = threadIdx.x; i < total; i += blockDim.x) {
      const int r = i / per_row, g = i % per_row / chunks, j = i % chunks * kVector;
      const T* row = source(r);
      if (row == nullptr) continue;
      const T* from = row + g * src_stride + j;
      T* to = dst + r * ld + g * dst_stride + j;
      const int width = static_cast<int>(length) - j < kVector ? static_cast<int>(length) - j : kVector;
      if (width == kVector && aligned(from, 16) && aligned(to, 16)) {
        copy_async<16, true>(to, from);
        continue;
      }
      for (int e = 0; e < width;) {
        if (kWord > 1 && e + kWord <= width && aligned(from + e, 4) && aligned(to + e, 4)) {
          copy_async<4, false>(to + e, from + e);
          e += kWord;
        } else {
          copy_async<sizeof(T), false>(to + e, from + e);
          ++e;
        }
      }
    }
  }

  // This thread's asynchronous copies have landed (a CTA barrier must follow before other
  // threads read them).
  __device__ __forceinline__ void prefetched() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_all;" ::: "memory");
#endif
  }

  // One cp.async of `kBytes` (through L2 only where `kGlobal`: .cg takes 16 bytes only);
  // a load and a store for 2 bytes, or before sm_80 (the persistent kernels need sm_80; this
  // keeps the other architectures' builds compiling).
  template <int kBytes, bool kGlobal, typename T>
  __device__ __forceinline__ void copy_async(T* to, const T* from) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    if constexpr (kBytes < 4) {
      *to = *from;
    } else {
      const unsigned address = shared_address(to);
      if constexpr (kGlobal)
        asm volatile("cp.async.cg.shared.global [%0], [%1], %2;" ::"r"(address), "l"(from), "n"(kBytes) : "memory");
      else
        asm volatile("cp.async.ca.shared.global [%0], [%1], %2;" ::"r"(address), "l"(from), "n"(kBytes) : "memory");
    }
#else
    for (int e = 0; e < kBytes / static_cast<int>(sizeof(T)); ++e) to[e] = from[e];
#endif
  }

  template <typename S>
  __device__ __forceinline__ S operand(S x) const {
    return tensor_core_operand(x);
  }

  // Tiles are small (well under 2^31 elements): 32-bit indices divide faster.
  template <typename F>
  __device__ __forceinline__ void for_each(int64_t rows, int64_t cols, const F& f) {
    const int total = static_cast<int>(rows * cols), width = static_cast<int>(cols);
    for (int i = threadIdx.x; i < total; i += blockDim.x) f(i / width, i % width);
  }

  __device__ __forceinline__ void sync(Sync) { __syncthreads(); }

  // Where a row segment is made of 16-byte vectors: one cp.async.cg (through L2) per vector
  // straight into shared memory, all in flight at once, landing by prefetched() (a vector
  // whose source or destination starts off 16 bytes: loaded and stored by its thread). Where the rows are not
  // made of vectors (H not a multiple of 8 / 4), element by element.
  template <typename S, typename Source>
  __device__ void copy_rows(S* dst, int64_t ld, int64_t rows, int64_t segments, int64_t dst_stride,
                            int64_t src_stride, int64_t length, const Source& source) {
    if (rows <= 0) return;
    constexpr int kVector = 16 / sizeof(S);
    if (length % kVector != 0 || src_stride % kVector != 0) {
      const int per_row = static_cast<int>(segments * length), total = static_cast<int>(rows) * per_row;
      for (int i = threadIdx.x; i < total; i += blockDim.x) {
        const int r = i / per_row, g = i % per_row / static_cast<int>(length), j = i % static_cast<int>(length);
        const S* row = source(r);
        if (row != nullptr) dst[r * ld + g * dst_stride + j] = load_coherent(row + g * src_stride + j);
      }
      return;
    }
    const int chunks = static_cast<int>(length / kVector), per_row = static_cast<int>(segments) * chunks;
    const int total = static_cast<int>(rows) * per_row;
    for (int i = threadIdx.x; i < total; i += blockDim.x) {
      const int r = i / per_row, g = i % per_row / chunks, chunk = i % chunks;
      const S* row = source(r);
      if (row == nullptr) continue;
      const S* from = row + g * src_stride + chunk * kVector;
      S* to = dst + r * ld + g * dst_stride + chunk * kVector;
      if (reinterpret_cast<uintptr_t>(from) % 16 == 0 && reinterpret_cast<uintptr_t>(to) % 16 == 0) {
        copy_async<16, true>(to, from);
      } else {
        for (int j = 0; j < kVector; ++j) to[j] = load_coherent(from + j);
      }
    }
  }

  // Warp `job % warps`: output tile `job % tiles`, K part `job / tiles` (program.h's contract;
  // host.h's HostOps::gemm takes the same parts and adds them up in the same order). A job's
  // MMAs alternate between two accumulators (even MMAs, odd MMAs), added up at its end: two
  // dependent chains of half the length, the same whether W is held or not. fp32: A (the W
  // tile) is stored TF32-rounded (operand()); B's fragment is rounded as it is loaded. The
  // products of a held W take its A fragments from registers (hold).
  template <typename S>
  __device__ __forceinline__ void gemm(float* acc, int64_t ld_acc, float* partials, int64_t partial_stride,
                                       const S* a, int64_t lda, const S* b, int64_t ldb, int64_t m0, int64_t m1,
                                       int64_t n, int64_t k0, int64_t k1, int64_t split) {
    static_assert(std::is_same_v<S, Storage>, "the products multiply the kernel's storage type");
    namespace wmma = nvcuda::wmma;
    const int warp = threadIdx.x / 32, warps = blockDim.x / 32;
    const int n_tiles = static_cast<int>(n / kTile), tiles = static_cast<int>((m1 - m0) / kTile) * n_tiles;
    const int steps = static_cast<int>((k1 - k0) / kTile), parts = static_cast<int>(split);
    auto output = [&](int part, int64_t m, int64_t c) {
      return (split > 1 ? partials + part * partial_stride : acc) + m * ld_acc + c;
    };
    if (a == held) {
      Accumulator sum[2];
#pragma unroll
      for (int f = 0; f < kHeldFragments; ++f) {
        if (f >= held_count) break;
        const int q = f % held_per_job, job = warp + f / held_per_job * warps, tile = job % tiles;
        const int64_t m = m0 + tile / n_tiles * kTile, c = tile % n_tiles * kTile;
        const Storage* operand = b + c * ldb + (job / tiles * held_per_job + q) * kK;
        if (q == 0) start(sum);
        // The chain of the job's MMA q, as the path below takes it (an index the unrolled loop
        // knows, so that sum stays in registers).
        if (q % 2 == 0)
          multiply(sum[0], fragments[f], operand, ldb);
        else
          multiply(sum[1], fragments[f], operand, ldb);
        if (q == held_per_job - 1) finish(sum, output(job / tiles, m, c), ld_acc);
      }
    } else {
      for (int job = warp; job < tiles * parts; job += warps) {
        const int tile = job % tiles, part = job / tiles;
        const int64_t m = m0 + tile / n_tiles * kTile, c = tile % n_tiles * kTile;
        const int64_t begin = part * steps / parts * kTile, end = (part + 1) * steps / parts * kTile;
        const S* row = a + m * lda + k0;
        auto step = [&](Accumulator& sum, int64_t k) {
          FragmentA fa;
          wmma::load_matrix_sync(fa, row + k, static_cast<unsigned>(lda));
          multiply(sum, fa, b + c * ldb + k, ldb);
        };
        Accumulator sum[2];
        start(sum);
        int64_t k = begin;
        for (; k + kK < end; k += 2 * kK) {
          step(sum[0], k);
          step(sum[1], k + kK);
        }
        if (k < end) step(sum[0], k);
        finish(sum, output(part, m, c), ld_acc);
      }
    }
    __syncthreads();
    if (split > 1) {
      const int rows = static_cast<int>(m1 - m0), width = static_cast<int>(n);
      for (int i = threadIdx.x; i < rows * width; i += blockDim.x) {
        const int64_t m = m0 + i / width, c = i % width;
        float total = 0.f;
        for (int part = 0; part < parts; ++part) total += partials[part * partial_stride + m * ld_acc + c];
        acc[m * ld_acc + c] = total;
      }
      __syncthreads();
    }
  }

  // program.h's hold: each warp loads the A fragments of its jobs of the products of `a` (the
  // shape of gemm's arguments; K's parts equal) into registers. The planner's held_fragments
  // keeps their count within kHeldFragments; a plan beyond it traps rather than multiply wrong.
  template <typename S>
  __device__ __forceinline__ void hold(const S* a, int64_t lda, int64_t m0, int64_t m1, int64_t n, int64_t k0,
                                       int64_t k1, int64_t split) {
    const int warp = threadIdx.x / 32, warps = blockDim.x / 32;
    const int n_tiles = static_cast<int>(n / kTile), tiles = static_cast<int>((m1 - m0) / kTile) * n_tiles;
    const int jobs = tiles * static_cast<int>(split);
    held_per_job = static_cast<int>((k1 - k0) / split / kK);
    held_count = (jobs > warp ? (jobs - warp + warps - 1) / warps : 0) * held_per_job;
    held = a;
    if (held_count > kHeldFragments || (k1 - k0) % (split * kTile) != 0) __trap();
#pragma unroll
    for (int f = 0; f < kHeldFragments; ++f) {
      if (f >= held_count) break;
      const int q = f % held_per_job, job = warp + f / held_per_job * warps, tile = job % tiles;
      const int64_t m = m0 + tile / n_tiles * kTile, k = k0 + (job / tiles * held_per_job + q) * kK;
      nvcuda::wmma::load_matrix_sync(fragments[f], a + m * lda + k, static_cast<unsigned>(lda));
    }
  }

 private:
  __device__ __forceinline__ static void start(Accumulator (&sum)[2]) {
    nvcuda::wmma::fill_fragment(sum[0], 0.f);
    nvcuda::wmma::fill_fragment(sum[1], 0.f);
  }

  // sum += a times the B fragment at b (fp32: rounded to TF32 as the tensor cores take it).
  __device__ __forceinline__ static void multiply(Accumulator& sum, const FragmentA& a, const Storage* b,
                                                  int64_t ldb) {
    FragmentB fb;
    nvcuda::wmma::load_matrix_sync(fb, b, static_cast<unsigned>(ldb));
    if constexpr (std::is_same_v<Storage, float>)
      for (int i = 0; i < fb.num_elements; ++i) fb.x[i] = tensor_core_operand(fb.x[i]);
    nvcuda::wmma::mma_sync(sum, a, fb, sum);
  }

  // A job's two chains added up (both accumulators have the same layout), stored.
  __device__ __forceinline__ static void finish(Accumulator (&sum)[2], float* out, int64_t ld) {
    for (int i = 0; i < sum[0].num_elements; ++i) sum[0].x[i] += sum[1].x[i];
    nvcuda::wmma::store_matrix_sync(out, sum[0], static_cast<unsigned>(ld), nvcuda::wmma::mem_row_major);
  }
};

// Every CTA runs begin, the phases of every walk step, end; the grid barrier separates the
// phases (none between begin and the first phase: begin writes only this CTA's shared
// memory), or a CTA barrier where each CTA has all the units of its rows (its phases read
// only what it wrote), or in a cluster plan the exchange (and once the cluster barrier, after
// begin: the peers push into the operand tiles begin zeroes; blockIdx.x % unit_tiles is the
// rank, the batch tile's CTAs one cluster). Between its arrival at the barrier and its wait a CTA does what no
// other CTA waits for (after_arrival). All CTAs reach every barrier: the trip counts depend
// only on T and the cell.
// `arrivals`: the barrier's counter, zero at the start; `times`: the phase records of a
// timed build (null otherwise).
template <typename S>
__global__ void __launch_bounds__(kThreads, 1)
    forward_kernel(const __grid_constant__ ForwardParams p, const __grid_constant__ Tiling t,
                   const __grid_constant__ Walk walk, unsigned long long* arrivals, PhaseRecord* times) {
  extern __shared__ __align__(128) char smem[];
  DeviceOps<S> ops(times, smem, t.fwd);
  ForwardCta<S, float> cta(p, t, walk, blockIdx.x, smem);
  unsigned long long target = 0;
  cta.begin(ops);
  ops.begun(t);
  for (int64_t s = 0; s < walk.T; ++s)
    for (int k = 0; k < cta.phases(); ++k) {
      cta.phase(ops, s, k);
      ops.arrive(t, arrivals, target);
      cta.after_arrival(ops, s, k);
      ops.wait(t, arrivals, target, RNNF_BARRIER_TIMEOUT_MESSAGE("persistent forward kernel"));
    }
  cta.end(ops);
  ops.finish();
}

template <typename S>
__global__ void __launch_bounds__(kThreads, 1)
    backward_kernel(const __grid_constant__ BackwardParams p, const __grid_constant__ Tiling t,
                    const __grid_constant__ Walk walk, unsigned long long* arrivals, PhaseRecord* times) {
  extern __shared__ __align__(128) char smem[];
  DeviceOps<S> ops(times, smem, t.bwd);
  BackwardCta<S, float> cta(p, t, walk, blockIdx.x, smem);
  unsigned long long target = 0;
  cta.begin(ops);
  ops.begun(t);
  for (int64_t s = walk.T - 1; s >= 0; --s)
    for (int k = 0; k < cta.phases(); ++k) {
      cta.phase(ops, s, k);
      ops.arrive(t, arrivals, target);
      cta.after_arrival(ops, s, k);
      ops.wait(t, arrivals, target, RNNF_BARRIER_TIMEOUT_MESSAGE("persistent backward kernel"));
    }
  cta.end(ops);
  ops.finish();
}

// What a launch needs to know about the current device and a kernel, asked once: the
// multiprocessor count, and the kernel's dynamic shared-memory limit raised once to the
// device's opt-in maximum (the attribute is per function and device, so setting it per
// launch to the plan's size would race between threads launching different plans).
inline int prepare_kernel(const void* kernel, int device) {
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, int> prepared;  // -> multiprocessors
  std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_pair(kernel, device);
  auto found = prepared.find(key);
  if (found != prepared.end()) return found->second;
  int sms = 0, optin = 0;
  RNNF_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  RNNF_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  RNNF_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, optin));
  prepared.emplace(key, sms);
  return sms;
}

// Launches `kernel` with `bytes` of shared memory per CTA: cooperatively where the plan has a
// grid barrier (the cooperative launch guarantees that all CTAs are resident at once, which
// the barrier needs), in clusters of t.cluster CTAs in a cluster plan (the hardware
// co-schedules a cluster's CTAs; clusters never wait for each other), as a plain launch where
// each CTA has every unit of its rows (its CTAs never wait for each other). Returns the reason
// when the GPU cannot run the plan (not enough co-resident CTAs, a refused cooperative launch
// under MPS, MIG or green contexts, no room for one cluster, a kernel without sm_90 code):
// nothing was launched and the caller runs stage 1. Any other error throws.
template <typename Kernel, typename Params>
const char* launch_persistent(Kernel kernel, const Params& p, const Tiling& t, int64_t bytes, bool backward,
                              cudaStream_t stream) {
  const Walk walk{p.T, p.B, p.reverse, p.kernel_batch_sizes, p.kernel_offsets};
  const bool cluster = t.cluster > 0, grid_barrier = t.unit_tiles > 1 && !cluster;
  int device = 0, per_sm = 0;
  RNNF_CUDA_CHECK(cudaGetDevice(&device));
  const int sms = prepare_kernel(reinterpret_cast<const void*>(kernel), device);
  RNNF_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, static_cast<size_t>(bytes)));
  if (grid_barrier && static_cast<int64_t>(per_sm) * sms < t.ctas()) return "fewer co-resident CTAs than the plan needs";
  const dim3 grid(static_cast<unsigned>(t.ctas())), block(kThreads);
  cudaLaunchConfig_t config{};
  cudaLaunchAttribute attribute{};
  if (cluster) {
    cudaFuncAttributes attributes{};
    RNNF_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
    // ptxVersion is the __CUDA_ARCH__ the kernel was compiled for (binaryVersion is the device's
    // where the driver compiled PTX for it).
    if (attributes.ptxVersion < 90 || attributes.binaryVersion < 90)
      return "this build's kernel has no sm_90 code, which clusters need";
    config.gridDim = grid;
    config.blockDim = block;
    config.dynamicSmemBytes = static_cast<size_t>(bytes);
    config.stream = stream;
    attribute.id = cudaLaunchAttributeClusterDimension;
    attribute.val.clusterDim.x = static_cast<unsigned>(t.cluster);
    attribute.val.clusterDim.y = attribute.val.clusterDim.z = 1;
    config.attrs = &attribute;
    config.numAttrs = 1;
    // Clusters of more than the portable 8 CTAs (sm_90: up to 16) only where the kernel allows
    // them. A device that refuses the attribute or the size (a MIG slice, another part) answers
    // with an error rather than no room: either way stage 1 runs instead.
    int clusters = 0;
    const bool allowed = t.cluster <= 8 ||
                         cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) == cudaSuccess;
    if (!allowed || cudaOccupancyMaxActiveClusters(&clusters, kernel, &config) != cudaSuccess) {
      cudaGetLastError();
      return "the GPU cannot run clusters of this plan's size";
    }
    if (clusters < 1) return "the GPU cannot co-schedule one cluster of the plan";
  }
  // The grid barrier's counter, cleared on the stream; the lock held until the launch is enqueued.
  cuda::BarrierLaunch barrier{{}, nullptr};
  if (grid_barrier) barrier = cuda::prepare_barrier(device, stream);
  PhaseRecord* times = nullptr;
#if defined(RNNFUSED_PHASE_TIMING)
  times = cuda::phase_records(device, backward, t.ctas());
#else
  (void)backward;
#endif
  void* args[] = {const_cast<Params*>(&p), const_cast<Tiling*>(&t), const_cast<Walk*>(&walk), &barrier.arrivals,
                  &times};
  cudaError_t err;
  if (cluster)
    err = cudaLaunchKernelExC(&config, reinterpret_cast<const void*>(kernel), args);
  else if (grid_barrier)
    err = cudaLaunchCooperativeKernel(reinterpret_cast<void*>(kernel), grid, block, args, static_cast<size_t>(bytes), stream);
  else
    err = cudaLaunchKernel(reinterpret_cast<void*>(kernel), grid, block, args, static_cast<size_t>(bytes), stream);
  if (grid_barrier &&
      (err == cudaErrorCooperativeLaunchTooLarge || err == cudaErrorNotSupported || err == cudaErrorNotPermitted)) {
    cudaGetLastError();
    return "the GPU refused the cooperative launch";
  }
  RNNF_CUDA_CHECK(err);
#if defined(RNNFUSED_PHASE_TIMING)
  cuda::phase_records_launched(device, backward, t.ctas(), p.T, p.cell == Cell::GRU_CHO ? 2 : 1);
#endif
  return nullptr;
}

template <typename S>
const char* launch_forward(const ForwardParams& p, cudaStream_t stream) {
  return launch_persistent(forward_kernel<S>, p, *p.tiling, p.tiling->fwd.bytes, false, stream);
}

template <typename S>
const char* launch_backward(const BackwardParams& p, cudaStream_t stream) {
  return launch_persistent(backward_kernel<S>, p, *p.tiling, p.tiling->bwd.bytes, true, stream);
}

}  // namespace persistent
}  // namespace rnnfused
