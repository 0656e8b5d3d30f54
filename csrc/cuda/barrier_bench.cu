// A microbenchmark of the barriers a persistent recurrence can step with (for
// python -m bench.barrier and make gpu-check): cooperative groups' grid-wide barrier, the
// persistent kernels' own bounded grid barrier on a counter (persistent/grid_barrier.cuh,
// what csrc/persistent uses), both in a cooperative launch, the hardware barrier of a
// thread-block cluster (sm_90; the alternative exchange policy of ../shared/PERSISTENT.md), and
// the exchange of the cluster plans (grid_barrier.cuh): every CTA pushes `payload` bytes into
// each peer and waits for its peers' on its own mbarrier (16 bytes: the exchange's latency;
// kilobytes: the SM-to-SM network's bandwidth too).
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "../persistent/grid_barrier.cuh"
#include "check.h"
#include "rnn_cuda.h"

namespace rnnfused {
namespace cuda {
namespace {

__global__ void grid_barriers(int iterations) {
  cooperative_groups::grid_group grid = cooperative_groups::this_grid();
  for (int i = 0; i < iterations; ++i) grid.sync();
}

__global__ void counter_barriers(int iterations, unsigned long long* arrivals) {
  unsigned long long target = 0;
  for (int i = 0; i < iterations; ++i) {
    target += gridDim.x;
    persistent::grid_barrier(arrivals, target, RNNF_BARRIER_TIMEOUT_MESSAGE("barrier microbenchmark"), [] {});
  }
}

__global__ void cluster_barriers(int iterations) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  cooperative_groups::cluster_group cluster = cooperative_groups::this_cluster();
  for (int i = 0; i < iterations; ++i) cluster.sync();
#endif
}

// `vectors` 16-byte pieces from every CTA into each peer per exchange: the slots of source
// rank r are slots[r * vectors, (r + 1) * vectors) in every CTA.
__global__ void cluster_exchanges(int iterations, int vectors) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  __shared__ unsigned long long signals[2];
  extern __shared__ uint4 slots[];
  cooperative_groups::cluster_group cluster = cooperative_groups::this_cluster();
  const unsigned rank = cluster.block_rank(), size = cluster.num_blocks();
  if (threadIdx.x == 0) persistent::exchange_init(signals);
  for (int j = threadIdx.x; j < vectors * static_cast<int>(size); j += blockDim.x) slots[j] = make_uint4(rank, j, 0, 0);
  cluster.sync();
  uint4* own = slots + rank * vectors;
  for (int i = 0; i < iterations; ++i) {
    unsigned long long* signal = signals + i % 2;
    if (threadIdx.x == 0) persistent::exchange_expect(signal, 16u * vectors * (size - 1));
    for (int j = threadIdx.x; j < vectors * static_cast<int>(size); j += blockDim.x) {
      const unsigned peer = static_cast<unsigned>(j / vectors);
      if (peer != rank)
        persistent::exchange_store<16>(own + j % vectors, persistent::peer_address(own + j % vectors, peer),
                                       persistent::peer_address(signal, peer));
    }
    persistent::exchange_wait(signal, i / 2 % 2, RNNF_BARRIER_TIMEOUT_MESSAGE("barrier microbenchmark"));
    __syncthreads();
  }
  cluster.sync();
#endif
}

// A cluster kind's launch: clusters of `cluster` blocks (up to sm_90's 16, beyond the portable
// 8); the exchange with one block per SM, as the persistent kernels run (more than half an
// SM's shared memory each), so that every push crosses the SM-to-SM network.
struct ClusterLaunch {
  const void* kernel = nullptr;
  cudaLaunchConfig_t config{};
  cudaLaunchAttribute attribute{};
};

void prepare_cluster_launch(ClusterLaunch& launch, const std::string& kind, int cluster, int payload) {
  int device = 0, optin = 0;
  RNNF_CUDA_CHECK(cudaGetDevice(&device));
  RNNF_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  // What a block's dynamic shared memory may be: the opt-in limit less a margin for the
  // kernels' static shared memory (the exchange's two mbarriers), which counts against it.
  const int dynamic_limit = optin - 64;
  const int64_t slot_bytes = static_cast<int64_t>(payload) * cluster;
  if (kind == "exchange" && (payload < 16 || payload % 16 != 0 || slot_bytes > dynamic_limit))
    throw std::invalid_argument("rnnfused: an exchange's payload must be a multiple of 16 bytes, within the " +
                                std::to_string(dynamic_limit) +
                                " bytes of shared memory a block may have over the cluster, "
                                "got " + std::to_string(payload) + " bytes from each of " + std::to_string(cluster) +
                                " blocks");
  cudaLaunchConfig_t& config = launch.config;
  config.blockDim = dim3(128);
  launch.attribute.id = cudaLaunchAttributeClusterDimension;
  launch.attribute.val.clusterDim.x = static_cast<unsigned>(cluster);
  launch.attribute.val.clusterDim.y = launch.attribute.val.clusterDim.z = 1;
  config.attrs = &launch.attribute;
  config.numAttrs = 1;
  launch.kernel = kind == "cluster" ? reinterpret_cast<const void*>(cluster_barriers)
                                    : reinterpret_cast<const void*>(cluster_exchanges);
  RNNF_CUDA_CHECK(cudaFuncSetAttribute(launch.kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
  if (kind == "exchange") {
    RNNF_CUDA_CHECK(cudaFuncSetAttribute(launch.kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, dynamic_limit));
    config.dynamicSmemBytes = static_cast<size_t>(std::max<int64_t>(slot_bytes, optin / 2 + 1024));
  }
}

int max_active_clusters(const ClusterLaunch& launch) {
  int clusters = 0;
  RNNF_CUDA_CHECK(cudaOccupancyMaxActiveClusters(&clusters, launch.kernel, &launch.config));
  return clusters;
}

void check_kind(const std::string& kind) {
  if (kind != "grid" && kind != "counter" && kind != "cluster" && kind != "exchange")
    throw std::invalid_argument("rnnfused: barrier kind must be grid, counter, cluster or exchange");
}

}  // namespace

int co_resident_clusters(const std::string& kind, int cluster, int payload) {
  check_kind(kind);
  if (kind != "cluster" && kind != "exchange") throw std::invalid_argument("rnnfused: " + kind + " has no clusters");
  ClusterLaunch launch;
  prepare_cluster_launch(launch, kind, cluster, payload);
  return max_active_clusters(launch);
}

double barrier_microseconds(const std::string& kind, int ctas, int cluster, int iterations, int payload,
                            cudaStream_t stream) {
  check_kind(kind);
  if (iterations < 1) throw std::invalid_argument("rnnfused: a barrier microbenchmark needs at least one iteration");
  ClusterLaunch launch;
  if (kind == "cluster" || kind == "exchange") {
    prepare_cluster_launch(launch, kind, cluster, payload);
    // Clusters that are not all resident at once would run in waves, timing several exchanges
    // as one.
    const int resident = max_active_clusters(launch);
    if (ctas % cluster != 0 || ctas / cluster > resident)
      throw std::invalid_argument("rnnfused: " + std::to_string(ctas) + " blocks are not whole clusters of " +
                                  std::to_string(cluster) + " or more than the " + std::to_string(resident) +
                                  " clusters this GPU runs at once (co_resident_clusters)");
    launch.config.gridDim = dim3(ctas);
    launch.config.stream = stream;
  }
  BarrierLaunch barrier{{}, nullptr};
  if (kind == "counter") {  // cleared before the timed region, as before a persistent launch
    int device = 0;
    RNNF_CUDA_CHECK(cudaGetDevice(&device));
    barrier = prepare_barrier(device, stream);
  }
  unsigned long long* arrivals = barrier.arrivals;
  cudaEvent_t start, stop;
  RNNF_CUDA_CHECK(cudaEventCreate(&start));
  RNNF_CUDA_CHECK(cudaEventCreate(&stop));
  RNNF_CUDA_CHECK(cudaEventRecord(start, stream));
  if (kind == "grid") {
    void* args[] = {&iterations};
    RNNF_CUDA_CHECK(cudaLaunchCooperativeKernel(reinterpret_cast<void*>(grid_barriers), dim3(ctas), dim3(128), args,
                                                0, stream));
  } else if (kind == "counter") {
    void* args[] = {&iterations, &arrivals};
    RNNF_CUDA_CHECK(cudaLaunchCooperativeKernel(reinterpret_cast<void*>(counter_barriers), dim3(ctas), dim3(128), args,
                                                0, stream));
  } else if (kind == "cluster") {
    RNNF_CUDA_CHECK(cudaLaunchKernelEx(&launch.config, cluster_barriers, iterations));
  } else {
    RNNF_CUDA_CHECK(cudaLaunchKernelEx(&launch.config, cluster_exchanges, iterations, payload / 16));
  }
  RNNF_CUDA_CHECK(cudaGetLastError());
  if (barrier.lock.owns_lock()) barrier.lock.unlock();  // enqueued: other launches may follow
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
