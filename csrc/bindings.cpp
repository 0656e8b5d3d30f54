// The only file that sees torch: argument checks, device guard, current stream,
// allocation of every buffer named in params.h, and the pybind11 module rnnfused._C.
#include <ATen/ATen.h>
#include <torch/library.h>
#include <torch/python.h>

#include <ATen/EmptyTensor.h>
#include <ATen/LegacyBatchedTensorImpl.h>
#include <ATen/LegacyVmapTransforms.h>
#include <sys/mman.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/DeviceGuard.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "cpu/rnn_cpu.h"
#include "kernel_choice.h"
#include "params.h"
#include "persistent/plan.h"
#include "persistent/timing.h"

#ifdef RNNFUSED_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>

#include "cuda/rnn_cuda.h"
#endif

namespace rnnfused {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

DType dtype_of(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return DType::Float32;
    case at::kDouble: return DType::Float64;
    case at::kHalf: return DType::Float16;
    case at::kBFloat16: return DType::BFloat16;
    default:
      break;
  }
  TORCH_CHECK_TYPE(false, "rnnfused: expected a float32, float64, float16 or bfloat16 input, got ", type);
}

DType dtype_of(const Tensor& t) {
  return dtype_of(t.scalar_type());
}

// Large CPU buffers are recycled. glibc maps every large block afresh and returns it to
// the kernel when it is freed, so each call touched its buffers page by page again: ~5000
// page faults per LSTM layer's forward + backward at T100 B16 H256, a third of its time.
// Sizes are rounded up to four classes per power of two (at most 25% more), so that packed
// input of varying lengths reuses blocks instead of caching one per size. As an
// at::Allocator the cache gives ordinary resizable storages (a user may resize_() an
// output). Freed blocks are kept up to a bound (RNNFUSED_CPU_CACHE_MB, read once at the
// first allocation; default kDefaultLimitBytes; 0 keeps none), beyond it they go back to
// the system at once; rnnfused.empty_cache() returns every kept block. Blocks are mapped
// and unmapped directly (not malloc'ed), so that what is returned leaves the process: glibc
// would keep freed blocks in its heap once its mmap threshold has risen past their size.
class CachingCpuAllocator final : public at::Allocator {
 public:
  static constexpr size_t kMinBytes = size_t(1) << 18;
  static constexpr size_t kDefaultLimitBytes = size_t(256) << 20;

  struct Stats {
    size_t cached_bytes;  // freed blocks kept for reuse
    size_t in_use_bytes;  // blocks held by live tensors
    size_t limit_bytes;   // the bound on cached_bytes
  };

  static CachingCpuAllocator& instance() {
    static auto* allocator = new CachingCpuAllocator();  // never destroyed: tensors may outlive statics
    return *allocator;
  }

  at::DataPtr allocate(size_t bytes) override {
    if (bytes < kMinBytes) return c10::GetDefaultCPUAllocator()->allocate(bytes);
    void* block = take(size_class(bytes));
    return {block, block, &give_back, at::Device(at::kCPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  // Returns every cached block to the system; the bytes released.
  size_t empty_cache() {
    std::vector<std::pair<void*, size_t>> blocks;
    size_t released = 0;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (auto& [bytes, list] : free_) {
        released += bytes * list.size();
        for (void* block : list) blocks.emplace_back(block, bytes);
      }
      free_.clear();
      cached_bytes_ = 0;
    }
    for (const auto& [block, bytes] : blocks) unmap(block, bytes);
    return released;
  }

  Stats stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {cached_bytes_, in_use_bytes_, limit_bytes_};
  }

 private:
  static size_t limit_from_environment() {
    const char* text = std::getenv("RNNFUSED_CPU_CACHE_MB");
    if (text == nullptr || *text == '\0') return kDefaultLimitBytes;
    char* end = nullptr;
    const double megabytes = std::strtod(text, &end);
    TORCH_CHECK(end != text && *end == '\0' && megabytes >= 0 && std::isfinite(megabytes),
                "rnnfused: RNNFUSED_CPU_CACHE_MB must be a number of megabytes >= 0, got '", text, "'");
    return static_cast<size_t>(megabytes * double(1 << 20));
  }

  static size_t size_class(size_t bytes) {
    size_t power = kMinBytes;
    while (power * 2 <= bytes) power *= 2;
    const size_t step = power / 4;
    return (bytes + step - 1) / step * step;
  }

  void* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    void* block = nullptr;
    auto it = free_.find(bytes);
    if (it != free_.end() && !it->second.empty()) {
      block = it->second.back();
      it->second.pop_back();
      cached_bytes_ -= bytes;
    } else {
      block = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      TORCH_CHECK(block != MAP_FAILED, "rnnfused: out of memory allocating ", bytes, " bytes");
    }
    sizes_[block] = bytes;
    in_use_bytes_ += bytes;
    return block;
  }

  // Called from tensor deleters, which must not throw; munmap only fails for a range that
  // was never mapped, and every block here came from mmap with this size.
  static void unmap(void* block, size_t bytes) noexcept { munmap(block, bytes); }

  static void give_back(void* block) {
    CachingCpuAllocator& self = instance();
    size_t bytes = 0;
    {
      std::lock_guard<std::mutex> lock(self.mutex_);
      auto it = self.sizes_.find(block);
      bytes = it->second;
      self.sizes_.erase(it);
      self.in_use_bytes_ -= bytes;
      if (self.cached_bytes_ + bytes <= self.limit_bytes_) {
        self.free_[bytes].push_back(block);
        self.cached_bytes_ += bytes;
        return;
      }
    }
    unmap(block, bytes);
  }

  std::mutex mutex_;
  std::unordered_map<size_t, std::vector<void*>> free_;
  std::unordered_map<void*, size_t> sizes_;  // blocks in use
  size_t cached_bytes_ = 0;
  size_t in_use_bytes_ = 0;
  const size_t limit_bytes_ = limit_from_environment();
};

