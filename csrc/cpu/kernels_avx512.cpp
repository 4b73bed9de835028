// AVX-512 kernels: VNNI vpdpbusd (u8 code × s8 activation, int32 accumulation, no int16
// overflow window) and VPOPCNTDQ for the bit-serial path.
//
// Built with -DAF_SIMDE by tests/native/, this file compiles against SIMDe's portable
// implementations of the same intrinsics, so its logic is tested on CPUs without AVX-512.
#ifdef AF_SIMDE
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
#else
#include <immintrin.h>
#endif

#include "cpu/avx2_helpers.h"
#include "cpu/kernels.h"

namespace agentforge {
namespace cpu {
namespace {

constexpr int64_t kChunkBlocks = 32;

inline int32_t hsum512(__m512i v) {
  return hsum256(_mm256_add_epi32(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64(v, 1)));
}

// GEMV over one row tile. A tile stores the R rows of one K block back to back, so one
// 64-byte load holds two rows; the block's activations are broadcast to both halves.
template <int R>
void gemv_tile(const MatmulArgs& a, const int8_t* x, int32_t x_sum, int32_t* out, int64_t n) {
  constexpr int P = R / 2;  // row pairs in zmm registers; an odd last row uses a ymm
  const __m512i mask3 = _mm512_set1_epi8(3);
  const __m256i mask3y = _mm256_set1_epi8(3);
  const uint8_t* tile = a.w + block_offset(a.N, a.KB, n, 0);
  __m512i acc[P > 0 ? P : 1];
  __m256i acc_odd = _mm256_setzero_si256();
  for (int p = 0; p < P; ++p) acc[p] = _mm512_setzero_si512();
  for (int64_t kb = 0; kb < a.KB; ++kb) {
    const int8_t* xb = x + kb * kBlockK;
    const uint8_t* blk = tile + kb * R * kBlockBytes;
    __m256i xs[4];
    for (int s = 0; s < 4; ++s) xs[s] = _mm256_loadu_si256((const __m256i*)(xb + 32 * s));
    for (int p = 0; p < P; ++p) {
      __m512i v = _mm512_loadu_si512((const void*)(blk + 2 * p * kBlockBytes));
      for (int s = 0; s < 4; ++s) {
        __m512i c = _mm512_and_si512(_mm512_srli_epi16(v, 2 * s), mask3);
        acc[p] = _mm512_dpbusd_epi32(acc[p], c, _mm512_broadcast_i64x4(xs[s]));
      }
    }
    if (R % 2) {
      __m256i v = _mm256_loadu_si256((const __m256i*)(blk + (R - 1) * kBlockBytes));
      for (int s = 0; s < 4; ++s)
        acc_odd = _mm256_dpbusd_epi32(acc_odd, code_plane(v, s, mask3y), xs[s]);
    }
  }
  for (int p = 0; p < P; ++p) {
    out[n + 2 * p] = hsum256(_mm512_castsi512_si256(acc[p])) - x_sum;
    out[n + 2 * p + 1] = hsum256(_mm512_extracti64x4_epi64(acc[p], 1)) - x_sum;
  }
  if (R % 2) out[n + R - 1] = hsum256(acc_odd) - x_sum;
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

void decode_chunk(const MatmulArgs& a, int64_t n, int64_t kb0, int64_t nkb, uint8_t codes[][kChunkBlocks * kBlockK]) {
  const __m256i mask3 = _mm256_set1_epi8(3);
  const int64_t rows = rows_in_tile(a.N, n);
  for (int64_t r = 0; r < kTileRows; ++r) {
    for (int64_t kb = 0; kb < nkb; ++kb) {
      uint8_t* dst = codes[r] + kb * kBlockK;
      __m256i v = r < rows ? _mm256_loadu_si256((const __m256i*)(a.w + block_offset(a.N, a.KB, n + r, kb0 + kb)))
                           : _mm256_setzero_si256();
      for (int s = 0; s < 4; ++s)
        _mm256_storeu_si256((__m256i*)(dst + 32 * s), code_plane(v, s, mask3));
    }
  }
}

// acc[i][r] += Σ_k codes[r][k] · x[i][k]; len is a multiple of 128, so 64-byte steps never
// run past the chunk.
template <int MR>
void gemm_micro(const uint8_t codes[][kChunkBlocks * kBlockK], const int8_t* x, int64_t x_stride, int64_t len,
                int32_t acc_out[][kTileRows]) {
  __m512i acc[MR][4];
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < 4; ++r) acc[i][r] = _mm512_setzero_si512();
  for (int64_t k = 0; k < len; k += 64) {
    __m512i c0 = _mm512_loadu_si512((const void*)(codes[0] + k));
    __m512i c1 = _mm512_loadu_si512((const void*)(codes[1] + k));
    __m512i c2 = _mm512_loadu_si512((const void*)(codes[2] + k));
    __m512i c3 = _mm512_loadu_si512((const void*)(codes[3] + k));
    for (int i = 0; i < MR; ++i) {
      __m512i xv = _mm512_loadu_si512((const void*)(x + i * x_stride + k));
      acc[i][0] = _mm512_dpbusd_epi32(acc[i][0], c0, xv);
      acc[i][1] = _mm512_dpbusd_epi32(acc[i][1], c1, xv);
      acc[i][2] = _mm512_dpbusd_epi32(acc[i][2], c2, xv);
      acc[i][3] = _mm512_dpbusd_epi32(acc[i][3], c3, xv);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < 4; ++r) acc_out[i][r] += hsum512(acc[i][r]);
}

// Outputs of a tile for a block of activation rows are summed locally and written once, so
// threads on neighbouring tiles never share a cache line in the inner loop.
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
        const int64_t len = nkb * kBlockK;
        int64_t i = 0;
        for (; i + 4 <= mb; i += 4) gemm_micro<4>(codes, x + i * Kp, Kp, len, acc + i);
        switch (mb - i) {
          case 3: gemm_micro<3>(codes, x + i * Kp, Kp, len, acc + i); break;
          case 2: gemm_micro<2>(codes, x + i * Kp, Kp, len, acc + i); break;
          case 1: gemm_micro<1>(codes, x + i * Kp, Kp, len, acc + i); break;
          default: break;
        }
      }
      for (int64_t i = 0; i < mb; ++i)
        for (int64_t r = 0; r < rows; ++r) a.out[(m0 + i) * a.N + n + r] = acc[i][r];
    }
  }
}

}  // namespace

