// A microbenchmark of the two barriers a persistent recurrence can step with (for
// python -m bench.barrier and make gpu-check): the grid-wide barrier of a cooperative
// launch (what csrc/persistent uses) and the hardware barrier of a thread-block cluster
// (sm_90; the alternative exchange policy of ../shared/PERSISTENT.md).
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <string>

#include "check.h"
#include "rnn_cuda.h"

namespace rnnfused {
namespace cuda {
namespace {

__global__ void grid_barriers(int iterations) {
  cooperative_groups::grid_group grid = cooperative_groups::this_grid();
  for (int i = 0; i < iterations; ++i) grid.sync();
}

__global__ void cluster_barriers(int iterations) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  cooperative_groups::cluster_group cluster = cooperative_groups::this_cluster();
  for (int i = 0; i < iterations; ++i) cluster.sync();
#endif
}

}  // namespace

double barrier_microseconds(const std::string& kind, int ctas, int cluster, int iterations, cudaStream_t stream) {
  cudaEvent_t start, stop;
  RNNF_CUDA_CHECK(cudaEventCreate(&start));
  RNNF_CUDA_CHECK(cudaEventCreate(&stop));
  RNNF_CUDA_CHECK(cudaEventRecord(start, stream));
  if (kind == "grid") {
    void* args[] = {&iterations};
    RNNF_CUDA_CHECK(cudaLaunchCooperativeKernel(reinterpret_cast<void*>(grid_barriers), dim3(ctas), dim3(128), args,
                                                0, stream));
  } else if (kind == "cluster") {
    cudaLaunchConfig_t config{};
    config.gridDim = dim3(ctas);
    config.blockDim = dim3(128);
    config.stream = stream;
    cudaLaunchAttribute attribute{};
    attribute.id = cudaLaunchAttributeClusterDimension;
    attribute.val.clusterDim.x = static_cast<unsigned>(cluster);
    attribute.val.clusterDim.y = attribute.val.clusterDim.z = 1;
    config.attrs = &attribute;
    config.numAttrs = 1;
    RNNF_CUDA_CHECK(cudaLaunchKernelEx(&config, cluster_barriers, iterations));
  } else {
    throw std::invalid_argument("rnnfused: barrier kind must be grid or cluster");
  }
  RNNF_CUDA_CHECK(cudaGetLastError());
  RNNF_CUDA_CHECK(cudaEventRecord(stop, stream));
  RNNF_CUDA_CHECK(cudaEventSynchronize(stop));
  float ms = 0;
  RNNF_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
  RNNF_CUDA_CHECK(cudaEventDestroy(start));
  RNNF_CUDA_CHECK(cudaEventDestroy(stop));
  return ms * 1e3 / iterations;
}

}  // namespace cuda
}  // namespace rnnfused
