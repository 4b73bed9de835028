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

// acc + Σ4 u8·s8 per int32 lane. GCC 12 copies every accumulator twice around each
// _mm512_dpbusd_epi32 inside a loop (two register moves per multiply, which halved the GEMV
// rate); the inline-asm form lets it keep accumulators in place. SIMDe builds use the intrinsic.
#ifdef AF_SIMDE
inline __m512i dpbusd(__m512i acc, __m512i u8, __m512i s8) { return _mm512_dpbusd_epi32(acc, u8, s8); }
inline __m256i dpbusd(__m256i acc, __m256i u8, __m256i s8) { return _mm256_dpbusd_epi32(acc, u8, s8); }
#else
inline __m512i dpbusd(__m512i acc, __m512i u8, __m512i s8) {
  __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u8), "v"(s8));
  return acc;
}
inline __m256i dpbusd(__m256i acc, __m256i u8, __m256i s8) {
  __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u8), "v"(s8));
  return acc;
}
#endif

inline int32_t hsum512(__m512i v) {
  return hsum256(_mm256_add_epi32(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64(v, 1)));
}

// c0 + c1/4 + c2/16 + c3/64 for the mask-decoded code planes of gemv_tiles; exact, because
// each plane's accumulator only ever holds multiples of its scale.
inline __m256i combine_planes(const __m256i c[4]) {
  return _mm256_add_epi32(_mm256_add_epi32(c[0], _mm256_srai_epi32(c[1], 2)),
                          _mm256_add_epi32(_mm256_srai_epi32(c[2], 4), _mm256_srai_epi32(c[3], 6)));
}

inline __m512i combine_planes(const __m512i c[4]) {
#ifdef AF_SIMDE  // SIMDe 0.7 has no _mm512_srai_epi32: combine each 256-bit half
  __m256i lo[4], hi[4];
  for (int s = 0; s < 4; ++s) {
    lo[s] = _mm512_castsi512_si256(c[s]);
    hi[s] = _mm512_extracti64x4_epi64(c[s], 1);
  }
  return _mm512_inserti64x4(_mm512_castsi256_si512(combine_planes(lo)), combine_planes(hi), 1);
#else
  return _mm512_add_epi32(_mm512_add_epi32(c[0], _mm512_srai_epi32(c[1], 2)),
                          _mm512_add_epi32(_mm512_srai_epi32(c[2], 4), _mm512_srai_epi32(c[3], 6)));
#endif
}

// Row sums of four row-pair vectors (lanes 0-7: row 2q, lanes 8-15: row 2q + 1), returned
// as rows 0..7 in order: a transposing reduction, 7 adds and shuffles instead of 8 hsums.
inline __m256i row_sums(const __m512i s[4]) {
  // per 128-bit chunk: [Σ s0, Σ s1, Σ s2, Σ s3] over that chunk's four lanes
  const __m512i a01 = _mm512_add_epi32(_mm512_unpacklo_epi32(s[0], s[1]), _mm512_unpackhi_epi32(s[0], s[1]));
  const __m512i a23 = _mm512_add_epi32(_mm512_unpacklo_epi32(s[2], s[3]), _mm512_unpackhi_epi32(s[2], s[3]));
  const __m512i b = _mm512_add_epi32(_mm512_unpacklo_epi64(a01, a23), _mm512_unpackhi_epi64(a01, a23));
  // chunks 0 + 1 hold the even rows 0, 2, 4, 6; chunks 2 + 3 the odd rows
  const __m512i c = _mm512_add_epi32(b, _mm512_shuffle_i32x4(b, b, _MM_SHUFFLE(2, 3, 0, 1)));
  const __m512i order = _mm512_setr_epi32(0, 8, 1, 9, 2, 10, 3, 11, 0, 0, 0, 0, 0, 0, 0, 0);
  return _mm512_castsi512_si256(_mm512_permutexvar_epi32(order, c));
}