void int8_matmul_avx512(const MatmulArgs& a, int64_t n0, int64_t n1) {
  if (a.M < 4) {
    const int64_t Kp = a.KB * kBlockK;
    for (int64_t m = 0; m < a.M; ++m) gemv_rows(a, a.x + m * Kp, a.x_sum[m], a.out + m * a.N, n0, n1);
  } else {
    gemm_rows(a, n0, n1);
  }
}

// All activation bit-planes of a 64-element half fit one zmm (bits ≤ 8 lanes): one vpopcntq
// per weight plane counts every bit at once; the 2^b weights are applied once per output.
void popcount_matmul_avx512(const MatmulArgs& a, int64_t n0, int64_t n1) {
  const int bits = a.act_bits;
  const uint8_t lanes = (uint8_t)((1u << bits) - 1);  // a __mmask8
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t m = 0; m < a.M; ++m) {
      __m512i counts = _mm512_setzero_si512();
      for (int64_t kb = 0; kb < a.KB; ++kb) {
        uint64_t pos[2], neg[2];
        weight_planes_simd(a.w + block_offset(a.N, a.KB, n, kb), pos, neg);
        const uint64_t* xp = a.planes + (m * a.KB + kb) * 2 * bits;
        for (int h = 0; h < 2; ++h) {
          // planes is padded by 8 words (matmul.cpp), so the full load stays in bounds
          __m512i xv = _mm512_maskz_mov_epi64(lanes, _mm512_loadu_si512((const void*)(xp + h * bits)));
          __m512i pc = _mm512_popcnt_epi64(_mm512_and_si512(xv, _mm512_set1_epi64((long long)pos[h])));
          __m512i nc = _mm512_popcnt_epi64(_mm512_and_si512(xv, _mm512_set1_epi64((long long)neg[h])));
          counts = _mm512_add_epi64(counts, _mm512_sub_epi64(pc, nc));
        }
      }
      alignas(64) int64_t c[8];
      _mm512_store_si512((void*)c, counts);
      int64_t dot = 0;
      for (int b = 0; b < bits; ++b) dot += (b == bits - 1) ? -c[b] * (1LL << b) : c[b] * (1LL << b);
      a.out[m * a.N + n] = (int32_t)dot;
    }
  }
}

}  // namespace cpu
}  // namespace agentforge
