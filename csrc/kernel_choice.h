// Which of our kernels runs the recurrence of a layer direction: the stepwise kernels (stage 1)
// or the persistent kernel (stage 2, csrc/persistent/). Whether a layer runs ours at all, or
// cuDNN through torch's own RNN op, or the reference equations, is decided before the operator
// is called, in rnnfused/dispatch.py (with the measured table and the GPU verification record);
// this is the part the operators need, on the device they run on.
//
// RNNFUSED_KERNEL (read on every call):
//   auto (default), cudnn  the persistent kernel where its plan fits and a GPU run has verified
//                          this build on the device's architecture (set_verified_architectures),
//                          else stepwise; on the CPU the threads where their plan fits
//   ours                   the persistent kernel wherever its plan fits, verified or not
//   stepwise               stage 1 everywhere
//   persistent             the persistent kernel, an error where it does not fit
//   simulate               on the CPU, the GPU persistent kernel's program through its host
//                          simulation (a test harness)
#pragma once

#include <ATen/core/Tensor.h>

#include <string>
#include <vector>

#include "params.h"
#include "persistent/plan.h"

namespace rnnfused {

struct KernelChoice {
  std::string kernel;  // "stepwise", "persistent" or "persistent (host simulation)"
  std::string reason;
  persistent::Plan plan;  // plan.persistent: run it
};

// The RNNFUSED_KERNEL setting, checked.
std::string kernel_setting();

// `side_by_side`: the recurrences the caller runs at once on the device, this one included
// (LayerOptions::side_by_side); the GPU's plans (and the host simulation's) take a share of the
// SMs where that pays. `use`: a training run's passes or an inference forward alone
// (persistent::make_plan).
KernelChoice choose_kernel(Cell cell, int64_t T, int64_t H, int64_t P, int64_t B, DType dtype,
                           const at::Device& device, int64_t side_by_side = 1,
                           persistent::PlanFor use = persistent::PlanFor::Training);

// RNNFUSED_WAVEFRONT=auto: how a unidirectional stack of `layers` layers on `device` runs,
// layer after layer or pipelined over slices of its T steps (persistent::plan_pipeline), where
// its layers run the persistent kernel on a GPU (choose_kernel; with `step_flags`, lengths or
// resets, they run stepwise); else layer after layer, with the reason.
persistent::PipelinePlan choose_pipeline(Cell cell, int64_t T, int64_t layers, int64_t H, int64_t P, int64_t B,
                                         DType dtype, const at::Device& device, bool step_flags,
                                         persistent::PlanFor use = persistent::PlanFor::Training);

// `choice` for a layer with step flags (resets, lengths) or the masks of recurrent dropout and
// zoneout: the CPU threads run recurrence.h's own steps and take both, the GPU's persistent
// program neither (the stepwise kernels run them).
KernelChoice with_steps_options(KernelChoice choice, bool step_flags, bool masks);

// The compute capabilities (e.g. 90) on which a GPU run has verified this build's device
// code; rnnfused.dispatch sets them at import from rnnfused/gpu_verified.json.
void set_verified_architectures(const std::vector<int64_t>& compute_capabilities);
bool verified_on(int compute_capability);

}  // namespace rnnfused
