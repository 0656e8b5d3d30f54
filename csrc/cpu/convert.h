// float16 / bfloat16 <-> float32 on the CPU for steps.h's and norm.h's load / store, written
// as integer and float operations without branches so that the element loops (kernels.h)
// vectorise. c10's own conversions do not: bfloat16's rounding branches on NaN, and float16's
// vector instructions are not enabled where the extension is compiled. The results are
// c10's bit for bit (round to nearest even, NaN as c10 writes it; tests/cpp/convert_bits.cpp
// checks every input).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

#include "../steps.h"

namespace rnnfused {
namespace cpu {

inline uint32_t float_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
}

inline float bits_float(uint32_t u) {
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
}

// `when ? a : b` for a mask `when` of all ones or all zeros: GCC turns ternaries inside a large
// loop body into branches, and then does not vectorise the loop.
inline uint32_t select(uint32_t when, uint32_t a, uint32_t b) { return (a & when) | (b & ~when); }
inline uint32_t mask(bool condition) { return 0u - static_cast<uint32_t>(condition); }

inline float bfloat16_to_float(uint16_t h) { return bits_float(static_cast<uint32_t>(h) << 16); }

inline uint16_t float_to_bfloat16(float x) {
  const uint32_t u = float_bits(x);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>(select(mask(x != x), 0x7FC0u, rounded));
}

inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t magnitude = static_cast<uint32_t>(h & 0x7FFFu) << 13;  // exponent and mantissa in place
  // Normal values: rebias the exponent by a multiplication (2^112 = 2^(127 - 15)).
  // Subnormal values m * 2^-24: 0.5 + m * 2^-24 minus 0.5, never a subnormal float (which a
  // flush-to-zero mode would zero). Infinity and NaN: all exponent bits set, NaN made quiet
  // as a float operation on it would.
  const uint32_t normal = float_bits(bits_float(magnitude) * 0x1.0p112f);
  const uint32_t subnormal = float_bits(bits_float(0x3F000000u | (h & 0x3FFu)) - 0.5f);
  const uint32_t special = magnitude | 0x7F800000u | (mask(magnitude > 0x0F800000u) & 0x00400000u);
  const uint32_t finite = select(mask(magnitude < 0x00800000u), subnormal, normal);
  return bits_float(sign | select(mask(magnitude >= 0x0F800000u), special, finite));
}

inline uint16_t float_to_half(float x) {
  const uint32_t u = float_bits(x);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7FFFFFFFu;
  // Normal results: rebias the exponent, round the 13 dropped bits to nearest even (a carry
  // into the exponent is the right result). Subnormal results: adding 0.5 leaves |x| in
  // units of 2^-24 in the low mantissa bits, rounded by the addition itself.
  const uint32_t normal = (a - 0x38000000u + 0xFFFu + ((a >> 13) & 1u)) >> 13;
  const uint32_t subnormal = float_bits(bits_float(a) + 0.5f) - 0x3F000000u;
  uint32_t magnitude = select(mask(a >= 0x38800000u), normal, subnormal);  // at least 2^-14
  magnitude = select(mask(a >= 0x477FF000u), 0x7C00u, magnitude);          // rounds past 65504: infinity
  magnitude = select(mask(a > 0x7F800000u), 0x7E00u, magnitude);           // NaN
  return static_cast<uint16_t>(sign | magnitude);
}

}  // namespace cpu

template <>
inline float load<float, c10::BFloat16>(c10::BFloat16 x) {
  return cpu::bfloat16_to_float(x.x);
}
template <>
inline c10::BFloat16 store<c10::BFloat16, float>(float x) {
  return c10::BFloat16(cpu::float_to_bfloat16(x), c10::BFloat16::from_bits());
}
template <>
inline float load<float, c10::Half>(c10::Half x) {
  return cpu::half_to_float(x.x);
}
template <>
inline c10::Half store<c10::Half, float>(float x) {
  return c10::Half(cpu::float_to_half(x), c10::Half::from_bits());
}

}  // namespace rnnfused
