// AVX2 kernels: vpmaddubsw (u8 code × s8 activation) with int16 partial sums widened to
// int32 before they can overflow; codes are decoded in registers with shifts and masks.
#include <immintrin.h>

#include "cpu/avx2_helpers.h"
#include "cpu/kernels.h"
#include "cpu/popcount_impl.h"

namespace agentforge {
namespace cpu {
namespace {

constexpr int64_t kChunkBlocks = 32;  // GEMM: K chunk decoded at once (4 rows × 4 KiB)

// GEMV over one row tile, codes decoded in registers. Masking a packed byte with 0x03 gives
// code c0, with 0x0C gives 4·c1 (no shift needed); after one shift by 4 the same two masks
// give c2 and 4·c3. The 4× terms go to their own int16 accumulator, divided by 4 (exact)
// when it is widened: 13 instructions per 128 weights instead of 16 with a shift per code.
// Bounds: a low-accumulator lane gains at most 2·2·(2·128) = 1024 per block, a high one
// 4096, so both stay inside int16 for kInt16Blocks = 7 blocks.
constexpr int64_t kInt16Blocks = 7;

template <int R>
void gemv_tile(const MatmulArgs& a, const int8_t* x, int32_t x_sum, int32_t* out, int64_t n) {
  const __m256i m03 = _mm256_set1_epi8(0x03), m0c = _mm256_set1_epi8(0x0C);
  const __m256i ones = _mm256_set1_epi16(1);
  const uint8_t* tile = a.w + block_offset(a.N, a.KB, n, 0);
  __m256i acc32[R];
  for (int r = 0; r < R; ++r) acc32[r] = _mm256_setzero_si256();
  for (int64_t kb0 = 0; kb0 < a.KB; kb0 += kInt16Blocks) {
    const int64_t kb1 = a.KB - kb0 < kInt16Blocks ? a.KB : kb0 + kInt16Blocks;
    __m256i lo[R], hi[R];
    for (int r = 0; r < R; ++r) lo[r] = hi[r] = _mm256_setzero_si256();
    for (int64_t kb = kb0; kb < kb1; ++kb) {
      const __m256i* xb = (const __m256i*)(x + kb * kBlockK);
      const __m256i x0 = _mm256_loadu_si256(xb), x1 = _mm256_loadu_si256(xb + 1);
      const __m256i x2 = _mm256_loadu_si256(xb + 2), x3 = _mm256_loadu_si256(xb + 3);
      const uint8_t* blk = tile + kb * R * kBlockBytes;
      for (int r = 0; r < R; ++r) {
        const __m256i v = _mm256_loadu_si256((const __m256i*)(blk + r * kBlockBytes));
        const __m256i v4 = _mm256_srli_epi16(v, 4);
        lo[r] = _mm256_add_epi16(lo[r], _mm256_add_epi16(_mm256_maddubs_epi16(_mm256_and_si256(v, m03), x0),
                                                         _mm256_maddubs_epi16(_mm256_and_si256(v4, m03), x2)));
        hi[r] = _mm256_add_epi16(hi[r], _mm256_add_epi16(_mm256_maddubs_epi16(_mm256_and_si256(v, m0c), x1),
                                                         _mm256_maddubs_epi16(_mm256_and_si256(v4, m0c), x3)));
      }
    }
    for (int r = 0; r < R; ++r)
      acc32[r] = _mm256_add_epi32(acc32[r], _mm256_add_epi32(_mm256_madd_epi16(lo[r], ones),
                                                             _mm256_srai_epi32(_mm256_madd_epi16(hi[r], ones), 2)));
  }
  for (int r = 0; r < R; ++r) out[n + r] = hsum256(acc32[r]) - x_sum;
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

// One vpmaddubsw lane is at most 2 · 2 · 128 = 512, so 32 of them (one window) fit int16.
constexpr int64_t kInt16Window = 32 * 32;

// acc[i][r] += Σ_k codes[r][k] · x[i][k] for MR activation rows and the 4 code rows.
template <int MR>
void gemm_micro(const uint8_t codes[][kChunkBlocks * kBlockK], const int8_t* x, int64_t x_stride, int64_t len,
                int32_t acc[][kTileRows]) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc32[MR][4];
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < 4; ++r) acc32[i][r] = _mm256_setzero_si256();
  for (int64_t k0 = 0; k0 < len; k0 += kInt16Window) {
    const int64_t k1 = len - k0 < kInt16Window ? len : k0 + kInt16Window;
    __m256i acc16[MR][4];
    for (int i = 0; i < MR; ++i)
      for (int r = 0; r < 4; ++r) acc16[i][r] = _mm256_setzero_si256();
    for (int64_t k = k0; k < k1; k += 32) {
      __m256i c0 = _mm256_loadu_si256((const __m256i*)(codes[0] + k));
      __m256i c1 = _mm256_loadu_si256((const __m256i*)(codes[1] + k));
      __m256i c2 = _mm256_loadu_si256((const __m256i*)(codes[2] + k));
      __m256i c3 = _mm256_loadu_si256((const __m256i*)(codes[3] + k));
      for (int i = 0; i < MR; ++i) {
        __m256i xv = _mm256_loadu_si256((const __m256i*)(x + i * x_stride + k));
        acc16[i][0] = _mm256_add_epi16(acc16[i][0], _mm256_maddubs_epi16(c0, xv));
        acc16[i][1] = _mm256_add_epi16(acc16[i][1], _mm256_maddubs_epi16(c1, xv));
        acc16[i][2] = _mm256_add_epi16(acc16[i][2], _mm256_maddubs_epi16(c2, xv));
        acc16[i][3] = _mm256_add_epi16(acc16[i][3], _mm256_maddubs_epi16(c3, xv));
      }
    }
    for (int i = 0; i < MR; ++i)
      for (int r = 0; r < 4; ++r) acc32[i][r] = _mm256_add_epi32(acc32[i][r], _mm256_madd_epi16(acc16[i][r], ones));
  }
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < 4; ++r) acc[i][r] += hsum256(acc32[i][r]);
}

// Each tile's outputs for a block of activation rows are summed in a local buffer and
// written once, so threads working on neighbouring tiles never share a cache line in the
// inner loop.
constexpr int64_t kRowBlock = 64;

void gemm_rows(const MatmulArgs& a, int64_t n0, int64_t n1) {
  alignas(64) uint8_t codes[kTileRows][kChunkBlocks * kBlockK];
  int32_t acc[kRowBlock][kTileRows];
  const int64_t Kp = a.KB * kBlockK;
  for (int64_t n = n0; n < n1; n += kTileRows) {
    const int64_t rows = rows_in_tile(a.N, n);
    for (int64_t m0 = 0; m0 < a.M; m0 += kRowBlock) {
      const int64_t mb = a.M - m0 < kRowBlock ? a.M - m0 : kRowBlock;
      for (int64_t i = 0; i < mb; ++i)
        for (int64_t r = 0; r < kTileRows; ++r) acc[i][r] = -a.x_sum[m0 + i];
      for (int64_t kb0 = 0; kb0 < a.KB; kb0 += kChunkBlocks) {
        const int64_t nkb = a.KB - kb0 < kChunkBlocks ? a.KB - kb0 : kChunkBlocks;
        decode_chunk(a, n, kb0, nkb, codes);
        const int8_t* x = a.x + m0 * Kp + kb0 * kBlockK;
        int64_t i = 0;
        for (; i + 2 <= mb; i += 2) gemm_micro<2>(codes, x + i * Kp, Kp, nkb * kBlockK, acc + i);
        if (i < mb) gemm_micro<1>(codes, x + i * Kp, Kp, nkb * kBlockK, acc + i);
      }
      for (int64_t i = 0; i < mb; ++i)
        for (int64_t r = 0; r < rows; ++r) a.out[(m0 + i) * a.N + n + r] = acc[i][r];
    }
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
  popcount_matmul_generic(a, n0, n1, weight_planes_simd);
}

}  // namespace cpu
}  // namespace agentforge
