// CUDA entry points: one layer, one direction (see params.h for the contract).
// All work is enqueued on ctx.stream; matmuls use ctx.blas (torch's handle for that stream).
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <mutex>
#include <string>
#include <vector>

#include "../params.h"
#include "../persistent/timing.h"

namespace rnnfused {
namespace cuda {

struct Context {
  cudaStream_t stream;
  cublasHandle_t blas;
};

// Both return null, or why the persistent kernel asked for in p.tiling could not be
// launched (stage 1 then ran in its place).
const char* run(const ForwardParams& p, DType dtype, const Context& ctx);
const char* run(const BackwardParams& p, DType dtype, const Context& ctx);

// Whether torch allows TF32 for fp32 matmuls (the math mode torch put on its handle).
bool tf32_allowed(cublasHandle_t handle);

// Registers, local memory (spills) and shared memory of every persistent kernel.
struct KernelInfo {
  std::string name;
  int registers;
  size_t local_bytes, static_shared_bytes;
};
std::vector<KernelInfo> persistent_kernel_info();

// One launch of `ctas` blocks that pass `iterations` barriers of `kind` ("grid": cooperative
// groups' grid.sync(); "counter": the persistent kernels' own bounded grid barrier,
// persistent/grid_barrier.cuh; "cluster": the cluster barrier, clusters of `cluster` blocks,
// sm_90, up to 16; "exchange": the cluster plans' exchange, `payload` bytes from every block
// into each peer, one block per SM): microseconds per barrier, launch included. A cluster
// kind's `ctas` must be whole clusters, at most co_resident_clusters of them.
double barrier_microseconds(const std::string& kind, int ctas, int cluster, int iterations, int payload,
                            cudaStream_t stream);
// How many clusters of `cluster` blocks of that kind's launch the GPU runs at once.
int co_resident_clusters(const std::string& kind, int cluster, int payload);

// The arrival counter of the grid barrier (persistent/grid_barrier.cuh) for the next launch on
// `stream` of `device`, already cleared on the stream, and a lock to hold until that launch
// is enqueued. Launches on one stream run one after another and share one counter; the lock
// keeps two host threads that launch on one stream from interleaving their clears and
// launches (a kernel would start on the other's count). Kernels on different streams may run
// at once and get different counters. A launch captured into a CUDA graph gets a counter of
// its own (the graph may later run on any stream, next to other launches; its clear is
// captured with it). Counters are never freed: 8 bytes per stream and per captured launch.
struct BarrierLaunch {
  std::unique_lock<std::mutex> lock;
  unsigned long long* arrivals;
};
BarrierLaunch prepare_barrier(int device, cudaStream_t stream);

// Per-phase timing (builds with RNNFUSED_PHASE_TIMING; python -m bench.phases): where the next
// persistent launch of `device` writes its per-CTA records; what a launch that was enqueued
// is (only those count, so a refused launch leaves the last record as it was); and a copy of
// the last forward or backward launch's records (after synchronizing the device). Other
// builds throw.
struct PhaseTimes {
  int64_t launches = 0;         // timed launches of this direction so far on the device
  int64_t steps = 0;            // of the last one
  int64_t phases_per_step = 0;  // barriers per step (2 for GRU_CHO)
  std::vector<persistent::PhaseRecord> ctas;
};
persistent::PhaseRecord* phase_records(int device, bool backward, int64_t ctas);
void phase_records_launched(int device, bool backward, int64_t ctas, int64_t steps, int64_t phases_per_step);
PhaseTimes last_phase_times(bool backward);

// The compute capabilities this build has device code for, e.g. "8.0, 9.0".
const char* compiled_archs();

// Instantiated once per storage dtype in rnn_<dtype>.cu.
template <typename S>
const char* forward_typed(const ForwardParams& p, const Context& ctx);
template <typename S>
const char* backward_typed(const BackwardParams& p, const Context& ctx);
template <typename S>
KernelInfo persistent_kernel_info_typed(bool backward);

}  // namespace cuda
}  // namespace rnnfused