Tensor empty(at::IntArrayRef shape, const at::TensorOptions& options) {
  if (!options.device().is_cpu()) return at::empty(shape, options);
  return at::detail::empty_generic(shape, &CachingCpuAllocator::instance(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   options.dtype().toScalarType(), std::nullopt);
}

// A new tensor (from empty above) holding t's values, of options' dtype and device (t's): the
// state buffers that the kernels overwrite, and the private copy of y that backward reads. On
// the CPU a contiguous copy of the same dtype is one memcpy; Tensor::clone and Tensor::to take
// about 5 us each through the dispatcher, a tenth of a small layer's call (bench.overhead).
Tensor copy_of(const Tensor& t, const at::TensorOptions& options) {
  Tensor copy = empty(t.sizes(), options);
  if (t.is_cpu() && t.is_contiguous() && copy.scalar_type() == t.scalar_type() && !t._is_zerotensor()) {
    if (t.numel() > 0) std::memcpy(copy.data_ptr(), t.data_ptr(), t.nbytes());
  } else {
    copy.copy_(t);
  }
  return copy;
}

at::ScalarType acc_type(at::ScalarType s) {
  return s == at::kDouble ? at::kDouble : at::kFloat;
}

void* ptr(const Tensor& t) {
  return t.defined() ? t.data_ptr() : nullptr;
}

// Checks a tensor's shape, dtype (by default the input's) and device against the input
// and makes it contiguous.
Tensor prepare(const Tensor& t, const char* name, at::IntArrayRef shape, const Tensor& like,
               std::optional<at::ScalarType> dtype = std::nullopt) {
  TORCH_CHECK(t.sizes() == shape, "rnnfused: ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.device() == like.device(), "rnnfused: ", name, " is on ", t.device(),
              " but the input is on ", like.device(), "; move both to the same device");
  const at::ScalarType expected = dtype.value_or(like.scalar_type());
  TORCH_CHECK(t.scalar_type() == expected, "rnnfused: ", name, " has dtype ", t.scalar_type(),
              dtype ? " but must be " : " but the input has dtype ", expected);
  return t.contiguous();
}

Cell cell_of(int64_t cell) {
  TORCH_CHECK_VALUE(cell >= 0 && cell < kNumCells, "rnnfused: cell must be one of 0..", kNumCells - 1,
                    " (rnnfused.functional.Cell), got ", cell);
  return static_cast<Cell>(cell);
}

// The operators' scalar options, checked (Python: rnnfused._ops.LayerOptions, same order).
LayerOptions layer_options(int64_t cell, bool has_biases, bool reverse, double cell_clip, double grad_clip,
                           int64_t norm, bool training, double eps, int64_t side_by_side) {
  LayerOptions o;
  o.cell = cell_of(cell);
  o.has_biases = has_biases;
  o.reverse = reverse;
  TORCH_CHECK_VALUE(cell_clip > 0, "rnnfused: cell_clip must be positive (infinity = off), got ", cell_clip);
  TORCH_CHECK_VALUE(std::isinf(cell_clip) || o.cell == Cell::LSTM, "rnnfused: cell_clip is only supported for LSTM");
  TORCH_CHECK_VALUE(grad_clip > 0, "rnnfused: grad_clip must be positive (infinity = off), got ", grad_clip);
  o.cell_clip = cell_clip;
  o.grad_clip = grad_clip;
  TORCH_CHECK_VALUE(norm >= 0 && norm <= 2, "rnnfused: norm must be 0 (none), 1 (batch) or 2 (layer), got ", norm);
  o.norm = static_cast<Norm>(norm);
  o.training = training;
  TORCH_CHECK_VALUE(eps > 0, "rnnfused: eps must be positive, got ", eps);
  o.eps = eps;
  TORCH_CHECK_VALUE(side_by_side >= 1, "rnnfused: side_by_side must be at least 1 (this recurrence), got ",
                    side_by_side);
  o.side_by_side = side_by_side;
  return o;
}

// The weights of one layer and direction in torch.nn's order: w_ih, w_hh, then b_ih, b_hh
// when has_biases, then w_hr for an LSTM with projection.
struct Weights {
  Tensor w_ih, w_hh;
  OptTensor b_ih, b_hh, w_hr;
};

Weights unpack_weights(at::TensorList weights, bool has_biases) {
  const size_t expected = 2 + (has_biases ? 2 : 0);
  TORCH_CHECK(weights.size() == expected || weights.size() == expected + 1, "rnnfused: expected ", expected,
              " weights (w_ih, w_hh", has_biases ? ", b_ih, b_hh" : "", ") or ", expected + 1,
              " with w_hr, got ", weights.size());
  Weights w{weights[0], weights[1]};
  if (has_biases) {
    w.b_ih = weights[2];
    w.b_hh = weights[3];
  }
  if (weights.size() == expected + 1) w.w_hr = weights[expected];
  return w;
}

// What forward and backward share: the sizes (read from the input, h0 and the weights), the
// contiguous input, the checked weights (kept alive here: p points into them) and the
// tensor options of the storage and accumulation dtypes.
struct Layer {
  LayerParams p;
  std::vector<int64_t> batch_sizes;
  bool packed = false;
  Tensor x, w_ih, w_hh, b_ih, b_hh, w_hr, step_flags, recurrent_mask, keep_h, keep_c;
  at::TensorOptions opts, acc;
  bool has_masks() const { return p.recurrent_mask || p.zoneout_h() || p.zoneout_c(); }
};

// The operators' `masks`: none, or [recurrent_mask, keep_h, keep_c] (params.h), an absent one an
// empty tensor of shape [0] (as the operators' outputs that do not apply; `Tensor?[]` would not
// trace with torch.jit.trace). keep_h and keep_c are each either the weights [T, B, *] in the
// input's dtype, or int64 [2] {seed, threshold}: drawn in the kernels (steps.h: Keep).
using Masks = at::TensorList;

bool absent_mask(const Tensor& t) {
  return t.dim() == 1 && t.size(0) == 0;
}

bool drawn_mask(const Tensor& t) {
  return t.scalar_type() == at::kLong && t.dim() == 1 && t.size(0) == 2;
}

void attach_masks(Layer& l, Masks masks) {
  if (masks.empty()) return;
  LayerParams& p = l.p;
  TORCH_CHECK_VALUE(masks.size() == 3, "rnnfused: masks are [recurrent_mask, keep_h, keep_c] (an absent one an "
                    "empty tensor of shape [0]), got ", masks.size(), " tensors");
  TORCH_CHECK_VALUE(absent_mask(masks[2]) || p.cell == Cell::LSTM, "rnnfused: keep_c (zoneout of the cell) is only "
                    "for LSTM");
  const char* names[] = {"recurrent_mask", "keep_h", "keep_c"};
  const std::vector<int64_t> shapes[] = {{p.B, p.P}, {p.T, p.B, p.P}, {p.T, p.B, p.H}};
  Tensor* kept[] = {&l.recurrent_mask, &l.keep_h, &l.keep_c};
  const void** pointers[] = {&p.recurrent_mask, &p.keep_h, &p.keep_c};
  const int64_t** draws[] = {nullptr, &p.keep_h_draw, &p.keep_c_draw};
  for (int i = 0; i < 3; ++i) {
    if (absent_mask(masks[i])) continue;
    if (draws[i] && drawn_mask(masks[i])) {
      *kept[i] = prepare(masks[i], names[i], {2}, l.x, at::kLong);
      *draws[i] = kept[i]->data_ptr<int64_t>();
    } else {
      *kept[i] = prepare(masks[i], names[i], shapes[i], l.x);
      *pointers[i] = ptr(*kept[i]);
    }
  }
}

Layer prepare_layer(const LayerOptions& options, const Tensor& x_in, const OptTensor& batch_sizes, const Tensor& h0,
                    at::TensorList weights, const OptTensor& step_flags, Masks masks) {
  Layer l;
  LayerParams& p = l.p;
  const Tensor& x = x_in;
  const Cell cell = options.cell;
  const Weights w = unpack_weights(weights, options.has_biases);
  p.cell = cell;
  p.reverse = options.reverse;
  l.packed = batch_sizes.has_value();
  TORCH_CHECK(h0.dim() == 2, "rnnfused: h0 must be 2-D [batch, hidden], got ", h0.dim(), "-D");
  if (l.packed) {
    TORCH_CHECK(x.dim() == 2, "rnnfused: packed input must be 2-D [rows, features], got ", x.dim(), "-D");
    const Tensor& bs = *batch_sizes;
    TORCH_CHECK(bs.dim() == 1 && bs.device().is_cpu() && bs.scalar_type() == at::kLong,
                "rnnfused: batch_sizes must be a 1-D int64 CPU tensor");
    TORCH_CHECK(bs.numel() > 0, "Expected sequence length to be larger than 0 in RNN");
    const Tensor bsc = bs.contiguous();
    l.batch_sizes.assign(bsc.data_ptr<int64_t>(), bsc.data_ptr<int64_t>() + bsc.numel());
    int64_t total = 0;
    for (size_t t = 0; t < l.batch_sizes.size(); ++t) {
      TORCH_CHECK(l.batch_sizes[t] >= 0 && (t == 0 || l.batch_sizes[t] <= l.batch_sizes[t - 1]),
                  "rnnfused: batch_sizes must be non-negative and non-increasing");
      total += l.batch_sizes[t];
    }
    TORCH_CHECK(total == x.size(0), "rnnfused: batch_sizes sum to ", total, " but the input has ",
                x.size(0), " rows");
    TORCH_CHECK(l.batch_sizes[0] == h0.size(0), "rnnfused: batch_sizes[0] is ", l.batch_sizes[0],
                " but h0 has ", h0.size(0), " rows");
  } else {
    TORCH_CHECK(x.dim() == 3, "rnnfused: input must be 3-D [seq, batch, features], got ", x.dim(), "-D");
    TORCH_CHECK(x.size(0) > 0, "Expected sequence length to be larger than 0 in RNN");
    l.batch_sizes.assign(x.size(0), x.size(1));
  }
  dtype_of(x);
  const int64_t gates = gates_per_unit(cell);
  TORCH_CHECK(w.w_ih.dim() == 2 && w.w_hh.dim() == 2 && w.w_ih.size(0) % gates == 0,
              "rnnfused: weight_ih must be [gates * hidden, input], weight_hh [gates * hidden, hidden]");
  p.T = static_cast<int64_t>(l.batch_sizes.size());
  p.B = l.batch_sizes[0];
  p.N = l.packed ? x.size(0) : x.size(0) * x.size(1);
  p.I = x.size(-1);
  p.G = w.w_ih.size(0);
  p.H = p.G / gates;
  p.P = w.w_hr.has_value() ? w.w_hr->size(0) : p.H;
  TORCH_CHECK_VALUE(!w.w_hr.has_value() || cell == Cell::LSTM, "rnnfused: projections exist only for LSTM");
  p.cell_clip = options.cell_clip;
  p.grad_clip = options.grad_clip;
  p.batch_sizes = l.batch_sizes.data();

  l.x = x_in.contiguous();
  l.w_ih = prepare(w.w_ih, "weight_ih", {p.G, p.I}, l.x);
  l.w_hh = prepare(w.w_hh, "weight_hh", {p.G, p.P}, l.x);
  // The kernels always add both biases: zeros stand in for a layer without bias.
  l.b_ih = w.b_ih ? prepare(*w.b_ih, "bias_ih", {p.G}, l.x) : at::zeros({p.G}, l.x.options());
  l.b_hh = w.b_hh ? prepare(*w.b_hh, "bias_hh", {p.G}, l.x) : at::zeros({p.G}, l.x.options());
  if (w.w_hr) l.w_hr = prepare(*w.w_hr, "weight_hr", {p.P, p.H}, l.x);
  p.w_ih = ptr(l.w_ih);
  p.w_hh = ptr(l.w_hh);
  p.b_ih = ptr(l.b_ih);
  p.b_hh = ptr(l.b_hh);
  // The kernels tell a projection by a non-null w_hr (params.h); one of zero rows (P == 0) has
  // no data pointer, so it gets the address of a constant that no kernel reads (every use of
  // w_hr with P == 0 is a matmul with no rows or an empty inner dimension).
  static const double kNoRows = 0;
  p.w_hr = l.w_hr.defined() ? (l.w_hr.numel() ? l.w_hr.data_ptr() : &kNoRows) : nullptr;
  if (step_flags.has_value()) {
    TORCH_CHECK_VALUE(!l.packed, "rnnfused: step_flags are for padded input; packed input has none");
    l.step_flags = prepare(*step_flags, "step_flags", {p.T, p.B}, l.x, at::kInt);
    p.step_flags = l.step_flags.data_ptr<int32_t>();
  }
  attach_masks(l, masks);
  l.opts = l.x.options();
  l.acc = l.opts.dtype(acc_type(l.x.scalar_type()));
  return l;
}

// Normalized layers: the checked norm weights and running statistics (kept alive here:
// params points into them). Layer norm has no running statistics; batch norm always takes
// them: eval normalizes with them, training at steps with a single active row.
struct Normalization {
  NormParams params;
  std::vector<Tensor> weights, running;
  bool active() const { return params.kind != Norm::None; }
  bool batch_training() const { return params.kind == Norm::Batch && params.own_statistics; }
};

Normalization prepare_norm(const LayerOptions& options, at::TensorList weights, const Layer& layer) {
  Normalization out;
  NormParams& n = out.params;
  n.kind = options.norm;
  if (n.kind == Norm::None) {
    TORCH_CHECK_VALUE(weights.empty(), "rnnfused: norm weights are only for norm=1 (batch) or 2 (layer)");
    return out;
  }
  const LayerParams& p = layer.p;
  const bool lstm = p.cell == Cell::LSTM;
  TORCH_CHECK_VALUE(weights.size() == (lstm ? 4u : 2u), "rnnfused: a normalized layer needs the norm weights "
                    "[gamma_x, gamma_h", lstm ? ", gamma_c, beta_c" : "", "], got ", weights.size(), " tensors");
  TORCH_CHECK_VALUE(!layer.p.step_flags, "rnnfused: normalized layers take no step_flags (resets or lengths)");
  TORCH_CHECK_VALUE(!layer.p.zoneout_h() && !layer.p.zoneout_c(), "rnnfused: normalized layers take no zoneout masks "
                    "(keep_h, keep_c)");
  const char* weight_names[] = {"gamma_x", "gamma_h", "gamma_c", "beta_c"};
  for (size_t i = 0; i < weights.size(); ++i)
    out.weights.push_back(prepare(weights[i], weight_names[i], {i < 2 ? p.G : p.H}, layer.x));
  n.gamma_x = ptr(out.weights[0]);
  n.gamma_h = ptr(out.weights[1]);
  if (lstm) {
    n.gamma_c = ptr(out.weights[2]);
    n.beta_c = ptr(out.weights[3]);
  }
  n.eps = options.eps;
  n.own_statistics = n.kind == Norm::Layer || options.training;
  return out;
}

// Forward: the running statistics of every step, which batch norm needs and layer norm has not.
void attach_running_stats(Normalization& norm, at::TensorList running, const Layer& layer) {
  NormParams& n = norm.params;
  const LayerParams& p = layer.p;
  const bool lstm = p.cell == Cell::LSTM;
  if (n.kind != Norm::Batch) {
    TORCH_CHECK_VALUE(running.empty(), "rnnfused: running statistics are only for batch norm (norm=1)");
    return;
  }
  // As nn.BatchNorm1d: one row per step in training is an error, an empty batch is not.
  TORCH_CHECK_VALUE(!n.own_statistics || p.B != 1, "Expected more than 1 value per channel when training, got input "
                    "size torch.Size([", p.B, ", ", p.G, "])");
  TORCH_CHECK_VALUE(running.size() == (lstm ? 6u : 4u), "rnnfused: batch norm needs the running statistics of every "
                    "step [mean_x, var_x, mean_h, var_h", lstm ? ", mean_c, var_c" : "", "], got ", running.size(),
                    " tensors");
  const char* running_names[] = {"running mean_x", "running var_x", "running mean_h",
                                 "running var_h",  "running mean_c", "running var_c"};
  const void** targets[] = {&n.mean_x, &n.var_x, &n.mean_h, &n.var_h, &n.mean_c, &n.var_c};
  for (size_t i = 0; i < running.size(); ++i) {
    norm.running.push_back(prepare(running[i], running_names[i], {p.T, i < 4 ? p.G : p.H}, layer.x));
    *targets[i] = ptr(norm.running.back());
  }
}

#ifdef RNNFUSED_WITH_CUDA
constexpr bool kWithCuda = true;
#else
constexpr bool kWithCuda = false;
#endif

template <typename Params>
void run(const Tensor& x, const Params& p) {
  if (x.device().is_cpu()) return cpu::run(p, dtype_of(x));
#ifdef RNNFUSED_WITH_CUDA
  if (x.device().is_cuda()) {
    const char* refused = cuda::run(p, dtype_of(x),
                                    cuda::Context{at::cuda::getCurrentCUDAStream(), at::cuda::getCurrentCUDABlasHandle()});
    if (refused) {
      TORCH_WARN_ONCE("rnnfused: the persistent kernel could not be launched (", refused,
                      "); the stepwise kernels ran instead");
    }
    return;
  }
#endif
  TORCH_CHECK(false, "rnnfused: no kernels for device ", x.device(), " in this build",
              kWithCuda ? "" : " (it was built without CUDA)");
}

bool simulated(const KernelChoice& choice) {
  return choice.kernel == "persistent (host simulation)";
}

// The host simulation is a test harness: it fills what the kernel must write with NaN first,
// so that an element the persistent program never writes shows in the results.
void poison(std::initializer_list<Tensor> outputs) {
  for (const Tensor& t : outputs)
    if (t.defined()) t.fill_(std::numeric_limits<double>::quiet_NaN());
}

// Points p at the persistent plan of `choice` (which must outlive the run). Packed input
// needs its batch sizes and step offsets where the kernel reads them: `table` keeps the
// device copy alive. Inside CUDA-graph capture that copy is impossible: stage 1 runs.
void attach_plan(LayerParams& p, const KernelChoice& choice, const Layer& layer, Tensor& table) {
  if (!choice.plan.persistent) return;
  if (layer.packed && layer.x.is_cuda()) {
#ifdef RNNFUSED_WITH_CUDA
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    C10_CUDA_CHECK(cudaStreamIsCapturing(at::cuda::getCurrentCUDAStream(), &capture));
    if (capture != cudaStreamCaptureStatusNone) {
      TORCH_WARN_ONCE("rnnfused: packed input inside CUDA-graph capture runs the stepwise kernels");
      return;
    }
#endif
    // Filled through its pointer (indexing the tensor would be four ATen calls per step) in
    // pinned memory, so that the copy is queued behind the stream's work instead of waiting for
    // it, as a copy from pageable memory does; the pinned block is not reused before the copy ran.
    Tensor host = at::empty({2, p.T}, at::TensorOptions(at::kLong).pinned_memory(true));
    int64_t* sizes = host.data_ptr<int64_t>();
    int64_t offset = 0;
    for (int64_t t = 0; t < p.T; ++t) {
      sizes[t] = p.batch_sizes[t];
      sizes[p.T + t] = offset;
      offset += p.batch_sizes[t];
    }
    table = host.to(layer.x.device(), /*non_blocking=*/true);
    p.kernel_batch_sizes = table.data_ptr<int64_t>();
    p.kernel_offsets = p.kernel_batch_sizes + p.T;
  }
  p.tiling = &choice.plan.tiling;
}

// An output that does not apply: its own empty tensor (an operator's outputs never share
// storage with each other or with an input).
Tensor absent(const Tensor& like) {
  return empty({0}, like.options());
}

using ForwardResult = std::tuple<Tensor, Tensor, Tensor, std::vector<Tensor>, std::vector<Tensor>>;

// Normalized layers run the stepwise kernels, and so do step flags and masks except on the CPU
// threads (with_steps_options). `use`: a training run's passes, or an inference forward (one that
// saves nothing for a backward) alone.
KernelChoice kernel_for(const Layer& layer, const Normalization& norm, const LayerOptions& options,
                        persistent::PlanFor use) {
  if (norm.active()) {
    // Their passes launch one thread per normalized line (csrc/norm.h): correct, but not yet
    // fit for a GPU, so only an explicit request runs them there (rnnfused.functional's gate
    // otherwise runs the reference equations before the operator is reached).
    const char* fused = std::getenv("RNNFUSED_CUDA_NORM");
    TORCH_CHECK(!layer.x.is_cuda() || (fused && std::string(fused) == "fused"),
                "rnnfused: the fused normalized layers are off on CUDA until their kernels are fit for a GPU; "
                "RNNFUSED_CUDA_NORM=fused runs them (rnnfused's modules run the reference equations instead)");
    return {"stepwise", "normalized layers run the stepwise kernels", {}};
  }
  const LayerParams& p = layer.p;
  // The planners tell a projection by P != H; one with P == H must not reach the persistent
  // programs, which have none.
  if (p.w_hr) {
    TORCH_CHECK(kernel_setting() != "persistent",
                "rnnfused: RNNFUSED_KERNEL=persistent but this layer cannot run persistent (LSTM with projection)");
    return {"stepwise", "LSTM with projection runs the stepwise kernels", {}};
  }
  return with_steps_options(
      choose_kernel(p.cell, p.T, p.H, p.P, p.B, dtype_of(layer.x), layer.x.device(), options.side_by_side, use),
      p.step_flags != nullptr, layer.has_masks());
}

// rnnfused::layer_forward: see the schema in TORCH_LIBRARY below.
ForwardResult layer_forward(const Tensor& x_in, const OptTensor& batch_sizes, const Tensor& h0, const OptTensor& c0,
                            at::TensorList weights, at::TensorList norm_weights, at::TensorList running_stats,
                            const OptTensor& step_flags, Masks masks, int64_t cell_index, bool has_biases,
                            bool reverse, double cell_clip, double grad_clip, int64_t norm_index, bool training,
                            double eps, int64_t side_by_side, bool save_for_backward) {
  const LayerOptions options =
      layer_options(cell_index, has_biases, reverse, cell_clip, grad_clip, norm_index, training, eps, side_by_side);
  const Cell cell = options.cell;
  const c10::DeviceGuard guard(x_in.device());
  const Layer layer = prepare_layer(options, x_in, batch_sizes, h0, weights, step_flags, masks);
  Normalization norm = prepare_norm(options, norm_weights, layer);
  attach_running_stats(norm, running_stats, layer);
  ForwardParams p;
  static_cast<LayerParams&>(p) = layer.p;
  const Tensor& x = layer.x;
  const auto &opts = layer.opts, &acc = layer.acc;
  const persistent::PlanFor use = save_for_backward ? persistent::PlanFor::Training : persistent::PlanFor::Inference;
  const KernelChoice choice = kernel_for(layer, norm, options, use);
  Tensor table;
  attach_plan(p, choice, layer, table);

  std::vector<int64_t> y_shape = {p.N, p.P};
  if (!layer.packed) y_shape = {x.size(0), x.size(1), p.P};
  Tensor y = empty(y_shape, opts);
  const Tensor h0c = prepare(h0, "h0", {p.B, p.P}, x);
  Tensor h = copy_of(h0c, h0c.options());
  Tensor c;
  if (cell == Cell::LSTM) {
    TORCH_CHECK_VALUE(c0.has_value(), "rnnfused: LSTM needs c0");
    c = copy_of(prepare(*c0, "c0", {p.B, p.H}, x), acc);
  } else {
    TORCH_CHECK_VALUE(!c0.has_value(), "rnnfused: c0 is only for LSTM");
  }
  Tensor gh = empty({p.B, p.G}, acc);
  Tensor gx, gates, cells, proj_in, rh;
  const int64_t saved = saved_gates_per_unit(cell);
  if (save_for_backward && saved > 0)
    gates = empty({p.N, saved * p.H}, acc);
  else
    gx = empty({p.N, p.G}, acc);
  if (save_for_backward && cell == Cell::LSTM) cells = empty({p.N, p.H}, acc);
  // A projection is a given w_hr, whatever its rows: P == H (unambiguous here, unlike torch's
  // _VF.lstm, which infers it from the widths) and P == 0 write proj_in too.
  if (layer.w_hr.defined()) proj_in = empty({save_for_backward ? p.N : p.B, p.H}, opts);
  if (cell == Cell::GRU_CHO) rh = empty({p.B, p.H}, opts);
  Tensor masked_h, state_new;
  if (layer.p.recurrent_mask) masked_h = empty({p.B, p.P}, opts);
  // Zoneout: what backward cannot tell from the state (params.h: cells_new, hidden_new).
  if (save_for_backward && cell == Cell::LSTM && layer.p.zoneout_c()) state_new = empty({p.N, p.H}, acc);
  const bool rnn = cell == Cell::RNN_TANH || cell == Cell::RNN_RELU;
  if (save_for_backward && rnn && layer.p.zoneout_h()) state_new = empty({p.N, p.H}, opts);

  p.x = ptr(x);
  p.y = ptr(y);
  p.h = ptr(h);
  p.h0 = ptr(h0c);
  p.c = ptr(c);
  p.gx = ptr(gx);
  p.gh = ptr(gh);
  p.gates = ptr(gates);
  p.cells = ptr(cells);
  p.proj_in = ptr(proj_in);
  p.rh = ptr(rh);
  p.masked_h = ptr(masked_h);
  (cell == Cell::LSTM ? p.cells_new : p.hidden_new) = ptr(state_new);

  // Normalized layers: x̂ and rstd of each normalization (norm_saved: [xhat_x, rstd_x, xhat_h,
  // rstd_h] + LSTM [chat, rstd_c]), batch norm's statistics in training (batch_stats: [mean_x,
  // var_x, mean_h, var_h] + LSTM [mean_c, var_c]).
  std::vector<Tensor> norm_saved, batch_stats, scratch;  // scratch: alive until run() returns
  Tensor c_tilde;
  if (norm.active()) {
    p.norm = &norm.params;
    const bool batch = norm.params.kind == Norm::Batch, lstm = cell == Cell::LSTM;
    const std::vector<int64_t> line_shapes[] = {
        batch ? std::vector<int64_t>{p.T, p.G} : std::vector<int64_t>{p.N},
        batch ? std::vector<int64_t>{p.T, p.G} : std::vector<int64_t>{p.N, hidden_norm_groups(cell)},
        batch ? std::vector<int64_t>{p.T, p.H} : std::vector<int64_t>{p.N}};
    const int64_t widths[] = {p.G, p.G, p.H};
    void** xhats[] = {&p.xhat_x, &p.xhat_h, &p.chat};
    void** rstds[] = {&p.rstd_x, &p.rstd_h, &p.rstd_c};
    void** means[] = {&p.batch_mean_x, &p.batch_mean_h, &p.batch_mean_c};
    void** vars[] = {&p.batch_var_x, &p.batch_var_h, &p.batch_var_c};
    for (int i = 0; i < (lstm ? 3 : 2); ++i) {
      Tensor rstd = empty(line_shapes[i], acc);
      *rstds[i] = ptr(rstd);
      if (save_for_backward) {
        Tensor xhat = empty({p.N, widths[i]}, acc);
        *xhats[i] = ptr(xhat);
        norm_saved.insert(norm_saved.end(), {xhat, rstd});
      } else {
        scratch.push_back(rstd);
      }
      if (norm.batch_training()) {
        Tensor mean = empty({p.T, widths[i]}, acc), var = empty({p.T, widths[i]}, acc);
        *means[i] = ptr(mean);
        *vars[i] = ptr(var);
        batch_stats.insert(batch_stats.end(), {mean, var});
      }
    }
    if (lstm) {
      c_tilde = empty({p.B, p.H}, acc);
      p.c_tilde = ptr(c_tilde);
    }
  }
  if (simulated(choice)) poison({y, h, gates, cells});
  run(x, p);

  // Backward reads the hidden states from its own copy, so that a user's in-place change
  // of y (e.g. ReLU(inplace=True)) neither corrupts nor blocks the gradient. With step flags
  // the copy keeps the states inactive rows held (the gather reads them), the output zeros.
  std::vector<Tensor> saved_list;
  if (save_for_backward) saved_list.push_back(copy_of(y, y.options()));
  if (layer.p.step_flags)
    y.masked_fill_(layer.step_flags.bitwise_and(kStepInactive).ne(0).unsqueeze(-1), 0);
  if (save_for_backward) {
    saved_list.insert(saved_list.end(), {gates.defined() ? gates : absent(x), cells.defined() ? cells : absent(x),
                                         proj_in.defined() ? proj_in : absent(x),
                                         state_new.defined() ? state_new : absent(x)});
    saved_list.insert(saved_list.end(), norm_saved.begin(), norm_saved.end());
  }
  return {y, h, c.defined() ? c.to(x.scalar_type()) : absent(x), saved_list, batch_stats};
}

using BackwardResult = std::tuple<Tensor, Tensor, Tensor, std::vector<Tensor>, std::vector<Tensor>>;

// rnnfused::layer_backward: see the schema in TORCH_LIBRARY below.
BackwardResult layer_backward(const Tensor& x_in, const OptTensor& batch_sizes, const Tensor& h0, const OptTensor& c0,
                              at::TensorList weights, at::TensorList norm_weights, const OptTensor& step_flags,
                              Masks masks, at::TensorList saved_list, const Tensor& dy, const Tensor& dh_n,
                              const OptTensor& dc_n, int64_t cell_index, bool has_biases, bool reverse, double cell_clip, double grad_clip,
                              int64_t norm_index, bool training, double eps, int64_t side_by_side, bool need_dx,
                              bool need_weights) {
  const LayerOptions options =
      layer_options(cell_index, has_biases, reverse, cell_clip, grad_clip, norm_index, training, eps, side_by_side);
  const Cell cell = options.cell;
  const c10::DeviceGuard guard(x_in.device());
  const Layer layer = prepare_layer(options, x_in, batch_sizes, h0, weights, step_flags, masks);
  const Normalization norm = prepare_norm(options, norm_weights, layer);  // backward reads the saved rstd, not eps
  BackwardParams p;
  static_cast<LayerParams&>(p) = layer.p;
  const Tensor& x = layer.x;
  const auto &opts = layer.opts, &acc = layer.acc;
  const KernelChoice choice = kernel_for(layer, norm, options, persistent::PlanFor::Training);
  Tensor table;
  attach_plan(p, choice, layer, table);
  const int64_t saved = saved_gates_per_unit(cell);
  const bool projected = layer.w_hr.defined();
  // saved_list: [hidden, gates, cells, proj_in, state_new, *norm_saved] as forward returned it.
  const size_t norm_saved_count = norm.active() ? (cell == Cell::LSTM ? 6 : 4) : 0;
  TORCH_CHECK(saved_list.size() == 5 + norm_saved_count, "rnnfused: backward needs the ", 5 + norm_saved_count,
              " tensors forward saved (saved), got ", saved_list.size());
  TORCH_CHECK(cell != Cell::LSTM || (c0.has_value() && dc_n.has_value()),
              "rnnfused: LSTM backward needs c0 and the gradient of c_n");
  const Tensor &hidden = saved_list[0], &gates = saved_list[1], &cells = saved_list[2], &proj_in = saved_list[3],
               &state_new = saved_list[4];
  const at::TensorList norm_saved = saved_list.slice(5);

  const Tensor h0c = prepare(h0, "h0", {p.B, p.P}, x);
  const std::vector<int64_t> y_shape =
      layer.packed ? std::vector<int64_t>{p.N, p.P} : std::vector<int64_t>{p.T, p.B, p.P};
  const Tensor hidden_c = prepare(hidden, "the saved hidden states", y_shape, x);
  const Tensor dyc = prepare(dy, "grad of output", y_shape, x);
  const at::ScalarType acc_dtype = acc_type(x.scalar_type());
  const Tensor gates_c =
      saved > 0 ? prepare(gates, "the saved gates", {p.N, saved * p.H}, x, acc_dtype) : Tensor();
  const Tensor cells_c =
      cell == Cell::LSTM ? prepare(cells, "the saved cells", {p.N, p.H}, x, acc_dtype) : Tensor();
  const Tensor proj_in_c = projected ? prepare(proj_in, "the saved projection input", {p.N, p.H}, x) : Tensor();
  const bool lstm_zoneout = cell == Cell::LSTM && p.zoneout_c();
  const bool rnn_zoneout = (cell == Cell::RNN_TANH || cell == Cell::RNN_RELU) && p.zoneout_h();
  const Tensor state_new_c =
      lstm_zoneout || rnn_zoneout
          ? prepare(state_new, "the saved state before zoneout", {p.N, p.H}, x,
                    lstm_zoneout ? std::optional<at::ScalarType>(acc_dtype) : std::nullopt)
          : Tensor();
  Tensor dh = copy_of(prepare(dh_n, "grad of h_n", {p.B, p.P}, x), acc);
  Tensor dc, c0_acc, c_prev;
  if (cell == Cell::LSTM) {
    dc = copy_of(prepare(*dc_n, "grad of c_n", {p.B, p.H}, x), acc);
    c0_acc = prepare(*c0, "c0", {p.B, p.H}, x).to(acc);
    c_prev = empty({p.N, p.H}, acc);
  }
  Tensor dx = need_dx ? empty({p.N, p.I}, opts) : Tensor();
  std::vector<Tensor> dweights;
  Tensor dw_ih, dw_hh, db_ih, db_hh, dw_hr;
  if (need_weights) {
    dw_ih = empty({p.G, p.I}, opts);
    dw_hh = empty({p.G, p.P}, opts);
    dweights = {dw_ih, dw_hh};
    if (has_biases) {
      db_ih = empty({p.G}, opts);
      db_hh = empty({p.G}, opts);
      dweights.insert(dweights.end(), {db_ih, db_hh});
    }
    if (projected) {
      dw_hr = empty({p.P, p.H}, opts);
      dweights.push_back(dw_hr);
    }
  }
  Tensor dgx = empty({p.N, p.G}, opts);
  Tensor dgh = cell == Cell::GRU || norm.active() ? empty({p.N, p.G}, opts) : dgx;
  Tensor h_prev = empty({p.N, p.P}, opts);
  Tensor dht, dm, rh, drh;
  if (projected) {
    dht = empty({p.N, p.P}, opts);
    dm = empty({p.B, p.H}, acc);
  }
  if (cell == Cell::GRU_CHO) {
    rh = empty({p.N, p.H}, opts);
    drh = empty({p.B, p.H}, acc);
  }
  Tensor masked_h_prev, dh_product;
  if (p.recurrent_mask) {
    masked_h_prev = empty({p.N, p.P}, opts);
    dh_product = empty({p.B, p.P}, acc);
  }
  Tensor ones = (need_weights && has_biases) ? empty({p.N}, opts).fill_(1) : Tensor();

  p.x = ptr(x);
  p.h0 = ptr(h0c);
  p.c0 = ptr(c0_acc);
  p.hidden = ptr(hidden_c);
  p.gates = ptr(gates_c);
  p.cells = ptr(cells_c);
  p.proj_in = ptr(proj_in_c);
  p.dy = ptr(dyc);
  p.dh = ptr(dh);
  p.dc = ptr(dc);
  p.dx = ptr(dx);
  p.dw_ih = ptr(dw_ih);
  p.dw_hh = ptr(dw_hh);
  p.db_ih = ptr(db_ih);
  p.db_hh = ptr(db_hh);
  p.dw_hr = ptr(dw_hr);
  p.dgx = ptr(dgx);
  p.dgh = ptr(dgh);
  p.h_prev = ptr(h_prev);
  p.c_prev = ptr(c_prev);
  p.dht = ptr(dht);
  p.dm = ptr(dm);
  p.rh = ptr(rh);
  p.drh = ptr(drh);
  (lstm_zoneout ? p.cells_new : p.hidden_new) = ptr(state_new_c);
  p.masked_h_prev = ptr(masked_h_prev);
  p.dh_product = ptr(dh_product);
  p.ones = ptr(ones);

  std::vector<Tensor> saved_c, dnorm_weights;
  Tensor dpre_x, dpre_h, dc_tilde, dc_norm;
  if (norm.active()) {
    p.norm = &norm.params;
    const bool batch = norm.params.kind == Norm::Batch, lstm = cell == Cell::LSTM;
    const int64_t widths[] = {p.G, p.G, p.H};
    const char* names[] = {"x", "h", "c"};
    const void** xhats[] = {&p.xhat_x, &p.xhat_h, &p.chat};
    const void** rstds[] = {&p.rstd_x, &p.rstd_h, &p.rstd_c};
    for (int i = 0; i < (lstm ? 3 : 2); ++i) {
      const std::vector<int64_t> line_shape =
          batch ? std::vector<int64_t>{p.T, widths[i]}
                : (i == 1 ? std::vector<int64_t>{p.N, hidden_norm_groups(cell)} : std::vector<int64_t>{p.N});
      const std::string xhat_name = std::string("the saved normalized ") + names[i];
      const std::string rstd_name = std::string("the saved rstd of ") + names[i];
      saved_c.push_back(prepare(norm_saved[2 * i], xhat_name.c_str(), {p.N, widths[i]}, x, acc_dtype));
      saved_c.push_back(prepare(norm_saved[2 * i + 1], rstd_name.c_str(), line_shape, x, acc_dtype));
      *xhats[i] = ptr(saved_c[2 * i]);
      *rstds[i] = ptr(saved_c[2 * i + 1]);
    }
    dpre_x = empty({p.N, p.G}, opts);
    dpre_h = cell == Cell::GRU ? empty({p.N, p.G}, opts) : dpre_x;
    p.dpre_x = ptr(dpre_x);
    p.dpre_h = ptr(dpre_h);
    if (lstm) {
      dc_tilde = empty({p.N, p.H}, acc);
      dc_norm = empty({p.B, p.H}, acc);
      p.dc_tilde = ptr(dc_tilde);
      p.dc_norm = ptr(dc_norm);
    }
    if (need_weights) {
      void** targets[] = {&p.dgamma_x, &p.dgamma_h, &p.dgamma_c, &p.dbeta_c};
      for (size_t i = 0; i < norm.weights.size(); ++i) {
        dnorm_weights.push_back(empty({i < 2 ? p.G : p.H}, opts));
        *targets[i] = ptr(dnorm_weights.back());
      }
    }
  }
  if (simulated(choice)) poison({dgx, dgh, rh});
  run(x, p);

  if (dx.defined() && !layer.packed) dx = dx.view(x.sizes());
  return {dx.defined() ? dx : absent(x), dh.to(x.scalar_type()), dc.defined() ? dc.to(x.scalar_type()) : absent(x),
          dweights, dnorm_weights};
}

// Batched backward under autograd's own vmap (the legacy one, dispatch key Batched):
// torch.autograd.grad(..., is_grads_batched=True), jacobian(..., vectorize=True) and gradcheck's
// batched check run the backward with batched gradients, and that vmap's generic fallback
// cannot return lists of tensors. The fused backward has no batch dimension of its own (the
// weight gradients sum over all rows, batch norm couples them), so it runs once per batch
// entry and the results are stacked. torch.func.vmap goes through the rule that
// rnnfused/_ops.py registers with torch.library.register_vmap.
BackwardResult layer_backward_batched(const Tensor& x_in, const OptTensor& batch_sizes, const Tensor& h0,
                                      const OptTensor& c0, at::TensorList weights, at::TensorList norm_weights,
                                      const OptTensor& step_flags, Masks masks, at::TensorList saved_list,
                                      const Tensor& dy,
                                      const Tensor& dh_n, const OptTensor& dc_n, int64_t cell_index, bool has_biases,
                                      bool reverse, double cell_clip, double grad_clip, int64_t norm_index,
                                      bool training, double eps, int64_t side_by_side, bool need_dx,
                                      bool need_weights) {
  Tensor x = x_in, h0_entry = h0, dy_entry = dy, dh_entry = dh_n;
  OptTensor c0_entry = c0, flags_entry = step_flags, dc_entry = dc_n;
  std::vector<Tensor> weights_entry(weights.begin(), weights.end()), norm_entry(norm_weights.begin(), norm_weights.end()),
      saved_entry(saved_list.begin(), saved_list.end());
  std::vector<Tensor*> batched;  // the arguments that carry batch dimensions, replaced by one entry at a time
  auto visit = [&](Tensor& t) {
    if (t.defined() && at::isBatchedTensor(t)) batched.push_back(&t);
  };
  for (Tensor* t : {&x, &h0_entry, &dy_entry, &dh_entry}) visit(*t);
  for (OptTensor* t : {&c0_entry, &flags_entry, &dc_entry})
    if (t->has_value()) visit(**t);
  for (std::vector<Tensor>* list : {&weights_entry, &norm_entry, &saved_entry})
    for (Tensor& t : *list) visit(t);
  TORCH_CHECK(!batched.empty() && !(batch_sizes.has_value() && at::isBatchedTensor(*batch_sizes)),
              "rnnfused: batched layer_backward needs batched tensors other than batch_sizes");
  std::vector<Tensor> logical;
  for (Tensor* t : batched) logical.push_back(*t);
  // Every batch dimension moved to the front, aligned and expanded across the arguments.
  const at::VmapPhysicalViewVec physical = at::MultiBatchVmapTransform::logicalToPhysical(logical);
  const int64_t batch_dims = physical[0].numBatchDims();
  const std::vector<int64_t> batch_shape(physical[0].tensor().sizes().begin(),
                                         physical[0].tensor().sizes().begin() + batch_dims);
  int64_t entries = 1;
  for (int64_t size : batch_shape) entries *= size;
  std::vector<Tensor> flat;
  for (const at::VmapPhysicalView& view : physical) flat.push_back(view.tensor().flatten(0, batch_dims - 1));

  std::vector<Tensor> dxs, dh0s, dc0s;
  std::vector<std::vector<Tensor>> dweights, dnorm_weights;
  for (int64_t i = 0; i < entries; ++i) {
    for (size_t j = 0; j < batched.size(); ++j) *batched[j] = flat[j][i];
    auto [dx, dh0, dc0, dw, dnw] =
        layer_backward(x, batch_sizes, h0_entry, c0_entry, weights_entry, norm_entry, flags_entry, masks, saved_entry,
                       dy_entry, dh_entry, dc_entry, cell_index, has_biases, reverse, cell_clip, grad_clip, norm_index,
                       training, eps, side_by_side, need_dx, need_weights);
    dxs.push_back(dx);
    dh0s.push_back(dh0);
    dc0s.push_back(dc0);
    dweights.resize(dw.size());
    dnorm_weights.resize(dnw.size());
    for (size_t k = 0; k < dw.size(); ++k) dweights[k].push_back(dw[k]);
    for (size_t k = 0; k < dnw.size(); ++k) dnorm_weights[k].push_back(dnw[k]);
  }
  const at::VmapPhysicalToLogicalMap to_logical = physical[0].getPhysicalToLogicalMap();
  auto stacked = [&](const std::vector<Tensor>& parts) {
    Tensor result = at::stack(parts);
    std::vector<int64_t> shape = batch_shape;
    shape.insert(shape.end(), result.sizes().begin() + 1, result.sizes().end());
    return to_logical.apply(result.view(shape));
  };
  std::vector<Tensor> dw_out, dnw_out;
  for (const auto& parts : dweights) dw_out.push_back(stacked(parts));
  for (const auto& parts : dnorm_weights) dnw_out.push_back(stacked(parts));
  return {stacked(dxs), stacked(dh0s), stacked(dc0s), dw_out, dnw_out};
}

persistent::PlanFor plan_for(bool inference) {
  return inference ? persistent::PlanFor::Inference : persistent::PlanFor::Training;
}

// A device described by its numbers (for _C.plan and _C.pipeline_plan: tests and tuning).
persistent::DeviceLimits described_limits(int64_t sm_count, int64_t smem_per_block, int compute_capability,
                                          bool cooperative_launch, int64_t max_cluster) {
  persistent::DeviceLimits limits;
  limits.sm_count = sm_count;
  limits.smem_per_block = smem_per_block;
  limits.compute_capability = compute_capability;
  limits.cooperative_launch = cooperative_launch;
  limits.max_cluster = max_cluster;
  return limits;
}

pybind11::dict pipeline_dict(const persistent::PipelinePlan& pipeline) {
  namespace py = pybind11;
  return py::dict(py::arg("chunks") = pipeline.chunks, py::arg("layered_ns") = pipeline.layered_ns,
                  py::arg("pipelined_ns") = pipeline.pipelined_ns, py::arg("reason") = pipeline.reason);
}

// A tiling's fields and layouts, for _C.plan and _C.plan_cost.
pybind11::dict tiling_dict(const persistent::Tiling& t) {
  namespace py = pybind11;
  py::dict out;
  for (const auto& [name, value] :
       std::vector<std::pair<const char*, int64_t>>{{"units", t.units}, {"rows", t.rows},
                                                    {"unit_tiles", t.unit_tiles}, {"row_tiles", t.row_tiles},
                                                    {"ctas", t.ctas()}, {"rows_pad", t.rows_pad},
                                                    {"gate_stride", t.gate_stride}, {"gate_rows", t.gate_rows},
                                                    {"k_fwd", t.k_fwd}, {"ld_w_fwd", t.ld_w_fwd},
                                                    {"ld_acc_fwd", t.ld_acc_fwd}, {"split_fwd", t.split_fwd},
                                                    {"unit_rows", t.unit_rows}, {"k_block", t.k_block},
                                                    {"k_bwd", t.k_bwd}, {"ld_w_bwd", t.ld_w_bwd},
                                                    {"chunk_gates", t.chunk_gates}, {"ld_dg", t.ld_dg},
                                                    {"ld_acc_bwd", t.ld_acc_bwd}, {"split_bwd", t.split_bwd},
                                                    {"cluster", t.cluster}, {"held_fwd", t.held_fwd},
                                                    {"held_bwd", t.held_bwd}})
    out[name] = value;
  out["prefetch_bwd"] = t.prefetch_bwd;
  for (const auto& [name, layout] :
       std::vector<std::pair<const char*, persistent::Layout>>{{"fwd", t.fwd}, {"bwd", t.bwd}})
    out[name] = py::dict(py::arg("weights") = layout.weights, py::arg("operand") = layout.operand,
                         py::arg("acc") = layout.acc, py::arg("partials") = layout.partials,
                         py::arg("state") = layout.state, py::arg("state2") = layout.state2,
                         py::arg("inputs") = layout.inputs, py::arg("bias") = layout.bias,
                         py::arg("narrow") = layout.narrow, py::arg("signals") = layout.signals,
                         py::arg("bytes") = layout.bytes);
  return out;
}

// A forward and a backward step's estimates by phase (timing.h's names), in nanoseconds,
// with their totals.
pybind11::dict estimate_dict(const persistent::StepCost& forward, const persistent::StepCost& backward) {
  namespace py = pybind11;
  auto phases = [](const persistent::StepCost& cost) {
    return py::dict(py::arg("exchange") = cost.exchange, py::arg("mma") = cost.mma, py::arg("cell") = cost.cell,
                    py::arg("stores") = cost.stores, py::arg("window") = cost.window,
                    py::arg("barrier") = cost.barrier,
                    py::arg("total") = cost.total());
  };
  return py::dict(py::arg("forward") = phases(forward), py::arg("backward") = phases(backward));
}

}  // namespace
}  // namespace rnnfused

