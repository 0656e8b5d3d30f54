// The CPU's vector code, each compiled for three instruction sets and picked at run time:
// the fused element loops (steps.h's functors) and the small-batch product of the threaded
// recurrence (persistent_cpu.h). A build with RNNFUSED_CPU_BASELINE_ONLY (setup.py) compiles
// the baseline alone: a third of the code, for builds that check packaging or an interface
// rather than speed, and a run of the baseline code on any CPU.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace rnnfused {
namespace cpu {

enum class Isa { Baseline, Avx2, Avx512 };

inline Isa detect_isa() {
#if defined(RNNFUSED_CPU_BASELINE_ONLY)
  return Isa::Baseline;
#else
  __builtin_cpu_init();  // a library's static initialiser may run before libgcc's own
  // BW and VL: the element loops' float16 / bfloat16 values in 512-bit vectors.
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl"))
    return Isa::Avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::Avx2;
  return Isa::Baseline;
#endif
}

inline Isa cpu_isa() {
  static const Isa isa = detect_isa();
  return isa;
}

// ---------------------------------------------------------------------------------------
// The element loop: f(b, j) for b in [begin, end), j in [j0, j1). The cell functions inline
// into it and vectorise along j (every (b, j) touches its own elements, which `omp simd`
// asserts).
// A pass with step flags (steps.h: kHolds) picks its step or its hold per row, outside the
// vectorised loop.
template <typename F, typename = void>
struct HoldsRows : std::false_type {};
template <typename F>
struct HoldsRows<F, std::enable_if_t<F::kHolds>> : std::true_type {};

template <typename F>
__attribute__((always_inline)) inline void rows(const F& f_in, int64_t begin, int64_t end, int64_t j0, int64_t j1) {
  // A local copy: through the reference, a float member (a clip value) could alias the
  // float stores of the loop, and the vectoriser would give up.
  const F f = f_in;
  for (int64_t b = begin; b < end; ++b) {
    if constexpr (HoldsRows<F>::value) {
      if (f.held(b)) {
        for (int64_t j = j0; j < j1; ++j) f.hold(b, j);
        continue;
      }
#pragma omp simd
      for (int64_t j = j0; j < j1; ++j) f.step(b, j);
    } else {
#pragma omp simd
      for (int64_t j = j0; j < j1; ++j) f(b, j);
    }
  }
}

template <typename F>
void rows_baseline(const F& f, int64_t begin, int64_t end, int64_t j0, int64_t j1) {
  rows(f, begin, end, j0, j1);
}

template <typename F>
__attribute__((target("avx2,fma"))) void rows_avx2(const F& f, int64_t begin, int64_t end, int64_t j0, int64_t j1) {
  rows(f, begin, end, j0, j1);
}

template <typename F>
__attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma"))) void rows_avx512(const F& f, int64_t begin,
                                                                                       int64_t end, int64_t j0,
                                                                                       int64_t j1) {
  rows(f, begin, end, j0, j1);
}

template <typename F>
void for_each_element(const F& f, int64_t begin, int64_t end, int64_t j0, int64_t j1) {
  switch (cpu_isa()) {
#if !defined(RNNFUSED_CPU_BASELINE_ONLY)
    case Isa::Avx512: return rows_avx512(f, begin, end, j0, j1);
    case Isa::Avx2: return rows_avx2(f, begin, end, j0, j1);
#endif
    default: return rows_baseline(f, begin, end, j0, j1);
  }
}

// ---------------------------------------------------------------------------------------
// The small-batch product: c[r][col(v, l)] (+)= Σ_k a[r][k] w[v][k][l] for rows r < m,
// where w is packed in `vectors` panels of kV columns, each K-major and contiguous (a block
// streams through its panels), zero padded, and col(v, l) = offset[v] + l, lanes
// l < valid[v] stored. A register block of kR rows by
// kC vectors: per k, kR broadcasts of a, kC vector loads of w, kR * kC fused multiply-adds;
// no reductions. Every element of c is summed in k order whatever the blocking, so the
// result does not depend on how columns are split between threads.
template <typename T, int kV>
struct Columns {
  const int64_t* offset;  // [vectors] first column of c of each vector
  const int* valid;       // [vectors] lanes stored (the rest is padding)
};

