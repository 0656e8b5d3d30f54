// See kernel_choice.h.
#include "kernel_choice.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <set>
#include <tuple>

#ifdef RNNFUSED_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>

#include "cuda/rnn_cuda.h"
#endif

namespace rnnfused {
namespace {

std::mutex verified_mutex;
std::set<int64_t> verified_architectures;

}  // namespace

KernelChoice with_steps_options(KernelChoice choice, bool step_flags, bool masks) {
  if (!choice.plan.persistent || choice.plan.tiling.cpu_threads) return choice;
  if (step_flags)
    return {"stepwise", "resets and lengths run the stepwise kernels (the persistent kernel has no step flags)", {}};
  if (masks)
    return {"stepwise", "recurrent dropout and zoneout run the stepwise kernels (the persistent kernel has no masks)", {}};
  return choice;
}

void set_verified_architectures(const std::vector<int64_t>& compute_capabilities) {
  std::lock_guard<std::mutex> lock(verified_mutex);
  verified_architectures = std::set<int64_t>(compute_capabilities.begin(), compute_capabilities.end());
}

bool verified_on(int compute_capability) {
  std::lock_guard<std::mutex> lock(verified_mutex);
  return verified_architectures.count(compute_capability) > 0;
}

std::string kernel_setting() {
  const char* value = std::getenv("RNNFUSED_KERNEL");
  const std::string setting = value && *value ? value : "auto";
  TORCH_CHECK_VALUE(setting == "auto" || setting == "cudnn" || setting == "ours" || setting == "stepwise" ||
                        setting == "persistent" || setting == "simulate",
                    "rnnfused: RNNFUSED_KERNEL must be auto, cudnn, ours, stepwise, persistent or simulate, got '",
                    setting, "'");
  return setting;
}

namespace {

// The device the persistent kernel would run on; RNNFUSED_PERSISTENT_SMS and
// RNNFUSED_PERSISTENT_SMEM_KB override its multiprocessor count and shared memory per block
// (to plan for another GPU, e.g. an A100's 108 and 163, or to provoke a refused launch in a
// test); RNNFUSED_PERSISTENT_SPREAD=1 plans by stage 2's rule, the units spread over the SMs,
// RNNFUSED_PERSISTENT_TILING=ROWSxUNITS forces a tiling (plan.h), and
// RNNFUSED_PERSISTENT_CLUSTERS=0 leaves out the thread-block cluster plans of sm_90 (to
// compare them with the grid barrier's; =n allows clusters of at most n CTAs, e.g. 8 to leave
// out the non-portable 16), RNNFUSED_PERSISTENT_HELD_W=0 keeps W in shared memory
// only (to compare with W in registers). The CPU's host simulation plans for an H100.
persistent::DeviceLimits device_limits(const at::Device& device) {
  persistent::DeviceLimits limits = persistent::h100_limits();
  limits.host_simulation = device.is_cpu();
#ifdef RNNFUSED_WITH_CUDA
  if (device.is_cuda()) {
    const cudaDeviceProp* properties = at::cuda::getDeviceProperties(device.index());
    limits.sm_count = properties->multiProcessorCount;
    limits.smem_per_block = static_cast<int64_t>(properties->sharedMemPerBlockOptin);
    limits.compute_capability = properties->major * 10 + properties->minor;
    limits.cooperative_launch = properties->cooperativeLaunch != 0;
    limits.max_cluster = limits.compute_capability >= 90 ? 16 : 0;
  }
#endif
  if (const char* clusters = std::getenv("RNNFUSED_PERSISTENT_CLUSTERS"); clusters && *clusters) {
    char* end = nullptr;
    const long long most = std::strtoll(clusters, &end, 10);
    TORCH_CHECK_VALUE(*end == 0 && most >= 0, "rnnfused: RNNFUSED_PERSISTENT_CLUSTERS must be the most CTAs a "
                      "cluster may have (0: no clusters), got '", clusters, "'");
    limits.max_cluster = std::min<int64_t>(limits.max_cluster, most);
  }
  if (const char* held = std::getenv("RNNFUSED_PERSISTENT_HELD_W"); held && std::string(held) == "0")
    limits.hold_weights = false;
  if (const char* sms = std::getenv("RNNFUSED_PERSISTENT_SMS")) limits.sm_count = std::atoll(sms);
  if (const char* kb = std::getenv("RNNFUSED_PERSISTENT_SMEM_KB")) limits.smem_per_block = std::atoll(kb) * 1024;
  if (const char* spread = std::getenv("RNNFUSED_PERSISTENT_SPREAD")) limits.spread_units = std::string(spread) == "1";
  if (const char* tiling = std::getenv("RNNFUSED_PERSISTENT_TILING"); tiling && *tiling) {
    long long rows = 0, units = 0;
    char end = 0;
    TORCH_CHECK_VALUE(std::sscanf(tiling, "%lldx%lld%c", &rows, &units, &end) == 2 && rows > 0 && units > 0,
                      "rnnfused: RNNFUSED_PERSISTENT_TILING must be ROWSxUNITS (batch rows and hidden units per CTA, "
                      "e.g. 16x32), got '", tiling, "'");
    limits.forced_rows = rows;
    limits.forced_units = units;
  }
  return limits;
}

// make_plan compares tens of tilings, 20-40 us of a CPU core at H128-512 (_C.plan, fp16, H100
// limits), and the GPU path asks for the plan in every forward and backward of every layer
// direction: plans are made once per question and kept. The key is every argument and every
// field of the limits (the structured binding stops compiling when DeviceLimits gains a field,
// which must then join the key); the map is emptied when it grows past kPlansKept (a batch size
// that changes every call).
persistent::Plan kept_plan(Cell cell, int64_t H, int64_t P, int64_t B, DType dtype, bool tf32,
                           const persistent::DeviceLimits& limits, persistent::PlanFor use) {
  const auto& [sm_count, smem_per_block, compute_capability, cooperative_launch, host_simulation, spread_units,
               forced_rows, forced_units, max_cluster, hold_weights, side_by_side] = limits;
  using Key = std::tuple<int, int64_t, int64_t, int64_t, int, bool, int, int64_t, int64_t, int, bool, bool, bool,
                         int64_t, int64_t, int64_t, bool, int64_t>;
  const Key key{static_cast<int>(cell), H, P, B, static_cast<int>(dtype), tf32, static_cast<int>(use),
                sm_count, smem_per_block, compute_capability, cooperative_launch, host_simulation, spread_units,
                forced_rows, forced_units, max_cluster, hold_weights, side_by_side};
  constexpr size_t kPlansKept = 4096;
  static std::mutex mutex;
  static std::map<Key, persistent::Plan> plans;
  {
    std::lock_guard<std::mutex> lock(mutex);
    if (auto found = plans.find(key); found != plans.end()) return found->second;
  }
  persistent::Plan plan = persistent::make_plan(cell, H, P, B, dtype, tf32, limits, use);
  std::lock_guard<std::mutex> lock(mutex);
  if (plans.size() >= kPlansKept) plans.clear();
  plans.emplace(key, plan);
  return plan;
}

KernelChoice stepwise(std::string reason) {
  return {"stepwise", std::move(reason), {}};
}

// Whether the GPU's float32 products may use TF32 (torch's matmul precision setting).
bool tf32_products(DType dtype) {
#ifdef RNNFUSED_WITH_CUDA
  return dtype == DType::Float32 && cuda::tf32_allowed(at::cuda::getCurrentCUDABlasHandle());
#else
  return false;
#endif
}

}  // namespace

KernelChoice choose_kernel(Cell cell, int64_t T, int64_t H, int64_t P, int64_t B, DType dtype,
                           const at::Device& device, int64_t side_by_side, persistent::PlanFor use) {
  const std::string setting = kernel_setting();
  if (setting == "stepwise") return stepwise("RNNFUSED_KERNEL=stepwise");
  // The device the persistent plans are for, shared by the recurrences side by side.
  auto limits_for = [&] {
    persistent::DeviceLimits limits = device_limits(device);
    limits.side_by_side = side_by_side;
    return limits;
  };
  if (device.is_cpu()) {
    if (setting == "simulate") {
      persistent::Plan plan = kept_plan(cell, H, P, B, dtype, dtype == DType::Float32, limits_for(), use);
      if (!plan.persistent) return stepwise(plan.reason);
      return {"persistent (host simulation)", plan.reason, plan};
    }
    persistent::Plan plan = persistent::make_cpu_plan(cell, T, H, P, B, dtype, at::get_num_threads());
    if (setting == "persistent") {
      TORCH_CHECK(plan.persistent, "rnnfused: RNNFUSED_KERNEL=persistent but this layer cannot run persistent (",
                  plan.reason, ")");
      return {"persistent", plan.reason, plan};
    }
    if (!plan.persistent) return stepwise(plan.reason);
    return {"persistent", plan.reason, plan};
  }
  if (!device.is_cuda()) return stepwise("no recurrent kernels for device " + device.str());
  TORCH_CHECK(setting != "simulate", "rnnfused: RNNFUSED_KERNEL=simulate is the CPU test harness; on a GPU use "
              "RNNFUSED_KERNEL=persistent");
  const persistent::DeviceLimits limits = limits_for();
  persistent::Plan plan = kept_plan(cell, H, P, B, dtype, tf32_products(dtype), limits, use);
  if (setting == "persistent") {
    TORCH_CHECK(plan.persistent, "rnnfused: RNNFUSED_KERNEL=persistent but this layer cannot run persistent (",
                plan.reason, ")");
    return {"persistent", plan.reason, plan};
  }
  const int cc = limits.compute_capability;
  if (setting != "ours" && !verified_on(cc))
    return stepwise("the persistent kernel of this build has not passed its GPU tests on compute capability " +
                    std::to_string(cc / 10) + "." + std::to_string(cc % 10) +
                    " (rnnfused/gpu_verified.json; RNNFUSED_KERNEL=ours or persistent forces it; its plan here: " +
                    plan.reason + ")");
  if (!plan.persistent) return stepwise(plan.reason);
  return {"persistent", plan.reason, plan};
}

persistent::PipelinePlan choose_pipeline(Cell cell, int64_t T, int64_t layers, int64_t H, int64_t P, int64_t B,
                                         DType dtype, const at::Device& device, bool step_flags,
                                         persistent::PlanFor use) {
  persistent::PipelinePlan layered;
  if (!device.is_cuda()) {
    layered.reason = "layer after layer: off the GPU the slices would run one after another";
    return layered;
  }
  const KernelChoice alone =
      with_steps_options(choose_kernel(cell, T, H, P, B, dtype, device, 1, use), step_flags, false);
  if (!alone.plan.persistent) {  // the model does not estimate the stepwise kernels
    layered.reason = "layer after layer: " + alone.reason;
    return layered;
  }
  return persistent::plan_pipeline(cell, T, layers, H, P, B, dtype, tf32_products(dtype), device_limits(device), use);
}

}  // namespace rnnfused
