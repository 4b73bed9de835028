// Bit-serial (XNOR/popcount-style) ternary dot product with one hardware or software
// popcount per 64 weights and activation bit. Included by the scalar and AVX2 kernel files,
// each compiled with its own flags; everything here has internal linkage.
#pragma once
#include "cpu/kernels.h"

namespace agentforge {
namespace cpu {
namespace {

// Σ_b coef_b · (popcnt(pos & X_b) − popcnt(neg & X_b)); the top plane is the sign bit,
// so its weight is −2^(bits−1) (two's complement).
inline int64_t bitserial_dot64(uint64_t pos, uint64_t neg, const uint64_t* x_planes, int bits) {
  int64_t dot = 0;
  for (int b = 0; b < bits; ++b) {
    int64_t d = (int64_t)__builtin_popcountll(pos & x_planes[b]) -
                (int64_t)__builtin_popcountll(neg & x_planes[b]);
    dot += (b == bits - 1) ? -d * (1LL << b) : d * (1LL << b);
  }
  return dot;
}

// WeightPlanes(block, pos, neg) extracts the weight bit-planes of one 32-byte block.
template <typename WeightPlanes>
void popcount_matmul_generic(const MatmulArgs& a, int64_t n0, int64_t n1, WeightPlanes weight_planes) {
  const int bits = a.act_bits;
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t m = 0; m < a.M; ++m) a.out[m * a.N + n] = 0;
    for (int64_t kb = 0; kb < a.KB; ++kb) {
      uint64_t pos[2], neg[2];
      weight_planes(a.w + block_offset(a.N, a.KB, n, kb), pos, neg);
      for (int64_t m = 0; m < a.M; ++m) {
        const uint64_t* xp = a.planes + (m * a.KB + kb) * 2 * bits;
        int64_t dot = bitserial_dot64(pos[0], neg[0], xp, bits) +
                      bitserial_dot64(pos[1], neg[1], xp + bits, bits);
        a.out[m * a.N + n] += (int32_t)dot;
      }
    }
  }
}

}  // namespace
}  // namespace cpu
}  // namespace agentforge