template <typename T, int kV, int kR, int kC>
inline __attribute__((always_inline)) void product_block(T* c, int64_t ldc, bool accumulate, const T* a, int64_t lda,
                                                         const T* w, int64_t vectors, int64_t k,
                                                         const Columns<T, kV>& columns, int64_t r0, int64_t v0) {
  typedef T Vector __attribute__((vector_size(kV * sizeof(T))));
  Vector sum[kR][kC];
  for (int i = 0; i < kR; ++i)
    for (int j = 0; j < kC; ++j) sum[i][j] = Vector{};
  for (int64_t kk = 0; kk < k; ++kk) {
    Vector wv[kC];
    for (int j = 0; j < kC; ++j) std::memcpy(&wv[j], w + ((v0 + j) * k + kk) * kV, sizeof(Vector));
    for (int i = 0; i < kR; ++i) {
      const T x = a[(r0 + i) * lda + kk];
      for (int j = 0; j < kC; ++j) sum[i][j] += x * wv[j];
    }
  }
  for (int i = 0; i < kR; ++i)
    for (int j = 0; j < kC; ++j) {
      T* out = c + (r0 + i) * ldc + columns.offset[v0 + j];
      const int lanes = columns.valid[v0 + j];
      if (lanes == kV) {  // a whole vector: one load and store
        Vector value = sum[i][j];
        if (accumulate) {
          Vector old;
          std::memcpy(&old, out, sizeof(Vector));
          value += old;
        }
        std::memcpy(out, &value, sizeof(Vector));
      } else {
        for (int l = 0; l < lanes; ++l) out[l] = accumulate ? out[l] + sum[i][j][l] : sum[i][j][l];
      }
    }
}

// Column vectors [v0, v1) for all rows: vector blocks outside (a block of W, kC vectors by
// K, is read from the cache once for all row blocks), row blocks inside. Rows past the last
// full block go one at a time, eight vectors at once (a single row's kC sums alone would wait
// on each other's fused multiply-adds).
template <typename T, int kV, int kR, int kC>
inline __attribute__((always_inline)) void product(T* c, int64_t ldc, bool accumulate, const T* a, int64_t lda,
                                                   const T* w, int64_t vectors, int64_t m, int64_t k,
                                                   const Columns<T, kV>& columns) {
  constexpr int kWide = 8;
  const int64_t full = m / kR * kR;
  int64_t v = 0;
  for (; v + kC <= vectors; v += kC)
    for (int64_t r = 0; r < full; r += kR)
      product_block<T, kV, kR, kC>(c, ldc, accumulate, a, lda, w, vectors, k, columns, r, v);
  for (; v < vectors; ++v)
    for (int64_t r = 0; r < full; r += kR)
      product_block<T, kV, kR, 1>(c, ldc, accumulate, a, lda, w, vectors, k, columns, r, v);
  for (int64_t r = full; r < m; ++r) {
    int64_t u = 0;
    for (; u + kWide <= vectors; u += kWide)
      product_block<T, kV, 1, kWide>(c, ldc, accumulate, a, lda, w, vectors, k, columns, r, u);
    for (; u < vectors; ++u) product_block<T, kV, 1, 1>(c, ldc, accumulate, a, lda, w, vectors, k, columns, r, u);
  }
}

// Lanes per vector of each build (the packing must match): 64, 32 and 16 bytes.
template <typename T>
constexpr int lanes(Isa isa) {
  return static_cast<int>((isa == Isa::Avx512 ? 64 : isa == Isa::Avx2 ? 32 : 16) / sizeof(T));
}

template <typename T>
__attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma"), optimize("fp-contract=fast"))) void
product_avx512(T* c, int64_t ldc, bool accumulate, const T* a, int64_t lda, const T* w, int64_t vectors, int64_t m,
               int64_t k, const int64_t* offset, const int* valid) {
  constexpr int kV = 64 / sizeof(T);
  product<T, kV, 8, 2>(c, ldc, accumulate, a, lda, w, vectors, m, k, Columns<T, kV>{offset, valid});
}

template <typename T>
__attribute__((target("avx2,fma"), optimize("fp-contract=fast"))) void product_avx2(
    T* c, int64_t ldc, bool accumulate, const T* a, int64_t lda, const T* w, int64_t vectors, int64_t m, int64_t k,
    const int64_t* offset, const int* valid) {
  constexpr int kV = 32 / sizeof(T);
  product<T, kV, 4, 2>(c, ldc, accumulate, a, lda, w, vectors, m, k, Columns<T, kV>{offset, valid});
}

template <typename T>
void product_baseline(T* c, int64_t ldc, bool accumulate, const T* a, int64_t lda, const T* w, int64_t vectors,
                      int64_t m, int64_t k, const int64_t* offset, const int* valid) {
  constexpr int kV = 16 / sizeof(T);
  product<T, kV, 2, 2>(c, ldc, accumulate, a, lda, w, vectors, m, k, Columns<T, kV>{offset, valid});
}

template <typename T>
void small_batch_product(Isa isa, T* c, int64_t ldc, bool accumulate, const T* a, int64_t lda, const T* w,
                         int64_t vectors, int64_t m, int64_t k, const int64_t* offset, const int* valid) {
  switch (isa) {
#if !defined(RNNFUSED_CPU_BASELINE_ONLY)
    case Isa::Avx512: return product_avx512(c, ldc, accumulate, a, lda, w, vectors, m, k, offset, valid);
    case Isa::Avx2: return product_avx2(c, ldc, accumulate, a, lda, w, vectors, m, k, offset, valid);
#endif
    default: return product_baseline(c, ldc, accumulate, a, lda, w, vectors, m, k, offset, valid);
  }
}

}  // namespace cpu
}  // namespace rnnfused
