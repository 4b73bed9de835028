// AVX2 kernels: vpmaddubsw (u8 code × s8 activation) with int16 partial sums flushed to
// int32 before they can overflow; codes are decoded in registers with one shift and one AND
// per 32 weights.
#include <immintrin.h>

#include "cpu/kernels.h"
#include "cpu/popcount_impl.h"

namespace agentforge {
namespace cpu {
namespace {

// One 4-maddubs block sum is at most 4 · 2 · (2 · 128) = 2048 in magnitude, so 15 blocks
// fit an int16 lane (30720 < 32767) before widening.
constexpr int kInt16Blocks = 15;
constexpr int64_t kChunkBlocks = 32;  // GEMM: K chunk decoded at once (4 rows × 4 KiB)

inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

inline __m256i code_plane(__m256i packed, int s, __m256i mask3) {
  return _mm256_and_si256(_mm256_srli_epi16(packed, 2 * s), mask3);
}

// GEMV over one row tile: codes decoded in registers, activations loaded once per block.
template <int R>
void gemv_tile(const MatmulArgs& a, const int8_t* x, int32_t x_sum, int32_t* out, int64_t n) {
  const __m256i mask3 = _mm256_set1_epi8(3), ones = _mm256_set1_epi16(1);
  const uint8_t* tile = a.w + block_offset(a.N, a.KB, n, 0);
  __m256i acc32[R], acc16[R];
  for (int r = 0; r < R; ++r) acc32[r] = acc16[r] = _mm256_setzero_si256();
  for (int64_t kb = 0; kb < a.KB; ++kb) {
    const int8_t* xb = x + kb * kBlockK;
    __m256i x0 = _mm256_loadu_si256((const __m256i*)xb);
    __m256i x1 = _mm256_loadu_si256((const __m256i*)(xb + 32));
    __m256i x2 = _mm256_loadu_si256((const __m256i*)(xb + 64));
    __m256i x3 = _mm256_loadu_si256((const __m256i*)(xb + 96));
    const uint8_t* blk = tile + kb * R * kBlockBytes;
    for (int r = 0; r < R; ++r) {
      __m256i v = _mm256_loadu_si256((const __m256i*)(blk + r * kBlockBytes));
      __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(code_plane(v, 0, mask3), x0),
                                   _mm256_maddubs_epi16(code_plane(v, 1, mask3), x1));
      __m256i q = _mm256_add_epi16(_mm256_maddubs_epi16(code_plane(v, 2, mask3), x2),
                                   _mm256_maddubs_epi16(code_plane(v, 3, mask3), x3));
      acc16[r] = _mm256_add_epi16(acc16[r], _mm256_add_epi16(p, q));
    }
    if ((kb + 1) % kInt16Blocks == 0 || kb + 1 == a.KB) {
      for (int r = 0; r < R; ++r) {
        acc32[r] = _mm256_add_epi32(acc32[r], _mm256_madd_epi16(acc16[r], ones));
        acc16[r] = _mm256_setzero_si256();
      }
    }
  }
  for (int r = 0; r < R; ++r) out[n + r] = hsum_epi32(acc32[r]) - x_sum;
}

void gemv_rows(const MatmulArgs& a, const int8_t* x, int32_t x_sum, int32_t* out, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; n += kTileRows) {
    switch (rows_in_tile(a.N, n)) {
      case 4: gemv_tile<4>(a, x, x_sum, out, n); break;
      case 3: gemv_tile<3>(a, x, x_sum, out, n); break;
      case 2: gemv_tile<2>(a, x, x_sum, out, n); break;
      default: gemv_tile<1>(a, x, x_sum, out, n); break;
    }
  }
}

// GEMM: decode a K chunk of a row tile into plain u8 codes, then run MR activation rows
// against the 4 code rows with int32 accumulation.
void decode_chunk(const MatmulArgs& a, int64_t n, int64_t kb0, int64_t nkb, uint8_t codes[][kChunkBlocks * kBlockK]) {
  const __m256i mask3 = _mm256_set1_epi8(3);
  const int64_t rows = rows_in_tile(a.N, n);
  for (int64_t r = 0; r < kTileRows; ++r) {
    for (int64_t kb = 0; kb < nkb; ++kb) {
      uint8_t* dst = codes[r] + kb * kBlockK;
      if (r >= rows) {  // rows past the end of a short tile compute zeros, never stored
        for (int s = 0; s < 4; ++s) _mm256_storeu_si256((__m256i*)(dst + 32 * s), _mm256_setzero_si256());
        continue;
      }
      __m256i v = _mm256_loadu_si256((const __m256i*)(a.w + block_offset(a.N, a.KB, n + r, kb0 + kb)));
      for (int s = 0; s < 4; ++s) _mm256_storeu_si256((__m256i*)(dst + 32 * s), code_plane(v, s, mask3));
    }
  }
}

template <int MR>
void gemm_micro(const uint8_t codes[][kChunkBlocks * kBlockK], const int8_t* x, int64_t x_stride, int64_t len,
                int32_t* out, int64_t N, int64_t rows) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[MR][4];
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < 4; ++r) acc[i][r] = _mm256_setzero_si256();
  for (int64_t k = 0; k < len; k += 32) {
    __m256i c0 = _mm256_loadu_si256((const __m256i*)(codes[0] + k));
    __m256i c1 = _mm256_loadu_si256((const __m256i*)(codes[1] + k));
    __m256i c2 = _mm256_loadu_si256((const __m256i*)(codes[2] + k));
    __m256i c3 = _mm256_loadu_si256((const __m256i*)(codes[3] + k));
    for (int i = 0; i < MR; ++i) {
      __m256i xv = _mm256_loadu_si256((const __m256i*)(x + i * x_stride + k));
      acc[i][0] = _mm256_add_epi32(acc[i][0], _mm256_madd_epi16(_mm256_maddubs_epi16(c0, xv), ones));
      acc[i][1] = _mm256_add_epi32(acc[i][1], _mm256_madd_epi16(_mm256_maddubs_epi16(c1, xv), ones));
      acc[i][2] = _mm256_add_epi32(acc[i][2], _mm256_madd_epi16(_mm256_maddubs_epi16(c2, xv), ones));
      acc[i][3] = _mm256_add_epi32(acc[i][3], _mm256_madd_epi16(_mm256_maddubs_epi16(c3, xv), ones));
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int64_t r = 0; r < rows; ++r) out[i * N + r] += hsum_epi32(acc[i][r]);
}

