// Host-side state of the persistent kernels shared by every dtype's launches (rnn_cuda.h):
// the grid barrier's counters, and the per-phase timing records of a timed build.
#include <cuda_runtime.h>

#include <map>
#include <mutex>
#include <stdexcept>
#include <utility>
#include <vector>

#include "check.h"
#include "rnn_cuda.h"

namespace rnnfused {
namespace cuda {
namespace {

// cudaMalloc while this thread captures a CUDA graph: allowed in relaxed capture mode only
// (torch captures in global mode), so switch for the call.
void* allocate_while_maybe_capturing(size_t bytes) {
  cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
  RNNF_CUDA_CHECK(cudaThreadExchangeStreamCaptureMode(&mode));
  void* memory = nullptr;
  const cudaError_t err = cudaMalloc(&memory, bytes);
  RNNF_CUDA_CHECK(cudaThreadExchangeStreamCaptureMode(&mode));
  RNNF_CUDA_CHECK(err);
  return memory;
}

}  // namespace

BarrierLaunch prepare_barrier(int device, cudaStream_t stream) {
  constexpr size_t kPerBlock = 512;  // counters per cudaMalloc (4 KB)
  static std::mutex mutex;
  static std::map<std::pair<int, cudaStream_t>, unsigned long long*> by_stream;
  static std::map<int, std::pair<unsigned long long*, size_t>> spare;  // device -> (next, left)
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  RNNF_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  std::unique_lock<std::mutex> lock(mutex);
  const auto key = std::make_pair(device, stream);
  unsigned long long* counter = nullptr;
  auto found = by_stream.find(key);
  if (capture == cudaStreamCaptureStatusNone && found != by_stream.end()) {
    counter = found->second;
  } else {
    auto& [next, left] = spare[device];
    if (left == 0) {
      next = static_cast<unsigned long long*>(allocate_while_maybe_capturing(kPerBlock * sizeof(unsigned long long)));
      left = kPerBlock;
    }
    counter = next++;
    --left;
    if (capture == cudaStreamCaptureStatusNone) by_stream.emplace(key, counter);
  }
  RNNF_CUDA_CHECK(cudaMemsetAsync(counter, 0, sizeof(*counter), stream));
  return {std::move(lock), counter};
}

#if defined(RNNFUSED_PHASE_TIMING)
namespace {

struct TimedLaunches {
  persistent::PhaseRecord* records = nullptr;  // device memory
  size_t capacity = 0;                         // records
  PhaseTimes last;                             // what the last launch was (ctas left empty)
  int64_t ctas = 0;
};

std::mutex timing_mutex;
std::map<std::pair<int, bool>, TimedLaunches> timed;  // (device, backward) ->

}  // namespace

persistent::PhaseRecord* phase_records(int device, bool backward, int64_t ctas) {
  std::lock_guard<std::mutex> lock(timing_mutex);
  TimedLaunches& launches = timed[std::make_pair(device, backward)];
  if (launches.capacity < static_cast<size_t>(ctas)) {
    if (launches.records) RNNF_CUDA_CHECK(cudaFree(launches.records));
    launches.records = static_cast<persistent::PhaseRecord*>(
        allocate_while_maybe_capturing(static_cast<size_t>(ctas) * sizeof(persistent::PhaseRecord)));
    launches.capacity = static_cast<size_t>(ctas);
  }
  return launches.records;
}

void phase_records_launched(int device, bool backward, int64_t ctas, int64_t steps, int64_t phases_per_step) {
  std::lock_guard<std::mutex> lock(timing_mutex);
  TimedLaunches& launches = timed[std::make_pair(device, backward)];
  ++launches.last.launches;
  launches.last.steps = steps;
  launches.last.phases_per_step = phases_per_step;
  launches.ctas = ctas;
}

PhaseTimes last_phase_times(bool backward) {
  int device = 0;
  RNNF_CUDA_CHECK(cudaGetDevice(&device));
  RNNF_CUDA_CHECK(cudaDeviceSynchronize());
  std::lock_guard<std::mutex> lock(timing_mutex);
  PhaseTimes out;
  auto found = timed.find(std::make_pair(device, backward));
  if (found == timed.end()) return out;
  out = found->second.last;
  out.ctas.resize(static_cast<size_t>(found->second.ctas));
  RNNF_CUDA_CHECK(cudaMemcpy(out.ctas.data(), found->second.records, out.ctas.size() * sizeof(persistent::PhaseRecord),
                             cudaMemcpyDeviceToHost));
  return out;
}
#else
persistent::PhaseRecord* phase_records(int, bool, int64_t) {
  throw std::logic_error("rnnfused: built without RNNFUSED_PHASE_TIMING");
}

void phase_records_launched(int, bool, int64_t, int64_t, int64_t) {
  throw std::logic_error("rnnfused: built without RNNFUSED_PHASE_TIMING");
}

PhaseTimes last_phase_times(bool) {
  throw std::runtime_error("rnnfused: this build has no phase timer; rebuild with RNNFUSED_PHASE_TIMING=1 "
                           "(python -m bench.phases)");
}
#endif

}  // namespace cuda
}  // namespace rnnfused
