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

// Weight bit-planes of a 32-byte block: bits 2s (low) and 2s+1 (high) of every byte are the
// code bits of elements 32s..32s+31; shifting one to bit 7 lets movemask gather it.
// Code 2 (w = +1) has the high bit, code 0 (w = -1) neither.
inline void weight_planes_simd(const uint8_t* block, uint64_t pos[2], uint64_t neg[2]) {
  __m256i v = _mm256_loadu_si256((const __m256i*)block);
  uint32_t lo[4], hi[4];
  for (int s = 0; s < 4; ++s) {
    lo[s] = (uint32_t)_mm256_movemask_epi8(_mm256_slli_epi16(v, 7 - 2 * s));
    hi[s] = (uint32_t)_mm256_movemask_epi8(_mm256_slli_epi16(v, 6 - 2 * s));
  }
  for (int h = 0; h < 2; ++h) {
    uint64_t l = lo[2 * h] | ((uint64_t)lo[2 * h + 1] << 32);
    uint64_t p = hi[2 * h] | ((uint64_t)hi[2 * h + 1] << 32);
    pos[h] = p;
    neg[h] = ~(l | p);
  }
}

}  // namespace
}  // namespace cpu
}  // namespace agentforge
