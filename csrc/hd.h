// RNNF_HD marks a function that runs on the host and on the device (CUDA), forced inline on
// both sides: the CPU element loops only vectorise when every function down to cells.h's
// exp_ is inlined, which GCC's growth limits do not guarantee in a large unit.
#pragma once

#if defined(__CUDACC__)
#define RNNF_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define RNNF_HD inline __attribute__((always_inline))
#else
#define RNNF_HD inline
#endif
