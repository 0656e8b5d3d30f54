// Host-side state of the persistent kernels shared by every dtype's launches (rnn_cuda.h):
// the grid barrier's counters.
#include <cuda_runtime.h>

#include <map>
#include <mutex>
#include <utility>

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

}  // namespace cuda
}  // namespace rnnfused