// The operators. Shapes (params.h): T steps, B batch, N rows (T*B padded), I inputs, H hidden,
// P = proj_size or H, G gate rows. x is [T, B, I] (batch_sizes None) or packed [N, I];
// outputs that do not apply are empty tensors of shape [0].
TORCH_LIBRARY(rnnfused, m) {
  // Tensors first (the weights and the normalization's as lists), then the scalar options in
  // the order of LayerOptions (params.h; Python: rnnfused._ops.LayerOptions), then what is
  // particular to the operator.
  m.def(
      "layer_forward(Tensor x, Tensor? batch_sizes, Tensor h0, Tensor? c0, Tensor[] weights, Tensor[] norm_weights, "
      "Tensor[] running_stats, Tensor? step_flags, Tensor[] masks, int cell, bool has_biases, bool reverse, "
      "float cell_clip, float grad_clip, int norm, bool training, float eps, int side_by_side, "
      "bool save_for_backward) -> (Tensor y, Tensor h_n, Tensor c_n, Tensor[] saved, Tensor[] batch_stats)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "layer_backward(Tensor x, Tensor? batch_sizes, Tensor h0, Tensor? c0, Tensor[] weights, Tensor[] norm_weights, "
      "Tensor? step_flags, Tensor[] masks, Tensor[] saved, Tensor dy, Tensor dh_n, Tensor? dc_n, int cell, "
      "bool has_biases, bool reverse, float cell_clip, float grad_clip, int norm, bool training, float eps, "
      "int side_by_side, bool need_dx, bool need_weights) -> "
      "(Tensor dx, Tensor dh0, Tensor dc0, Tensor[] dweights, Tensor[] dnorm_weights)",
      {at::Tag::pt2_compliant_tag});
}

TORCH_LIBRARY_IMPL(rnnfused, CPU, m) {
  m.impl("layer_forward", &rnnfused::layer_forward);
  m.impl("layer_backward", &rnnfused::layer_backward);
}

#ifdef RNNFUSED_WITH_CUDA
TORCH_LIBRARY_IMPL(rnnfused, CUDA, m) {
  m.impl("layer_forward", &rnnfused::layer_forward);
  m.impl("layer_backward", &rnnfused::layer_backward);
}
#endif

TORCH_LIBRARY_IMPL(rnnfused, Batched, m) {
  m.impl("layer_backward", &rnnfused::layer_backward_batched);
}

// What is not an operator: which backends, GPU architectures and CPU instruction sets this
// build has, and which kernel a layer runs (rnnfused.explain) with the planner behind it.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace rnnfused;
  namespace py = pybind11;
  m.doc() = "rnnfused kernels; the operators are torch.ops.rnnfused.layer_forward / layer_backward";
  m.attr("with_cuda") = kWithCuda;
#ifdef RNNFUSED_DEVICE_SOURCE_HASH
  m.attr("device_source_hash") = RNNFUSED_DEVICE_SOURCE_HASH;
#else
  m.attr("device_source_hash") = "";
#endif
  m.def("set_verified_architectures", &set_verified_architectures,
        "The compute capabilities (e.g. [90]) on which a GPU run verified this build's device code");
  m.attr("cpu_element_loops") = cpu::element_loop_isa();
#ifdef RNNFUSED_WITH_CUDA
  m.attr("cuda_archs") = cuda::compiled_archs();
#else
  m.attr("cuda_archs") = "";
#endif
  m.def(
      "empty_cpu_cache", [] { return CachingCpuAllocator::instance().empty_cache(); },
      "Returns every cached CPU block to the system (rnnfused.empty_cache); the bytes released");
  m.def(
      "cpu_cache_stats",
      [] {
        const CachingCpuAllocator::Stats stats = CachingCpuAllocator::instance().stats();
        return py::dict(py::arg("cached_bytes") = stats.cached_bytes, py::arg("in_use_bytes") = stats.in_use_bytes,
                        py::arg("limit_bytes") = stats.limit_bytes);
      },
      "Bytes of the CPU block cache: cached (kept for reuse), in use, and its bound");
  m.def(
      "kernel_choice",
      [](int64_t cell, int64_t T, int64_t H, int64_t P, int64_t B, at::ScalarType dtype, const std::string& device,
         bool step_flags, bool masks, int64_t side_by_side, bool inference) {
        const KernelChoice choice = with_steps_options(
            choose_kernel(cell_of(cell), T, H, P, B, dtype_of(dtype), at::Device(device), side_by_side,
                          plan_for(inference)),
            step_flags, masks);
        return std::make_pair(choice.kernel, choice.reason);
      },
      py::arg("cell"), py::arg("T"), py::arg("H"), py::arg("P"), py::arg("B"), py::arg("dtype"), py::arg("device"),
      py::arg("step_flags") = false, py::arg("masks") = false, py::arg("side_by_side") = 1,
      py::arg("inference") = false,
      "(kernel, reason) for a layer direction: cell, steps, hidden size, output width, batch, dtype, device, "
      "whether it has step flags (resets, lengths) or masks (recurrent dropout, zoneout), how many recurrences "
      "run side by side with it included (LayerOptions.side_by_side), and whether it is an inference forward "
      "(nothing saved for a backward)");
  m.def(
      "layer_plan",
      [](int64_t cell, int64_t T, int64_t H, int64_t B, at::ScalarType dtype, const std::string& device,
         int64_t side_by_side, bool inference) {
        const KernelChoice choice = choose_kernel(cell_of(cell), T, H, H, B, dtype_of(dtype), at::Device(device),
                                                  side_by_side, plan_for(inference));
        py::dict out = tiling_dict(choice.plan.tiling);
        out["kernel"] = choice.kernel;
        out["reason"] = choice.reason;
        out["persistent"] = choice.plan.persistent;
        out["estimate"] = estimate_dict(choice.plan.forward, choice.plan.backward);
        return out;
      },
      py::arg("cell"), py::arg("T"), py::arg("H"), py::arg("B"), py::arg("dtype"), py::arg("device"),
      py::arg("side_by_side") = 1, py::arg("inference") = false,
      "The kernel choice of a layer direction (as kernel_choice, RNNFUSED_* settings included) with its persistent "
      "plan: the tiling and the cost model's estimate of a step's phases in nanoseconds (for bench.phases)");
  m.def(
      "plan",
      [](int64_t cell, int64_t H, int64_t P, int64_t B, at::ScalarType dtype, bool tf32, int64_t sm_count,
         int64_t smem_per_block, int compute_capability, bool cooperative_launch, bool host_simulation,
         bool spread_units, int64_t max_cluster, bool hold_weights, int64_t side_by_side, bool inference) {
        persistent::DeviceLimits limits =
            described_limits(sm_count, smem_per_block, compute_capability, cooperative_launch, max_cluster);
        limits.side_by_side = side_by_side;
        limits.hold_weights = hold_weights;
        limits.host_simulation = host_simulation;
        limits.spread_units = spread_units;
        const persistent::Plan plan =
            persistent::make_plan(cell_of(cell), H, P, B, dtype_of(dtype), tf32, limits, plan_for(inference));
        py::dict out = tiling_dict(plan.tiling);
        out["persistent"] = plan.persistent;
        out["reason"] = plan.reason;
        out["candidates"] = plan.candidates;
        out["estimate"] = estimate_dict(plan.forward, plan.backward);
        return out;
      },
      py::arg("cell"), py::arg("H"), py::arg("P"), py::arg("B"), py::arg("dtype"), py::arg("tf32"),
      py::arg("sm_count"), py::arg("smem_per_block"), py::arg("compute_capability"), py::arg("cooperative_launch"),
      py::arg("host_simulation"), py::arg("spread_units"), py::arg("max_cluster") = 0, py::arg("hold_weights") = true,
      py::arg("side_by_side") = 1, py::arg("inference") = false,
      "The persistent kernel's plan for a layer direction on a described device (for tests and tuning; max_cluster: "
      "the most CTAs a thread-block cluster may have, 0 for none; hold_weights: whether W may be kept in registers; "
      "side_by_side: the recurrences sharing the device, this one included; inference: the forward alone, without "
      "a backward estimate), with the cost model's estimate of a step's phases in nanoseconds (not a measurement)");
  m.def(
      "pipeline_plan",
      [](int64_t cell, int64_t T, int64_t layers, int64_t H, int64_t B, at::ScalarType dtype, bool tf32,
         int64_t sm_count, int64_t smem_per_block, int compute_capability, bool cooperative_launch,
         int64_t max_cluster, bool inference, int64_t max_chunks) {
        py::dict out = pipeline_dict(persistent::plan_pipeline(
            cell_of(cell), T, layers, H, H, B, dtype_of(dtype), tf32,
            described_limits(sm_count, smem_per_block, compute_capability, cooperative_launch, max_cluster),
            plan_for(inference), max_chunks));
        out["launch_ns"] = persistent::CostModel().launch_ns;
        return out;
      },
      py::arg("cell"), py::arg("T"), py::arg("layers"), py::arg("H"), py::arg("B"), py::arg("dtype"), py::arg("tf32"),
      py::arg("sm_count"), py::arg("smem_per_block"), py::arg("compute_capability"), py::arg("cooperative_launch"),
      py::arg("max_cluster") = 0, py::arg("inference") = false,
      py::arg("max_chunks") = persistent::kMaxPipelineChunks,
      "A unidirectional stack's layer pipeline on a described device (for tests): the cheapest number of slices "
      "(chunks, 0 for layer after layer), the cost model's estimates of the stack's recurrences in nanoseconds "
      "layer after layer and pipelined, the reason, and the model's launch cost it charged");
  m.def(
      "pipeline_choice",
      [](int64_t cell, int64_t T, int64_t layers, int64_t H, int64_t P, int64_t B, at::ScalarType dtype,
         const std::string& device, bool step_flags, bool inference) {
        return pipeline_dict(choose_pipeline(cell_of(cell), T, layers, H, P, B, dtype_of(dtype), at::Device(device),
                                             step_flags, plan_for(inference)));
      },
      py::arg("cell"), py::arg("T"), py::arg("layers"), py::arg("H"), py::arg("P"), py::arg("B"), py::arg("dtype"),
      py::arg("device"), py::arg("step_flags") = false, py::arg("inference") = false,
      "RNNFUSED_WAVEFRONT=auto's choice for a unidirectional stack on a device (RNNFUSED_* settings included): "
      "as pipeline_plan, where its layers run the persistent kernel on a GPU (not with step flags: lengths, "
      "resets), else layer after layer");
  m.def(
      "plan_cost",
      [](int64_t cell, int64_t H, int64_t B, at::ScalarType dtype, int64_t rows, int64_t units,
         int64_t smem_per_block, bool cluster, bool hold_weights) {
        const persistent::Tiling t = persistent::tile_for(cell_of(cell), H, B, dtype_of(dtype), rows, units,
                                                          smem_per_block, cluster, hold_weights);
        const bool fits = persistent::fits(t, smem_per_block),
                   fits_forward = persistent::fits(t, smem_per_block, persistent::PlanFor::Inference);
        py::dict out = tiling_dict(t);
        out["fits"] = fits;
        out["fits_forward"] = fits_forward;
        out["estimate"] = py::none();
        if (fits_forward) {
          persistent::StepCost backward;  // estimate_step needs a backward that fits
          if (fits) backward = persistent::estimate_step(cell_of(cell), H, dtype_of(dtype), t, true);
          py::dict estimate =
              estimate_dict(persistent::estimate_step(cell_of(cell), H, dtype_of(dtype), t, false), backward);
          if (!fits) estimate["backward"] = py::none();
          out["estimate"] = estimate;
        }
        return out;
      },
      py::arg("cell"), py::arg("H"), py::arg("B"), py::arg("dtype"), py::arg("rows"), py::arg("units"),
      py::arg("smem_per_block"), py::arg("cluster") = false, py::arg("hold_weights") = true,
      "Any tiling of `rows` batch rows and `units` hidden units per CTA (the CTAs of a batch tile one cluster if "
      "`cluster`; W in registers where it can be and `hold_weights`): its layout, whether both passes fit (fits) "
      "and whether the forward does (fits_forward), and the cost model's estimate of a step of each pass that "
      "fits (the planner's candidates; for tests)");
#ifdef RNNFUSED_WITH_CUDA
  m.def(
      "persistent_kernel_info",
      [] {
        py::list out;
        for (const cuda::KernelInfo& info : cuda::persistent_kernel_info())
          out.append(py::dict(py::arg("name") = info.name, py::arg("registers") = info.registers,
                              py::arg("local_bytes") = info.local_bytes,
                              py::arg("static_shared_bytes") = info.static_shared_bytes));
        return out;
      },
      "Registers, local memory (spills) and static shared memory of every persistent kernel");
  m.def(
      "barrier_microseconds",
      [](const std::string& kind, int ctas, int cluster, int iterations, int payload) {
        return cuda::barrier_microseconds(kind, ctas, cluster, iterations, payload, at::cuda::getCurrentCUDAStream());
      },
      py::arg("kind"), py::arg("ctas"), py::arg("cluster"), py::arg("iterations"), py::arg("payload") = 16,
      "Microseconds per grid or cluster barrier, or per exchange of `payload` bytes from every CTA of a cluster "
      "into each peer (python -m bench.barrier)");
  m.def("co_resident_clusters", &cuda::co_resident_clusters, py::arg("kind"), py::arg("cluster"),
        py::arg("payload") = 16, "How many clusters of barrier_microseconds' cluster or exchange launch run at once");
#endif

  // --- the persistent kernel's phase timer (python -m bench.phases) -------------------------
  // Builds with RNNFUSED_PHASE_TIMING=1 (setup.py) time the phases of every persistent launch
  // (csrc/persistent/timing.h); phase_times returns the last forward or backward launch's.
#if defined(RNNFUSED_WITH_CUDA) && defined(RNNFUSED_PHASE_TIMING)
  m.attr("phase_timing") = true;
#else
  m.attr("phase_timing") = false;
#endif
  {
    py::list names;
    for (const char* name : persistent::kPhaseNames) names.append(name);
    m.attr("phase_names") = names;
  }
#ifdef RNNFUSED_WITH_CUDA
  m.def(
      "phase_times",
      [](bool backward) {
        const cuda::PhaseTimes times = cuda::last_phase_times(backward);
        py::list ctas;
        for (const persistent::PhaseRecord& r : times.ctas)
          ctas.append(py::dict(py::arg("cycles") = std::vector<unsigned long long>(r.cycles, r.cycles + persistent::kPhases),
                               py::arg("clock") = std::make_pair(r.clock_begin, r.clock_end),
                               py::arg("ns") = std::make_pair(r.ns_begin, r.ns_end)));
        return py::dict(py::arg("launches") = times.launches, py::arg("steps") = times.steps,
                        py::arg("phases_per_step") = times.phases_per_step, py::arg("ctas") = ctas);
      },
      py::arg("backward"),
      "The phase times of the last persistent launch (forward, or backward): launches (timed so far), steps, "
      "phases_per_step, and per CTA its clock64 cycles per phase (phase_names), clock and %globaltimer ns at its "
      "start and end. Needs a build with RNNFUSED_PHASE_TIMING=1");
#endif
}
