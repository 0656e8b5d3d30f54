// Philox4x32-10 (Salmon, Moraes, Dror and Shaw, "Parallel random numbers: as easy as 1, 2, 3",
// SC 2011), the counter-based generator torch's CUDA dropout also draws from: 32 random bits
// are a pure function of (key, counter), so a kernel draws element n of a mask from the
// seed and n alone, in any order, on any backend, and backward draws the same bits again.
// rnnfused/regularisers.py computes the same function with tensor operations (the reference's
// copy, which tests compare bit for bit).
#pragma once

#include <stdint.h>

#include "hd.h"

namespace rnnfused {
namespace philox {

// The high 32 bits of a * b; the low ones in `lo`.
RNNF_HD uint32_t mulhilo(uint32_t a, uint32_t b, uint32_t& lo) {
  const uint64_t product = static_cast<uint64_t>(a) * b;
  lo = static_cast<uint32_t>(product);
  return static_cast<uint32_t>(product >> 32);
}

// The four output words of counter c under key (k0, k1), in place: ten rounds, the key bumped
// by the Weyl constants between them.
RNNF_HD void philox4x32_10(uint32_t c[4], uint32_t k0, uint32_t k1) {
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    uint32_t lo0, lo1;
    const uint32_t hi0 = mulhilo(0xD2511F53u, c[0], lo0);
    const uint32_t hi1 = mulhilo(0xCD9E8D57u, c[2], lo1);
    const uint32_t next[4] = {hi1 ^ c[1] ^ k0, lo1, hi0 ^ c[3] ^ k1, lo0};
    for (int i = 0; i < 4; ++i) c[i] = next[i];
  }
}

// The 32 random bits of element `index` of the stream `seed`: the first output word of the
// counter (index, 0, 0) under the key seed.
RNNF_HD uint32_t bits(uint64_t seed, uint64_t index) {
  uint32_t c[4] = {static_cast<uint32_t>(index), static_cast<uint32_t>(index >> 32), 0u, 0u};
  philox4x32_10(c, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  return c[0];
}

}  // namespace philox
}  // namespace rnnfused
