// How fast one core streams a weight matrix out of its L2 cache through fused multiply-adds:
// the bound of a batch-of-one recurrent step on the CPU, whose product reads every W_hh
// element once per step (a thread's slice, 256 x 512 floats = 512 KiB at H = 256 on two
// threads). Vector panels of 16 floats as the threaded recurrence packs them, eight at a time,
// each a chain of K fused multiply-adds by a broadcast of h. Build and run (AVX-512 machines):
//
//   g++ -O3 -funroll-loops -o /tmp/l2_stream bench/l2_stream.cpp && /tmp/l2_stream
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <vector>

__attribute__((target("avx512f,fma"))) static void product(const float* w, const float* h, int k, int columns,
                                                             float* out) {
  for (int block = 0; block < columns / 128; ++block) {
    __m512 sum[8];
    for (int j = 0; j < 8; ++j) sum[j] = _mm512_setzero_ps();
    const float* panels = w + static_cast<size_t>(block) * 8 * k * 16;
    for (int kk = 0; kk < k; ++kk) {
      const __m512 x = _mm512_set1_ps(h[kk]);
      for (int j = 0; j < 8; ++j) sum[j] = _mm512_fmadd_ps(x, _mm512_loadu_ps(panels + (j * k + kk) * 16), sum[j]);
    }
    for (int j = 0; j < 8; ++j) _mm512_storeu_ps(out + block * 128 + j * 16, sum[j]);
  }
}

int main() {
  if (!__builtin_cpu_supports("avx512f")) {
    std::printf("needs AVX-512\n");
    return 1;
  }
  const int k = 256;
  std::printf("K = %d; median of 7 rounds of 2000 products\n", k);
  for (int columns : {128, 512, 1024, 4096}) {
    std::vector<float> w(static_cast<size_t>(k) * columns, 1e-3f), h(k, 1.0f), out(columns);
    std::vector<double> rounds;
    for (int round = 0; round < 7; ++round) {
      const auto begin = std::chrono::steady_clock::now();
      for (int i = 0; i < 2000; ++i) product(w.data(), h.data(), k, columns, out.data());
      rounds.push_back(std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - begin).count() /
                       2000);
    }
    std::sort(rounds.begin(), rounds.end());
    const double us = rounds[3], kib = 4.0 * k * columns / 1024;
    std::printf("%5d columns (%6.0f KiB): %7.2f us per product, %5.1f GB/s\n", columns, kib, us,
                4.0 * k * columns / us / 1e3);
  }
  return 0;
}