// GEMV over T consecutive row tiles of R rows each (T > 1 only for full tiles, R = 4). A tile
// stores the R rows of one K block back to back, so one 64-byte load holds two rows; the
// block's activations are broadcast to both halves and shared by every tile of the call.
// Codes are decoded by masks alone: byte & 0x03 is code c0, & 0x0C is 4·c1, & 0x30 is 16·c2
// and & 0xC0 is 64·c3 (elements 0..31, 32..63, 64..95, 96..127 of the block), each
// multiplied into its own accumulator, which is divided back (exactly) at the end: 4 ands
// and 4 vpdpbusd per 256 weights, no shifts. Bound: the 64· accumulator gains at most
// 4·128·128 per block and lane, so it stays inside int32 for K < 2^21 (checked in matmul.cpp).
template <int T, int R>
void gemv_tiles(const MatmulArgs& a, const int8_t* x, int32_t x_sum, int32_t* out, int64_t n) {
  constexpr int P = R / 2;  // row pairs per tile in zmm registers; an odd last row uses a ymm
  constexpr bool odd = R % 2;
  const __m512i mask[4] = {_mm512_set1_epi8(0x03), _mm512_set1_epi8(0x0C), _mm512_set1_epi8(0x30),
                           _mm512_set1_epi8((char)0xC0)};
  const uint8_t* tile[T];
  for (int t = 0; t < T; ++t) tile[t] = a.w + block_offset(a.N, a.KB, n + t * kTileRows, 0);
  __m512i acc[T * P > 0 ? T * P : 1][4];
  __m256i acc_odd[4];
  for (int p = 0; p < T * P; ++p)
    for (int s = 0; s < 4; ++s) acc[p][s] = _mm512_setzero_si512();
  for (int s = 0; s < 4; ++s) acc_odd[s] = _mm256_setzero_si256();
  for (int64_t kb = 0; kb < a.KB; ++kb) {
    __m512i xs[4];
    for (int s = 0; s < 4; ++s)
      xs[s] = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i*)(x + kb * kBlockK + 32 * s)));
    for (int t = 0; t < T; ++t)
      for (int p = 0; p < P; ++p) {
        const __m512i v = _mm512_loadu_si512((const void*)(tile[t] + (kb * R + 2 * p) * kBlockBytes));
        for (int s = 0; s < 4; ++s) acc[t * P + p][s] = dpbusd(acc[t * P + p][s], _mm512_and_si512(v, mask[s]), xs[s]);
      }
    if (odd) {
      const __m256i v = _mm256_loadu_si256((const __m256i*)(tile[0] + (kb * R + R - 1) * kBlockBytes));
      for (int s = 0; s < 4; ++s)
        acc_odd[s] = dpbusd(acc_odd[s], _mm256_and_si256(v, _mm512_castsi512_si256(mask[s])),
                            _mm512_castsi512_si256(xs[s]));
    }
  }
  // Undo the plane scales, then sum the 8 lanes of each row for all pairs at once.
  __m512i pair_sums[4];
  for (int q = 0; q < 4; ++q) pair_sums[q] = q < T * P ? combine_planes(acc[q]) : _mm512_setzero_si512();
  alignas(32) int32_t rows[8];
  _mm256_store_si256((__m256i*)rows, _mm256_sub_epi32(row_sums(pair_sums), _mm256_set1_epi32(x_sum)));
  for (int r = 0; r < 2 * T * P; ++r) out[n + r] = rows[r];
  if (odd) out[n + R - 1] = hsum256(combine_planes(acc_odd)) - x_sum;
}

void gemv_rows(const MatmulArgs& a, const int8_t* x, int32_t x_sum, int32_t* out, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + 2 * kTileRows <= n1; n += 2 * kTileRows) gemv_tiles<2, 4>(a, x, x_sum, out, n);
  for (; n < n1; n += kTileRows) {
    switch (rows_in_tile(a.N, n)) {
      case 4: gemv_tiles<1, 4>(a, x, x_sum, out, n); break;
      case 3: gemv_tiles<1, 3>(a, x, x_sum, out, n); break;
      case 2: gemv_tiles<1, 2>(a, x, x_sum, out, n); break;
      default: gemv_tiles<1, 1>(a, x, x_sum, out, n); break;
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
      acc[i][0] = dpbusd(acc[i][0], c0, xv);
      acc[i][1] = dpbusd(acc[i][1], c1, xv);
      acc[i][2] = dpbusd(acc[i][2], c2, xv);
      acc[i][3] = dpbusd(acc[i][3], c3, xv);
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
