// Every input of csrc/cpu/convert.h's conversions against c10's: all 2^16 float16 and
// bfloat16 values widened, all 2^32 float32 values narrowed; the widening again with the
// CPU's flush-to-zero modes on. Prints the first mismatches and exits 1 if there is any.
#include <xmmintrin.h>

#include <cstdio>
#include <vector>

#include "cpu/convert.h"

using rnnfused::cpu::bits_float;
using rnnfused::cpu::float_bits;

static long mismatches = 0;

static void report(const char* what, uint32_t input, uint32_t got, uint32_t want) {
  if (++mismatches <= 10) std::printf("%s(0x%08x): 0x%08x, c10 0x%08x\n", what, input, got, want);
}

static void check_widening(const std::vector<uint32_t>& half_want, const std::vector<uint32_t>& bf16_want) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const uint32_t half = float_bits(rnnfused::cpu::half_to_float(static_cast<uint16_t>(h)));
    const uint32_t bf16 = float_bits(rnnfused::cpu::bfloat16_to_float(static_cast<uint16_t>(h)));
    if (half != half_want[h]) report("half_to_float", h, half, half_want[h]);
    if (bf16 != bf16_want[h]) report("bfloat16_to_float", h, bf16, bf16_want[h]);
  }
}

int main() {
  std::vector<uint32_t> half_want(65536), bf16_want(65536);
  for (uint32_t h = 0; h < 65536; ++h) {
    half_want[h] = float_bits(static_cast<float>(c10::Half(static_cast<uint16_t>(h), c10::Half::from_bits())));
    bf16_want[h] = float_bits(static_cast<float>(c10::BFloat16(static_cast<uint16_t>(h), c10::BFloat16::from_bits())));
  }
  check_widening(half_want, bf16_want);
  uint32_t u = 0;
  do {
    const float x = bits_float(u);
    const uint16_t half = rnnfused::cpu::float_to_half(x), bf16 = rnnfused::cpu::float_to_bfloat16(x);
    const uint16_t half_want = c10::Half(x).x, bf16_want = c10::BFloat16(x).x;
    if (half != half_want) report("float_to_half", u, half, half_want);
    if (bf16 != bf16_want) report("float_to_bfloat16", u, bf16, bf16_want);
  } while (++u != 0);
  _mm_setcsr(_mm_getcsr() | 0x8040);  // flush to zero, denormals are zero
  check_widening(half_want, bf16_want);
  std::printf("%ld mismatches\n", mismatches);
  return mismatches == 0 ? 0 : 1;
}