void gemm_rows(const MatmulArgs& a, int64_t n0, int64_t n1) {
  alignas(64) uint8_t codes[kTileRows][kChunkBlocks * kBlockK];
  const int64_t Kp = a.KB * kBlockK;
  for (int64_t n = n0; n < n1; n += kTileRows) {
    const int64_t rows = rows_in_tile(a.N, n);
    for (int64_t m = 0; m < a.M; ++m)
      for (int64_t r = 0; r < rows; ++r) a.out[m * a.N + n + r] = -a.x_sum[m];
    for (int64_t kb0 = 0; kb0 < a.KB; kb0 += kChunkBlocks) {
      const int64_t nkb = a.KB - kb0 < kChunkBlocks ? a.KB - kb0 : kChunkBlocks;
      decode_chunk(a, n, kb0, nkb, codes);
      const int8_t* x = a.x + kb0 * kBlockK;
      int64_t m = 0;
      for (; m + 2 <= a.M; m += 2) gemm_micro<2>(codes, x + m * Kp, Kp, nkb * kBlockK, a.out + m * a.N + n, a.N, rows);
      if (m < a.M) gemm_micro<1>(codes, x + m * Kp, Kp, nkb * kBlockK, a.out + m * a.N + n, a.N, rows);
    }
  }
}

// Bit 2s of every byte is the low code bit of elements 32s..32s+31: shifting it to bit 7
// lets movemask gather it. Code 2 (w = +1) has the high bit, code 0 (w = -1) neither.
void weight_planes_avx2(const uint8_t* block, uint64_t pos[2], uint64_t neg[2]) {
  __m256i v = _mm256_loadu_si256((const __m256i*)block);
  uint32_t lo[4], hi[4];
  lo[0] = (uint32_t)_mm256_movemask_epi8(_mm256_slli_epi16(v, 7));
  hi[0] = (uint32_t)_mm256_movemask_epi8(_mm256_slli_epi16(v, 6));
  lo[1] = (uint32_t)_mm256_movemask_epi8(_mm256_slli_epi16(v, 5));
  hi[1] = (uint32_t)_mm256_movemask_epi8(_mm256_slli_epi16(v, 4));
  lo[2] = (uint32_t)_mm256_movemask_epi8(_mm256_slli_epi16(v, 3));
  hi[2] = (uint32_t)_mm256_movemask_epi8(_mm256_slli_epi16(v, 2));
  lo[3] = (uint32_t)_mm256_movemask_epi8(_mm256_slli_epi16(v, 1));
  hi[3] = (uint32_t)_mm256_movemask_epi8(v);
  for (int h = 0; h < 2; ++h) {
    uint64_t l = lo[2 * h] | ((uint64_t)lo[2 * h + 1] << 32);
    uint64_t p = hi[2 * h] | ((uint64_t)hi[2 * h + 1] << 32);
    pos[h] = p;
    neg[h] = ~(l | p);
  }
}

}  // namespace

void int8_matmul_avx2(const MatmulArgs& a, int64_t n0, int64_t n1) {
  if (a.M < 4) {
    const int64_t Kp = a.KB * kBlockK;
    for (int64_t m = 0; m < a.M; ++m) gemv_rows(a, a.x + m * Kp, a.x_sum[m], a.out + m * a.N, n0, n1);
  } else {
    gemm_rows(a, n0, n1);
  }
}

void popcount_matmul_avx2(const MatmulArgs& a, int64_t n0, int64_t n1) {
  popcount_matmul_generic(a, n0, n1, weight_planes_avx2);
}

}  // namespace cpu
}  // namespace agentforge
