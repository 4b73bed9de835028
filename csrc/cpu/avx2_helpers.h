// AVX2-level helpers shared by the AVX2 and AVX-512 kernel files. The including file has
// already included the intrinsics (immintrin.h, or SIMDe for the emulated test build);
// everything here has internal linkage.
#pragma once
#include "cpu/kernels.h"

namespace agentforge {
namespace cpu {
namespace {

inline int32_t hsum256(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// Codes of elements 32s..32s+31 of a prepacked block, one per byte.
inline __m256i code_plane(__m256i packed, int s, __m256i mask3) {
  return _mm256_and_si256(_mm256_srli_epi16(packed, 2 * s), mask3);
}

// Code bit-planes of a 32-byte block (see weight_planes_scalar): bits 2s (low) and 2s+1 (high)
// of every byte are the code bits of elements 32s..32s+31; shifting one to bit 7 lets movemask
// gather it.
inline void weight_planes_simd(const uint8_t* block, uint64_t lo[2], uint64_t hi[2]) {
  __m256i v = _mm256_loadu_si256((const __m256i*)block);
  uint32_t l[4], h[4];
  for (int s = 0; s < 4; ++s) {
    l[s] = (uint32_t)_mm256_movemask_epi8(_mm256_slli_epi16(v, 7 - 2 * s));
    h[s] = (uint32_t)_mm256_movemask_epi8(_mm256_slli_epi16(v, 6 - 2 * s));
  }
  for (int i = 0; i < 2; ++i) {
    lo[i] = l[2 * i] | ((uint64_t)l[2 * i + 1] << 32);
    hi[i] = h[2 * i] | ((uint64_t)h[2 * i + 1] << 32);
  }
}

}  // namespace
}  // namespace cpu
}  // namespace agentforge
