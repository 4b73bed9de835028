// Bit-serial (XNOR/popcount-style) ternary dot product with one hardware or software
// popcount per 64 weights and activation bit. Included by the scalar and AVX2 kernel files,
// each compiled with its own flags; everything here has internal linkage.
#pragma once
#include "cpu/kernels.h"

namespace agentforge {
namespace cpu {
namespace {

// Σ_b coef_b · popcnt(mask & X_b) = Σ_i [mask_i] x_i; the top plane is the sign bit, so its
// weight is −2^(bits−1) (two's complement).
inline int64_t bitserial_sum64(uint64_t mask, const uint64_t* x_planes, int bits) {
  int64_t dot = 0;
  for (int b = 0; b < bits; ++b) {
    int64_t d = (int64_t)__builtin_popcountll(mask & x_planes[b]);
    dot += (b == bits - 1) ? -d * (1LL << b) : d * (1LL << b);
  }
  return dot;
}

// WeightPlanes(block, lo, hi) extracts the code bit-planes of one 32-byte block; the dot
// product is Σ (lo + 2 hi) x − Σ x, the same w = c − 1 the int8 kernels compute.
template <typename WeightPlanes>
void popcount_matmul_generic(const MatmulArgs& a, int64_t n0, int64_t n1, WeightPlanes weight_planes) {
  const int bits = a.act_bits;
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t m = 0; m < a.M; ++m) a.out[m * a.N + n] = -a.x_sum[m];
    for (int64_t kb = 0; kb < a.KB; ++kb) {
      uint64_t lo[2], hi[2];
      weight_planes(a.w + block_offset(a.N, a.KB, n, kb), lo, hi);
      for (int64_t m = 0; m < a.M; ++m) {
        const uint64_t* xp = a.planes + (m * a.KB + kb) * 2 * bits;
        int64_t dot = 0;
        for (int h = 0; h < 2; ++h)
          dot += bitserial_sum64(lo[h], xp + h * bits, bits) + 2 * bitserial_sum64(hi[h], xp + h * bits, bits);
        a.out[m * a.N + n] += (int32_t)dot;
      }
    }
  }
}

}  // namespace
}  // namespace cpu
}  // namespace agentforge
